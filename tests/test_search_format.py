"""decd.search.format: `load` refuses a damaged or outdated index in one line, `verify=False` skips the full
read, file names that are not UTF-8 survive (and descriptions from a terminal that is not UTF-8), the model
checksum an index records, and docs/index-format.md (and docs/milvus.md's collection) says what the code writes."""

import json
import os
import re
import shutil
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


def _record_path(folder: Path, entry: int, recorded: str) -> None:
    paths = json.loads((folder / "paths.json").read_text())
    paths[entry] = recorded
    (folder / "paths.json").write_text(json.dumps(paths))


@pytest.mark.parametrize("recorded, gallery_dir, message", [
    ("../secret.txt", None, r"index '.*' \(paths.json\): entry 1 \('../secret.txt'\) goes up out of the gallery "
                            r"folder \('..'\)"),
    ("cam/../../secret.png", None, r"entry 1 \('cam/../../secret.png'\) goes up"),
    ("/etc/hostname", None, r"entry 1 \('/etc/hostname'\) is an absolute path"),
    ("hostname", "/etc", r"entry 1 \('hostname'\) is not an image file name \(no extension\)"),
    (".ssh/id_rsa", "/root", r"entry 1 \('.ssh/id_rsa'\) is not an image file name"),
    ("1.png", "../crops", r"\(meta.json\) records the gallery folder '../crops', which is not an absolute path"),
], ids=["up", "up-inside", "absolute", "gallery-dir-etc", "gallery-dir-home", "relative-gallery-dir"])
def test_an_index_recording_a_path_outside_its_gallery_is_refused_naming_the_entry(built, capsys, recorded,
                                                                                    gallery_dir, message):
    """An index folder is input from whoever wrote it: a paths.json entry or a meta.json gallery folder that leads
    out of the gallery makes the open fail in one line naming it (with or without the full read), and
    `decd-search query` lists nothing."""
    _record_path(built, 1, recorded)
    if gallery_dir is not None:
        _rewrite_meta(built, gallery_dir=gallery_dir)
    for verify in (True, False):
        with pytest.raises(GalleryIndexError, match=message) as refused:
            GalleryIndex.load(built, verify=verify)
        assert "\n" not in str(refused.value) and "rebuild it from the gallery folder" in str(refused.value)
    assert main(["query", str(built), QUERY]) == 1
    captured = capsys.readouterr()
    assert re.search(message, captured.err) and "Traceback" not in captured.err and captured.out == ""


def test_an_index_whose_image_became_a_link_out_of_its_gallery_is_refused(setup, tmp_path):
    """The gallery folder itself may lead out: an image the index names replaced by a symbolic link to a file outside
    the folder (or a folder of it linked outside) refuses the open; a link that stays inside is an image like any."""
    gallery = tmp_path / "gallery"
    (gallery / "cam").mkdir(parents=True)
    for number, image in enumerate(sorted(setup["gallery"].iterdir())):
        (gallery / ("cam" if number == 4 else "") / image.name).write_bytes(image.read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes((gallery / "1.png").read_bytes())
    _build(setup, tmp_path / "index", gallery=gallery)
    (gallery / "2.png").unlink()
    os.symlink(gallery / "0.png", gallery / "2.png")  # inside: opened as before
    assert len(GalleryIndex.load(tmp_path / "index")) == 5
    (gallery / "1.png").unlink()
    os.symlink(outside / "secret.png", gallery / "1.png")
    with pytest.raises(GalleryIndexError, match=r"entry 1 \('1.png'\) leads through a symbolic link to "
                                                r".*outside/secret.png, outside the gallery folder"):
        GalleryIndex.load(tmp_path / "index")
    (gallery / "1.png").unlink()
    (gallery / "1.png").write_bytes((outside / "secret.png").read_bytes())
    (outside / "4.png").write_bytes((gallery / "cam" / "4.png").read_bytes())
    shutil.rmtree(gallery / "cam")
    os.symlink(outside, gallery / "cam")  # a folder of the gallery linked outside
    with pytest.raises(GalleryIndexError, match=r"entry 4 \('cam/4.png'\) leads through a symbolic link"):
        GalleryIndex.load(tmp_path / "index", verify=False)


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
