"""decd.search.build: building an index (skipping unreadable files), resuming an interrupted build, never
touching files it does not own, the shares of several processes (stood in for in this one; real processes are in
test_multiprocess.py), and memory that follows the model's input size rather than the photos'."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from decd.cli import main
from decd.search import BuildInterrupted, GalleryIndex, GalleryIndexError, IndexNotFoundError
from decd.search.encode import encode_gallery, list_images
from decd.search.format import model_checksum
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .search_fixtures import (REPO, _build, _count_images, _snapshot, five_images, gallery_and_model,  # noqa: F401
                              workspace)

# ---------------------------------------------------------------------------------------------
# Building, resuming
# ---------------------------------------------------------------------------------------------


def test_build_skips_and_reports_corrupt_file(workspace):
    index, gallery = workspace["index"], workspace["gallery"]
    num_images = _count_images(gallery)
    assert len(index) == num_images
    assert [item["path"] for item in index.skipped] == ["bad.png"]
    assert "bad.png" not in index.paths
    assert index.paths == sorted(index.paths)

    folder = workspace["root"] / "index"
    assert sorted(path.name for path in folder.iterdir()) == ["embeddings.npy", "files.json", "meta.json", "paths.json"]
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


def test_encode_gallery_gives_each_process_whole_batches_once_and_skips_what_is_done(workspace):
    model, processor, gallery = workspace["model"], workspace["processor"], workspace["gallery"]
    files = list_images(gallery)
    whole = list(encode_gallery(model, processor, gallery, files, batch_size=3))
    assert [batch.start for batch in whole] == list(range(0, len(files), 3))
    assert [item["path"] for batch in whole for item in batch.skipped] == ["bad.png"]
    assert sum(len(batch.paths) for batch in whole) == len(files) - 1
    assert all(set(batch.fingerprints) == set(batch.files) for batch in whole)
    shares = [batch for rank in range(3)
              for batch in encode_gallery(model, processor, gallery, files, batch_size=3, share=(rank, 3))]
    assert [batch.start for batch in shares] == [batch.start for batch in whole]  # each batch once, in order
    for one, other in zip(whole, shares):  # the same batches give the same embeddings, bit for bit
        assert one.paths == other.paths and one.skipped == other.skipped
        assert np.array_equal(one.embeddings, other.embeddings)
    rest = list(encode_gallery(model, processor, gallery, files, batch_size=3, done={0, 3}))
    assert [batch.start for batch in rest] == [batch.start for batch in whole][2:]
    first = encode_gallery(model, processor, gallery, files, batch_size=3, max_batches=1)
    next(first)
    with pytest.raises(BuildInterrupted, match="stopped after 1 batches"):
        next(first)
    chosen = list(encode_gallery(model, processor, gallery, files, batch_size=3, select=lambda names: names[1:]))
    assert [batch.paths for batch in chosen] == [[name for name in batch.files[1:] if name != "bad.png"]
                                                 for batch in chosen]


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
# Ownership of the output folder
# ---------------------------------------------------------------------------------------------


def test_build_refuses_a_non_empty_folder_that_is_not_an_index(setup, tmp_path):
    output = tmp_path / "my-documents"
    (output / "partial").mkdir(parents=True)
    (output / "partial" / "holiday.png").write_bytes(b"precious")
    (output / "meta.json").write_text('{"mine": true}')
    (output / "paths.json").write_text("my paths")
    (output / "embeddings.npy").write_bytes(b"my embeddings")
    before = _snapshot(output)
    with pytest.raises(GalleryIndexError, match="my-documents.*not written by a DECD index build"):
        _build(setup, output)
    assert _snapshot(output) == before
    (output / "partial" / "holiday.png").unlink()
    (output / "partial").rmdir()
    before = _snapshot(output)
    with pytest.raises(GalleryIndexError, match="not empty and is not a DECD gallery index.*nothing was changed"):
        _build(setup, output, resume=False)
    assert _snapshot(output) == before


def test_build_refuses_an_output_folder_that_holds_the_gallery(setup, tmp_path):
    output = tmp_path / "photos"
    (output / "partial").mkdir(parents=True)
    Image.new("RGB", (48, 96), "red").save(output / "partial" / "me.png")
    before = _snapshot(output)
    for gallery in (output / "partial", output):
        with pytest.raises(GalleryIndexError, match="is inside the output folder"):
            _build(setup, output, gallery=gallery)
    assert _snapshot(output) == before


def test_cli_refusal_is_one_line_and_exit_1(setup, tmp_path, capsys):
    output = tmp_path / "notes"
    output.mkdir()
    (output / "todo.txt").write_text("keep me")
    code = main(["index", str(setup["gallery"]), "--model", str(setup["model_dir"]), "--output", str(output),
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("\n") == 1 and "not a DECD gallery index" in captured.err and "Traceback" not in captured.err
    assert (output / "todo.txt").read_text() == "keep me"


def test_rebuild_in_an_index_folder_touches_only_its_own_files(setup, tmp_path):
    output = tmp_path / "index"
    with pytest.raises(BuildInterrupted):  # an unfinished build of ours
        _build(setup, output, max_batches=1)
    (output / "README.txt").write_text("notes next to the index")
    first = _build(setup, output)  # resumes the unfinished build
    assert {path.name for path in output.iterdir()} == {"README.txt", "meta.json", "paths.json", "files.json",
                                                        "embeddings.npy"}
    meta = json.loads((output / "meta.json").read_text())
    assert meta["format"] == "decd-gallery-index" and meta["format_version"] == 3
    second = _build(setup, output, resume=False)  # a finished index of ours is replaced
    assert (output / "README.txt").read_text() == "notes next to the index"
    assert second.paths == first.paths


def test_only_our_shard_files_are_removed_from_partial(setup, tmp_path):
    output = tmp_path / "index"
    with pytest.raises(BuildInterrupted):
        _build(setup, output, max_batches=1)
    assert (output / "partial" / "progress.json").exists()
    (output / "partial" / "diary.txt").write_text("not a shard")
    with pytest.raises(GalleryIndexError, match="partial.*not written by a DECD index build"):
        _build(setup, output, resume=False)
    assert (output / "partial" / "diary.txt").read_text() == "not a shard"


# ---------------------------------------------------------------------------------------------
# Several processes, stood in for by hand in this one (real processes: test_multiprocess.py)
# ---------------------------------------------------------------------------------------------


class _FakeState:
    """A process state for driving one rank of a multi-process build by hand (barriers are no-ops)."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0

    def wait_for_everyone(self):
        pass


