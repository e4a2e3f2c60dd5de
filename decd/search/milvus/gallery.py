"""`MilvusGallery`: a gallery in a Milvus collection (docs/milvus.md), opened, searched and built like a local
`GalleryIndex`: both implement the `Gallery` protocol."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..display import check_top_k, display_path, shown_filter
from ..encode import IMAGE_EXTENSIONS
from ..errors import IndexNotFoundError, MilvusStoreError, StaleIndexError
from ..format import PathLike, check_gallery_dir, check_gallery_paths, path_problem
from ..protocol import Gallery, SearchResult, is_text, query_embeddings
from .build import build_collection
from .lease import CollectionLease
from .store import (DEFAULT_CONSISTENCY, KEY_FIELD, MAX_TOP_K, META_PROPERTY, MILVUS_FORMAT_VERSION, PATH_FIELD,
                    STAT_FIELD, VECTOR_FIELD, MilvusLocation, call_milvus, collection_record, connect, count_rows,
                    default_collection_name, engine_log, import_pymilvus, index_settings, milvus_errors, one_line,
                    parse_location, quiet_pymilvus, read_paths, search_parameters, stat_text,
                    vector_index_info)


class MilvusGallery(Gallery):
    """A gallery in a Milvus collection, a `Gallery` like a local `GalleryIndex`: its `SearchResult.indices` are the
    rows' Milvus keys (int64) and `image_path` takes one; `backend` is the Milvus index type; `search(...,
    filter='camera == "c12"')` takes a Milvus boolean expression over `filter_fields`. Open one with
    `MilvusGallery.open` (or `open_gallery`), write one with `MilvusGallery.build`.

    A collection is input from whoever wrote into it: `open` checks every row's path (and the gallery folder the
    collection records) with `decd.search.format.path_problem`, and so does every search for the rows it returns.
    """

    PATH_CACHE_SIZE = 4096  # keys whose path `image_path` remembers (the most recent): a long-running service's
    #                         searches return ever more keys, and each is looked up again once forgotten

    def __init__(self, client, location: MilvusLocation, name: str, meta: dict, metadata_fields: dict,
                 consistency: str = DEFAULT_CONSISTENCY):
        self.client, self.location, self.name, self.meta = client, location, name, meta
        self.metadata_fields = dict(metadata_fields)
        self.consistency = consistency
        self.path = None  # no index folder: the embeddings live in Milvus
        self.skipped: list[dict] = []  # unreadable files the last `build` of this object left out
        self.changes: dict[str, int] = {}  # what that build did (see `build`)
        self._paths: OrderedDict[int, str] = OrderedDict()  # key -> relative path of recent rows, for image_path
        self._paths_lock = threading.Lock()  # the service searches and serves images from several threads
        self.index_type, self.index_params = index_settings(vector_index_info(client, location, name), meta)
        self._count = count_rows(client, location, name, consistency)

    # ---- opening ----------------------------------------------------------------------------------
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
        name = location.collection
        if name is None or name not in names:  # the DECD collections there, to choose from
            ours = [candidate for candidate in names if collection_record(client, location, candidate)[0] is not None]
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
        meta, fields = collection_record(client, location, name)
        if meta is None:
            raise MilvusStoreError(f"{location.describe(name)} was not written by decd-search (no DECD {META_PROPERTY} "
                                   f"property); give a collection built with `decd-search index --store`")
        if meta.get("format_version") != MILVUS_FORMAT_VERSION:
            raise MilvusStoreError(f"{location.describe(name)} has format version {meta.get('format_version')}, this "
                                   f"code reads version {MILVUS_FORMAT_VERSION}; rebuild it with --no-resume")
        call_milvus(location, "loading the collection", client.load_collection, name)
        # every path the collection records stays inside the gallery folder it records, or nothing is opened
        gallery_dir = check_gallery_dir(meta.get("gallery_dir"), f"{location.describe(name)} ({META_PROPERTY})")
        check_gallery_paths(read_paths(client, location, name, consistency), gallery_dir,
                            f"{location.describe(name)} (its rows' {PATH_FIELD})")
        return cls(client, location, name, meta, fields, consistency)

    # ---- properties -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"MilvusGallery(count={len(self)}, {self.location.describe(self.name)}, index={self.index_type}, "
                f"model_id={self.model_id!r})")

    @property
    def uri(self) -> str:
        return self.location.uri

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
            rows = call_milvus(self.location, "reading a row", self.client.get, self.name, ids=[key],
                               output_fields=[PATH_FIELD], consistency_level=self.consistency)
            if not rows:
                raise MilvusStoreError(f"{self.location.describe(self.name)} has no row with key {key}")
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
        problem = path_problem(relative)
        if problem is not None:
            raise MilvusStoreError(f"{self.location.describe(self.name)}: the row with key {key} "
                                   f"({display_path(str(relative))!r}) {problem}; it was written by something other "
                                   f"than decd-search: nothing was returned; rebuild the collection from the gallery "
                                   f"folder with `decd-search index --store`")
        return relative

    def close(self) -> None:
        self.client.close()

    # ---- searching --------------------------------------------------------------------------------
    def verify_model(self, model, model_id: Optional[str] = None) -> None:
        """Raise `StaleIndexError` (naming both models and the collection) unless `model` built the collection."""
        try:
            super().verify_model(model, model_id)
        except StaleIndexError as error:
            raise StaleIndexError(f"{self.location.describe(self.name)}: {error} (decd-search index GALLERY --model M "
                                  f"--store {self.uri} --collection {self.name} --no-resume)") from None

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
        if backend not in (None, self.backend):
            raise MilvusStoreError(f"{self.location.describe(self.name)} is searched with its own {self.backend} "
                                   f"index; --backend (backend=) chooses a local index's search, give none")
        if rerank:
            raise MilvusStoreError("--rerank (rerank=) re-scores from a local index's embeddings.npy; a Milvus "
                                   "collection has none: give none (choose FLAT for exact scores)")
        unknown = set(unused) - {"chunk_size", "device"}
        if unknown:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        top_k = check_top_k(top_k)
        queries = query_embeddings(queries, self.embedding_dim).cpu().numpy()
        limit = min(int(top_k), max(len(self), 1), MAX_TOP_K)
        parameters = dict(metric_type="IP", params=search_parameters(self.index_type, self.index_params, limit,
                                                                        nprobe, ef_search))
        pymilvus = import_pymilvus(self.uri)
        with quiet_pymilvus():
            try:
                hits = self.client.search(self.name, data=list(queries), limit=limit, filter=filter or "",
                                          output_fields=[PATH_FIELD, STAT_FIELD], search_params=parameters,
                                          anns_field=VECTOR_FIELD, consistency_level=self.consistency)
            except milvus_errors(pymilvus) as error:
                log = f" (Milvus Lite's log: {display_path(engine_log())})" if self.location.lite and engine_log() \
                    else ""
                if filter:
                    fields = ", ".join(f"{field} ({kind})" for field, kind in self.filter_fields.items())
                    raise MilvusStoreError(f"Milvus rejected the filter {shown_filter(filter)} ("
                                           f"{one_line(error, filter)}); the fields of "
                                           f"{self.location.describe(self.name)} are: {fields}{log}") from None
                raise MilvusStoreError(f"Milvus refused the search ({self.location.describe(self.name)}): "
                                       f"{one_line(error)}{log}") from None
        width = max([len(row) for row in hits] + [0])
        scores = np.full((len(queries), width), -np.inf, dtype=np.float32)
        keys = np.full((len(queries), width), -1, dtype=np.int64)
        paths: list[list[Optional[str]]] = [[None] * width for _ in range(len(queries))]
        status: list[list[Optional[str]]] = [[None] * width for _ in range(len(queries))]
        for row, found in enumerate(hits):
            for place, hit in enumerate(found):
                key = int(hit[KEY_FIELD])
                path = self._checked(key, hit["entity"][PATH_FIELD])
                scores[row, place], keys[row, place], paths[row][place] = hit["distance"], key, path
                status[row][place] = self._file_status(path, hit["entity"][STAT_FIELD])
                self._remember(key, path)
        # "top p% of N" counts the images the filter lets through (at least those found, should rows arrive between
        # the search and the count)
        searched = len(self) if not filter else count_rows(self.client, self.location, self.name, self.consistency,
                                                           filter)
        return SearchResult(scores=torch.from_numpy(scores), indices=torch.from_numpy(keys), paths=paths,
                            status=status, searched=max(searched, width))

    def _file_status(self, path: str, stat: str) -> Optional[str]:
        """"deleted" or "changed" when the image's file is gone or has another size or time than when its row was
        written (as a local index's `file_status`), None when it is the same (or the gallery folder is unknown)."""
        if self.gallery_dir is None:
            return None
        current = stat_text(self.gallery_dir / path)
        return "deleted" if current is None else None if current == stat else "changed"

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        processor,
        gallery_dir: PathLike,
        store: Union[str, os.PathLike],
        collection: Optional[str] = None,
        token: Optional[str] = None,
        metadata: Optional[PathLike] = None,
        batch_size: int = 64,
        model_id: Optional[str] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        resume: bool = True,
        show_progress: bool = True,
        max_batches: Optional[int] = None,
        backend: Optional[str] = None,
        distributed=None,
        replace: bool = False,
    ) -> Optional["MilvusGallery"]:
        """Write (or bring up to date) the collection of every image under `gallery_dir` in the Milvus `store`.

        Args:
            store: a Milvus Lite path (`gallery.db`, created if needed) or `http://host:port`, optionally
                followed by `/COLLECTION` (docs/milvus.md).
            collection: the collection (default: named in `store`, else `default_collection_name(gallery_dir)`).
            token: for a server that needs one (default: $DECD_MILVUS_TOKEN).
            metadata: a CSV with a `path` column and one column per scalar field (`read_metadata`); every image
                needs a row. A collection built with metadata needs the same columns on every update.
            batch_size: images per forward pass (and per insert).
            resume: True: bring an existing collection up to date: insert the images it lacks, re-embed those
                whose bytes changed (sha256), delete rows of files that are gone, rewrite rows whose metadata or
                file stat changed with their stored embedding. An interrupted build resumes this way. False:
                drop the collection and build it again (for another model).
            max_batches: stop (`BuildInterrupted`) after this many batches of this call; for time-boxed jobs and tests.
            backend: the vector index (`milvus_index`): None keeps an existing collection's and gives FLAT (exact)
                to a new one; another index than the collection's re-indexes it without re-embedding.
            distributed: an `accelerate` `PartialState` (`decd.processes.process_state`) when several processes
                build together (torchrun or accelerate launch, a server only): each process embeds and inserts a contiguous share of the files to
                encode; the main process creates the collection and deletes rows of files that are gone.
            replace: an existing collection of another gallery folder becomes this folder's (rows of images it
                lacks are deleted); without it, such a collection is refused, nothing changed.

        On a server, the build holds the collection's lease (`decd.search.milvus.lease`) from start to end: a second
        build of the collection, of any folder, is refused while it runs, naming it (process, host, folder).

        Unreadable files are skipped with one `SkippedImagesWarning` (listed in the result's `skipped`, and
        tried again on the next build); metadata rows naming no image of the folder, with one
        `MetadataRowsWarning`. Returns the opened `MilvusGallery` with `changes` = {"new", "changed", "updated",
        "removed", "unchanged"} counts (new/changed/updated: this process's share), on the main process; None on
        the others.
        """
        location = parse_location(store, collection)
        lease = None
        if not location.lite and (distributed is None or distributed.is_main_process):
            name = location.collection or default_collection_name(gallery_dir)
            lease = CollectionLease(connect(location, token), location, name, str(Path(gallery_dir).resolve()))
            try:
                lease.acquire()
            except BaseException:
                lease.client.close()
                raise
        try:
            built = build_collection(model, processor, gallery_dir, store, collection=collection, token=token,
                                     metadata=metadata, batch_size=batch_size, model_id=model_id,
                                     extensions=extensions, resume=resume, show_progress=show_progress,
                                     max_batches=max_batches, backend=backend, distributed=distributed,
                                     replace=replace, lease=lease)
        finally:
            if lease is not None:
                lease.release()
                lease.client.close()
        if built is None:  # another process than the main one
            return None
        client, location, name, skipped, changes = built
        gallery = cls(client, location, name, *collection_record(client, location, name))
        gallery.skipped, gallery.changes = skipped, changes
        return gallery
