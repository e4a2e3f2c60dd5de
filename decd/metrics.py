"""Text-to-image retrieval metrics of the evaluation protocol: R@k (CMC), mAP and mINP.

The definitions are those of `docs/protocol.md` ("Retrieval metrics"):

- the gallery is ranked per query by descending similarity; equal similarities are ordered by
  gallery index, lower index first, so the ranking is deterministic;
- R@k is the percent of queries with at least one relevant gallery item in the first k ranks;
- AP(q) is the mean, over the relevant positions r (0-based), of (relevant items in ranks 0..r) /
  (r + 1); mAP is its mean over queries, in percent;
- INP(q) is (number of relevant items) / (1 + the 0-based rank of the last relevant item); mINP is
  its mean over queries, in percent;
- a query whose identity has no gallery item is left out of every metric and counted.

Nothing here sorts the whole similarity matrix. All three metrics only need the ranks of the few
relevant gallery items of each query, and the rank of gallery item j is the number of gallery
items placed before it: those with a higher score, plus those with an equal score and a lower
index. Counting them is one comparison of every gallery item against every relevant score, so a
query costs O(num_gallery * num_relevant) simple vector work instead of a sort. Queries are
processed in chunks whose working set stays near `_CHUNK_BYTES`; a chunk whose queries have many
relevant items falls back to a stable sort of that chunk only.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch


__all__ = ["retrieval_metrics"]

# Target working set of one chunk of queries.
_CHUNK_BYTES = 256 * 2**20
# On CPU the comparisons are done a few queries at a time so that the boolean temporary stays in
# cache; this is its target size (about one query of a 20k gallery; benchmarks/results/design_notes.md).
_CPU_COMPARE_BYTES = 2**20
# Above this many relevant items per query, sort the chunk instead of counting comparisons.
# Counting costs num_relevant comparisons per gallery item, a sort ~log2(num_gallery) slower steps, so
# counting wins up to a few hundred relevant items (benchmarks/results/design_notes.md). 128 also
# bounds the comparison memory.
_MAX_RELEVANT_FOR_COUNTING = 128


def retrieval_metrics(
    similarity: Any,
    query_ids: Any,
    gallery_ids: Any,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
) -> dict[str, float | int]:
    """Compute R@k, mAP and mINP of a text-to-image retrieval.

    Args:
        similarity: `[num_queries, num_gallery]` scores (cosine similarity in the protocol), a
            torch tensor or a numpy array of any floating dtype. Higher means more similar.
            A tensor is processed on its own device. NaN is an error; +-inf are allowed.
        query_ids: `[num_queries]` integer identity of each query (caption).
        gallery_ids: `[num_gallery]` integer identity of each gallery item (image).
        ks: the cut-offs k of the R@k values to report (positive integers).
        chunk_size: number of queries processed at once; by default chosen so that a chunk's
            working set stays around 256 MB.

    Returns:
        A dict with, in percent (floats in [0, 100]), `R{k}` for each k in `ks`, `mAP` and
        `mINP`; and as ints `num_queries` (queries evaluated), `num_queries_without_match`
        (queries left out because no gallery item has their identity) and `num_gallery`.

    Raises:
        ValueError: on badly shaped inputs, NaN similarities, bad `ks` or `chunk_size`, or when
            no query has a relevant gallery item.
        TypeError: when `similarity` is not floating point or the ids are not integers.
    """
    similarity = _as_similarity(similarity)
    num_queries, num_gallery = similarity.shape
    device = similarity.device
    query_ids = _as_ids(query_ids, "query_ids", "num_queries", num_queries, device)
    gallery_ids = _as_ids(gallery_ids, "gallery_ids", "num_gallery", num_gallery, device)
    ks = _check_ks(ks)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")

    # Group the gallery by identity once: the relevant items of a query are then one slice of
    # `gallery_by_identity`, ascending in gallery index.
    gallery_by_identity = torch.sort(gallery_ids, stable=True).indices
    identities, identity_counts = torch.unique_consecutive(gallery_ids[gallery_by_identity], return_counts=True)
    identity_starts = torch.cumsum(identity_counts, 0) - identity_counts
    identity_slot = torch.searchsorted(identities, query_ids).clamp_(max=max(len(identities) - 1, 0))
    if len(identities) > 0:
        has_match = identities[identity_slot] == query_ids
        relevant_counts = torch.where(has_match, identity_counts[identity_slot], 0)
        relevant_starts = identity_starts[identity_slot]
    else:
        relevant_counts = relevant_starts = torch.zeros_like(query_ids)

    if chunk_size is None:
        max_relevant = int(relevant_counts.max()) if num_queries > 0 else 0
        chunk_size = _auto_chunk_size(num_gallery, max_relevant)

    best_rank_hits = torch.zeros(len(ks), dtype=torch.int64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_evaluated = 0
    cutoffs = torch.tensor(ks, dtype=torch.int64, device=device)

    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        scores = similarity[start:stop]
        if torch.isnan(scores).any():
            bad_row = start + int(torch.isnan(scores).any(dim=1).nonzero()[0])
            raise ValueError(f"similarity contains NaN (first in query row {bad_row})")
        counts = relevant_counts[start:stop]
        keep = counts > 0
        if not bool(keep.all()):
            scores, counts = scores[keep], counts[keep]
            starts, chunk_query_ids = relevant_starts[start:stop][keep], query_ids[start:stop][keep]
        else:
            starts, chunk_query_ids = relevant_starts[start:stop], query_ids[start:stop]
        if len(counts) == 0:
            continue

        ranks = _relevant_ranks(scores, counts, starts, chunk_query_ids, gallery_by_identity, gallery_ids)
        best_rank, average_precision, inverse_negative_penalty = _per_query_metrics(ranks, counts)
        best_rank_hits += (best_rank[:, None] < cutoffs[None, :]).sum(0)
        ap_sum += average_precision.sum()
        inp_sum += inverse_negative_penalty.sum()
        num_evaluated += len(counts)

    if num_evaluated == 0:
        raise ValueError(
            f"none of the {num_queries} queries has a relevant gallery item (no gallery item shares "
            "its identity), so no retrieval metric is defined; check that query_ids and gallery_ids "
            "use the same identity numbering"
        )
    results: dict[str, float | int] = {f"R{k}": 100.0 * hits / num_evaluated
                                       for k, hits in zip(ks, best_rank_hits.tolist())}
    return dict(results, mAP=100.0 * float(ap_sum) / num_evaluated, mINP=100.0 * float(inp_sum) / num_evaluated,
                num_queries=num_evaluated, num_queries_without_match=num_queries - num_evaluated,
                num_gallery=num_gallery)


def _relevant_ranks(
    scores: torch.Tensor,
    counts: torch.Tensor,
    starts: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_by_identity: torch.Tensor,
    gallery_ids: torch.Tensor,
) -> torch.Tensor:
    """0-based ranks of the relevant gallery items of a chunk of queries.

    `scores` is `[chunk, num_gallery]`; every query has `counts > 0` relevant items. Returns
    `[chunk, max(counts)]` int64, each row ascending, padded with `num_gallery` past `counts`.
    """
    num_gallery = scores.shape[1]
    max_relevant = int(counts.max())
    if max_relevant > _MAX_RELEVANT_FOR_COUNTING:
        return _relevant_ranks_by_sorting(scores, query_ids, gallery_ids, max_relevant)

    slot = torch.arange(max_relevant, device=scores.device)
    is_real = slot[None, :] < counts[:, None]
    positions = torch.where(is_real, starts[:, None] + slot[None, :], 0)
    relevant_index = gallery_by_identity[positions]  # [chunk, max_relevant], padding is garbage

    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.to(torch.float32)  # exact, and numpy has no bfloat16
    relevant_scores = torch.gather(scores, 1, relevant_index)
    if scores.device.type == "cpu":
        # numpy's count_nonzero is several times faster than torch's boolean sum on CPU, and being
        # single-threaded it does not suffer when other processes hold the cores.
        block = max(1, _CPU_COMPARE_BYTES // (max_relevant * num_gallery))
        ranks = _count_ahead(
            scores.numpy(), relevant_scores.numpy(), relevant_index.numpy(), is_real.numpy(), np.arange(num_gallery), block
        )
        ranks = torch.from_numpy(ranks)
    else:
        gallery_index = torch.arange(num_gallery, device=scores.device)
        ranks = _count_ahead(scores, relevant_scores, relevant_index, is_real, gallery_index, len(scores))
    ranks = torch.where(is_real, ranks, num_gallery)
    return torch.sort(ranks, dim=1).values


def _count_ahead(scores, relevant_scores, relevant_index, is_real, gallery_index, block: int):
    """Number of gallery items ranked before each relevant item (numpy arrays or torch tensors).

    `scores` is `[chunk, num_gallery]`; `relevant_scores`, `relevant_index` (gallery index) and
    `is_real` (False on padding) are `[chunk, max_relevant]`; `gallery_index` is
    `arange(num_gallery)`. Compares `block` queries at a time. Returns int64 `[chunk, max_relevant]`.
    """
    is_numpy = isinstance(scores, np.ndarray)

    def count(mask):
        return np.count_nonzero(mask, axis=-1) if is_numpy else mask.sum(-1)

    counts = []
    for first in range(0, len(scores), block):
        rows = slice(first, first + block)
        gallery_scores, own_scores = scores[rows, None, :], relevant_scores[rows, :, None]
        ahead = count(gallery_scores > own_scores)
        equal = gallery_scores == own_scores
        # A relevant item always equals itself; a second equal score is a tie, which the lower
        # gallery index wins. Ties are rare with real embeddings, so they are only resolved where
        # they occur.
        if ((count(equal) > 1) & is_real[rows]).any():
            ahead = ahead + count(equal & (gallery_index < relevant_index[rows, :, None]))
        counts.append(ahead)
    ranks = np.concatenate(counts) if is_numpy else torch.cat(counts)
    return ranks.astype(np.int64) if is_numpy else ranks.to(torch.int64)


def _relevant_ranks_by_sorting(
    scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor, max_relevant: int
) -> torch.Tensor:
    """Same result as the counting path, from a stable sort of this chunk only."""
    num_gallery = scores.shape[1]
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.to(torch.float32)  # exact; sorting is not implemented for every half type
    # Stable descending sort: equal scores keep ascending gallery index.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    matches = gallery_ids[order] == query_ids[:, None]
    del order
    rows, ranks = matches.nonzero(as_tuple=True)  # row-major: ranks ascend within a row
    counts = matches.sum(1)
    slot = torch.arange(len(rows), device=scores.device) - (torch.cumsum(counts, 0) - counts)[rows]
    padded = torch.full((len(scores), max_relevant), num_gallery, dtype=torch.int64, device=scores.device)
    padded[rows, slot] = ranks
    return padded


def _per_query_metrics(ranks: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank, AP and INP (fractions, float64) of each query from its ascending relevant ranks.

    `ranks` is `[chunk, max_relevant]`, ascending, padded past `counts` (`[chunk]`, all > 0).
    """
    slot = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)
    is_real = slot[None, :] <= counts[:, None]
    # The t-th relevant item (1-based) at 0-based rank p has precision t / (p + 1).
    precision = torch.where(is_real, slot[None, :] / (ranks.to(torch.float64) + 1.0), 0.0)
    counts_float = counts.to(torch.float64)
    average_precision = precision.sum(1) / counts_float
    last_rank = torch.gather(ranks, 1, (counts - 1)[:, None])[:, 0]
    inverse_negative_penalty = counts_float / (last_rank.to(torch.float64) + 1.0)
    return ranks[:, 0], average_precision, inverse_negative_penalty