def test_each_rank_encodes_a_contiguous_share_and_the_main_one_assembles_in_listing_order(gallery_and_model, tmp_path):
    _, gallery, model_dir = gallery_and_model
    model = DecdModel.from_pretrained(model_dir).eval()
    processor = DecdProcessor.from_pretrained(model_dir)
    options = dict(batch_size=3, shard_batches=1, show_progress=False)
    with pytest.warns(UserWarning, match="bad.png"):
        reference = GalleryIndex.build(model, processor, gallery, tmp_path / "one", **options)
    output = tmp_path / "three"
    # Rank 1 and 2 cannot start before the main process wrote progress.json; here: main first (it stops
    # before assembling because the others' shares are missing), then 1 and 2, then main again to assemble.
    with pytest.raises(BuildInterrupted, match="another process"):
        GalleryIndex.build(model, processor, gallery, output, distributed=_FakeState(0, 3), **options)
    with pytest.raises(BuildInterrupted, match="another process"):
        GalleryIndex.build(model, processor, gallery, output, distributed=_FakeState(1, 3), **options)
    # Rank 2 completes the shards; a non-main process never joins them: it returns None.
    assert GalleryIndex.build(model, processor, gallery, output, distributed=_FakeState(2, 3), **options) is None
    assert not (output / "meta.json").exists()
    starts = sorted(json.loads(path.read_text())["start"] for path in (output / "partial").glob("shard_*.json"))
    assert starts == list(range(0, starts[-1] + 1, 3))
    # Each shard names its writer: the processes' shares are contiguous, in process order.
    writers = [json.loads(path.read_text())["writer"] for path in sorted((output / "partial").glob("shard_*.json"))]
    ranks = [writer["process"] for writer in writers]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2} and {writer["processes"] for writer in writers} == {3}
    assert {writer["pid"] for writer in writers} == {os.getpid()}  # stood in for by this one
    with pytest.warns(UserWarning, match="bad.png"):
        index = GalleryIndex.build(model, processor, gallery, output, distributed=_FakeState(0, 3), **options)
    assert index.paths == reference.paths and index.skipped == reference.skipped
    np.testing.assert_array_equal(np.asarray(index.embeddings), np.asarray(reference.embeddings))
    assert not (output / "partial").exists()


