"""Search backends: the exact chunked top-k every index has (`exact_top_k`), and the FAISS index-factory strings of
approximate ones, built once from the embeddings (`build_ann_index`) into `ann.faiss` (docs/large-galleries.md,
"Approximate search"); `recall_at_k` measures one against the other."""

from __future__ import annotations

import contextlib
import re
from typing import Optional, Union

import numpy as np
import torch

from .display import check_top_k
from .errors import GalleryIndexError

EXACT_BACKEND = "exact"
DEFAULT_CHUNK_SIZE = 65536  # gallery rows scored at once: Q x 65536 float32 scores (16 MB for 64 queries)
# Search-time defaults, chosen with benchmarks/search.py (recall@10 and speed per setting:
# docs/large-galleries.md). Raise them for more recall, lower them for more speed.
DEFAULT_NPROBE = 32  # IVF lists visited per query (of nlist; IVF4096: about 0.8% of the gallery scanned)
DEFAULT_EF_SEARCH = 256  # HNSW candidate-list size (raised to top_k)
DEFAULT_TRAIN_SIZE = 64  # training sample: this many vectors per IVF list (faiss warns below 39), at least 2**16


def is_exact(backend: Optional[str]) -> bool:
    """Whether `backend` names the exact search (None: the default)."""
    return backend is None or backend == EXACT_BACKEND


