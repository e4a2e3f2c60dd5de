"""`decd-search` (decd.cli): index then query by description or photo, a recorded approximate backend, and
user errors as one line with exit status 1."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from decd.cli import main, parse_arguments
from decd.search import SCORE_EXPLANATION, GalleryIndex, GalleryIndexError, MilvusGallery
from decd.search.format import ANN_FILE

from .milvus_fixtures import milvus_gallery, read_metadata_rows  # noqa: F401
from .search_fixtures import _index_command, _table_paths, gallery_and_model, photo_gallery, workspace  # noqa: F401

QUERY = "a man in a red shirt and blue trousers"


# ---------------------------------------------------------------------------------------------
# By description
# ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("arguments", [
    ["query", "URI", "--collection", "crops", "a woman", "--top_k", "5", "a man"],  # the synopsis' order
    ["query", "--top_k", "5", "URI", "a woman", "a man", "--collection", "crops"],  # options first
    ["query", "URI", "a woman", "--collection", "crops", "a man", "--top_k", "5"],  # between descriptions
])
def test_query_takes_its_options_before_between_or_after_the_descriptions(arguments):
    parsed = parse_arguments(arguments)
    assert (parsed.command, parsed.index, parsed.descriptions) == ("query", "URI", ["a woman", "a man"])
    assert (parsed.collection, parsed.top_k, parsed.images) == ("crops", 5, [])
    photo = parse_arguments(["query", "--image", "a.png", "INDEX", "--image", "b.png"])
    assert (photo.index, photo.descriptions, photo.images) == ("INDEX", [], ["a.png", "b.png"])


@pytest.mark.parametrize("arguments, message", [
    (["query", "INDEX", "a woman", "--topk", "3"], "unrecognized arguments: --topk"),
    (["query", "--top_k", "ten", "INDEX", "a woman"], "argument --top_k: invalid int value: 'ten'"),
    (["query", "--top_k", "3"], "required: INDEX"),
    (["index", "GALLERY", "--model", "M", "--output", "OUT", "extra"], "unrecognized arguments: extra"),
])
def test_the_command_line_still_refuses_what_it_does_not_know(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_arguments(arguments)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_query_with_options_first_ranks_as_with_options_last(workspace, capsys):
    index_dir = str(workspace["root"] / "index")
    assert main(["query", index_dir, QUERY, "--top_k", "3", "--backend", "exact"]) == 0
    options_last = capsys.readouterr().out
    assert main(["query", "--top_k", "3", index_dir, "--backend", "exact", QUERY]) == 0
    options_first = capsys.readouterr().out
    expected = workspace["index"].search_text(workspace["model"], workspace["processor"], QUERY, top_k=3)
    assert _table_paths(options_first) == _table_paths(options_last) == expected.paths[0]
    assert options_first == options_last


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["query", "{index}", "   "], "description is empty"),
        (["query", "{missing}", QUERY], "does not exist"),
        (["query", "{index}", QUERY, "--model", "{other}"], "rebuild the index"),
        (["query", "{index}", QUERY, "--model", "{missing}"], "could not load the model"),
        (["index", "{missing}", "--model", "{model}", "--output", "{missing}"], "does not exist"),
        (["index", "{empty}", "--model", "{model}", "--output", "{missing}"], "no images found"),
        (["query", "{index}", QUERY, "--top_k", "0"], "--top_k must be a positive whole number, got 0"),
        (["query", "{index}", QUERY, "--ef_search", "0"], "--ef_search must be a positive whole number, got 0"),
        (["query", "{index}", QUERY, "--nprobe", "-3"], "--nprobe must be a positive whole number, got -3"),
        (["query", "{index}", QUERY, "--rerank", "-1"], "--rerank must be a positive whole number, got -1"),
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
# By photo
# ---------------------------------------------------------------------------------------------


def test_cli_query_by_image_prints_ranking_and_explanation(setup, capsys, tmp_path):
    index_dir, gallery = setup["root"] / "index", setup["gallery"]
    query = gallery / setup["index"].paths[2]
    grid = tmp_path / "grid.png"
    assert main(["query", str(index_dir), "--image", str(query), "--top_k", "3", "--grid", str(grid)]) == 0
    output = capsys.readouterr().out
    rows = [line.split() for line in output.splitlines() if line.split() and line.split()[0].isdigit()]
    expected = setup["index"].search_image(setup["model"], setup["processor"], query, top_k=3)
    assert [row[3] for row in rows] == expected.paths[0]
    assert rows[0][2] == f"{100 / len(setup['index']):.3g}%"
    assert f"photo {query}" in output and SCORE_EXPLANATION in output and grid.is_file()
    # a description and a photo in one call: one table each
    assert main(["query", str(index_dir), "a man in a red shirt", "--image", str(query), "--top_k", "2"]) == 0
    assert capsys.readouterr().out.count("Query:") == 2


@pytest.mark.parametrize("arguments, message", [
    ([], "give a description"),
    (["--image", "{missing}"], "does not exist"),
    (["--image", "{query}", "--model", "{other}"], "rebuild the index"),
])
def test_cli_query_by_image_user_errors(setup, capsys, tmp_path, arguments, message):
    paths = dict(missing=tmp_path / "missing.png", other=setup["other_dir"],
                 query=setup["gallery"] / setup["index"].paths[0])
    code = main(["query", str(setup["root"] / "index")] + [argument.format(**paths) for argument in arguments])
    captured = capsys.readouterr()
    assert code == 1 and message in captured.err and "Traceback" not in captured.err


# ---------------------------------------------------------------------------------------------
# Approximate backends
# ---------------------------------------------------------------------------------------------


def test_cli_builds_a_recorded_backend_that_query_uses_and_load_verifies(gallery_and_model, tmp_path, capsys):
    pytest.importorskip("faiss")
    _, gallery, model = gallery_and_model
    output = tmp_path / "hnsw"
    assert main(_index_command(gallery, model, output, "--backend", "HNSW8")) == 0
    assert "backend HNSW8" in capsys.readouterr().out
    meta = json.loads((output / "meta.json").read_text())
    assert meta["backend"] == "HNSW8" and meta["ann_file"] == ANN_FILE and len(meta["ann_sha256"]) == 64
    index = GalleryIndex.load(output)
    assert index.backend == "HNSW8" and index.ann_index().ntotal == len(index)
    queries = torch.randn(4, index.embedding_dim)
    approximate = index.search(queries, top_k=5)  # the recorded backend by default
    exact = index.search(queries, top_k=5, backend="exact")
    # A tiny gallery: HNSW with efSearch >= the gallery size is exact.
    np.testing.assert_array_equal(approximate.indices.numpy(), exact.indices.numpy())
    reranked = index.search(queries, top_k=5, rerank=20)  # candidates re-scored from embeddings.npy
    np.testing.assert_array_equal(reranked.indices.numpy(), exact.indices.numpy())
    np.testing.assert_allclose(reranked.scores.numpy(), exact.scores.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"'exact', 'faiss' or this index's own backend 'HNSW8'"):
        index.search(queries, backend="IVF4,Flat")
    # A knob out of range is refused whichever backend searches, never quietly replaced by its default.
    for backend in (None, "exact"):
        for named, value in (("ef_search", 0), ("nprobe", -1), ("rerank", 2.5)):
            with pytest.raises(ValueError, match=rf"^{named} must be a positive whole number"):
                index.search(queries, top_k=5, backend=backend, **{named: value})
    assert index.search(queries, top_k=5, rerank=0).indices.tolist() == approximate.indices.tolist()

    assert main(["query", str(output), QUERY, "--top_k", "3", "--ef_search", "16"]) == 0
    hnsw_out = capsys.readouterr().out
    assert main(["query", str(output), QUERY, "--top_k", "3", "--backend", "exact"]) == 0
    assert capsys.readouterr().out == hnsw_out
    assert main(["query", str(output), QUERY, "--top_k", "3", "--rerank", "10"]) == 0
    assert capsys.readouterr().out == hnsw_out
    assert main(["query", str(output), QUERY, "--backend", "IVF4,Flat"]) == 1
    assert "--backend must be exact, faiss or HNSW8" in capsys.readouterr().err

    # The FAISS file is covered by the checksum: a flipped byte is refused in one line.
    data = bytearray((output / ANN_FILE).read_bytes())
    data[-5] ^= 0xFF
    (output / ANN_FILE).write_bytes(bytes(data))
    with pytest.raises(GalleryIndexError, match=r"ann.faiss does not match the checksum"):
        GalleryIndex.load(output)
    (output / ANN_FILE).unlink()
    with pytest.raises(GalleryIndexError, match=r"ann.faiss \(the HNSW8 index\) is missing"):
        GalleryIndex.load(output, verify=False)


def test_cli_index_refuses_a_bad_backend_before_encoding(gallery_and_model, tmp_path, capsys):
    pytest.importorskip("faiss")
    _, gallery, model = gallery_and_model
    assert main(_index_command(gallery, model, tmp_path / "bad", "--backend", "IVF9999,Flat")) == 1
    error = capsys.readouterr().err
    assert "has 9999 IVF lists but the gallery holds only" in error and "Traceback" not in error
    assert not (tmp_path / "bad" / "partial").exists()
    assert main(_index_command(gallery, model, tmp_path / "bad2", "--backend", "Nonsense")) == 1
    assert "'Nonsense' is not a FAISS index factory string" in capsys.readouterr().err


def test_cli_index_with_an_ann_backend_but_no_faiss_says_how_to_install(gallery_and_model, tmp_path, capsys,
                                                                        monkeypatch):
    _, gallery, model = gallery_and_model
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    assert main(_index_command(gallery, model, tmp_path / "index", "--backend", "HNSW32")) == 1
    error = capsys.readouterr().err
    assert "backend='HNSW32' needs the optional FAISS package: `pip install faiss-cpu`" in error
    assert not (tmp_path / "index").exists()


# ---------------------------------------------------------------------------------------------
# A Milvus collection (--store): Milvus Lite here; both engines are tested in test_search_milvus.py
# ---------------------------------------------------------------------------------------------


def test_cli_index_into_milvus_then_query_with_a_filter_and_a_grid(milvus_gallery, tmp_path, capsys):
    gallery, model_dir, local = milvus_gallery["gallery"], milvus_gallery["model_dir"], milvus_gallery["index"]
    store = tmp_path / "gallery.db"
    command = ["index", str(gallery), "--model", str(model_dir), "--store", str(store), "--metadata",
               str(milvus_gallery["metadata"]), "--batch_size", "5", "--quiet"]
    assert main(command) == 0
    output = capsys.readouterr().out
    assert "collection 'imgs'" in output and "12 images; 12 new" in output  # named after the gallery folder
    grid = tmp_path / "grid.png"
    assert main(["query", str(store), QUERY, "--top_k", "3", "--grid", str(grid)]) == 0  # its only collection
    expected = local.search_text(milvus_gallery["model"], milvus_gallery["processor"], QUERY, top_k=12)
    assert _table_paths(capsys.readouterr().out) == expected.paths[0][:3]
    with Image.open(grid) as picture:
        assert picture.format == "PNG" and picture.width > 3 * 64
    cameras = {path: row["camera"] for path, row in read_metadata_rows(milvus_gallery["metadata"]).items()}
    assert main(["query", f"{store}/imgs", QUERY, "--filter", 'camera == "c2"', "--image",
                 str(gallery / local.paths[4])]) == 0
    output = capsys.readouterr().out
    printed = _table_paths(output)
    by_text = [path for path in expected.paths[0] if cameras[path] == "c2"]
    assert printed[:len(by_text)] == by_text and len(printed) == 2 * len(by_text)
    shares = [float(line.split()[2].rstrip("%")) for line in output.splitlines()
              if line.split() and line.split()[0].isdigit() and len(line.split()) >= 4]
    assert shares[len(by_text) - 1] == 100.0  # the last of the filtered images: "top %" counts only those
    assert {cameras[path] for path in printed} == {"c2"}
    assert main(command) == 0 and "0 new, 0 changed, 0 rewritten without re-encoding, 0 removed, 12 unchanged" \
        in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["query", "{store}", QUERY, "--filter", 'camra == "c1"'], "camera (str), timestamp (int), score (float)"),
        (["query", "{store}", QUERY, "--backend", "exact"], "its own FLAT index"),
        (["query", "{index}", QUERY, "--filter", 'camera == "c1"'], "needs a gallery in Milvus"),
        (["query", "http://127.0.0.1:{port}/crops", QUERY], "does not answer"),
        (["query", "{root}", QUERY, "--collection", "nothing"], "there is no collection 'nothing'"),
        (["index", "{gallery}", "--model", "{model}", "--output", "{missing}", "--collection", "c"], "go with --store"),
        (["index", "{gallery}", "--model", "{other}", "--store", "{store}"], "--no-resume"),
        (["index", "{gallery}", "--model", "{missing}", "--store", "{root}", "--backend", "IVF1024,PQ64"],
         "Milvus Lite has no IVF_PQ index"),  # refused before the model (here a missing one) is loaded
    ],
)
def test_cli_milvus_errors_are_one_line(milvus_gallery, tmp_path, capsys, arguments, message):
    store = tmp_path / "gallery.db" / "imgs"
    MilvusGallery.build(milvus_gallery["model"], milvus_gallery["processor"], milvus_gallery["gallery"], store,
                        metadata=milvus_gallery["metadata"], model_id=str(milvus_gallery["model_dir"]),
                        show_progress=False)
    with __import__("socket").socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    values = dict(store=store, root=store.parent, index=milvus_gallery["index"].path, port=port,
                  gallery=milvus_gallery["gallery"], model=milvus_gallery["model_dir"],
                  other=milvus_gallery["other_dir"], missing=tmp_path / "new")
    assert main([argument.format(**values) for argument in arguments]) == 1
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.strip() and "Loading weights" not in line]  # the loading bar
    assert len(lines) == 1 and lines[0].startswith("decd-search") and message in lines[0], error


def test_query_output_is_safe_and_flags_what_changed_since_indexing(setup, tmp_path, capsys):
    """File names with ANSI escapes or newlines are printed escaped (no cleared screen, no forged row); results
    whose file was deleted or changed since indexing say so; a description without a word is refused before
    the model loads."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for number, path in enumerate(sorted(setup["gallery"].rglob("*.png"))):
        name = ["plain.png", "x\x1b[2J\x1b[31mred.png", "two\nrank 1  0.9999  0.1%  forged.png"][number % 3]
        shutil.copy(path, gallery / f"{number}-{name}")
    index_dir = tmp_path / "index"
    assert main(["index", str(gallery), "--model", str(setup["model_dir"]), "--output", str(index_dir),
                 "--quiet"]) == 0
    capsys.readouterr()
    names = sorted(path.name for path in gallery.iterdir())
    (gallery / names[0]).unlink()
    Image.new("RGB", (30, 60), (0, 255, 0)).save(gallery / names[1])
    assert main(["query", str(index_dir), QUERY, "--top_k", str(len(names))]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out
    table = out.split("path\n", 1)[1]
    assert sum(1 for line in table.splitlines() if re.match(r"\s*\d+\s+-?\d\.\d{4}\s", line)) == len(names)
    assert "forged" in out and "two\\nrank 1" in out  # one row, its newline escaped
    assert "(file deleted since indexing)" in out and "(file changed since indexing)" in out
    assert "2 of these images were deleted or changed since indexing" in out
    assert main(["query", str(index_dir), "the with of"]) == 1
    assert "made of punctuation or function words only" in capsys.readouterr().err
