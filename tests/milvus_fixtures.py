"""Milvus engines and a gallery with metadata for the Milvus tests (test_search_milvus.py, and the Milvus tests of
test_cli.py, test_pipeline.py, test_app.py and test_handler.py).

- `milvus_server`: a real Milvus standalone server (the PyPI `milvus` package) on 127.0.0.1, started once per
  test session in a temporary data folder and stopped at the end by its own process id. If it cannot start,
  the tests that use it fail with the server's log tail; they never skip. It asks for credentials: its token is
  in $DECD_MILVUS_TOKEN while it runs, as a user would give it (the app and the handler read only that).
- `milvus_gallery`: a tiny saved model, a second one, a synthetic gallery of 12 crops, a metadata CSV
  (camera, timestamp, score per crop) and the local exact index of that gallery (`GalleryIndex.build`),
  the reference every Milvus result is compared with.
"""

import csv
import os
import re
import shutil
from pathlib import Path

import pytest

from decd.search import GalleryIndex, MilvusStoreError
from decd.search.milvus import TOKEN_ENV, LocalMilvusServer
from decd.synthetic import generate_synthetic_person_search
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import save_tiny_model

QUERIES = ["a man in a red shirt and blue trousers", "a woman with a black bag", "a person in white shoes"]
CAMERAS = ("c1", "c2", "c3")
FIRST_TIMESTAMP = 1_700_000_000

# One server per session, whichever test module asks first (a fixture imported into several modules is a
# separate fixture in each; they share this one and the first teardown stops it).
_SERVER: dict = {}


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    if "server" not in _SERVER:
        server = LocalMilvusServer(tmp_path_factory.mktemp("milvus-server"))
        try:
            server.start()
        except MilvusStoreError as error:
            pytest.fail(f"the Milvus standalone server did not start: {error}", pytrace=False)
        _SERVER["server"] = server
        _SERVER["token"] = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = server.token
    yield _SERVER["server"]
    server = _SERVER.pop("server", None)
    if server is not None:
        process = server.process
        server.stop()
        assert process.poll() is not None  # the launcher is gone (and its session was killed with it)
        token = _SERVER.pop("token", None)
        if token is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = token


def write_metadata(path: Path, paths, timestamps=None, cameras=None) -> Path:
    """A metadata CSV: per image, a camera (c1, c2, c3 in turn), a timestamp and a float score."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "camera", "timestamp", "score"])
        for number, image in enumerate(paths):
            camera = (cameras or {}).get(image, CAMERAS[number % 3])
            timestamp = (timestamps or {}).get(image, FIRST_TIMESTAMP + 10 * number)
            writer.writerow([image, camera, timestamp, f"{number / 4:.2f}"])
    return path


def read_metadata_rows(path: Path) -> dict:
    with open(path, newline="") as file:
        return {row["path"]: row for row in csv.DictReader(file)}


@pytest.fixture(scope="module")
def milvus_gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("milvus-gallery")
    model_dir, other_dir = save_tiny_model(root / "model", 0), save_tiny_model(root / "other-model", 1)
    gallery = generate_synthetic_person_search(root / "synthetic", num_train_ids=1, num_val_ids=1, num_test_ids=2,
                                               images_per_id=3, progress=False) / "imgs"
    model = DecdModel.from_pretrained(model_dir).eval()
    processor = DecdProcessor.from_pretrained(model_dir)
    index = GalleryIndex.build(model, processor, gallery, root / "index", batch_size=4, show_progress=False)
    metadata = write_metadata(root / "crops.csv", index.paths)
    return dict(root=root, model_dir=model_dir, other_dir=other_dir, gallery=gallery, model=model,
                processor=processor, index=index, metadata=metadata)


def collection_name(request) -> str:
    """A collection name of the running test (its name made a valid Milvus name)."""
    return ("t_" + re.sub(r"[^A-Za-z0-9_]", "_", request.node.name))[:200]


def store_uri(engine: str, request, tmp_path) -> str:
    """A collection of its own for the running test: a fresh Milvus Lite store, or a new collection on the server."""
    if engine == "lite":
        return f"{tmp_path / 'gallery.db'}/{collection_name(request)}"
    server = request.getfixturevalue("milvus_server")
    return f"{server.uri}/{collection_name(request)}"


def copy_gallery(gallery: Path, target: Path) -> Path:
    shutil.copytree(gallery, target)
    return target
