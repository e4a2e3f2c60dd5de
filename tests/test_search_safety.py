"""Fail early, lose nothing: `decd-search index` only touches its own files, `load` refuses a damaged
index in one line, file names that are not UTF-8 survive, memory follows the model's input size, and
the Inference Endpoints handler refuses oversized requests before decoding them."""

import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decd.cli import main
from decd.search import BuildInterrupted, GalleryIndex, GalleryIndexError, display_path
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import tiny_config

REPO = Path(__file__).resolve().parent.parent
QUERY = "a man in a red shirt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
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


def _build(setup, output, gallery=None, **options):
    return GalleryIndex.build(setup["model"], setup["processor"], gallery or setup["gallery"], output,
                              batch_size=2, show_progress=False, model_id=str(setup["model_dir"]), **options)


def _snapshot(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. Ownership of the output folder
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
    assert {path.name for path in output.iterdir()} == {"README.txt", "meta.json", "paths.json", "embeddings.npy"}
    meta = json.loads((output / "meta.json").read_text())
    assert meta["format"] == "decd-gallery-index" and meta["format_version"] == 2
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
# 2. Opening an index validates it
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def built(setup, tmp_path):
    _build(setup, tmp_path / "index")
    return tmp_path / "index"


def _rewrite_meta(folder: Path, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def _damage_truncated(folder):
    data = (folder / "embeddings.npy").read_bytes()
    (folder / "embeddings.npy").write_bytes(data[: len(data) - 40])


def _damage_flipped(folder):
    data = bytearray((folder / "embeddings.npy").read_bytes())
    data[-3] ^= 0x40
    (folder / "embeddings.npy").write_bytes(bytes(data))


def _damage_nan_with_matching_checksum(folder):
    embeddings = np.load(folder / "embeddings.npy")
    embeddings[3] = np.nan
    np.save(folder / "embeddings.npy", embeddings)
    import hashlib

    _rewrite_meta(folder, embeddings_sha256=hashlib.sha256((folder / "embeddings.npy").read_bytes()).hexdigest())


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "meta.json").write_text("{broken"), "meta.json is not a valid JSON object"),
    (lambda folder: (folder / "paths.json").write_text("[1, 2"), "paths.json is missing or not a JSON list"),
    (lambda folder: (folder / "paths.json").write_text('["a.png"]'), "paths.json lists 1 paths"),
    (lambda folder: _rewrite_meta(folder, count=4), "paths.json lists 5 paths, meta.json says 4"),
    (_damage_truncated, "embeddings.npy cannot be read"),
    (lambda folder: np.save(folder / "embeddings.npy", np.zeros((5, 16), np.float64)), "float64"),
    (lambda folder: np.save(folder / "embeddings.npy", np.zeros((5, 8), np.float32)), r"expected float32 \(5, 16\)"),
    (_damage_flipped, "does not match the checksum"),
    (_damage_nan_with_matching_checksum, r"row 3 \(3.png\) is not finite"),
    (lambda folder: _rewrite_meta(folder, format_version=1), "format version 1"),
    (lambda folder: (folder / "embeddings.npy").unlink(), "embeddings.npy cannot be read"),
], ids=["broken-meta", "broken-paths", "paths-count", "meta-count", "truncated", "float64", "shape", "checksum",
        "nan", "old-format", "missing-embeddings"])
def test_load_refuses_a_damaged_index_in_one_line(built, capsys, damage, message):
    damage(built)
    with pytest.raises(GalleryIndexError, match=message) as error:
        GalleryIndex.load(built)
    assert "\n" not in str(error.value) and "rebuild" in str(error.value)
    assert main(["query", str(built), QUERY]) == 1
    captured = capsys.readouterr()
    assert "rebuild" in captured.err and "Traceback" not in captured.err