def test_a_process_that_sees_another_listing_model_or_batch_size_stops_naming_itself(gallery_and_model, tmp_path):
    _, shared, model_dir = gallery_and_model
    gallery = Path(shutil.copytree(shared, tmp_path / "gallery"))  # a file is added to it below
    model = DecdModel.from_pretrained(model_dir).eval()
    processor = DecdProcessor.from_pretrained(model_dir)
    output = tmp_path / "index"
    options = dict(batch_size=3, shard_batches=1, show_progress=False)
    with pytest.raises(BuildInterrupted, match="another process"):  # the main process wrote progress.json
        GalleryIndex.build(model, processor, gallery, output, distributed=_FakeState(0, 2), **options)
    other = DecdModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    cases = [(model, dict(options, batch_size=4)), (other, options)]  # another batch size; another model
    for seen_model, seen_options in cases:
        with pytest.raises(GalleryIndexError, match="process 1 of 2 sees another gallery listing, model or batch "
                                                    "size than the main process; every process must see the same"):
            GalleryIndex.build(seen_model, processor, gallery, output, distributed=_FakeState(1, 2), **seen_options)
    # another listing: a file added after the main process listed the folder
    shutil.copy(gallery / "bad.png", gallery / "added.png")
    with pytest.raises(GalleryIndexError, match="process 1 of 2 sees another gallery listing"):
        GalleryIndex.build(model, processor, gallery, output, distributed=_FakeState(1, 2), **options)
    assert not (output / "meta.json").exists()  # nothing was assembled from mismatched shares


# ---------------------------------------------------------------------------------------------
# Memory follows the model's input size, not the camera's
# ---------------------------------------------------------------------------------------------


