"""`MilvusGallery`: a gallery in a Milvus collection (docs/milvus.md), opened, searched and built like a local
`GalleryIndex`: both implement the `Gallery` protocol."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..display import check_top_k, display_path, shown_filter
from ..errors import IndexNotFoundError, MilvusStoreError, StaleIndexError
from ..format import check_gallery_dir, check_gallery_paths, path_problem
from ..protocol import Gallery, SearchResult, is_text, query_embeddings
from .build import build_collection
from .store import (DEFAULT_CONSISTENCY, KEY_FIELD, MAX_TOP_K, META_PROPERTY, MILVUS_FORMAT_VERSION, PATH_FIELD,
                    STAT_FIELD, VECTOR_FIELD, MilvusCollection, call_milvus, connect, engine_log, milvus_refusals,
                    one_line, parse_location, search_parameters, stat_text)


class MilvusGallery(Gallery):
    """A gallery in a Milvus collection, a `Gallery` like a local `GalleryIndex`: its `SearchResult.indices` are the
    rows' Milvus keys (int64) and `image_path` takes one; `backend` is the Milvus index type; `search(...,
    filter='camera == "c12"')` takes a Milvus boolean expression over `filter_fields`. Open one with
    `MilvusGallery.open` (or `open_gallery`), write one with `MilvusGallery.build`; `collection` is where it is.

    A collection is input from whoever wrote into it: `open` checks every row's path (and the gallery folder the
    collection records) with `decd.search.format.path_problem`, and so does every search for the rows it returns.
    """

    PATH_CACHE_SIZE = 4096  # keys whose path `image_path` remembers (the most recent): a long-running service's
    #                         searches return ever more keys, and each is looked up again once forgotten

    def __init__(self, collection: MilvusCollection, meta: dict, metadata_fields: dict,
                 consistency: str = DEFAULT_CONSISTENCY):
        self.collection, self.meta, self.metadata_fields = collection, meta, dict(metadata_fields)
        self.consistency = consistency
        self.path = None  # no index folder: the embeddings live in Milvus
        self.skipped: list[dict] = []  # unreadable files the last `build` of this object left out
        self.changes: dict[str, int] = {}  # what that build did (see `build`)
        self._paths: OrderedDict[int, str] = OrderedDict()  # key -> relative path of recent rows, for image_path
        self._paths_lock = threading.Lock()  # the service searches and serves images from several threads
        self.index_type, self.index_params = collection.index_settings(meta)
        self._count = collection.count_rows(consistency)

    # written in decd.search.milvus.build: `build` is the build itself, which returns the opened gallery
    build = classmethod(build_collection)

    @classmethod
    def open(cls, source: Union[str, os.PathLike], collection: Optional[str] = None, token: Optional[str] = None,
             consistency: str = DEFAULT_CONSISTENCY) -> "MilvusGallery":
        """Open the DECD collection that `source` (+ `collection`) names, loading it for search if needed.

        Raises IndexNotFoundError (no such store or collection, naming the DECD collections there),
        MilvusStoreError (no answer, a Lite store held by another process, not a DECD collection) or ImportError.
        """
        location = parse_location(source, collection)
        client = connect(location, token)
        names = call_milvus(location, "listing collections", client.list_collections)
        if (name := location.collection) is None or name not in names:  # the DECD collections there, to choose from
            ours = [candidate for candidate in names
                    if MilvusCollection(client, location, candidate).record()[0] is not None]
        if name is None:
            if len(ours) != 1:
                raise IndexNotFoundError(
                    f"{location.describe()} holds {len(ours)} DECD collections ({', '.join(ours) or 'none'}): name one "
                    f"with --collection NAME (collection=) or {location.uri}/NAME")
            name = ours[0]
        elif name not in names:
            raise IndexNotFoundError(f"there is no {location.describe(name)} (DECD collections there: "
                                     f"{', '.join(ours) or 'none'}); build it with `decd-search index GALLERY "
                                     f"--model M --store {location.uri} --collection {name}`")
        found = MilvusCollection(client, location, name)
        meta, fields = found.record()
        if meta is None:
            raise MilvusStoreError(f"{found.where} was not written by decd-search (no DECD {META_PROPERTY} property); "
                                   f"give a collection built with `decd-search index --store`")
        if meta.get("format_version") != MILVUS_FORMAT_VERSION:
            raise MilvusStoreError(f"{found.where} has format version {meta.get('format_version')}, this code reads "
                                   f"version {MILVUS_FORMAT_VERSION}; rebuild it with --no-resume")
        found.load()
        # every path the collection records stays inside the gallery folder it records, or nothing is opened
        gallery_dir = check_gallery_dir(meta.get("gallery_dir"), f"{found.where} ({META_PROPERTY})")
        check_gallery_paths(found.read_paths(consistency), gallery_dir, f"{found.where} (its rows' {PATH_FIELD})")
        return cls(found, meta, fields, consistency)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"MilvusGallery(count={len(self)}, {self.collection.where}, index={self.index_type}, " \
               f"model_id={self.model_id!r})"

    @property
    def uri(self) -> str:
        return self.collection.location.uri

    @property
    def backend(self) -> str:
        """The collection's Milvus index type (FLAT, HNSW, IVF_FLAT, ...)."""
        return self.index_type

    @property
    def embedding_dim(self) -> int:
        return int(self.meta["embedding_dim"])

    @property
    def filter_fields(self) -> dict:
        """The fields a filter can use: {name: "int" | "float" | "str"} (the path and the metadata fields)."""
        return {PATH_FIELD: "str", **self.metadata_fields}

    def image_path(self, index: int) -> Optional[Path]:
        """The absolute path of the image whose key is `index` (looked up in Milvus unless a search returned it)."""
        key = int(index)
        with self._paths_lock:
            relative = self._paths.get(key)
        if relative is None:
            rows = self.collection.call("reading a row", "get", ids=[key], output_fields=[PATH_FIELD],
                                        consistency_level=self.consistency)
            if not rows:
                raise MilvusStoreError(f"{self.collection.where} has no row with key {key}")
            relative = self._checked(key, rows[0][PATH_FIELD])
        self._remember(key, relative)
        return self.gallery_dir / relative if self.gallery_dir is not None else Path(relative)

    def _remember(self, key: int, relative: str) -> None:
        with self._paths_lock:
            self._paths[key] = relative
            self._paths.move_to_end(key)
            while len(self._paths) > self.PATH_CACHE_SIZE:
                self._paths.popitem(last=False)

    def _checked(self, key: int, relative: str) -> str:
        """`relative`, a row's path, if `path_problem` accepts it; MilvusStoreError naming the row otherwise (a row
        written into the collection after it was opened)."""
        if (problem := path_problem(relative)) is not None:
            raise MilvusStoreError(f"{self.collection.where}: the row with key {key} ({display_path(str(relative))!r}) "
                                   f"{problem}; it was written by something other than decd-search: nothing was "
                                   f"returned; rebuild the collection from the gallery folder with `decd-search index "
                                   f"--store`")
        return relative

    def close(self) -> None:
        self.collection.client.close()

    def verify_model(self, model, model_id: Optional[str] = None) -> None:
        """Raise `StaleIndexError` (naming both models and the collection) unless `model` built the collection."""
        try:
            super().verify_model(model, model_id)
        except StaleIndexError as error:
            raise StaleIndexError(f"{self.collection.where}: {error} (decd-search index GALLERY --model M --store "
                                  f"{self.uri} --collection {self.collection.name} --no-resume)") from None

    def search(self, queries, top_k: int = 10, filter: Optional[str] = None, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None, backend: Optional[str] = None, rerank: Optional[int] = None,
               model=None, processor=None, **unused) -> SearchResult:
        """Rank the collection for each query by cosine similarity, in Milvus.

        Args:
            queries: embeddings [num_queries, dim] or [dim] (normalised here), or description(s) with `model`
                and `processor` (see `search_text`).
            top_k: results per query (clamped to the collection's size; at most MAX_TOP_K).
            filter: a Milvus boolean expression over `filter_fields`, e.g. 'camera == "c12" and timestamp >=
                1700000000'; only matching rows are ranked. Rows with fewer matches are padded with key -1,
                score -inf and path None.
            nprobe, ef_search: IVF lists visited / HNSW candidate list (DEFAULT_NPROBE, DEFAULT_EF_SEARCH).
            backend: None or the collection's own index type (searching always uses it).
            rerank: not available (it re-reads a local index's embeddings.npy); None or 0.
            `chunk_size` and `device` (knobs of a local exact search) are accepted and ignored.
        """
        if is_text(queries):
            if model is None or processor is None:
                raise ValueError("searching with text needs `model` and `processor` (or pass embeddings)")
            return self.search_text(model, processor, queries, top_k=top_k, filter=filter, nprobe=nprobe,
                                    ef_search=ef_search, backend=backend, rerank=rerank)
        where = self.collection.where
        if backend not in (None, self.backend):
            raise MilvusStoreError(f"{where} is searched with its own {self.backend} index; --backend (backend=) "
                                   f"chooses a local index's search, give none")
        if rerank:
            raise MilvusStoreError("--rerank (rerank=) re-scores from a local index's embeddings.npy; a Milvus "
                                   "collection has none: give none (choose FLAT for exact scores)")
        if unknown := set(unused) - {"chunk_size", "device"}:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        top_k = check_top_k(top_k)
        queries = query_embeddings(queries, self.embedding_dim).cpu().numpy()
        limit = min(int(top_k), max(len(self), 1), MAX_TOP_K)
        parameters = dict(metric_type="IP", params=search_parameters(self.index_type, self.index_params, limit,
                                                                        nprobe, ef_search))

        def refused(error: BaseException) -> str:
            log = f" (Milvus Lite's log: {display_path(engine_log())})" if self.collection.location.lite \
                and engine_log() else ""
            if not filter:
                return f"Milvus refused the search ({where}): {one_line(error)}{log}"
            fields = ", ".join(f"{field} ({kind})" for field, kind in self.filter_fields.items())
            return (f"Milvus rejected the filter {shown_filter(filter)} ({one_line(error, filter)}); the fields of "
                    f"{where} are: {fields}{log}")

        with milvus_refusals(self.uri, refused):
            hits = self.collection.client.search(
                self.collection.name, data=list(queries), limit=limit, filter=filter or "",
                output_fields=[PATH_FIELD, STAT_FIELD], search_params=parameters, anns_field=VECTOR_FIELD,
                consistency_level=self.consistency)
        width = max([len(row) for row in hits] + [0])
        scores = np.full((len(queries), width), -np.inf, dtype=np.float32)
        keys = np.full((len(queries), width), -1, dtype=np.int64)
        paths, status = ([[None] * width for _ in range(len(queries))] for _ in range(2))  # a path, a file status
        for row, found in enumerate(hits):
            for place, hit in enumerate(found):
                key = int(hit[KEY_FIELD])
                path = self._checked(key, hit["entity"][PATH_FIELD])
                scores[row, place], keys[row, place], paths[row][place] = hit["distance"], key, path
                # "deleted" / "changed" when the file is gone or has another size or time than when its row was
                # written (as a local index's `file_status`); None when it is the same or the gallery folder unknown
                stat = hit["entity"][STAT_FIELD]
                current = stat_text(self.gallery_dir / path) if self.gallery_dir is not None else stat
                status[row][place] = "deleted" if current is None else None if current == stat else "changed"
                self._remember(key, path)
        # "top p% of N" counts the images the filter lets through (at least those found, should rows arrive between
        # the search and the count)
        searched = self.collection.count_rows(self.consistency, filter) if filter else len(self)
        return SearchResult(scores=torch.from_numpy(scores), indices=torch.from_numpy(keys), paths=paths,
                            status=status, searched=max(searched, width))
