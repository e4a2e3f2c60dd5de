"""Galleries, models and helpers shared by the search tests (test_search_*.py, test_cli.py, test_pipeline.py,
test_handler.py). A test module imports the fixtures it uses; each module builds its own (scope="module").

Two fixtures are called `setup` (their tests were written against that name): `photo_gallery`, a synthetic
gallery of 12 crops with its index and a second model, and `five_images`, a tiny model and 5 random PNGs.
A module imports one of them at most.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from decd.search import GalleryIndex
from decd.synthetic import generate_synthetic_person_search
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import save_tiny_model, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _make_model(folder: Path, seed: int) -> Path:
    return save_tiny_model(folder, seed)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny model, a second (different) one, and a synthetic gallery with one corrupt file."""
    root = tmp_path_factory.mktemp("search")
    model_dir = _make_model(root / "model", seed=0)
    other_model_dir = _make_model(root / "other-model", seed=1)
    data = generate_synthetic_person_search(root / "synthetic", num_train_ids=2, num_val_ids=1, num_test_ids=2,
                                            images_per_id=2, progress=False)
    gallery = data / "imgs"
    (gallery / "bad.png").write_bytes(b"this is not a png" * 20)
    model = DecdModel.from_pretrained(model_dir).eval()
    processor = DecdProcessor.from_pretrained(model_dir)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image"):
        index = GalleryIndex.build(model, processor, gallery, root / "index", batch_size=4, show_progress=False)
    return dict(root=root, model_dir=model_dir, other_model_dir=other_model_dir, gallery=gallery, model=model,
                processor=processor, index=index)


def _count_images(gallery: Path) -> int:
    return sum(1 for path in gallery.rglob("*.png") if path.name != "bad.png")


@pytest.fixture(scope="module", name="setup")
def photo_gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("by-image")
    model_dir, other_dir = _make_model(root / "model", 0), _make_model(root / "other", 1)
    gallery = generate_synthetic_person_search(root / "synthetic", num_train_ids=1, num_val_ids=1, num_test_ids=2,
                                               images_per_id=3, progress=False) / "imgs"
    model = DecdModel.from_pretrained(model_dir).eval()
    processor = DecdProcessor.from_pretrained(model_dir)
    index = GalleryIndex.build(model, processor, gallery, root / "index", batch_size=4, show_progress=False)
    return dict(root=root, model_dir=model_dir, other_dir=other_dir, gallery=gallery, model=model,
                processor=processor, index=index)


@pytest.fixture(scope="module", name="setup")
def five_images(tmp_path_factory):
    """A saved tiny model and a gallery of 5 small PNGs."""
    root = tmp_path_factory.mktemp("safety")
    torch.manual_seed(0)
    model = DecdModel(tiny_config()).eval()
    processor = DecdProcessor(image_size=(128, 64))
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    gallery = root / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for number in range(5):
        Image.fromarray(rng.integers(0, 255, (96, 48, 3), dtype=np.uint8)).save(gallery / f"{number}.png")
    return dict(root=root, model=model, processor=processor, gallery=gallery, model_dir=root / "model")


@pytest.fixture
def built(setup, tmp_path):
    _build(setup, tmp_path / "index")
    return tmp_path / "index"


def _build(setup, output, gallery=None, **options):
    return GalleryIndex.build(setup["model"], setup["processor"], gallery or setup["gallery"], output,
                              batch_size=2, show_progress=False, model_id=str(setup["model_dir"]), **options)


def _snapshot(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


@pytest.fixture(scope="module")
def gallery_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    DecdModel(tiny_config()).save_pretrained(root / "model")
    DecdProcessor(image_size=(128, 64)).save_pretrained(root / "model")
    data = generate_synthetic_person_search(root / "synthetic", num_train_ids=3, num_val_ids=1, num_test_ids=2,
                                            images_per_id=2, progress=False)
    gallery = data / "imgs"
    (gallery / "bad.png").write_bytes(b"this is not a png" * 20)
    return root, gallery, root / "model"


def _index_command(gallery, model, output, *extra):
    return ["index", str(gallery), "--model", str(model), "--output", str(output), "--batch_size", "3", "--quiet",
            *extra]


def _brute_force(queries: torch.Tensor, gallery: np.ndarray, top_k: int):
    scores = F.normalize(queries.float(), dim=-1).numpy() @ np.asarray(gallery).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(scores, order, axis=1)


def _table_paths(output: str) -> list[str]:
    """The path column of the result table(s) printed by `decd-search query`."""
    rows = [line.split() for line in output.splitlines()]
    return [row[3] for row in rows if len(row) == 4 and row[0].isdigit()]


def _direct(model, processor, gallery, paths, query):
    with torch.no_grad():
        pixels = processor(images=[Image.open(gallery / path).convert("RGB") for path in paths],
                           return_tensors="pt")["pixel_values"]
        keys = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        one = processor(images=[Image.open(query).convert("RGB")], return_tensors="pt")["pixel_values"]
        query = F.normalize(model.get_image_features(pixel_values=one).pooler_output, dim=-1)
    scores = (query @ keys.T)[0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [paths[i] for i in order], [float(scores[i]) for i in order]