def test_indexing_camera_size_photos_keeps_memory_at_the_model_input_size(tmp_path):
    """16 JPEG + 3 PNG photos of 4000 x 3000 in one batch (default batch size 64), tiny model.

    Decoded at full size, each photo is 36 MB, so holding the batch would add ~680 MB (measured: +1.4 GB
    for 16 JPEGs). The requirement is under 1.5 GB peak for 64 photos; the tiny model's forward pass is
    negligible, so what is measured here is the photos: under 1.5 GB in all, and the build adds less
    than 200 MB, i.e. never more than ~5 full-size photos decoded at once (one at a time: ~40-60 MB).
    The full-size model's numbers: benchmarks/index_memory.py, benchmarks/results/index_memory_cpu*.json."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import index_memory
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    gallery = index_memory.write_gallery(tmp_path / "photos", 16, "jpeg")
    index_memory.write_gallery(gallery, 3, "png")
    result = index_memory.measure(gallery, tmp_path / "index", model="tiny", batch_size=64, timeout=300)
    assert result["count"] == 19
    assert result["peak_bytes"] < index_memory.LIMIT_BYTES, result
    assert result["peak_bytes"] - result["before_build_bytes"] < 200 * 1024**2, result


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_a_landscape_photo_for_a_portrait_input_is_reduced_on_each_axis(tmp_path, image_format):
    """Crops are resized to exactly (384, 128): a 4000 x 3000 photo needs 256 x 768 pixels (2x), not 2000 x 1500."""
    from image_loading_decd import load_image

    path = tmp_path / f"photo.{image_format.lower()}"
    Image.new("RGB", (4000, 3000), "orange").save(path, format=image_format)
    image = load_image(path, size=(384, 128))
    width, height = image.size
    assert 2 * 128 <= width < 4 * 128 and 2 * 384 <= height < 4 * 384, image.size
    assert image.getpixel((5, 5)) == Image.new("RGB", (1, 1), "orange").getpixel((0, 0)) or image_format == "JPEG"


# ---------------------------------------------------------------------------------------------
# A gallery index is what it says it is: one build at a time, changed files re-embedded, an old index
# replaced only by a complete new one, updates instead of rebuilds, a full disk said in one line
# ---------------------------------------------------------------------------------------------
def _gallery_copy(setup, folder: Path) -> Path:
    folder.mkdir()
    for path in sorted(setup["gallery"].iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(path)


def _same_content(first: GalleryIndex, second: GalleryIndex) -> None:
    assert first.paths == second.paths and first.skipped == second.skipped
    assert np.allclose(np.asarray(first.embeddings), np.asarray(second.embeddings), atol=1e-6)


def test_a_second_build_into_the_same_folder_is_refused_naming_the_first(setup, tmp_path, capsys):
    import fcntl

    output = tmp_path / "index"
    output.mkdir()
    with open(output / ".build.lock", "a+") as held:  # a build in progress: it holds the lock and says who it is
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242, host h, gallery /data/other, started 2026-12-04 10:00:00")
        held.flush()
        with pytest.raises(GalleryIndexError, match=r"another build is writing .*index.* \(pid 4242, host h, gallery "
                                                    r"/data/other, started .*\); wait for it to finish"):
            _build(setup, output)
        assert main(["index", str(setup["gallery"]), "--model", str(setup["model_dir"]), "--output", str(output),
                     "--quiet"]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and "another build is writing" in errors[0] and "pid 4242" in errors[0]
        assert not (output / "meta.json").exists() and not (output / "partial").exists()  # nothing of it touched
    index = _build(setup, output)  # the first build is over: the folder is free again
    assert len(index) == 5 and not (output / ".build.lock").exists()


def test_a_resume_re_embeds_the_files_that_changed_since_their_shard(setup, tmp_path):
    gallery = _gallery_copy(setup, tmp_path / "gallery")
    with pytest.raises(BuildInterrupted):
        _build(setup, tmp_path / "index", gallery=gallery, max_batches=1)  # the first two files are encoded
    first = sorted(path.name for path in gallery.iterdir())[0]
    _png(gallery / first, seed=99)  # replaced before the resume
    os.utime(gallery / first, ns=(1, 1))  # even with an older time: the size and time no longer match
    resumed = _build(setup, tmp_path / "index", gallery=gallery)
    _same_content(resumed, _build(setup, tmp_path / "clean", gallery=gallery))


def test_a_rebuild_replaces_the_old_index_only_when_the_new_one_is_complete(setup, tmp_path):
    old = _build(setup, tmp_path / "index")
    before = _snapshot(tmp_path / "index")
    with pytest.raises(BuildInterrupted):
        _build(setup, tmp_path / "index", resume=False, max_batches=1)
    loaded = GalleryIndex.load(tmp_path / "index")  # the old index is whole and still searchable
    assert loaded.paths == old.paths and np.array_equal(loaded.embeddings, old.embeddings)
    assert {name: data for name, data in _snapshot(tmp_path / "index").items() if "partial" not in name} == before


def test_building_an_existing_index_again_updates_it_like_a_clean_build(setup, tmp_path, monkeypatch):
    import decd.search.encode as encode

    gallery = _gallery_copy(setup, tmp_path / "gallery")
    _build(setup, tmp_path / "index", gallery=gallery)
    names = sorted(path.name for path in gallery.iterdir())
    (gallery / names[0]).unlink()                     # deleted
    _png(gallery / names[1], seed=7)                  # replaced
    _png(gallery / "zz_new.png", seed=8)              # added
    embedded = []
    original = encode._embed_files

    def counting(model, processor, folder, batch):
        embedded.extend(batch)
        return original(model, processor, folder, batch)

    monkeypatch.setattr(encode, "_embed_files", counting)
    updated = _build(setup, tmp_path / "index", gallery=gallery)
    assert sorted(embedded) == [names[1], "zz_new.png"]  # only what changed is embedded again
    assert names[0] not in updated.paths and "zz_new.png" in updated.paths
    monkeypatch.setattr(encode, "_embed_files", original)
    _same_content(updated, _build(setup, tmp_path / "clean", gallery=gallery))
    embedded.clear()
    monkeypatch.setattr(encode, "_embed_files", counting)
    assert _build(setup, tmp_path / "index", gallery=gallery).paths == updated.paths and embedded == []  # current


def test_a_full_disk_is_one_line_and_the_build_resumes_to_the_same_index(setup, tmp_path, monkeypatch, capsys):
    import errno

    import decd.search.build as build

    real_save = np.save
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second shard cannot be written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(build.np, "save", full_disk)
    with pytest.raises(GalleryIndexError, match=r"the disk holding .*index.* is full \(No space left on device\); "
                                                r"free some space and run the same command again: the build resumes"):
        _build(setup, tmp_path / "index", shard_batches=1)
    monkeypatch.setattr(build.np, "save", real_save)
    resumed = _build(setup, tmp_path / "index", shard_batches=1)
    clean = _build(setup, tmp_path / "clean", shard_batches=1)
    assert resumed.paths == clean.paths and np.array_equal(resumed.embeddings, clean.embeddings)