def _auto_chunk_size(num_gallery: int, max_relevant: int) -> int:
    """Queries per chunk so that the chunk's working set stays around `_CHUNK_BYTES`."""
    if max_relevant > _MAX_RELEVANT_FOR_COUNTING:
        # Sorting path: scores, int64 indices, permuted ids and matches per gallery item.
        bytes_per_query = num_gallery * (4 + 8 + 8 + 1)
    else:
        # Counting path: a float32 copy of the scores (half types only, but count it) and the
        # boolean comparisons, done for the whole chunk at once on accelerators.
        bytes_per_query = num_gallery * (4 + 2 * max(max_relevant, 1))
    return max(1, _CHUNK_BYTES // max(bytes_per_query, 1))


def _as_similarity(similarity: Any) -> torch.Tensor:
    if isinstance(similarity, torch.Tensor):
        tensor = similarity.detach()
    else:
        array = np.asarray(similarity)
        if array.dtype == object:
            raise ValueError("similarity must be a rectangular [num_queries, num_gallery] array (rows differ in length)")
        with warnings.catch_warnings():
            # Read-only arrays warn that torch could write into them; nothing here writes.
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    if tensor.ndim != 2:
        raise ValueError(
            f"similarity must have shape [num_queries, num_gallery], got {tuple(tensor.shape)} ({tensor.ndim} dimensions)"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"similarity must be floating point, got dtype {tensor.dtype}")
    return tensor


def _as_ids(ids: Any, name: str, length_name: str, expected_length: int, device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        tensor = ids.detach()
    else:
        array = np.asarray(ids)
        if array.dtype == object:
            raise TypeError(f"{name} must be a 1-D array of integer identities, got an object array")
        tensor = torch.from_numpy(np.array(array, copy=True))
    if tensor.ndim != 1:
        raise ValueError(f"{name} must have shape [{length_name}], got {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer identities, got dtype {tensor.dtype}")
    if len(tensor) != expected_length:
        raise ValueError(
            f"{name} has length {len(tensor)} but similarity has {length_name} = {expected_length} "
            f"(similarity is [num_queries, num_gallery])"
        )
    return tensor.to(device=device, dtype=torch.int64)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has duplicates: {ks!r}")
    return tuple(int(k) for k in ks)
