"""`GalleryIndex`: a gallery's embeddings, their paths and the model that made them; building, opening, searching.
The index folder: `decd.search.format`; its build: `decd.search.build`; its searches: `decd.search.backends`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from inference_decd import embed_images

from .backends import (DEFAULT_CHUNK_SIZE, DEFAULT_EF_SEARCH, EXACT_BACKEND, ann_search, build_ann_index, check_knobs,
                       exact_top_k, import_faiss, is_exact, rerank_exact)
from .build import build_index
from .display import check_top_k, display_path
from .errors import GalleryIndexError
from .format import ANN_FILE, PathLike, file_fingerprint, model_checksum, model_meta, read_index
from .protocol import Gallery, SearchResult, filter_options, is_text, query_embeddings


class GalleryIndex(Gallery):
    """L2-normalised image embeddings of a gallery, their paths and the model that made them.

    Attributes:
        embeddings: [count, embedding_dim] float32 numpy array (memory-mapped when loaded from disk).
        paths: image paths relative to `gallery_dir` (or None for a gallery of in-memory images).
        meta: the `meta.json` dictionary (see `decd.search.format`).
        path: the index folder (None for an in-memory index).
    """

    def __init__(self, embeddings: np.ndarray, paths: Optional[list[str]], meta: dict,
                 path: Optional[PathLike] = None):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [count, dim], got shape {embeddings.shape}")
        if paths is not None and len(paths) != embeddings.shape[0]:
            raise ValueError(f"{len(paths)} paths for {embeddings.shape[0]} embeddings")
        self.embeddings, self.paths, self.meta = embeddings, paths, meta
        self.path = Path(path) if path is not None else None
        self._faiss_index = self._ann_index = None  # FAISS indexes, built or read on first use

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        return (f"GalleryIndex(count={len(self)}, embedding_dim={self.embedding_dim}, "
                f"model_id={self.model_id!r}, path={str(self.path) if self.path else None!r})")

    @property
    def embedding_dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def skipped(self) -> list[dict]:
        """Unreadable files left out of the index: [{"path": relative path, "error": reason}, ...]."""
        return list(self.meta.get("skipped", []))

    @property
    def filter_fields(self) -> dict:
        """{}: a local index has no fields to filter on (a Milvus collection has)."""
        return {}

    def file_status(self, row: int) -> Optional[str]:
        """"deleted" or "changed" when the image of gallery row `row` is gone or differs from the one embedded (its
        size or time), None when it is the same or the index records no fingerprints (older indexes)."""
        if (fingerprints := self.meta.get("fingerprints")) is None or self.paths is None or row < 0:
            return None
        if (current := file_fingerprint(self.image_path(row))) is None:
            return "deleted"
        return None if current == list(fingerprints[row]) else "changed"

    def image_path(self, index: int) -> Optional[Path]:
        """The absolute path of gallery row `index` (None without paths)."""
        if self.paths is None:
            return None
        relative = self.paths[int(index)]
        return self.gallery_dir / relative if self.gallery_dir is not None else Path(relative)

    # written in decd.search.build: `build` is the build itself, which returns the finished index
    build = classmethod(build_index)

    @classmethod
    @torch.no_grad()
    def from_images(cls, model, processor, images: Sequence[Any], batch_size: int = 64,
                    model_id: Optional[str] = None, show_progress: bool = False) -> "GalleryIndex":
        """An in-memory index of a list of images (anything `load_image` opens; nothing written).

        Paths are kept as given (`paths`, `None` if any item is a PIL image). Unreadable items raise:
        a list the caller assembled is expected to be valid, unlike a folder scan.
        """
        if not (images := list(images)):
            raise GalleryIndexError("the gallery is an empty list of images")
        embeddings = embed_images(model, processor, images, batch_size, show_progress=show_progress).numpy()
        paths = [str(item) for item in images] if all(isinstance(item, (str, os.PathLike)) for item in images) else None
        return cls(embeddings, paths, dict(model_meta(model, processor, model_id, model_checksum(model)),
                                           embedding_dim=int(embeddings.shape[1]), gallery_dir=None, count=len(images),
                                           skipped=[], num_skipped=0))

    @classmethod
    def load(cls, path: PathLike, mmap: bool = True, verify: bool = True) -> "GalleryIndex":
        """Open an index folder written by `build`, checking that it is whole.

        Args:
            path: the index folder.
            mmap: memory-map the embeddings (no read up front) instead of reading them into memory.
            verify: also read the whole embeddings file once to check its sha256 against the one recorded at build time
                and that every value is finite (one read of the file: a 10^6-image index at dim 512 is 2 GB).
                `verify=False` keeps the cheap checks only (JSON, shapes, dtype, counts): for an index verified before,
                when opening must be instant.

        Raises:
            IndexNotFoundError: no such folder, or an unfinished build.
            GalleryIndexError: a damaged or outdated index (one line; rebuild it).
        """
        return cls(*read_index(path, mmap, verify), path)

    def search(self, queries: Union[torch.Tensor, np.ndarray, str, Sequence[str]], top_k: int = 10,
               chunk_size: int = DEFAULT_CHUNK_SIZE, backend: Optional[str] = None, model=None, processor=None,
               device: Optional[Union[str, torch.device]] = None, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None, rerank: Optional[int] = None,
               filter: Optional[str] = None) -> SearchResult:
        """Rank the gallery for each query by cosine similarity.

        Args:
            queries: query embeddings [num_queries, dim] or [dim] (normalised here), or description(s) (str / list of
                str), which need `model` and `processor` (see `search_text`).
            top_k: results per query (clamped to the gallery size).
            chunk_size: gallery rows scored at once (exact backend); results do not depend on it.
            backend: None (default): the backend the index was built with (`meta["backend"]`, "exact" when none);
                "exact" (chunked matrix multiply + top-k, ties by lower gallery index); "faiss" (`faiss.IndexFlatIP`,
                also exact; needs faiss installed, keeps its own copy of the embeddings, and orders equal scores its own
                way); or the index's own FAISS factory string (an approximate search in `ann.faiss`: rows it could not
                fill get index -1, score -inf and path None).
            device: where the exact backend multiplies (default CPU).
            nprobe: IVF lists visited per query (default DEFAULT_NPROBE): more is slower and closer to exact.
            ef_search: HNSW candidate list size (default DEFAULT_EF_SEARCH, raised to top_k): likewise.
            rerank: approximate backends: fetch this many candidates and re-score them exactly against `embeddings`
                (`rerank_exact`; read from disk when memory-mapped), keeping the best `top_k`. Restores the ranking a
                compressed (PQ) index loses; None or 0: the index's own scores.
            filter: none (a local index has no fields to filter on: GalleryIndexError).
        """
        filter_options(self, filter)
        if is_text(queries):
            if model is None or processor is None:
                raise ValueError("searching with text needs `model` and `processor` (or pass embeddings)")
            return self.search_text(model, processor, queries, top_k=top_k, chunk_size=chunk_size, backend=backend,
                                    device=device, nprobe=nprobe, ef_search=ef_search, rerank=rerank)
        top_k = check_top_k(top_k)
        check_knobs(nprobe, ef_search, rerank)
        queries = query_embeddings(queries, self.embedding_dim)
        recorded = self.backend
        backend = recorded if backend is None else backend
        if backend == "exact":
            scores, indices = exact_top_k(queries.cpu() if device is None else queries, self.embeddings,
                                          top_k, chunk_size, device)
            scores, indices = scores.cpu(), indices.cpu()
        elif backend == "faiss":
            import_faiss()  # without faiss: the ImportError names backend 'faiss'
            if self._faiss_index is None:  # a flat inner-product index (IndexFlatIP), filled a chunk at a time
                self._faiss_index = build_ann_index(self.embeddings, "Flat")
            scores, indices = map(torch.from_numpy, ann_search(self._faiss_index, queries.cpu().numpy(),
                                                               min(top_k, len(self))))
        elif backend == recorded:
            top_k = min(top_k, len(self))
            fetch = min(max(int(rerank or 0), top_k), len(self))
            query_array = queries.cpu().numpy()
            scores, indices = ann_search(self.ann_index(), query_array, fetch, nprobe,
                                         max(ef_search or DEFAULT_EF_SEARCH, fetch))
            if rerank:
                scores, indices = rerank_exact(self.embeddings, query_array, indices, top_k)
            scores[indices < 0] = -np.inf
            scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
        else:
            built = f" or this index's own backend {recorded!r}" if not is_exact(recorded) else \
                " (an approximate backend is chosen when the index is built: decd-search index --backend SPEC)"
            raise ValueError(f"backend must be 'exact', 'faiss'{built}, got {backend!r}")
        paths = status = None
        if self.paths is not None:
            rows = indices.tolist()
            paths = [[self.paths[index] if index >= 0 else None for index in row] for row in rows]
            status = [[self.file_status(index) for index in row] for row in rows]
        return SearchResult(scores=scores, indices=indices, paths=paths, status=status, searched=len(self))

    @property
    def backend(self) -> str:
        """The search backend recorded at build time: "exact" or a FAISS index-factory string."""
        return self.meta.get("backend") or EXACT_BACKEND

    def ann_index(self):
        """The FAISS index of an approximate backend (`ann.faiss`), read on first use."""
        if is_exact(self.backend):
            raise ValueError("this index was built with the exact backend; it has no approximate index")
        if self._ann_index is None:
            faiss = import_faiss(self.backend)
            if self.path is None:
                raise ValueError("an in-memory index has no approximate index file")
            try:
                index = faiss.read_index(str(self.path / ANN_FILE))
            except RuntimeError as error:
                raise GalleryIndexError(f"index {display_path(self.path)!r} is damaged: {ANN_FILE} cannot be read "
                                        f"({str(error).strip().splitlines()[-1]}); rebuild it") from None
            if index.ntotal != len(self) or index.d != self.embedding_dim:
                raise GalleryIndexError(f"index {display_path(self.path)!r} is damaged: {ANN_FILE} holds "
                                        f"{index.ntotal} x {index.d}, expected {len(self)} x {self.embedding_dim}; "
                                        f"rebuild it")
            self._ann_index = index
        return self._ann_index