def test_verify_false_skips_the_full_read_and_nan_never_ranks_first(built, setup, capsys):
    _damage_nan_with_matching_checksum(built)
    _damage_flipped(built)
    index = GalleryIndex.load(built, verify=False)  # cheap checks only
    result = index.search_text(setup["model"], setup["processor"], QUERY, top_k=5)
    assert result.indices[0, 0].item() != 3 and result.indices[0, -1].item() == 3
    assert main(["query", str(built), QUERY, "--no-verify", "--top_k", "5"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[-1] == "3.png"  # the NaN row comes last


def test_load_of_a_good_index_checks_and_passes(built):
    meta = json.loads((built / "meta.json").read_text())
    assert len(meta["embeddings_sha256"]) == 64
    import hashlib

    assert hashlib.sha256((built / "embeddings.npy").read_bytes()).hexdigest() == meta["embeddings_sha256"]
    assert len(GalleryIndex.load(built)) == 5


# ---------------------------------------------------------------------------------------------
# 3. File names that are not UTF-8, descriptions from a terminal that is not UTF-8
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="Linux file names are bytes")
def test_non_utf8_file_names_are_indexed_printed_and_drawn(setup, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for number in range(2):
        Image.new("RGB", (48, 96), "blue").save(gallery / f"{number}.png")
    Image.new("RGB", (48, 96), "red").save(os.fsdecode(os.fsencode(str(gallery)) + b"/caf\xe9.png"))
    output = tmp_path / "index"
    code = main(["index", str(gallery), "--model", str(setup["model_dir"]), "--output", str(output), "--quiet"])
    assert code == 0, capsys.readouterr().err
    index = GalleryIndex.load(output)
    assert "caf\udce9.png" in index.paths
    assert os.fsencode(index.image_path(index.paths.index("caf\udce9.png"))).endswith(b"caf\xe9.png")
    assert display_path("caf\udce9.png") == "caf\\xe9.png"
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    code = main(["query", str(output), QUERY, "--top_k", "3", "--grid", str(grid)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "caf\\xe9.png" in captured.out
    captured.out.encode("utf-8")  # printable on any UTF-8 terminal: no lone surrogates
    assert grid.exists()


def test_description_with_undecodable_bytes_is_decoded_or_refused(setup, tmp_path, capsys):
    output = tmp_path / "index"
    _build(setup, output)
    utf8_through_ascii_locale = "caf\udcc3\udca9 man"  # b"caf\xc3\xa9" decoded with surrogateescape
    assert main(["query", str(output), utf8_through_ascii_locale, "--top_k", "2"]) == 0
    assert 'Query: "café man"' in capsys.readouterr().out
    latin1 = "caf\udce9 man"  # b"caf\xe9" from a Latin-1 terminal
    assert main(["query", str(output), latin1]) == 1
    captured = capsys.readouterr()
    assert "not valid UTF-8" in captured.err and captured.err.count("\n") == 1 and "Traceback" not in captured.err


# ---------------------------------------------------------------------------------------------
# 5. The Inference Endpoints handler refuses oversized requests before decoding
# ---------------------------------------------------------------------------------------------


def _png_base64(size=(48, 96)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_handler_refuses_requests_over_its_limits(setup, monkeypatch):
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]), max_images=2, max_texts=3,
                                                max_image_bytes=2000, max_text_chars=50)
    decoded = []
    monkeypatch.setattr(endpoint.processor, "load_image", lambda *a, **k: decoded.append(1))
    image = _png_base64()
    cases = [
        (dict(text="a man", image=[image] * 3), r"inputs.image has 3 items, more than the limit of 2 .*max_images"),
        (dict(text=["a man"] * 4, image=image), r"inputs.text has 4 items, more than the limit of 3 .*max_texts"),
        (dict(text="a man", image=[image, "A" * 4000]), r"inputs.image\[1\] is about 3,000 bytes.*max_image_bytes"),
        (dict(text=["a man", "x" * 51], image=image), r"inputs.text\[1\] has 51 characters.*max_text_chars"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            endpoint({"inputs": inputs})
        assert "\n" not in str(error.value)
    assert decoded == []  # refused before any image was decoded
    with pytest.raises(ValueError, match="max_images must be a positive integer or None"):
        checkout_handler.EndpointHandler(str(setup["model_dir"]), max_images=0)


def test_handler_defaults_accept_a_normal_request_and_refuse_a_huge_body(setup):
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    assert (endpoint.max_images, endpoint.max_texts) == (checkout_handler.MAX_IMAGES, checkout_handler.MAX_TEXTS)
    ranked = endpoint({"inputs": {"text": ["a man", "a woman"], "image": _png_base64()},
                       "parameters": {"mode": "image-to-text"}})
    assert len(ranked) == 2
    with pytest.raises(ValueError, match="max_images"):
        endpoint({"inputs": {"text": "a man", "image": [_png_base64()] * (checkout_handler.MAX_IMAGES + 1)}})
    with pytest.raises(ValueError, match="max_image_bytes"):
        endpoint({"inputs": {"text": "a man", "image": "A" * (checkout_handler.MAX_IMAGE_BYTES // 3 * 4 + 8)}})


# ---------------------------------------------------------------------------------------------
# 4. Memory follows the model's input size, not the camera's
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
    from processing_decd import load_image

    path = tmp_path / f"photo.{image_format.lower()}"
    Image.new("RGB", (4000, 3000), "orange").save(path, format=image_format)
    image = load_image(path, size=(384, 128))
    width, height = image.size
    assert 2 * 128 <= width < 4 * 128 and 2 * 384 <= height < 4 * 384, image.size
    assert image.getpixel((5, 5)) == Image.new("RGB", (1, 1), "orange").getpixel((0, 0)) or image_format == "JPEG"
