"""Tests of decd.search (gallery index), decd.cli (`decd-search`) and decd.pipeline (transformers pipeline)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from decd.cli import main
from decd.search import (
    BuildInterrupted,
    GalleryIndex,
    GalleryIndexError,
    IndexNotFoundError,
    StaleIndexError,
    exact_top_k,
    list_images,
    model_checksum,
)
from decd.synthetic import generate_synthetic_person_search
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import save_tiny_model

QUERY = "a man in a red shirt and blue trousers"


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


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------


def test_build_skips_and_reports_corrupt_file(workspace):
    index, gallery = workspace["index"], workspace["gallery"]
    num_images = _count_images(gallery)
    assert len(index) == num_images
    assert [item["path"] for item in index.skipped] == ["bad.png"]
    assert "bad.png" not in index.paths
    assert index.paths == sorted(index.paths)

    folder = workspace["root"] / "index"
    assert sorted(path.name for path in folder.iterdir()) == ["embeddings.npy", "meta.json", "paths.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["count"] == num_images and meta["num_skipped"] == 1 and meta["num_files"] == num_images + 1
    assert meta["model_checksum"] == model_checksum(workspace["model"])
    assert meta["model_id"] == str(workspace["model_dir"].resolve())
    assert meta["embedding_dim"] == 16 and meta["image_size"] == [128, 64]
    assert meta["created"].endswith("+00:00")

    loaded = GalleryIndex.load(folder)
    assert loaded.paths == index.paths
    np.testing.assert_array_equal(np.asarray(loaded.embeddings), np.asarray(index.embeddings))
    assert loaded.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings, axis=1), 1.0, atol=1e-5)


def test_embeddings_are_the_model_s_normalised_image_features(workspace):
    index, model, processor = workspace["index"], workspace["model"], workspace["processor"]
    images = [Image.open(workspace["gallery"] / path).convert("RGB") for path in index.paths[:3]]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).pooler_output
    np.testing.assert_allclose(np.asarray(index.embeddings[:3]), F.normalize(features, dim=-1).numpy(), atol=1e-5)


def test_checksum_survives_save_load_and_detaching_the_decoder(workspace, tmp_path):
    model = workspace["model"]
    reloaded = DecdModel.from_pretrained(workspace["model_dir"])
    assert model_checksum(reloaded) == model_checksum(model)
    assert model_checksum(DecdModel.from_pretrained(workspace["model_dir"]).detach_decoder()) == model_checksum(model)
    assert model_checksum(DecdModel.from_pretrained(workspace["other_model_dir"])) != model_checksum(model)


def test_empty_and_missing_folders_give_clear_errors(workspace, tmp_path):
    model, processor = workspace["model"], workspace["processor"]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(GalleryIndexError, match="no images found under"):
        GalleryIndex.build(model, processor, empty, tmp_path / "index", show_progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GalleryIndex.build(model, processor, tmp_path / "missing", tmp_path / "index", show_progress=False)
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        GalleryIndex.load(tmp_path / "no-index")
    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(GalleryIndexError, match="none of the 1 image files"):
        GalleryIndex.build(model, processor, only_bad, tmp_path / "index2", show_progress=False)


def test_listing_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ["b/2.PNG", "a/1.jpg", "a/0.webp", "c.txt", "z.JPEG"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_images(tmp_path) == ["a/0.webp", "a/1.jpg", "b/2.PNG", "z.JPEG"]


class _FailingProcessor:
    """Wraps a processor and raises on its `fail_at`-th image batch (1-based), like a crash mid-build."""

    def __init__(self, processor, fail_at=None):
        self.processor, self.fail_at, self.image_calls = processor, fail_at, 0
        self.image_size, self.load_image = processor.image_size, processor.load_image

    def __call__(self, *args, **kwargs):
        if kwargs.get("images") is not None:
            self.image_calls += 1
            if self.fail_at is not None and self.image_calls == self.fail_at:
                raise RuntimeError("injected failure")
        return self.processor(*args, **kwargs)


def test_resume_after_interruption_equals_uninterrupted_build(workspace, tmp_path):
    model, processor, gallery = workspace["model"], workspace["processor"], workspace["gallery"]
    options = dict(batch_size=2, shard_batches=1, show_progress=False)
    output = tmp_path / "index"
    with pytest.raises(BuildInterrupted, match="resume"):
        GalleryIndex.build(model, processor, gallery, output, max_batches=2, **options)
    with pytest.raises(IndexNotFoundError, match="unfinished build"):
        GalleryIndex.load(output)
    failing = _FailingProcessor(processor, fail_at=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        GalleryIndex.build(model, failing, gallery, output, **options)
    counting = _FailingProcessor(processor)
    with pytest.warns(UserWarning, match="bad.png"):
        resumed = GalleryIndex.build(model, counting, gallery, output, **options)
    total_batches = -(-(_count_images(gallery) + 1) // 2)
    assert counting.image_calls <= total_batches - 3  # 2 + 1 batches were saved before and not redone
    assert not (output / "partial").exists()

    with pytest.warns(UserWarning, match="bad.png"):
        fresh = GalleryIndex.build(model, processor, gallery, tmp_path / "fresh", **options)
    assert resumed.paths == fresh.paths
    assert resumed.skipped == fresh.skipped  # the corrupt file is reported once, not once per attempt
    np.testing.assert_allclose(np.asarray(resumed.embeddings), np.asarray(fresh.embeddings), atol=1e-6)
    # The same embeddings as the batch-4 build of the fixture (batching does not change them).
    np.testing.assert_allclose(np.asarray(fresh.embeddings), np.asarray(workspace["index"].embeddings), atol=1e-5)


def test_no_resume_or_another_model_starts_over(workspace, tmp_path):
    model, processor, gallery = workspace["model"], workspace["processor"], workspace["gallery"]
    options = dict(batch_size=2, shard_batches=1, show_progress=False)
    with pytest.raises(BuildInterrupted):
        GalleryIndex.build(model, processor, gallery, tmp_path / "index", max_batches=2, **options)
    counting = _FailingProcessor(processor)
    with pytest.warns(UserWarning):
        GalleryIndex.build(model, counting, gallery, tmp_path / "index", resume=False, **options)
    assert counting.image_calls == -(-(_count_images(gallery) + 1) // 2)


# ---------------------------------------------------------------------------------------------
# Searching
# ---------------------------------------------------------------------------------------------


def _brute_force(queries: torch.Tensor, gallery: np.ndarray, top_k: int):
    scores = F.normalize(queries.float(), dim=-1).numpy() @ np.asarray(gallery).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_text_search_equals_brute_force_cosine_ranking(workspace):
    index, model, processor = workspace["index"], workspace["model"], workspace["processor"]
    texts = [QUERY, "a woman with a backpack", "person wearing a hat"]
    result = index.search_text(model, processor, texts, top_k=len(index) + 5)  # clamped to the gallery size
    with torch.no_grad():
        batch = processor(text=texts, return_tensors="pt")
        queries = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    order, scores = _brute_force(queries, index.embeddings, len(index))
    assert result.indices.shape == (3, len(index))
    np.testing.assert_array_equal(result.indices.numpy(), order)
    np.testing.assert_allclose(result.scores.numpy(), scores, atol=1e-5)
    assert result.paths[0] == [index.paths[row] for row in order[0]]
    # Text given to `search` directly goes through the same path.
    again = index.search(texts[0], top_k=3, model=model, processor=processor)
    np.testing.assert_array_equal(again.indices.numpy(), order[:1, :3])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10_000])
def test_chunked_search_equals_unchunked(chunk_size):
    generator = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(53, 16, generator=generator), dim=-1).numpy()
    queries = torch.randn(5, 16, generator=generator)
    index = GalleryIndex(gallery, [f"{row}.png" for row in range(53)], {})
    order, scores = _brute_force(queries, gallery, 10)
    result = index.search(queries, top_k=10, chunk_size=chunk_size)
    np.testing.assert_array_equal(result.indices.numpy(), order)
    np.testing.assert_allclose(result.scores.numpy(), scores, atol=1e-6)
    single = index.search(queries[0].numpy(), top_k=10, chunk_size=chunk_size)  # one [dim] query
    np.testing.assert_array_equal(single.indices.numpy(), order[:1])


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 100])
def test_ties_are_ordered_by_gallery_index(chunk_size):
    # Unit vectors along two axes, repeated: every dot product is exactly 0, 1/sqrt(2) or 1, so scores
    # tie exactly, within and across chunks.
    axes = np.eye(4, dtype=np.float32)
    gallery = axes[[1, 0, 2, 0, 1, 0, 3, 1, 0, 2]]
    queries = torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, 0.5]])
    result = exact_top_k(F.normalize(queries, dim=-1), gallery, top_k=6, chunk_size=chunk_size)
    assert result[1].tolist() == [
        [1, 3, 5, 8, 0, 2],  # the four e0 rows, then the zeros by index
        [0, 1, 3, 4, 5, 7],  # e0 and e1 rows tie at 1/sqrt(2)
        [6, 0, 1, 2, 3, 4],
    ]


def test_search_rejects_bad_queries_and_backends(workspace):
    index = workspace["index"]
    with pytest.raises(ValueError, match=r"queries must be \[num_queries, 16\]"):
        index.search(torch.randn(2, 8))
    with pytest.raises(ValueError, match="backend"):
        index.search(torch.randn(1, 16), backend="annoy")
    with pytest.raises(ValueError, match="model"):
        index.search(QUERY)
    with pytest.raises(ValueError, match="empty"):
        index.search_text(workspace["model"], workspace["processor"], ["   "])


def test_index_from_another_model_is_refused(workspace):
    other = DecdModel.from_pretrained(workspace["other_model_dir"])
    with pytest.raises(StaleIndexError) as error:
        workspace["index"].search_text(other, workspace["processor"], QUERY)
    message = str(error.value)
    assert str(workspace["model_dir"].resolve()) in message
    assert str(workspace["other_model_dir"].resolve()) in message
    assert "rebuild the index" in message


def test_faiss_backend_equals_exact(workspace):
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(3)
    gallery = F.normalize(torch.randn(300, 16, generator=generator), dim=-1).numpy()
    index = GalleryIndex(gallery, None, {})
    queries = torch.randn(7, 16, generator=generator)
    exact = index.search(queries, top_k=12)
    approximate = index.search(queries, top_k=12, backend="faiss")
    np.testing.assert_array_equal(approximate.indices.numpy(), exact.indices.numpy())
    np.testing.assert_allclose(approximate.scores.numpy(), exact.scores.numpy(), atol=1e-5)
    text = workspace["index"].search_text(workspace["model"], workspace["processor"], QUERY, top_k=5, backend="faiss")
    reference = workspace["index"].search_text(workspace["model"], workspace["processor"], QUERY, top_k=5)
    assert text.paths == reference.paths


def test_faiss_backend_without_faiss_says_how_to_install(monkeypatch, capsys, workspace):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    index = GalleryIndex(np.eye(3, dtype=np.float32), None, {})
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        index.search(torch.ones(1, 3), backend="faiss")
    assert main(["query", str(workspace["root"] / "index"), QUERY, "--backend", "faiss"]) == 1
    assert "pip install faiss-cpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# decd-search
# ---------------------------------------------------------------------------------------------


def _table_paths(output: str) -> list[str]:
    """The path column of the result table(s) printed by `decd-search query`."""
    rows = [line.split() for line in output.splitlines()]
    return [row[3] for row in rows if len(row) == 4 and row[0].isdigit()]


def test_cli_index_then_query_prints_ranking_and_writes_grid(workspace, tmp_path, capsys):
    index_dir = tmp_path / "cli-index"
    code = main(["index", str(workspace["gallery"]), "--model", str(workspace["model_dir"]), "--output",
                 str(index_dir), "--batch_size", "5", "--quiet"])
    output = capsys.readouterr().out
    assert code == 0
    assert f"Indexed {len(workspace['index'])} images" in output and "bad.png" in output

    grid = tmp_path / "grid.png"
    code = main(["query", str(index_dir), QUERY, "--top_k", "3", "--grid", str(grid)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected = workspace["index"].search_text(workspace["model"], workspace["processor"], QUERY, top_k=3)
    assert _table_paths(captured.out) == expected.paths[0]
    assert QUERY in captured.out
    with Image.open(grid) as picture:
        assert picture.format == "PNG" and picture.width > 3 * 64

    code = main(["query", str(index_dir), QUERY, "--top_k", "2", "--model", str(workspace["model_dir"]),
                 "--backend", "exact"])
    assert code == 0 and _table_paths(capsys.readouterr().out) == expected.paths[0][:2]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["query", "{index}", "   "], "description is empty"),
        (["query", "{missing}", QUERY], "does not exist"),
        (["query", "{index}", QUERY, "--model", "{other}"], "rebuild the index"),
        (["query", "{index}", QUERY, "--model", "{missing}"], "could not load the model"),
        (["index", "{missing}", "--model", "{model}", "--output", "{missing}"], "does not exist"),
        (["index", "{empty}", "--model", "{model}", "--output", "{missing}"], "no images found"),
    ],
)
def test_cli_user_errors_exit_nonzero_without_traceback(workspace, tmp_path, capsys, arguments, message):
    (tmp_path / "empty").mkdir()
    paths = dict(index=workspace["root"] / "index", missing=tmp_path / "missing", other=workspace["other_model_dir"],
                 model=workspace["model_dir"], empty=tmp_path / "empty")
    code = main([argument.format(**paths) for argument in arguments])
    captured = capsys.readouterr()
    assert code == 1
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_console_script(workspace, tmp_path):
    script = shutil.which("decd-search") or shutil.which("decd-search", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the decd-search console script is not installed (pip install -e .)")
    completed = subprocess.run([script, "query", str(workspace["root"] / "index"), QUERY, "--top_k", "2"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    expected = workspace["index"].search_text(workspace["model"], workspace["processor"], QUERY, top_k=2)
    assert _table_paths(completed.stdout) == expected.paths[0]
    failed = subprocess.run([script, "query", str(tmp_path / "missing"), QUERY], capture_output=True, text=True,
                            timeout=120)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr


# ---------------------------------------------------------------------------------------------
# transformers pipeline
# ---------------------------------------------------------------------------------------------


def test_pipeline_returns_the_index_search_top_k(workspace):
    import decd.pipeline  # noqa: F401  (registers the task)
    from transformers import pipeline

    index = workspace["index"]
    search = pipeline("text-based-person-search", model=str(workspace["model_dir"]),
                      gallery=str(workspace["root"] / "index"), device="cpu")
    expected = index.search_text(workspace["model"], workspace["processor"], QUERY, top_k=5)
    matches = search(QUERY, top_k=5)
    assert [match["index"] for match in matches] == expected.indices[0].tolist()
    assert [match["path"] for match in matches] == expected.paths[0]
    np.testing.assert_allclose([match["score"] for match in matches], expected.scores[0].numpy(), atol=1e-5)
    assert len(search([QUERY, "a woman"], top_k=2)) == 2

    # A list of images gives the same ranking (encoded on the fly; no paths for PIL images).
    images = [Image.open(workspace["gallery"] / path).convert("RGB") for path in index.paths]
    in_memory = pipeline("text-based-person-search", model=workspace["model"], processor=workspace["processor"],
                         gallery=images, device="cpu")
    matches = in_memory(QUERY, top_k=5)
    assert [match["index"] for match in matches] == expected.indices[0].tolist()
    assert "path" not in matches[0]

    with pytest.raises(StaleIndexError):
        pipeline("text-based-person-search", model=str(workspace["other_model_dir"]),
                 gallery=str(workspace["root"] / "index"), device="cpu")
