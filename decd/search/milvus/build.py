"""`build_collection` (what `MilvusGallery.build` runs): the collection checked or created, the plan of what to insert,
rewrite and delete, the files encoded by `encode_gallery` and written, and the index built at the end."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
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
                    STAT_FIELD, VECTOR_FIELD, MilvusLocation, call_milvus, check_collection_name, collection_record,
                    connect, count_rows, create_collection, default_collection_name, delete_rows, index_parameters,
                    index_settings, insert_rows, milvus_index, parse_location, read_rows, stat_text, vector_index_info)

logger = logging.getLogger(__name__)


def build_collection(model, processor, gallery_dir: PathLike, store: Union[str, os.PathLike],
                     collection: Optional[str] = None, token: Optional[str] = None, metadata: Optional[PathLike] = None,
                     batch_size: int = 64, model_id: Optional[str] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                     resume: bool = True, show_progress: bool = True, max_batches: Optional[int] = None,
                     backend: Optional[str] = None, distributed=None, replace: bool = False,
                     lease: Optional[CollectionLease] = None):
    """Write (or bring up to date) the collection: see `MilvusGallery.build` for the arguments; `lease`: the one the
    main process holds on a server (`MilvusGallery.build` takes it), checked before each write. Returns (client,
    location, collection name, skipped, changes) on the main process, None on the others."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    state = distributed if distributed is not None else SingleProcess()
    main, rank, world = state.is_main_process, int(state.process_index), int(state.num_processes)
    gallery_dir, extensions = Path(gallery_dir), extension_names(extensions)
    location = parse_location(store, collection)
    name = location.collection or default_collection_name(gallery_dir)
    check_collection_name(name)
    if location.lite and world > 1:
        raise MilvusStoreError(f"Milvus Lite ({display_path(location.uri)}) lets one process open a store: build "
                               f"with one process, or into a Milvus server (--store http://HOST:19530)")
    wanted = milvus_index(backend, location.lite) if backend is not None else None
    files = list_images(gallery_dir, extensions)
    types, values = read_metadata(metadata) if metadata is not None else ({}, {})
    missing = [path for path in files if metadata is not None and path not in values]
    if missing:
        examples = ", ".join(display_path(path) for path in missing[:3])
        raise MilvusStoreError(f"the metadata file {display_path(metadata)!r} has no row for {len(missing)} of the "
                               f"{len(files)} images (e.g. {examples}); every image needs one")
    unmatched = sorted(set(values) - set(files))  # metadata rows naming no image: named once the build is done
    dim = getattr(getattr(model, "config", None), "projection_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"cannot tell the embedding size of {type(model).__name__} (no config.projection_dim)")
    checksum = model_checksum(model)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(model_meta(model, processor, model_id, checksum), format=MILVUS_FORMAT,
                format_version=MILVUS_FORMAT_VERSION, embedding_dim=dim, gallery_dir=str(gallery_dir.resolve()),
                extensions=list(extensions), metadata_fields=types, updated=now, num_files=len(files))
    client = connect(location, token, create=True)
    try:  # every process, before any writes; if one finds a problem, all stop
        _check_collection(client, location, name, meta, resume, metadata, replace)
        problem = None
    except GalleryIndexError as error:
        problem = error if world == 1 else type(error)(f"process {rank} of {world}: {error}")
    stop_together(state, problem)
    state.wait_for_everyone()
    if main:
        _prepare_collection(client, location, name, meta, types, wanted, resume)
    state.wait_for_everyone()
    stored_meta, types = collection_record(client, location, name)
    prepared = stored_meta is not None and stored_meta.get("model_checksum") == checksum
    stop_together(state, None if prepared else MilvusStoreError(
        f"process {rank} of {world} finds {location.describe(name)} prepared for another model; every process must "
        f"use the same model"))
    if metadata is not None:
        types, values = read_metadata(metadata, types)  # the collection's field types win over the CSV's guess
    stored = read_rows(client, location, name, list(types))
    state.wait_for_everyone()  # every process has read the rows before any process writes
    plan = _plan(gallery_dir, files, stored, values, types)
    if main and plan.gone:
        if lease is not None:
            lease.check()
        delete_rows(client, location, name, plan.gone)
    changes = dict(new=0, changed=0, updated=0, removed=len(plan.gone), unchanged=plan.unchanged)
    writer = _Writer(client, location, name, gallery_dir, plan.work, changes, list(plan.skipped), lease)
    batches = encode_gallery(model, processor, gallery_dir, [item[0] for item in plan.work], batch_size,
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
    own = dict(changes={key: changes[key] for key in ("new", "changed", "updated")},
               skipped=writer.skipped[len(plan.skipped):])
    if world > 1 and failure is None:
        logger.info("process %d of %d (pid %d on %s) wrote %d of the %d files to write%s: %d new, %d changed, "
                    "%d rewritten", rank, world, os.getpid(), socket.gethostname(),
                    sum(end - start for start, end in encoded), len(plan.work),
                    f" (listing positions {encoded[0][0]} to {encoded[-1][1] - 1})" if encoded else "",
                    *own["changes"].values())
    shares = all_processes(state, None if failure is not None else own)
    if failure is not None:
        raise failure
    if any(share is None for share in shares):
        raise BuildInterrupted(f"another process stopped before its share of the {len(plan.work)} files was "
                               f"written; build again with the same model and folder to resume")
    if not main:
        return None
    for key in ("new", "changed", "updated"):  # the whole build's, not the main process's share's
        changes[key] = sum(share["changes"][key] for share in shares)
    writer.skipped = list(plan.skipped) + [item for share in shares for item in share["skipped"]]
    if lease is not None:
        lease.check()
    finish_build(client, location, name, meta, wanted, bool(plan.work or plan.gone), show_progress)
    warn_skipped(writer.skipped, len(files), meta["gallery_dir"],
                 "the returned MilvusGallery's `skipped`; they are tried again on the next build", stacklevel=3)
    if unmatched:
        warnings.warn(unmatched_rows_message(metadata, unmatched, gallery_dir), MetadataRowsWarning, stacklevel=4)
    return client, location, name, writer.skipped, changes


def _check_collection(client, location: MilvusLocation, name: str, meta: dict, resume: bool, metadata,
                      replace: bool = False) -> None:
    """Refuse (nothing changed) an existing collection this build may not write: one decd-search did not write,
    or, when resuming, one of another model or with other metadata fields, or one of another gallery folder
    (unless `replace`: its rows then become this folder's, those of images this folder lacks deleted)."""
    where = location.describe(name)
    if not call_milvus(location, "looking for the collection", client.has_collection, name):
        return
    stored_meta, stored_types = collection_record(client, location, name)
    if stored_meta is None:
        raise MilvusStoreError(f"{where} exists and was not written by decd-search (no DECD {META_PROPERTY} "
                               f"property); nothing was changed: choose another --collection")
    if not resume:
        return
    if stored_meta.get("gallery_dir") != meta["gallery_dir"] and not replace:
        rows = count_rows(client, location, name, "Strong")
        raise MilvusStoreError(
            f"{where} holds the gallery {display_path(str(stored_meta.get('gallery_dir')))!r} ({rows} rows), this "
            f"build is of {display_path(meta['gallery_dir'])!r}; nothing was changed: pass --replace (replace=True) "
            f"to make it this folder's gallery (the rows of images this folder lacks are deleted), or choose another "
            f"--collection")
    if stored_meta.get("model_checksum") != meta["model_checksum"]:
        raise StaleIndexError(
            f"{where} holds embeddings of {stored_meta.get('model_id')} (checksum "
            f"{str(stored_meta.get('model_checksum'))[:12]}), this model is {meta['model_id']} (checksum "
            f"{meta['model_checksum'][:12]}): pass --no-resume (resume=False) to replace them, or choose "
            f"another --collection")
    if metadata is not None:
        read_metadata(metadata, stored_types)  # the same columns, with values of the fields' types
    elif stored_types:
        raise MilvusStoreError(f"{where} has the metadata fields {', '.join(stored_types)}: give the CSV with them "
                               f"(--metadata)")


def _prepare_collection(client, location: MilvusLocation, name: str, meta: dict, types: dict,
                        wanted: Optional[tuple[str, dict]], resume: bool) -> None:
    """Main process, after `_check_collection`: create the collection (dropping it first when not `resume`), or
    give an existing one the wanted index, rebuilt from its stored vectors."""
    if call_milvus(location, "looking for the collection", client.has_collection, name):
        if not resume:
            call_milvus(location, "dropping the collection", client.drop_collection, name)
        else:
            current = index_settings(vector_index_info(client, location, name),
                                     collection_record(client, location, name)[0])
            if wanted is not None and wanted != current:
                call_milvus(location, "releasing the collection", client.release_collection, name)
                call_milvus(location, "dropping the old index", client.drop_index, name, VECTOR_FIELD)
                call_milvus(location, "creating the index", client.create_index, name,
                            index_parameters(client, *wanted), sync=False)
            call_milvus(location, "loading the collection", client.load_collection, name)
            return
    kind, params = wanted or milvus_index(None)
    create_collection(client, location, name, meta["embedding_dim"], types, kind, params,
                      dict(meta, backend=kind, index_params=params))


@dataclass
class _Plan:
    work: list  # (path, action, old rows, stat, metadata) in listing order; action: new | changed | check | rewrite
    gone: list  # keys of rows whose file is no longer listed
    unchanged: int
    skipped: list  # listed files that cannot be stored (name not UTF-8, too long, no stat)


def _plan(gallery_dir: Path, files: list[str], stored: dict[str, list[dict]], values: dict, types: dict) -> _Plan:
    """What each listed file needs, decided the same way by every process (same listing, same rows read)."""
    work, skipped, unchanged = [], [], 0
    stored = dict(stored)
    for path in files:
        rows = stored.pop(path, [])
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            skipped.append(dict(path=path, error="the file name is not valid UTF-8, which Milvus stores text as; "
                                                  "rename the file"))
            continue
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            skipped.append(dict(path=path, error=f"the path is longer than {MAX_PATH_BYTES} bytes"))
            continue
        stat = stat_text(gallery_dir / path)
        if stat is None:
            skipped.append(dict(path=path, error="the file is gone or cannot be read (stat failed)"))
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
        work.append((path, action, rows, stat, wanted))
    gone = [int(row[KEY_FIELD]) for rows in stored.values() for row in rows]
    return _Plan(work, gone, unchanged, skipped)


class _Writer:
    """Writes the work list's batches: `to_encode` hashes a batch's files before they are read (a file whose bytes did
    not change keeps its stored embedding), `write` inserts the encoded and rewritten rows, then deletes the rows they
    replace: the new row exists before the old one goes, so an interruption never loses an image."""

    def __init__(self, client, location: MilvusLocation, name: str, gallery_dir: Path, work: list, changes: dict,
                 skipped: list, lease: Optional[CollectionLease] = None):
        self.client, self.location, self.name, self.gallery_dir = client, location, name, gallery_dir
        self.lease = lease  # held by the main process on a server: checked before each write
        self.items = {item[0]: item for item in work}  # path -> (path, action, old rows, stat, metadata)
        self.changes, self.skipped = changes, skipped
        self.digests: dict[str, Union[str, Exception]] = {}  # sha256 of the current batch's files (or why not)

    def to_encode(self, paths: list[str]) -> list[str]:
        chosen = []
        for path in paths:
            _, action, rows, _, _ = self.items[path]
            if action == "rewrite":  # the metadata changed, the file did not
                continue
            try:  # opened as load_image opens it: what is not a regular file is named, never read (a pipe blocks)
                with open_image_file(self.gallery_dir / path, path) as file:
                    self.digests[path] = digest = file_sha256(file)
            except (OSError, ValueError) as error:
                self.digests[path] = error
                continue
            if not (action == "check" and digest == rows[0][SHA_FIELD]):  # the same bytes: keep the embedding
                chosen.append(path)
        return chosen

    def write(self, batch: EncodedBatch) -> None:
        rewrite, replaced, digests = [], [], {path: self.digests.pop(path, None) for path in batch.files}
        for path in batch.files:
            _, action, rows, _, _ = self.items[path]
            if isinstance(digests[path], Exception):
                self.skipped.append(skipped_file(path, digests[path]))
                replaced += [row[KEY_FIELD] for row in rows]
            elif action == "rewrite" or (action == "check" and digests[path] == rows[0][SHA_FIELD]):
                rewrite.append(self.items[path])
            else:  # encoded now, or unreadable: either way its old rows go (a changed file now unreadable too)
                replaced += [row[KEY_FIELD] for row in rows]
                if path in batch.paths:
                    self.changes["new" if action == "new" else "changed"] += 1
        self.skipped += batch.skipped
        if self.lease is not None:
            self.lease.check()
        if batch.paths:
            items = [self.items[path] for path in batch.paths]
            insert_rows(self.client, self.location, self.name, batch.embeddings, batch.paths,
                        [digests[path] for path in batch.paths], [item[3] for item in items],
                        [item[4] for item in items])
        if rewrite:
            keys = [int(rows[0][KEY_FIELD]) for _, _, rows, _, _ in rewrite]
            found = call_milvus(self.location, "reading stored embeddings", self.client.get, self.name, ids=keys,
                                output_fields=[VECTOR_FIELD], consistency_level="Strong")
            vectors = {int(row[KEY_FIELD]): np.asarray(row[VECTOR_FIELD], dtype=np.float32) for row in found}
            kept = [(path, rows[0], stat, wanted) for path, _, rows, stat, wanted in rewrite
                    if int(rows[0][KEY_FIELD]) in vectors]
            insert_rows(self.client, self.location, self.name, [vectors[int(row[KEY_FIELD])] for _, row, _, _ in kept],
                        [path for path, *_ in kept], [row[SHA_FIELD] for _, row, _, _ in kept],
                        [stat for _, _, stat, _ in kept], [wanted for *_, wanted in kept])
            replaced += [int(row[KEY_FIELD]) for _, row, _, _ in kept]
            self.changes["updated"] += len(kept)
        if replaced:
            delete_rows(self.client, self.location, self.name, replaced)


def unmatched_rows_message(metadata, unmatched: list[str], gallery_dir: Path) -> str:
    """What to say of the metadata rows whose path names no image of the gallery (they are not stored)."""
    examples = ", ".join(repr(display_path(path)) for path in unmatched[:5])
    more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
    return (f"{len(unmatched)} row(s) of the metadata file {display_path(metadata)!r} name no image of "
            f"{display_path(str(gallery_dir))!r} and were not stored: {examples}{more}; a row's path is the image's "
            f"path relative to the gallery folder, as decd-search prints it: correct those rows, or remove them if "
            f"their images are gone")


def finish_build(client, location: MilvusLocation, name: str, meta: dict, wanted: Optional[tuple[str, dict]],
                 wrote: bool, show_progress: bool) -> None:
    """Record the build in decd.meta; for an approximate index, flush when rows were written (seal the segments:
    Milvus indexes sealed segments only) and wait, with a progress bar, while the engine builds the index."""
    stored_meta, _ = collection_record(client, location, name)
    kind, params = wanted or index_settings(vector_index_info(client, location, name), stored_meta)
    record = dict(stored_meta or meta, gallery_dir=meta["gallery_dir"], updated=meta["updated"],
                  num_files=meta["num_files"], model_id=meta["model_id"], backend=kind, index_params=params)
    call_milvus(location, "recording the build", client.alter_collection_properties, name,
                properties={META_PROPERTY: json.dumps(record)})
    if kind == "FLAT":  # nothing to index: the rows are durable and searchable once inserted
        return
    if wrote:
        call_milvus(location, "flushing", client.flush, name)
    if location.lite:
        _wait_for_lite_index(location, name, kind, show_progress)
        return
    info = vector_index_info(client, location, name)
    if _index_done(info):
        return
    with tqdm(total=int(info.get("total_rows") or 0), desc=f"Milvus building the {kind} index", unit="row",
              disable=not show_progress) as bar:
        while not _index_done(info):
            time.sleep(1)
            info = vector_index_info(client, location, name)
            bar.total = int(info.get("total_rows") or 0)
            bar.n = int(info.get("indexed_rows") or 0)
            bar.refresh()
    if str(info.get("state")) == "Failed":
        raise MilvusStoreError(f"Milvus failed to build the {kind} index of {location.describe(name)}: "
                               f"{info.get('index_state_fail_reason') or info.get('fail_reason') or 'no reason given'}")


def _index_done(info: dict) -> bool:
    """Whether a server has indexed what it will index (or failed). A server reports "Finished" while segments
    that compaction merged still wait for their index (`pending_index_rows`); those are searched exactly,
    slowly, until then."""
    state = str(info.get("state", "Finished"))
    return state == "Failed" or (state == "Finished" and not int(info.get("pending_index_rows") or 0))


def _wait_for_lite_index(location: MilvusLocation, name: str, kind: str, show_progress: bool) -> None:
    """Wait while Milvus Lite indexes the flushed rows. It does so in a background thread and its describe_index
    reports every row indexed at once, so the wait goes through its engine (this process runs it); otherwise
    the build would return while the index is still being built, and the process would wait for it at exit
    without saying why. Another milvus-lite version without that engine API is not waited for."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        engine = server_manager_instance._servers[os.path.abspath(location.uri)][1]
        drain = engine.get_collection(name, **({"database_name": location.db_name} if location.db_name else {}))
        drain = drain._wait_for_bg
    except (ImportError, AttributeError, KeyError, TypeError, IndexError):
        return
    with tqdm(total=None, desc=f"Milvus Lite building the {kind} index", bar_format="{desc}: {elapsed}",
              disable=not show_progress) as bar:
        drain()
        bar.update(0)
