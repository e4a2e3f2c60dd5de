"""Publishing the demo as a Hugging Face Space (decd.hub.publish_space, scripts/push_space.py), against the
loopback Hub stand-in (tests/hub_stub.py): no network."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from decd.hub import CODE_FILES, publish_space, stage_space

from .hub_stub import HubStub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    with HubStub(tmp_path_factory.mktemp("hub-stub")) as stub, stub.patched(home=home):
        yield stub


def _header(readme: bytes) -> dict:
    text = readme.decode("utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_publish_space_uploads_a_runnable_gradio_space(hub):
    url = publish_space("org/decd-demo", "org/decd-tiny")
    assert url == f"{hub.url}/spaces/org/decd-demo"
    files = hub.files("org/decd-demo", repo_type="space")
    for name in ("app.py",) + CODE_FILES:
        assert files[name] == (REPO / name).read_bytes()
    assert files["decd/search/__init__.py"] == (REPO / "decd" / "search" / "__init__.py").read_bytes()
    assert "decd/__init__.py" in files and "decd/hub/published_results.json" in files
    assert not any("__pycache__" in name for name in files)
    header = _header(files["README.md"])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py" and header["sdk_version"].startswith("6.")
    assert header["title"] and header["models"] == ["org/decd-tiny"]
    assert json.loads(files["space_config.json"]) == {"model": "org/decd-tiny"}  # gallery: the synthetic default
    requirements = files["requirements.txt"].decode()
    assert "gradio>=6.0,<7" in requirements and "torch" in requirements
    # updating the same Space is a new commit, not an error
    assert publish_space("org/decd-demo", "org/decd-tiny", title="Another title") == url
    assert _header(hub.files("org/decd-demo", repo_type="space")["README.md"])["title"] == "Another title"


def test_publish_space_copies_a_local_gallery(hub, tmp_path):
    crops = tmp_path / "crops"
    (crops / "cam1").mkdir(parents=True)
    (crops / "cam1" / "a.png").write_bytes(b"png bytes")
    publish_space("org/with-gallery", "org/decd-tiny", gallery=crops)
    files = hub.files("org/with-gallery", repo_type="space")
    assert files["gallery/cam1/a.png"] == b"png bytes"
    assert json.loads(files["space_config.json"]) == {"model": "org/decd-tiny", "gallery": "gallery"}


def test_staged_space_config_is_what_app_reads(tmp_path):
    import app

    stage_space(tmp_path, "org/space", "org/decd-tiny", gallery="/data/crops")
    assert app.space_config(tmp_path) == {"model": "org/decd-tiny", "gallery": "/data/crops"}


def test_push_space_script(hub, tmp_path):
    completed = subprocess.run([sys.executable, str(REPO / "scripts" / "push_space.py"), "--space", "org/scripted",
                                "--model", "org/decd-tiny"], capture_output=True, text=True, timeout=300,
                               env=hub.environment(tmp_path))
    assert completed.returncode == 0, completed.stderr
    assert f"{hub.url}/spaces/org/scripted" in completed.stdout
    assert "app.py" in hub.files("org/scripted", repo_type="space")
