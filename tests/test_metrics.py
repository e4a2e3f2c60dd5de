"""Tests of the retrieval metrics (`decd.metrics`) and of their `evaluate` module."""

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from decd import metrics
from decd.metrics import retrieval_metrics


METRIC_MODULE_DIR = Path(metrics.__file__).parent / "metrics_module" / "decd_retrieval"
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def reference_retrieval_metrics(similarity, query_ids, gallery_ids, ks=(1, 5, 10)):
    """docs/protocol.md read literally: a full stable sort per query, then the matches per rank."""
    similarity = np.asarray(similarity, dtype=np.float64)
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    hits = {k: 0 for k in ks}
    average_precisions, inverse_negative_penalties = [], []
    for scores, query_id in zip(similarity, query_ids):
        order = np.argsort(-scores, kind="stable")  # equal scores: lower gallery index first
        matches = gallery_ids[order] == query_id
        if not matches.any():
            continue
        relevant_ranks = np.flatnonzero(matches)
        for k in ks:
            hits[k] += bool(matches[:k].any())
        precisions = np.cumsum(matches)[relevant_ranks] / (relevant_ranks + 1)
        average_precisions.append(precisions.mean())
        inverse_negative_penalties.append(len(relevant_ranks) / (relevant_ranks[-1] + 1))
    num_queries = len(average_precisions)
    results = {f"R{k}": 100.0 * hits[k] / num_queries for k in ks}
    results["mAP"] = 100.0 * float(np.mean(average_precisions))
    results["mINP"] = 100.0 * float(np.mean(inverse_negative_penalties))
    results["num_queries"] = num_queries
    results["num_queries_without_match"] = len(query_ids) - num_queries
    results["num_gallery"] = len(gallery_ids)
    return results


def assert_same_metrics(actual, expected, tolerance=1e-9):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=tolerance), key


def percent(fraction):
    return 100.0 * float(fraction)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases


def test_perfect_ranking():
    # Each query's only relevant item scores highest: rank 0, so R@k = AP = INP = 1 for every query.
    similarity = np.array([[0.9, 0.1, 0.2], [0.0, 0.8, 0.3], [0.1, 0.2, 0.7]], dtype=np.float32)
    results = retrieval_metrics(similarity, [4, 5, 6], [4, 5, 6])
    assert results == {
        "R1": 100.0,
        "R5": 100.0,
        "R10": 100.0,
        "mAP": 100.0,
        "mINP": 100.0,
        "num_queries": 3,
        "num_queries_without_match": 0,
        "num_gallery": 3,
    }


