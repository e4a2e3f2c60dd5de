"""The demo app as a Hugging Face Space: `stage_space` writes the Space's files, `publish_space` uploads them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import HfApi

from .card import PAPER_URL
from .publish import CODE_FILES, _repo_root

SPACE_APP_FILES = ("app.py",) + CODE_FILES
SPACE_CONFIG_FILE = "space_config.json"  # read by app.py: the model id and gallery folder to use
SPACE_GALLERY_FOLDER = "gallery"
DEFAULT_GRADIO_VERSION = "6.31.0"


def _gradio_version() -> str:
    try:
        from importlib.metadata import version

        return version("gradio")
    except Exception:  # gradio not installed here: the version the app was tested with
        return DEFAULT_GRADIO_VERSION


def build_space_readme(space_id: str, model_id: str, gallery_note: str, title: str = "DECD person search",
                       sdk_version: str | None = None) -> str:
    """The Space's README.md: the metadata header Spaces read (sdk, sdk_version, app_file, ...) and a short body."""
    header = {
        "title": title,
        "emoji": "🚶",
        "colorFrom": "blue",
        "colorTo": "green",
        "sdk": "gradio",
        "sdk_version": sdk_version or _gradio_version(),
        "python_version": "3.11",
        "app_file": "app.py",
        "pinned": False,
        "license": "apache-2.0",
        "models": [model_id] if "/" in model_id and not os.path.isabs(model_id) else [],
        "tags": ["text-based-person-search", "person-retrieval", "re-identification", "clip", "decd"],
        "short_description": "Find a person in a gallery of crops by description or photo",
    }
    import yaml

    return (f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n"
            f"Text-based person search with [DECD]({PAPER_URL}) (a CLIP dual encoder): describe a pedestrian "
            f"and press Enter, or drop a photo of the person, and the gallery is ranked by cosine similarity.\n\n"
            f"- Model: `{model_id}`\n- Gallery: {gallery_note}\n\n"
            f"Published with `python scripts/push_space.py --space {space_id} --model {model_id}` "
            f"(`decd.hub.publish_space`). The model and gallery are set in `{SPACE_CONFIG_FILE}`; the "
            f"variables `DECD_MODEL` / `DECD_GALLERY` in the Space's settings override them.\n")


def stage_space(folder: str | os.PathLike, space_id: str, model_id: str, gallery: str | os.PathLike | None = None,
                title: str = "DECD person search", sdk_version: str | None = None) -> Path:
    """Write everything a Space needs into `folder`: app.py, the flat model modules, the `decd` package,
    requirements.txt (from requirements-app.txt), README.md with the Space header, `space_config.json`
    (model id, gallery) and, when `gallery` is a local folder (crops or an index), a copy of it under
    `gallery/`. Without `gallery` the Space searches the synthetic benchmark's test split (generated at
    start-up, offline)."""
    import shutil

    root, folder = _repo_root(), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPACE_APP_FILES:
        shutil.copy2(root / name, folder / name)
    shutil.copytree(root / "decd", folder / "decd", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    requirements = (root / "requirements-app.txt").read_text()
    (folder / "requirements.txt").write_text(requirements + "matplotlib>=3.7\n")
    config = {"model": str(model_id)}
    if gallery is not None and Path(gallery).is_dir():
        shutil.copytree(gallery, folder / SPACE_GALLERY_FOLDER, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("partial"))
        config["gallery"] = SPACE_GALLERY_FOLDER
        gallery_note = f"the {sum(1 for _ in (folder / SPACE_GALLERY_FOLDER).rglob('*') if _.is_file())} files of " \
                       f"`{SPACE_GALLERY_FOLDER}/` (copied from {Path(gallery).name})"
    elif gallery is not None:  # a path on the Space's machine (e.g. persistent storage /data/crops)
        config["gallery"] = str(gallery)
        gallery_note = f"`{gallery}` on the Space's machine"
    else:
        gallery_note = ("the synthetic benchmark's test split (400 generated crops of 100 people, made at start-up; "
                        "examples are its captions)")
    (folder / SPACE_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    (folder / "README.md").write_text(build_space_readme(space_id, str(model_id), gallery_note, title, sdk_version))
    return folder


def publish_space(space_id: str, model_id: str, gallery: str | os.PathLike | None = None, private: bool = False,
                  token: str | None = None, title: str = "DECD person search",
                  commit_message: str = "Upload DECD person-search demo") -> str:
    """Create (or update) a Gradio Space running app.py with `model_id` (a Hub id) and `gallery`; returns its URL.

    One commit: `stage_space`'s folder, uploaded with `HfApi.upload_folder` after
    `HfApi.create_repo(repo_type="space", space_sdk="gradio", exist_ok=True)`.
    """
    import tempfile

    api = HfApi(token=token)  # built now so that it uses the current endpoint (HF_ENDPOINT)
    repo_url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="decd-space-") as folder:
        stage_space(folder, repo_url.repo_id, model_id, gallery, title)
        api.upload_folder(folder_path=folder, repo_id=repo_url.repo_id, repo_type="space",
                          commit_message=commit_message)
    return str(repo_url)


__all__ = ["build_space_readme", "publish_space", "stage_space"]