# ---- Exact top-k ---------------------------------------------------------------------------------
def _sorted_top_k(scores: torch.Tensor, indices: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` best candidates per row by (score descending, gallery index ascending).

    scores, indices: [num_queries, num_candidates]. Two stable sorts: by index, then by score.
    """
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :top_k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _chunk_top_k(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one [num_queries, chunk] score block with ties at the k-th score broken by lower index.

    `torch.topk` picks an arbitrary one of several values tied with the k-th best. Asking it for k + 1
    shows where that can happen (the (k+1)-th value equals the k-th); only those rows are redone with a
    stable sort, so the common case costs one `topk`.
    """
    probe = min(top_k + 1, scores.shape[1])
    values, columns = torch.topk(scores, probe, dim=1, sorted=True)
    if probe == top_k:  # the whole chunk is selected: no choice to make
        return values, columns
    ambiguous = torch.nonzero(values[:, top_k] == values[:, top_k - 1]).flatten()
    values, columns = values[:, :top_k].clone(), columns[:, :top_k].clone()
    if ambiguous.numel():
        order = torch.argsort(scores[ambiguous], dim=1, descending=True, stable=True)[:, :top_k]
        columns[ambiguous], values[ambiguous] = order, scores[ambiguous].gather(1, order)
    return values, columns


def exact_top_k(queries: torch.Tensor, gallery: Union[torch.Tensor, np.ndarray], top_k: int = 10,
                chunk_size: int = DEFAULT_CHUNK_SIZE,
                device: Optional[Union[str, torch.device]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of `queries` against `gallery`, `chunk_size` gallery rows at a time.

    Args:
        queries: [num_queries, dim] float tensor (normalise it first for cosine similarity).
        gallery: [num_gallery, dim] float32 tensor or numpy array (a memory-mapped array is read one
            chunk at a time, so memory stays at one chunk of scores and `top_k` candidates per query).
        top_k: results per query; clamped to `num_gallery`.
        chunk_size: gallery rows scored per matrix multiply (memory: num_queries x chunk_size x 4 bytes).
        device: where the multiplies run (default: the queries' device).

    Returns:
        (scores [num_queries, k] float32, indices [num_queries, k] int64), best first; equal scores are
        ordered by lower gallery index, so results do not depend on `chunk_size`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if (num_gallery := int(gallery.shape[0])) == 0:
        raise ValueError("the gallery is empty")
    device = torch.device(device) if device is not None else queries.device
    # [dim, num_queries]: `block @ queries_t` is the faster GEMM shape on MKL for a few dozen queries
    # (benchmarks/results/design_notes.md); the [chunk, num_queries] scores are then transposed for a row-wise topk.
    queries_t = queries.to(device=device, dtype=torch.float32).T.contiguous()
    top_k = min(top_k, num_gallery)
    best_scores = best_indices = None
    for start in range(0, num_gallery, chunk_size):
        if isinstance(block := gallery[start:start + chunk_size], np.ndarray):
            # A read-only memory map cannot back a tensor directly; copy one chunk (bounded).
            block = torch.from_numpy(block if block.flags.writeable else np.array(block))
        block = block.to(device=device, dtype=torch.float32, non_blocking=True)
        scores = (block @ queries_t).T.contiguous()
        scores = torch.nan_to_num_(scores, nan=float("-inf"))  # a damaged (NaN) row never ranks first
        values, columns = _chunk_top_k(scores, min(top_k, scores.shape[1]))
        columns = columns + start
        if best_scores is None:
            best_scores, best_indices = values, columns
        else:
            best_scores, best_indices = _sorted_top_k(torch.cat([best_scores, values], dim=1),
                                                      torch.cat([best_indices, columns], dim=1), top_k)
    return _sorted_top_k(best_scores, best_indices, top_k)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / |truth_i| (rows of gallery ids; -1 in `found` never counts)."""
    found, truth = np.asarray(found), np.asarray(truth)
    if found.shape[0] != truth.shape[0]:
        raise ValueError(f"{found.shape[0]} result rows for {truth.shape[0]} ground-truth rows")
    return float(np.mean([len(set(row[row >= 0].tolist()) & set(expected.tolist())) / len(expected)
                          for row, expected in zip(found, truth)]))


# ---- Approximate backends (FAISS index-factory strings) ------------------------------------------
def import_faiss(backend: str = "faiss"):
    """The `faiss` module, or an ImportError that says how to get it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f"backend={backend!r} needs the optional FAISS package: `pip install faiss-cpu` (or "
                          "faiss-gpu); backend='exact' needs nothing extra and gives the exact ranking") from error
    return faiss


def new_ann_index(spec: str, dim: int):
    """An empty FAISS index for the index-factory string `spec` with the inner-product metric.

    Raises GalleryIndexError naming the string when FAISS cannot parse it (or it does not fit `dim`),
    and ImportError (how to install it) without faiss.
    """
    faiss = import_faiss(spec)
    if not isinstance(spec, str) or not spec.strip() or spec.strip() != spec:
        raise GalleryIndexError(f"backend {spec!r} is not a FAISS index factory string (e.g. HNSW32, IVF4096,Flat)")
    try:
        return faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        reason = re.sub(r"^Error in .*? at \S+: ", "", reason)
        raise GalleryIndexError(f"backend {spec!r} is not a FAISS index factory string for {dim}-dim embeddings "
                                f"({reason}); use 'exact' or e.g. HNSW32, IVF4096,Flat, IVF4096,PQ64 (see the FAISS "
                                f"wiki 'The index factory')") from None


def ann_num_lists(index) -> Optional[int]:
    """nlist of an IVF index (None for any other kind)."""
    try:
        return int(import_faiss().extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def ann_train_size(spec_index, count: int, train_size: Optional[int] = None) -> int:
    """How many gallery vectors train the index: `train_size`, else DEFAULT_TRAIN_SIZE per IVF list (at least 2**16)."""
    if train_size is None:
        train_size = max(DEFAULT_TRAIN_SIZE * (ann_num_lists(spec_index) or 0), 1 << 16)
    return int(min(count, train_size))


def check_ann_size(index, spec: str, count: int) -> None:
    """Refuse an IVF index with more lists than gallery images (FAISS would fail or warn deep inside)."""
    if (lists := ann_num_lists(index)) is not None and count < lists:
        raise GalleryIndexError(f"backend {spec!r} has {lists} IVF lists but the gallery holds only {count} images: an "
                                f"IVF index needs at least one image per list (39 or more for good lists); use fewer "
                                f"lists (e.g. IVF{max(1, count // 39)},Flat), HNSW32, or 'exact'")


def build_ann_index(embeddings: np.ndarray, spec: str, train_size: Optional[int] = None, seed: int = 0,
                    chunk_size: int = DEFAULT_CHUNK_SIZE):
    """A FAISS index `spec` (inner product) holding every row of `embeddings`, in row order (FAISS id = row).

    Indexes that need training (IVF, PQ, ...) are trained on `ann_train_size` rows drawn without replacement with `seed`
    (sorted, so a memory map is read in order); rows are added `chunk_size` at a time, so memory is the index plus one
    chunk. Raises GalleryIndexError for a bad string or an IVF index with more lists than gallery rows.
    """
    count, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    index = new_ann_index(spec, dim)
    check_ann_size(index, spec, count)
    if not index.is_trained:
        size = ann_train_size(index, count, train_size)
        rows = np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False)) if size < count \
            else np.arange(count)
        try:
            index.train(np.ascontiguousarray(np.asarray(embeddings[rows]), dtype=np.float32))
        except RuntimeError as error:
            raise GalleryIndexError(f"training the FAISS index {spec!r} on {size} images failed: {error}") from None
    for start in range(0, count, chunk_size):
        index.add(np.ascontiguousarray(embeddings[start:start + chunk_size], dtype=np.float32))
    return index


def check_knobs(nprobe=None, ef_search=None, rerank=None, prefix: str = "") -> None:
    """Approximate search's knobs as a caller gives them: each None (its default) or a positive whole number
    (`check_top_k`'s rule), `rerank` 0 too (none); a ValueError names the knob (after `prefix`, "--" for the command
    line). One rule for `GalleryIndex.search`, `MilvusGallery.search` and `decd-search query`, whatever the backend."""
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("rerank", rerank)):
        if value is None or (name == "rerank" and value == 0 and not isinstance(value, bool)):
            continue  # the default; rerank 0: no re-scoring
        check_top_k(value, prefix + name)


def ann_search(index, queries: np.ndarray, top_k: int, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) [num_queries, top_k] from a FAISS index; rows the index could not fill are -1. The search-time
    knobs that `index` has are set first (IVF `nprobe`, HNSW `efSearch`, defaults DEFAULT_NPROBE and
    DEFAULT_EF_SEARCH; `check_knobs`); a knob the index lacks is ignored."""
    check_knobs(nprobe, ef_search)
    parameters = import_faiss().ParameterSpace()
    lists = ann_num_lists(index)
    for name, value, default in (("nprobe", nprobe, DEFAULT_NPROBE), ("efSearch", ef_search, DEFAULT_EF_SEARCH)):
        value = default if value is None else int(value)
        if name == "nprobe" and lists is not None:
            value = min(value, lists)
        with contextlib.suppress(RuntimeError):  # "could not set parameter": this kind of index has no such knob
            parameters.set_index_parameter(index, name, value)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(top_k))
    return scores, rows.astype(np.int64)


def rerank_exact(embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray,
                 top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score approximate candidates exactly: (scores, rows) [num_queries, top_k] of the best `top_k` of
    each row of `candidates` (gallery rows, -1 = none) by the inner product with the stored embeddings.

    Only the candidates' rows are read (once each, in row order: a memory-mapped `embeddings.npy` is read
    from disk, so a compressed index such as IVF4096,PQ64 needs RAM for its codes only). Ties are ordered
    by lower gallery row; places with no candidate keep row -1 and score -inf.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    rows = np.unique(candidates[candidates >= 0])
    vectors = np.asarray(embeddings[rows], dtype=np.float32) if rows.size else \
        np.zeros((0, queries.shape[1]), np.float32)
    exact = np.asarray(queries, dtype=np.float32) @ vectors.T  # [num_queries, unique candidates]
    positions = np.searchsorted(rows, np.where(candidates >= 0, candidates, rows[0] if rows.size else 0))
    scores = np.take_along_axis(exact, positions, axis=1) if rows.size else np.zeros(candidates.shape, np.float32)
    scores = np.where(candidates >= 0, scores, -np.inf).astype(np.float32)
    scores, order = _sorted_top_k(torch.from_numpy(scores), torch.from_numpy(candidates),
                                  min(top_k, candidates.shape[1]))
    return scores.numpy(), order.numpy()
