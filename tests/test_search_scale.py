"""Galleries beyond one machine: `decd-search index` under `accelerate launch` (bit-identical to one process,
resumable across process counts) and approximate FAISS backends recorded in the index."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decd.cli import main
from decd.search import (
    ANN_FILE,
    BuildInterrupted,
    GalleryIndex,
    GalleryIndexError,
    build_ann_index,
    exact_top_k,
    recall_at_k,
)
from decd.synthetic import generate_synthetic_person_search
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
QUERY = "a man in a red shirt and blue trousers"


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


def _launch(tmp_path, processes, arguments):
    """`accelerate launch --cpu --num_processes N -m decd.cli ARGS` (one thread per process, like the one-process run)."""
    command = [ACCELERATE, "launch", "--cpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               "-m", "decd.cli", *arguments]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _single(tmp_path, arguments):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "decd.cli", *arguments], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _same_index(first: Path, second: Path):
    np.testing.assert_array_equal(np.load(first / "embeddings.npy"), np.load(second / "embeddings.npy"))
    assert (first / "embeddings.npy").read_bytes() == (second / "embeddings.npy").read_bytes()
    assert json.loads((first / "paths.json").read_text()) == json.loads((second / "paths.json").read_text())
    meta_one, meta_two = (json.loads((folder / "meta.json").read_text()) for folder in (first, second))
    for key in ("count", "embedding_dim", "embeddings_sha256", "model_checksum", "model_id", "skipped",
                "num_skipped", "num_files", "backend", "format", "format_version"):
        assert meta_one[key] == meta_two[key], key
    assert sorted(path.name for path in second.iterdir()) == ["embeddings.npy", "meta.json", "paths.json"]


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate's launcher is not installed next to this Python")
def test_accelerate_launch_two_processes_builds_the_one_process_index_bit_for_bit(gallery_and_model, tmp_path):
    _, gallery, model = gallery_and_model
    one = _single(tmp_path, _index_command(gallery, model, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(tmp_path, 2, _index_command(gallery, model, tmp_path / "two"))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    _same_index(tmp_path / "one", tmp_path / "two")
    # The skipped file is reported once (by the main process), like a one-process build.
    assert two.stdout.count("Indexed ") == 1 and two.stdout.count("Skipped 1 unreadable") == 1, two.stdout
    assert two.stdout.count("  bad.png: not a readable image") == 1, two.stdout
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["skipped"][0]["path"] == "bad.png"

    # Resumable across process counts: one process stops after 2 batches, two processes finish the rest.
    torch.set_num_threads(1)
    try:
        loaded_model = DecdModel.from_pretrained(model).eval()
        processor = DecdProcessor.from_pretrained(model)
        with pytest.raises(BuildInterrupted):
            GalleryIndex.build(loaded_model, processor, gallery, tmp_path / "resumed", batch_size=3, shard_batches=1,
                               max_batches=2, show_progress=False)
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    assert len(list((tmp_path / "resumed" / "partial").glob("shard_*.json"))) == 2
    resumed = _launch(tmp_path, 2, _index_command(gallery, model, tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _same_index(tmp_path / "one", tmp_path / "resumed")

    # The output-folder safety check holds under the launcher: a foreign folder is refused, untouched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = _launch(tmp_path, 2, _index_command(gallery, model, foreign))
    assert refused.returncode != 0
    assert "not a DECD gallery index" in refused.stderr
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


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
    with pytest.warns(UserWarning, match="bad.png"):
        index = GalleryIndex.build(model, processor, gallery, output, distributed=_FakeState(0, 3), **options)
    assert index.paths == reference.paths and index.skipped == reference.skipped
    np.testing.assert_array_equal(np.asarray(index.embeddings), np.asarray(reference.embeddings))
    assert not (output / "partial").exists()


# ---------------------------------------------------------------------------------------------
# Approximate backends
# ---------------------------------------------------------------------------------------------


def test_recall_at_k_is_the_mean_overlap_with_the_exact_top_k():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 1) / 2)
    assert recall_at_k(truth, truth) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(found[:1], truth)


def _clustered(count, dim, seed=0, clusters=20):
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    rows = centres[torch.randint(0, clusters, (count,), generator=generator)]
    return F.normalize(rows + 0.3 * torch.randn(count, dim, generator=generator) / dim ** 0.5, dim=-1).numpy()


@pytest.mark.parametrize("spec, params, fewer", [("HNSW16", dict(ef_search=256), dict(ef_search=16)),
                                                  ("IVF8,Flat", dict(nprobe=8), dict(nprobe=1)),
                                                  ("IVF8,PQ16x4", dict(nprobe=8), dict(nprobe=1))])
def test_ann_backends_find_the_exact_neighbours(spec, params, fewer):
    pytest.importorskip("faiss")
    gallery = _clustered(2000, 32)
    queries = torch.from_numpy(_clustered(50, 32, seed=1))
    index = GalleryIndex(gallery, None, dict(backend="exact"))
    truth = exact_top_k(queries, gallery, 10)[1].numpy()
    ann = build_ann_index(gallery, spec, train_size=1000)
    assert ann.ntotal == len(gallery)
    from decd.search import ann_search

    scores, found = ann_search(ann, queries.numpy(), 10, **params)
    recall = recall_at_k(found, truth)
    # HNSW with a long candidate list and IVF with every list visited are (near) exact; PQ16x4 codes (2 dims
    # per 4 bits) only approximate the scores. The search knobs are applied: fewer candidates, lower recall.
    assert recall >= (0.4 if "PQ" in spec else 0.97), recall
    assert recall_at_k(ann_search(ann, queries.numpy(), 10, **fewer)[1], truth) < recall
    assert recall_at_k(index.search(queries, top_k=10).indices.numpy(), truth) == 1.0


def test_bad_factory_string_small_ivf_and_missing_faiss_are_clear_errors(monkeypatch):
    pytest.importorskip("faiss")
    gallery = _clustered(100, 32)
    with pytest.raises(GalleryIndexError, match=r"'IVF12,Bogus' is not a FAISS index factory string"):
        build_ann_index(gallery, "IVF12,Bogus")
    with pytest.raises(GalleryIndexError, match="multiple of the number of subquantizers"):
        build_ann_index(gallery, "IVF4,PQ7")
    with pytest.raises(GalleryIndexError, match=r"has 4096 IVF lists but the gallery holds only 100 images"):
        build_ann_index(gallery, "IVF4096,Flat")
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"backend='HNSW32' needs the optional FAISS package: `pip install faiss-cpu`"):
        build_ann_index(gallery, "HNSW32")


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


def test_search_benchmark_measures_recall_against_its_exact_rows(tmp_path):
    pytest.importorskip("faiss")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import search as benchmark
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    common = dict(gallery_size=3000, dim=32, num_queries=8, top_k=10, repeats=1, chunk_size=1000, data="uniform",
                  clusters=30, recall_queries=40, truth_file=str(tmp_path / "truth.npy"))
    exact = benchmark.run_case("exact", **common)
    truth = np.load(tmp_path / "truth.npy")
    assert exact["recall_at_k"] == 1.0 and truth.shape == (40, 10)
    assert exact["index_bytes"] == 3000 * 32 * 4
    rows = benchmark.run_case("IVF16,Flat", **common, nprobes=(1, 16), train_size=1000)
    assert [row["setting"] for row in rows] == [dict(nprobe=1), dict(nprobe=16)]
    assert rows[1]["recall_at_k"] == 1.0  # every list visited: exact (up to float ties)
    assert rows[0]["recall_at_k"] < 1.0
    assert all(row["index_bytes"] > 3000 * 32 * 4 for row in rows)  # vectors + ids + centroids


def test_cli_index_with_an_ann_backend_but_no_faiss_says_how_to_install(gallery_and_model, tmp_path, capsys,
                                                                        monkeypatch):
    _, gallery, model = gallery_and_model
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    assert main(_index_command(gallery, model, tmp_path / "index", "--backend", "HNSW32")) == 1
    error = capsys.readouterr().err
    assert "backend='HNSW32' needs the optional FAISS package: `pip install faiss-cpu`" in error
    assert not (tmp_path / "index").exists()


def test_rerank_exact_rescores_candidates_like_exact_search():
    from decd.search import rerank_exact

    gallery = _clustered(500, 16, seed=3)
    queries = _clustered(6, 16, seed=4)
    scores, truth = exact_top_k(torch.from_numpy(queries), gallery, 5)
    # Candidates: the true top-5 shuffled among wrong rows and holes (-1), as a lossy index returns them.
    generator = np.random.default_rng(0)
    candidates = np.concatenate([truth.numpy(), generator.integers(0, 500, (6, 20)), -np.ones((6, 3), np.int64)], 1)
    candidates = np.stack([generator.permutation(row) for row in candidates])
    found_scores, found = rerank_exact(gallery, queries, candidates, 5)
    np.testing.assert_array_equal(found, truth.numpy())
    np.testing.assert_allclose(found_scores, scores.numpy(), atol=1e-6)
    only_holes = rerank_exact(gallery, queries[:1], -np.ones((1, 4), np.int64), 2)
    assert only_holes[1].tolist() == [[-1, -1]] and np.isneginf(only_holes[0]).all()