def test_ties_are_ordered_by_gallery_index():
    # Gallery ids [7, 7, 5, 5], query id 5, scores [0.3, 0.8, 0.8, 0.8].
    # Ranking, ties by lower index first: g1 (0.8, id 7), g2 (0.8, id 5), g3 (0.8, id 5), g0 (0.3).
    # Relevant at ranks 1 and 2: R@1 = 0, R@5 = 1, AP = (1/2 + 2/3) / 2 = 7/12, INP = 2/3.
    # (Higher index first would give g3, g2 at ranks 0 and 1: R@1 = 1, AP = 1.)
    results = retrieval_metrics(np.array([[0.3, 0.8, 0.8, 0.8]]), [5], [7, 7, 5, 5], ks=(1, 5))
    assert results["R1"] == 0.0
    assert results["R5"] == 100.0
    assert results["mAP"] == pytest.approx(percent(Fraction(7, 12)))
    assert results["mINP"] == pytest.approx(percent(Fraction(2, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_negative_zero_ties_with_zero(dtype):
    # -0.0 == 0.0: a tie, so gallery index 0 (id 5, relevant) comes first. Treating -0.0 as
    # smaller would rank it second (R@1 = 0).
    similarity = torch.tensor([[-0.0, 0.0, -1.0]], dtype=dtype)
    results = retrieval_metrics(similarity, [5], [5, 7, 7], ks=(1,))
    assert results["R1"] == 100.0 and results["mAP"] == 100.0


def test_query_without_match_is_left_out_and_counted():
    # Query 0 (id 1): its relevant g1 ranks second behind g0 (id 3): R@1 = 0, AP = INP = 1/2.
    # Query 1 (id 2): no gallery item has id 2, so it counts nowhere but in the count.
    similarity = np.array([[0.9, 0.5], [0.1, 0.2]])
    results = retrieval_metrics(similarity, [1, 2], [3, 1])
    assert results["num_queries"] == 1
    assert results["num_queries_without_match"] == 1
    assert results["num_gallery"] == 2
    assert results["R1"] == 0.0 and results["R5"] == 100.0
    assert results["mAP"] == pytest.approx(50.0)
    assert results["mINP"] == pytest.approx(50.0)


def test_several_relevant_items_per_query():
    # Gallery ids [1, 0, 1, 0, 0, 1]; both queries have scores [0.9, 0.8, 0.1, 0.7, 0.6, 0.5],
    # ranking g0, g1, g3, g4, g5, g2 (ids 1, 0, 0, 0, 1, 1).
    # Query id 1: relevant at ranks 0, 4, 5. AP = (1/1 + 2/5 + 3/6) / 3 = 19/30; INP = 3/6 = 1/2.
    # Query id 0: relevant at ranks 1, 2, 3. AP = (1/2 + 2/3 + 3/4) / 3 = 23/36; INP = 3/4.
    # R@1 = 1/2 (only query id 1 hits at rank 0), R@5 = 1. mAP = (19/30 + 23/36) / 2, mINP = 5/8.
    scores = [0.9, 0.8, 0.1, 0.7, 0.6, 0.5]
    results = retrieval_metrics(np.array([scores, scores]), [1, 0], [1, 0, 1, 0, 0, 1], ks=(1, 5))
    assert results["R1"] == pytest.approx(50.0)
    assert results["R5"] == pytest.approx(100.0)
    assert results["mAP"] == pytest.approx(percent((Fraction(19, 30) + Fraction(23, 36)) / 2))
    assert results["mINP"] == pytest.approx(percent(Fraction(5, 8)))


def test_reported_keys_follow_ks():
    results = retrieval_metrics(np.eye(3), [0, 1, 2], [0, 1, 2], ks=(2, 3))
    assert list(results) == ["R2", "R3", "mAP", "mINP", "num_queries", "num_queries_without_match", "num_gallery"]


# ---------------------------------------------------------------------------------------------
# Against the reference implementation


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_size", [1, 3, None, 1000])
def test_random_matrices_with_many_ties_match_reference(seed, chunk_size):
    rng = np.random.default_rng(seed)
    num_queries, num_gallery = rng.integers(1, 40), rng.integers(1, 60)
    num_identities = rng.integers(1, 8)
    # Integer-valued scores in a small range: most rows are full of ties.
    similarity = rng.integers(-3, 4, size=(num_queries, num_gallery)).astype(np.float32)
    query_ids = rng.integers(0, num_identities + 1, num_queries)  # id num_identities may be absent
    gallery_ids = rng.integers(0, num_identities, num_gallery)
    if not np.isin(query_ids, gallery_ids).any():
        query_ids[0] = gallery_ids[0]
    expected = reference_retrieval_metrics(similarity, query_ids, gallery_ids)
    assert_same_metrics(retrieval_metrics(similarity, query_ids, gallery_ids, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_random_float_matrices_match_reference(dtype):
    rng = np.random.default_rng(1)
    similarity = rng.normal(size=(50, 200)).astype(dtype)
    similarity[:, 100:110] = similarity[:, :10]  # duplicated gallery items: exact ties
    query_ids, gallery_ids = rng.integers(0, 20, 50), rng.integers(0, 20, 200)
    expected = reference_retrieval_metrics(similarity, query_ids, gallery_ids, ks=(1, 3, 50))
    assert_same_metrics(retrieval_metrics(similarity, query_ids, gallery_ids, ks=(1, 3, 50)), expected)


def test_infinite_scores_are_ranked():
    rng = np.random.default_rng(2)
    similarity = rng.integers(-2, 3, size=(20, 30)).astype(np.float64)
    similarity[rng.random((20, 30)) < 0.2] = np.inf
    similarity[rng.random((20, 30)) < 0.2] = -np.inf
    query_ids, gallery_ids = rng.integers(0, 4, 20), rng.integers(0, 4, 30)
    expected = reference_retrieval_metrics(similarity, query_ids, gallery_ids)
    assert_same_metrics(retrieval_metrics(similarity, query_ids, gallery_ids), expected)


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_many_relevant_items_use_chunk_sorting_and_match_reference(chunk_size):
    # More relevant items per query than the counting path takes: the chunk is sorted instead.
    rng = np.random.default_rng(3)
    num_gallery = 3 * metrics._MAX_RELEVANT_FOR_COUNTING
    similarity = rng.integers(0, 5, size=(12, num_gallery)).astype(np.float32)
    query_ids, gallery_ids = rng.integers(0, 2, 12), rng.integers(0, 2, num_gallery)
    expected = reference_retrieval_metrics(similarity, query_ids, gallery_ids)
    assert_same_metrics(retrieval_metrics(similarity, query_ids, gallery_ids, chunk_size=chunk_size), expected)


def test_sorting_path_matches_counting_path(monkeypatch):
    rng = np.random.default_rng(4)
    similarity = rng.integers(0, 3, size=(25, 40)).astype(np.float32)
    query_ids, gallery_ids = rng.integers(0, 6, 25), rng.integers(0, 5, 40)
    counting = retrieval_metrics(similarity, query_ids, gallery_ids, chunk_size=4)
    monkeypatch.setattr(metrics, "_MAX_RELEVANT_FOR_COUNTING", 0)
    sorting = retrieval_metrics(similarity, query_ids, gallery_ids, chunk_size=4)
    assert_same_metrics(sorting, counting)
    assert_same_metrics(sorting, reference_retrieval_metrics(similarity, query_ids, gallery_ids))


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(5)
    similarity = rng.integers(-2, 3, size=(30, 45)).astype(np.float32)
    query_ids, gallery_ids = rng.integers(0, 6, 30), rng.integers(0, 6, 45)
    from_numpy = retrieval_metrics(similarity, query_ids, gallery_ids)
    tensor = torch.from_numpy(similarity).requires_grad_()
    from_torch = retrieval_metrics(tensor, torch.from_numpy(query_ids), torch.from_numpy(gallery_ids).int())
    from_lists = retrieval_metrics(similarity.tolist(), query_ids.tolist(), gallery_ids.tolist())
    read_only = similarity.copy()
    read_only.flags.writeable = False
    from_read_only = retrieval_metrics(read_only, query_ids, gallery_ids)
    for results in (from_torch, from_lists, from_read_only):
        assert_same_metrics(results, from_numpy)
    assert_same_metrics(from_numpy, reference_retrieval_metrics(similarity, query_ids, gallery_ids))


def test_non_contiguous_similarity():
    rng = np.random.default_rng(6)
    similarity = rng.integers(-2, 3, size=(40, 30)).astype(np.float32)
    query_ids, gallery_ids = rng.integers(0, 5, 30), rng.integers(0, 5, 40)
    # A transposed view: gallery-by-query storage, read as [queries, gallery].
    expected = reference_retrieval_metrics(similarity.T, query_ids, gallery_ids)
    assert_same_metrics(retrieval_metrics(similarity.T, query_ids, gallery_ids, chunk_size=7), expected)
    assert_same_metrics(retrieval_metrics(torch.from_numpy(similarity).T, query_ids, gallery_ids), expected)


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "similarity, query_ids, gallery_ids, message",
    [
        (np.zeros(3), [0, 1, 2], [0], "similarity must have shape"),
        (np.zeros((2, 3)), [0, 1, 2], [0, 1, 2], "query_ids has length 3 .* num_queries = 2"),
        (np.zeros((2, 3)), [0, 1], [0, 1], "gallery_ids has length 2 .* num_gallery = 3"),
        (np.zeros((2, 3)), [[0], [1]], [0, 1, 2], r"query_ids must have shape \[num_queries\]"),
        (np.zeros((2, 3)), [0, 1], [[0, 1, 2]], r"gallery_ids must have shape \[num_gallery\]"),
        (np.array([[0.0, np.nan, 1.0], [0.0, 0.0, 0.0]]), [0, 1], [0, 1, 2], "NaN .* query row 0"),
        (np.zeros((2, 3)), [5, 6], [0, 1, 2], "none of the 2 queries has a relevant gallery item"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(similarity, query_ids, gallery_ids, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(similarity, query_ids, gallery_ids)


def test_bad_types_and_options():
    with pytest.raises(TypeError, match="similarity must be floating point"):
        retrieval_metrics(np.zeros((1, 1), dtype=np.int64), [0], [0])
    with pytest.raises(TypeError, match="query_ids must hold integer identities"):
        retrieval_metrics(np.zeros((1, 1)), [0.0], [0])
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(np.zeros((1, 1)), [0], [0], ks=(0,))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(np.zeros((1, 1)), [0], [0], chunk_size=0)


# ---------------------------------------------------------------------------------------------
# The evaluate module


@pytest.fixture
def offline_evaluate(monkeypatch):
    # Loading from a local path must not need the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    import evaluate

    return evaluate


def test_evaluate_module_matches_function(offline_evaluate, tmp_path):
    rng = np.random.default_rng(7)
    similarity = rng.integers(-2, 3, size=(23, 31)).astype(np.float32)
    query_ids, gallery_ids = rng.integers(0, 6, 23), rng.integers(0, 5, 31)
    retrieval = offline_evaluate.load(str(METRIC_MODULE_DIR), cache_dir=str(tmp_path))
    for start in range(0, len(similarity), 5):
        retrieval.add_batch(predictions=similarity[start : start + 5], references=query_ids[start : start + 5])
    results = retrieval.compute(gallery_ids=gallery_ids, ks=(1, 5, 10))
    assert_same_metrics(results, retrieval_metrics(similarity, query_ids, gallery_ids))
    with pytest.raises(ValueError, match="gallery_ids"):
        retrieval.compute(predictions=similarity, references=query_ids)


def test_evaluate_module_embeddings_configuration(offline_evaluate, tmp_path):
    rng = np.random.default_rng(8)
    query_embeddings = rng.normal(size=(17, 8)).astype(np.float32)
    gallery_embeddings = rng.normal(size=(29, 8)).astype(np.float32)
    query_ids, gallery_ids = rng.integers(0, 6, 17), rng.integers(0, 6, 29)
    retrieval = offline_evaluate.load(str(METRIC_MODULE_DIR), config_name="embeddings", cache_dir=str(tmp_path))
    results = retrieval.compute(
        predictions=query_embeddings,
        references=query_ids,
        gallery_ids=gallery_ids,
        gallery_embeddings=gallery_embeddings,
    )
    queries = torch.nn.functional.normalize(torch.from_numpy(query_embeddings), dim=1)
    gallery = torch.nn.functional.normalize(torch.from_numpy(gallery_embeddings), dim=1)
    assert_same_metrics(results, retrieval_metrics(queries @ gallery.T, query_ids, gallery_ids))
