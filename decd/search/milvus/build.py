"""`MilvusGallery.build` (`build_collection`): the collection checked or created, the plan of what to insert, rewrite
and delete, the files encoded by `encode_gallery` and written, and the index built at the end."""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from image_loading_decd import open_image_file

from ...processes import all_processes, stop_together
from ..display import display_path
from ..encode import (IMAGE_EXTENSIONS, EncodedBatch, SingleProcess, encode_gallery, extension_names, list_images,
                      one_share, skipped_file, warn_skipped)
from ..errors import BuildInterrupted, GalleryIndexError, MilvusStoreError, StaleIndexError
from ..format import PathLike, file_sha256, model_checksum, model_meta
from .lease import CollectionLease
from .metadata import MetadataRowsWarning, read_metadata
from .store import (KEY_FIELD, MAX_PATH_BYTES, META_PROPERTY, MILVUS_FORMAT, MILVUS_FORMAT_VERSION, SHA_FIELD,
                    STAT_FIELD, VECTOR_FIELD, MilvusCollection, connect, default_collection_name, gallery_row,
                    milvus_index, parse_location, stat_text)

logger = logging.getLogger(__name__)
_SURROGATES = re.compile("[\ud800-\udfff]")  # what a file name that is not UTF-8 holds (surrogateescape)


