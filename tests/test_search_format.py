"""decd.search.format: `load` refuses a damaged or outdated index in one line, `verify=False` skips the full
read, file names that are not UTF-8 survive (and descriptions from a terminal that is not UTF-8), the model
checksum an index records, and docs/index-format.md (and docs/milvus.md's collection) says what the code writes."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from decd.cli import main
from decd.search import BuildInterrupted, GalleryIndex, GalleryIndexError
from decd.search import format as index_format
from decd.search.display import display_path
from decd.search.format import model_checksum
from decd.search.milvus import store as milvus_store
from modeling_decd import DecdModel
from PIL import Image

from .search_fixtures import REPO, _build, built, five_images, workspace  # noqa: F401

QUERY = "a man in a red shirt"


# ---------------------------------------------------------------------------------------------
# The model checksum
# ---------------------------------------------------------------------------------------------


def test_checksum_survives_save_load_and_detaching_the_decoder(workspace, tmp_path):
    model = workspace["model"]
    reloaded = DecdModel.from_pretrained(workspace["model_dir"])
    assert model_checksum(reloaded) == model_checksum(model)
    assert model_checksum(DecdModel.from_pretrained(workspace["model_dir"]).detach_decoder()) == model_checksum(model)
    assert model_checksum(DecdModel.from_pretrained(workspace["other_model_dir"])) != model_checksum(model)


# ---------------------------------------------------------------------------------------------
# Opening an index validates it
# ---------------------------------------------------------------------------------------------


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
# File names that are not UTF-8, descriptions from a terminal that is not UTF-8
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
# The format pages say what the code writes
# ---------------------------------------------------------------------------------------------


def _table(page: str, heading: str) -> dict[str, str]:
    """{name: rest of the row} of the table under `## heading` (or `### heading`): each backticked name in a row's
    first cell (a row may name several)."""
    section = page.split(f"# {heading}\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= set("-"):
            rows.update({name: cells[1] for name in re.findall(r"`([^`]+)`", cells[0])})
    return rows


def _names(cell: str) -> set[str]:
    return set(re.findall(r"`([a-z_0-9]+)`", cell))


def test_the_index_format_page_names_the_files_fields_and_version_a_build_writes(setup, tmp_path):
    page = (REPO / "docs" / "index-format.md").read_text()
    files = _table(page, "Files")
    assert set(files) == {index_format.EMBEDDINGS_FILE, index_format.PATHS_FILE, index_format.FILES_FILE,
                          index_format.META_FILE, index_format.ANN_FILE, index_format.PARTIAL_DIR + "/",
                          index_format.LOCK_FILE} == set(index_format.INDEX_FILES) | {"partial/", ".build.lock"}
    assert '`{"fingerprints":' in files[index_format.FILES_FILE]
    # every version the page gives is this code's, and it reads the versions it says
    assert {int(number) for number in re.findall(r"format_version`?[\s|=]*`?(\d+)", page)} == \
        {index_format.INDEX_FORMAT_VERSION, 1}  # 1: the folders from before the format tag, refused
    versions = " and ".join(str(version) for version in index_format.READABLE_FORMAT_VERSIONS)
    assert f"Format versions {versions} are read" in page and f'`"{index_format.INDEX_FORMAT}"`' in page

    documented = set(_table(page, "meta.json"))
    approximate_only = {"ann_file", "ann_sha256", "ann_bytes", "ann_train_size", "ann_nlist"}
    exact = _build(setup, tmp_path / "exact")  # the fields and files a build writes
    assert set(json.loads((exact.path / index_format.META_FILE).read_text())) == documented - approximate_only
    assert json.loads((exact.path / index_format.FILES_FILE).read_text()) == {"fingerprints": exact.meta["fingerprints"]}

    with pytest.raises(BuildInterrupted):  # an unfinished build: progress.json and one shard
        _build(setup, tmp_path / "unfinished", max_batches=1)
    partial = _table(page, "An unfinished build: `partial/`")
    progress = tmp_path / "unfinished" / index_format.PARTIAL_DIR / index_format.PROGRESS_FILE
    assert _names(partial[index_format.PROGRESS_FILE]) == set(json.loads(progress.read_text()))
    [shard] = progress.parent.glob("shard_*.json")
    assert index_format.SHARD_FILE.fullmatch(shard.name) and re.fullmatch(r"shard_\d{12}\.json", shard.name)
    assert _names(partial["shard_<start>.json"]) == set(json.loads(shard.read_text()))

    pytest.importorskip("faiss")
    approximate = _build(setup, tmp_path / "hnsw", backend="HNSW8")
    assert set(json.loads((approximate.path / index_format.META_FILE).read_text())) == documented
    assert sorted(path.name for path in approximate.path.iterdir()) == sorted(index_format.INDEX_FILES)


def test_the_milvus_page_names_the_collection_s_fields_and_record():
    page = (REPO / "docs" / "milvus.md").read_text()
    assert tuple(_table(page, "What the collection holds")) == milvus_store.OWN_FIELDS
    assert f"`{milvus_store.META_PROPERTY}`" in page and f"(`{milvus_store.MILVUS_FORMAT}`)" in page
