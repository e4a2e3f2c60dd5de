"""`Gallery`, the protocol a local `GalleryIndex` and a `MilvusGallery` both implement, and its `SearchResult`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from inference_decd import embed_images, embed_texts

from .display import shown_filter
from .errors import GalleryIndexError
from .format import check_model


@dataclass
class SearchResult:
    """Ranked gallery results for a batch of queries, best first.

    scores: [num_queries, k] cosine similarities (float32); indices: [num_queries, k] gallery rows (int64; a
    Milvus gallery's keys); paths: per query, the k images' paths relative to the gallery folder (None for an
    in-memory gallery of PIL images). status: per query and place, None while the image is the one embedded,
    "deleted" or "changed" when its file is gone or differs since (a gallery that records its files).
    searched: how many gallery images were ranked: the whole gallery, or those a filter let through (what a
    match's "top p% of N" counts). A place no image fills (an approximate search, a filter) has index -1,
    score -inf and path None.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    paths: Optional[list[list[str]]]
    searched: int
    status: Optional[list[list[Optional[str]]]] = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@runtime_checkable
class Gallery(Protocol):
    """A searchable gallery: what `open_gallery` returns, and all that the CLI, the pipeline, the app and the
    endpoint handler use of one. `GalleryIndex` and `MilvusGallery` implement it; they inherit the model record,
    the model check and the text and photo searches from here, which call their `search`.

    `meta` is what the gallery records about how it was built (`model_id`, `model_checksum`, `gallery_dir`, ...);
    `skipped` the files left out as unreadable ([{"path", "error"}, ...]).
    """

    meta: dict
    skipped: list[dict]

    def __len__(self) -> int: ...

    @property
    def backend(self) -> str:
        """How the gallery is searched: "exact", a FAISS index-factory string, or a Milvus index type."""

    @property
    def embedding_dim(self) -> int: ...

    @property
    def filter_fields(self) -> dict:
        """The fields a `filter` expression can use, {name: "int" | "float" | "str"}; {} when it cannot filter."""

    def image_path(self, index: int) -> Optional[Path]:
        """The image file of a result's `indices` entry (None for a gallery without paths)."""

    def search(self, queries, top_k: int = 10, *, filter: Optional[str] = None, **options) -> SearchResult:
        """Rank the gallery for each query embedding ([num_queries, dim] or [dim]; or description(s) with `model=`
        and `processor=`) by cosine similarity; `filter` only for a gallery with `filter_fields`."""

    @property
    def model_id(self) -> Optional[str]:
        return self.meta.get("model_id")

    @property
    def model_checksum(self) -> Optional[str]:
        return self.meta.get("model_checksum")

    @property
    def gallery_dir(self) -> Optional[Path]:
        return Path(self.meta["gallery_dir"]) if self.meta.get("gallery_dir") else None

    def verify_model(self, model, model_id: Optional[str] = None) -> None:
        """Raise `StaleIndexError` (naming both models) unless `model` has the checksum the gallery was built with."""
        check_model(self.meta, model, model_id)

    @torch.no_grad()
    def search_text(self, model, processor, texts: Union[str, Sequence[str]], top_k: int = 10, verify: bool = True,
                    model_id: Optional[str] = None, **options) -> SearchResult:
        """Encode descriptions with `model` and rank the gallery for each (one result row per text).

        `verify` first checks that `model` is the model the gallery was built with (`StaleIndexError` naming both
        otherwise); skip it only when that was checked already. Empty descriptions raise ValueError (from the
        processor). Other keyword arguments go to `search`.
        """
        if verify:
            self.verify_model(model, model_id)
        return self.search(embed_texts(model, processor, texts), top_k=top_k, **options)

    @torch.no_grad()
    def search_image(self, model, processor, images: Any, top_k: int = 10, verify: bool = True,
                     model_id: Optional[str] = None, **options) -> SearchResult:
        """Rank the gallery by image-image cosine similarity for query photo(s) of a person (re-identification).

        `images` is one image or a list of them: anything `load_image` opens (path, bytes, PIL image, array); each
        is opened by the processor and encoded by `embed_images`, exactly like the gallery. `verify` as in
        `search_text`. Unreadable images raise ValueError naming the image (from `load_image`).
        """
        if verify:
            self.verify_model(model, model_id)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no query image given")
        return self.search(embed_images(model, processor, images, batch_size=len(images), show_progress=False),
                           top_k=top_k, **options)


def is_text(queries) -> bool:
    """Whether `queries` are descriptions (a str, or a non-empty list of them) rather than embeddings."""
    return isinstance(queries, str) or (isinstance(queries, (list, tuple)) and bool(queries)
                                        and all(isinstance(query, str) for query in queries))


def query_embeddings(queries: Union[torch.Tensor, np.ndarray], embedding_dim: int) -> torch.Tensor:
    """Query embeddings as L2-normalised float32 [num_queries, embedding_dim] (a [dim] vector is one query);
    ValueError naming the shape otherwise."""
    queries = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
    queries = queries[None] if queries.ndim == 1 else queries
    if queries.ndim != 2 or queries.shape[1] != embedding_dim:
        raise ValueError(f"queries must be [num_queries, {embedding_dim}], got {tuple(queries.shape)}")
    return F.normalize(queries.float(), dim=-1)


def filter_options(gallery: Gallery, filter: Optional[str]) -> dict:
    """The keyword arguments that pass a Milvus `filter` expression to `gallery.search`: {} when there is none, and
    a GalleryIndexError when the gallery cannot filter (a local index or folder: only a Milvus collection has
    fields to filter on)."""
    if filter is None or not str(filter).strip():
        return {}
    if not gallery.filter_fields:
        raise GalleryIndexError(f"a filter ({shown_filter(str(filter))}) needs a gallery in Milvus with fields to "
                                f"filter on (built with `decd-search index --store URI [--metadata CSV]`); this "
                                f"gallery is a local index")
    return {"filter": str(filter).strip()}