@torch.no_grad()
def build_collection(cls, model, processor, gallery_dir: PathLike, store: Union[str, os.PathLike],
                     collection: Optional[str] = None, token: Optional[str] = None, metadata: Optional[PathLike] = None,
                     batch_size: int = 64, model_id: Optional[str] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                     resume: bool = True, show_progress: bool = True, max_batches: Optional[int] = None,
                     backend: Optional[str] = None, distributed=None, replace: bool = False):
    """Write (or bring up to date) the collection of every image under `gallery_dir` in the Milvus `store`.

    Args:
        store: a Milvus Lite path (`gallery.db`, created if needed) or `http://host:port`, optionally followed by
            `/COLLECTION` (docs/milvus.md).
        collection: the collection (default: named in `store`, else `default_collection_name(gallery_dir)`).
        token: for a server that needs one (default: $DECD_MILVUS_TOKEN).
        metadata: a CSV with a `path` column and one column per scalar field (`read_metadata`); every image needs a row.
            A collection built with metadata needs the same columns on every update.
        batch_size: images per forward pass (and per insert).
        resume: True: bring an existing collection up to date (docs/milvus.md, "Keeping it current"); an interrupted
            build resumes this way. False: drop the collection and build it again (for another model).
        max_batches: stop (`BuildInterrupted`) after this many batches of this call; for time-boxed jobs and tests.
        backend: the vector index (`milvus_index`): None keeps an existing collection's and gives FLAT (exact) to a new
            one; another index than the collection's re-indexes it without re-embedding.
        distributed: an `accelerate` `PartialState` (`decd.processes.process_state`) when several processes build
            together (torchrun or accelerate launch, a server only): each process embeds and inserts a contiguous share
            of the files to encode; the main process creates the collection and deletes rows of files that are gone.
        replace: an existing collection of another gallery folder becomes this folder's (rows of images it lacks are
            deleted); without it, such a collection is refused, nothing changed.

    On a server, the build holds the collection's lease (`decd.search.milvus.lease`) from start to end: a second build
    of the collection, of any folder, is refused while it runs, naming it (process, host, folder).

    Unreadable files are skipped with one `SkippedImagesWarning` (listed in the result's `skipped`, and tried again on
    the next build); metadata rows naming no image of the folder, with one `MetadataRowsWarning`. Returns the opened
    `MilvusGallery` with `changes` = {"new", "changed", "updated", "removed", "unchanged"} counts, on the main process;
    None on the others.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    state = distributed if distributed is not None else SingleProcess()
    main, rank, world = state.is_main_process, int(state.process_index), int(state.num_processes)
    gallery_dir, extensions = Path(gallery_dir), extension_names(extensions)
    if (location := parse_location(store, collection)).lite and world > 1:
        raise MilvusStoreError(f"Milvus Lite ({display_path(location.uri)}) lets one process open a store: build "
                               f"with one process, or into a Milvus server (--store http://HOST:19530)")
    wanted = milvus_index(backend, location.lite) if backend is not None else None
    files = list_images(gallery_dir, extensions)
    types, values = read_metadata(metadata) if metadata is not None else ({}, {})
    if missing := [path for path in files if metadata is not None and path not in values]:
        examples = ", ".join(display_path(path) for path in missing[:3])
        raise MilvusStoreError(f"the metadata file {display_path(metadata)!r} has no row for {len(missing)} of the "
                               f"{len(files)} images (e.g. {examples}); every image needs one")
    unmatched = sorted(set(values) - set(files))  # metadata rows naming no image: named once the build is done
    if not isinstance(dim := getattr(getattr(model, "config", None), "projection_dim", None), int):
        raise ValueError(f"cannot tell the embedding size of {type(model).__name__} (no config.projection_dim)")
    checksum = model_checksum(model)
    meta = dict(model_meta(model, processor, model_id, checksum), format=MILVUS_FORMAT,
                format_version=MILVUS_FORMAT_VERSION, embedding_dim=dim, gallery_dir=str(gallery_dir.resolve()),
                extensions=list(extensions), metadata_fields=types, num_files=len(files),
                updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    target = MilvusCollection(connect(location, token, create=True), location,
                              location.collection or default_collection_name(gallery_dir))
    # On a server, the main process holds the collection's lease from its checks to the end, checked before each write.
    lease = CollectionLease(target, meta["gallery_dir"]) if main and not location.lite else None
    try:
        try:  # every process, before any writes; if one finds a problem (another build's lease too), all stop
            if lease is not None:
                lease.acquire()
            existing = target.record() if target.exists() else None  # (decd.meta, fields) of a collection there
            _check_collection(target, existing, meta, resume, metadata, replace)
            problem = None
        except GalleryIndexError as error:
            problem = error if world == 1 else type(error)(f"process {rank} of {world}: {error}")
        stop_together(state, problem)
        state.wait_for_everyone()
        if main:
            _prepare_collection(target, existing, meta, types, wanted, resume)
        state.wait_for_everyone()
        stored_meta, types = target.record()
        prepared = stored_meta is not None and stored_meta.get("model_checksum") == checksum
        stop_together(state, None if prepared else MilvusStoreError(
            f"process {rank} of {world} finds {target.where} prepared for another model; every process must use the "
            f"same model"))
        if metadata is not None:
            types, values = read_metadata(metadata, types)  # the collection's field types win over the CSV's guess
        stored = target.read_rows(list(types))
        state.wait_for_everyone()  # every process has read the rows before any process writes
        work, gone, unchanged, unstorable = _plan(gallery_dir, files, stored, values, types)
        if main and gone:
            if lease is not None:
                lease.check()
            target.delete_rows(gone)
        changes = dict(new=0, changed=0, updated=0, removed=len(gone), unchanged=unchanged)
        writer = _Writer(target, gallery_dir, work, changes, lease)
        batches = encode_gallery(model, processor, gallery_dir, [item.path for item in work], batch_size,
                                 share=(rank, world), max_batches=max_batches, select=writer.to_encode,
                                 show_progress=show_progress and main, desc="Indexing gallery into Milvus")
        encoded, failure = [], None  # (start, end) of the batches this process writes; why it stopped
        with one_share(state):  # then every process says how its share went, a process that failed too
            try:
                for batch in batches:
                    encoded.append((batch.start, batch.end))
                    writer.write(batch)
            except Exception as error:  # noqa: BLE001 - raised below, once the others know
                failure = error
        own = dict(changes={key: changes[key] for key in ("new", "changed", "updated")}, skipped=writer.skipped)
        if world > 1 and failure is None:
            logger.info("process %d of %d (pid %d on %s) wrote %d of the %d files to write%s: %d new, %d changed, "
                        "%d rewritten", rank, world, os.getpid(), socket.gethostname(),
                        sum(end - start for start, end in encoded), len(work),
                        f" (listing positions {encoded[0][0]} to {encoded[-1][1] - 1})" if encoded else "",
                        *own["changes"].values())
        shares = all_processes(state, None if failure is not None else own)
        if failure is not None:
            raise failure
        if any(share is None for share in shares):
            raise BuildInterrupted(f"another process stopped before its share of the {len(work)} files was "
                                   f"written; build again with the same model and folder to resume")
        if not main:
            return None
        changes.update({key: sum(share["changes"][key] for share in shares) for key in own["changes"]})  # all shares'
        skipped = unstorable + [item for share in shares for item in share["skipped"]]
        if lease is not None:
            lease.check()
        finish_build(target, meta, wanted, bool(work or gone), show_progress)
    finally:
        if lease is not None:
            lease.release()
    warn_skipped(skipped, len(files), meta["gallery_dir"],
                 "the returned MilvusGallery's `skipped`; they are tried again on the next build", stacklevel=3)
    if unmatched:  # metadata rows whose path names no image of the gallery: not stored
        examples = ", ".join(repr(display_path(path)) for path in unmatched[:5])
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        warnings.warn(f"{len(unmatched)} row(s) of the metadata file {display_path(metadata)!r} name no image of "
                      f"{display_path(str(gallery_dir))!r} and were not stored: {examples}{more}; a row's path is the "
                      f"image's path relative to the gallery folder, as decd-search prints it: correct those rows, or "
                      f"remove them if their images are gone", MetadataRowsWarning, stacklevel=3)
    gallery = cls(target, *target.record())
    gallery.skipped, gallery.changes = skipped, changes
    return gallery


def _check_collection(target: MilvusCollection, existing: Optional[tuple[Optional[dict], dict]], meta: dict,
                      resume: bool, metadata, replace: bool = False) -> None:
    """Refuse (nothing changed) an `existing` collection this build may not write: one decd-search did not write,
    or, when resuming, one of another model or with other metadata fields, or one of another gallery folder
    (unless `replace`: its rows then become this folder's, those of images this folder lacks deleted)."""
    if existing is None:
        return
    stored_meta, stored_types = existing
    if stored_meta is None:
        raise MilvusStoreError(f"{target.where} exists and was not written by decd-search (no DECD {META_PROPERTY} "
                               f"property); nothing was changed: choose another --collection")
    if not resume:
        return
    if stored_meta.get("gallery_dir") != meta["gallery_dir"] and not replace:
        raise MilvusStoreError(
            f"{target.where} holds the gallery {display_path(str(stored_meta.get('gallery_dir')))!r} "
            f"({target.count_rows('Strong')} rows), this build is of {display_path(meta['gallery_dir'])!r}; nothing "
            f"was changed: pass --replace (replace=True) to make it this folder's gallery (the rows of images this "
            f"folder lacks are deleted), or choose another --collection")
    if stored_meta.get("model_checksum") != meta["model_checksum"]:
        raise StaleIndexError(f"{target.where} holds embeddings of {stored_meta.get('model_id')} (checksum "
                              f"{str(stored_meta.get('model_checksum'))[:12]}), this model is {meta['model_id']} "
                              f"(checksum {meta['model_checksum'][:12]}): pass --no-resume (resume=False) to replace "
                              f"them, or choose another --collection")
    if metadata is not None:
        read_metadata(metadata, stored_types)  # the same columns, with values of the fields' types
    elif stored_types:
        raise MilvusStoreError(f"{target.where} has the metadata fields {', '.join(stored_types)}: give the CSV with "
                               f"them (--metadata)")


def _prepare_collection(target: MilvusCollection, existing: Optional[tuple[Optional[dict], dict]], meta: dict,
                        types: dict, wanted: Optional[tuple[str, dict]], resume: bool) -> None:
    """Main process, after `_check_collection`: create the collection (dropping an `existing` one first when not
    `resume`), or give an existing one the wanted index, rebuilt from its stored vectors."""
    if existing is not None:
        if resume:
            if wanted is not None and wanted != target.index_settings(existing[0]):
                target.set_index(*wanted, replace=True)
            else:
                target.load()
            return
        target.call("dropping the collection", "drop_collection")
    kind, params = wanted or milvus_index(None)
    target.create_gallery(meta["embedding_dim"], types, kind, params, dict(meta, backend=kind, index_params=params))


class _Item(NamedTuple):
    """A listed file the build writes: `action` new | changed | check (its stat changed: its bytes are hashed) |
    rewrite (its metadata changed: its stored embedding is kept); its stored `rows`, file `stat` and `metadata`."""

    path: str
    action: str
    rows: list
    stat: str
    metadata: dict


def _plan(gallery_dir: Path, files: list[str], stored: dict[str, list[dict]], values: dict,
          types: dict) -> tuple[list[_Item], list[int], int, list[dict]]:
    """(the files to write in listing order, keys of rows whose file is no longer listed, how many files are
    unchanged, the listed files that cannot be stored with why), decided the same way by every process (same
    listing, same rows read)."""
    work, skipped, unchanged = [], [], 0
    stored = dict(stored)
    for path in files:
        rows = stored.pop(path, [])
        error = ("the file name is not valid UTF-8, which Milvus stores text as; rename the file"
                 if _SURROGATES.search(path) else f"the path is longer than {MAX_PATH_BYTES} bytes"
                 if len(path.encode("utf-8")) > MAX_PATH_BYTES else None)
        if error or (stat := stat_text(gallery_dir / path)) is None:
            skipped.append(dict(path=path, error=error or "the file is gone or cannot be read (stat failed)"))
            continue
        wanted = values.get(path, {})
        if not rows:
            action = "new"
        elif len(rows) > 1:  # an interrupted replacement left two rows: encode it again, delete both
            action = "changed"
        elif rows[0][STAT_FIELD] != stat:
            action = "check"
        elif any(rows[0].get(field) != wanted.get(field) for field in types):
            action = "rewrite"
        else:
            unchanged += 1
            continue
        work.append(_Item(path, action, rows, stat, wanted))
    return work, [int(row[KEY_FIELD]) for rows in stored.values() for row in rows], unchanged, skipped


class _Writer:
    """Writes the work list's batches: `to_encode` hashes a batch's files before they are read (a file whose bytes did
    not change keeps its stored embedding), `write` inserts the encoded and rewritten rows, then deletes the rows they
    replace: the new row exists before the old one goes, so an interruption never loses an image."""

    def __init__(self, target: MilvusCollection, gallery_dir: Path, work: list[_Item], changes: dict,
                 lease: Optional[CollectionLease] = None):
        self.target, self.gallery_dir, self.lease = target, gallery_dir, lease  # lease: checked before each write
        self.items = {item.path: item for item in work}
        self.changes, self.skipped = changes, []  # the files of this process's share that could not be read
        self.digests: dict[str, Union[str, Exception]] = {}  # sha256 of the current batch's files (or why not)

    def to_encode(self, paths: list[str]) -> list[str]:
        chosen = []
        for path in paths:
            item = self.items[path]
            if item.action == "rewrite":  # the metadata changed, the file did not
                continue
            try:  # opened as load_image opens it: what is not a regular file is named, never read (a pipe blocks)
                with open_image_file(self.gallery_dir / path, path) as file:
                    self.digests[path] = digest = file_sha256(file)
            except (OSError, ValueError) as error:
                self.digests[path] = error
                continue
            if not (item.action == "check" and digest == item.rows[0][SHA_FIELD]):  # the same bytes: keep it
                chosen.append(path)
        return chosen

    def write(self, batch: EncodedBatch) -> None:
        digests = {path: self.digests.pop(path, None) for path in batch.files}
        kept, replaced = [], []  # the items whose stored embedding is kept; keys of the rows that go
        for path in batch.files:
            item = self.items[path]
            if isinstance(digests[path], Exception):
                self.skipped.append(skipped_file(path, digests[path]))
                replaced += [row[KEY_FIELD] for row in item.rows]
            elif item.action == "rewrite" or (item.action == "check" and digests[path] == item.rows[0][SHA_FIELD]):
                kept.append(item)
            else:  # encoded now, or unreadable: either way its old rows go (a changed file now unreadable too)
                replaced += [row[KEY_FIELD] for row in item.rows]
                if path in batch.paths:
                    self.changes["new" if item.action == "new" else "changed"] += 1
        self.skipped += batch.skipped
        if self.lease is not None:
            self.lease.check()
        rows = [gallery_row(embedding, path, digests[path], self.items[path].stat, self.items[path].metadata)
                for embedding, path in zip(batch.embeddings, batch.paths)] if batch.paths else []
        if kept:
            found = self.target.call("reading stored embeddings", "get", output_fields=[VECTOR_FIELD],
                                     ids=[int(item.rows[0][KEY_FIELD]) for item in kept], consistency_level="Strong")
            vectors = {int(row[KEY_FIELD]): row[VECTOR_FIELD] for row in found}
            kept = [(item, int(item.rows[0][KEY_FIELD])) for item in kept if int(item.rows[0][KEY_FIELD]) in vectors]
            rows += [gallery_row(vectors[key], item.path, item.rows[0][SHA_FIELD], item.stat, item.metadata)
                     for item, key in kept]
            replaced += [key for _, key in kept]
            self.changes["updated"] += len(kept)
        if rows:
            self.target.insert_rows(rows)
        if replaced:
            self.target.delete_rows(replaced)


def finish_build(target: MilvusCollection, meta: dict, wanted: Optional[tuple[str, dict]], wrote: bool,
                 show_progress: bool) -> None:
    """Record the build in decd.meta; for an approximate index, flush when rows were written (seal the segments:
    Milvus indexes sealed segments only) and wait, with a progress bar, while the engine builds the index."""
    stored_meta, _ = target.record()
    kind, params = wanted or target.index_settings(stored_meta)
    target.set_property("recording the build", META_PROPERTY, dict(
        stored_meta or meta, gallery_dir=meta["gallery_dir"], updated=meta["updated"], num_files=meta["num_files"],
        model_id=meta["model_id"], backend=kind, index_params=params))
    if kind == "FLAT":  # nothing to index: the rows are durable and searchable once inserted
        return
    if wrote:
        target.call("flushing", "flush")
    if target.location.lite:
        _wait_for_lite_index(target, kind, show_progress)
        return
    if not _index_done(info := target.index_info()):
        with tqdm(total=int(info.get("total_rows") or 0), desc=f"Milvus building the {kind} index", unit="row",
                  disable=not show_progress) as bar:
            while not _index_done(info):
                time.sleep(1)
                info = target.index_info()
                bar.total = int(info.get("total_rows") or 0)
                bar.n = int(info.get("indexed_rows") or 0)
                bar.refresh()
    if str(info.get("state")) == "Failed":  # at once or after a wait
        raise MilvusStoreError(f"Milvus failed to build the {kind} index of {target.where}: "
                               f"{info.get('index_state_fail_reason') or info.get('fail_reason') or 'no reason given'}")


def _index_done(info: dict) -> bool:
    """Whether a server has indexed what it will index (or failed). A server reports "Finished" while segments
    that compaction merged still wait for their index (`pending_index_rows`); those are searched exactly,
    slowly, until then."""
    state = str(info.get("state", "Finished"))
    return state == "Failed" or (state == "Finished" and not int(info.get("pending_index_rows") or 0))


def _wait_for_lite_index(target: MilvusCollection, kind: str, show_progress: bool) -> None:
    """Wait while Milvus Lite indexes the flushed rows. It does so in a background thread and its describe_index
    reports every row indexed at once, so the wait goes through its engine (this process runs it); otherwise
    the build would return while the index is still being built, and the process would wait for it at exit
    without saying why. Another milvus-lite version without that engine API is not waited for."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        engine = server_manager_instance._servers[os.path.abspath(target.location.uri)][1]
        database = target.location.db_name
        drain = engine.get_collection(target.name, **({"database_name": database} if database else {}))._wait_for_bg
    except (ImportError, AttributeError, KeyError, TypeError, IndexError):
        return
    with tqdm(total=None, desc=f"Milvus Lite building the {kind} index", bar_format="{desc}: {elapsed}",
              disable=not show_progress) as bar:
        drain()
        bar.update(0)
