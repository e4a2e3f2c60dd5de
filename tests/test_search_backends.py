"""decd.search.backends: the exact chunked top-k (ties, chunking), FAISS (exact IndexFlatIP and approximate
index-factory backends), re-ranking and recall@k."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decd.cli import main
from decd.search import GalleryIndex, GalleryIndexError
from decd.search.backends import ann_search, build_ann_index, exact_top_k, recall_at_k, rerank_exact

from .search_fixtures import REPO, _brute_force, workspace  # noqa: F401

QUERY = "a man in a red shirt and blue trousers"


# ---------------------------------------------------------------------------------------------
# Exact top-k
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# FAISS
# ---------------------------------------------------------------------------------------------


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


def test_rerank_exact_rescores_candidates_like_exact_search():
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
