"""The steps of `MilvusGallery.build`: each process's share, the collection checked or created, the plan of
what to insert, rewrite and delete, the batches written, and the index built at the end."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ..build import _embed_files
from ..format import StaleIndexError, file_sha256
from .metadata import read_metadata
from .store import (KEY_FIELD, MAX_PATH_BYTES, META_PROPERTY, SHA_FIELD, STAT_FIELD, VECTOR_FIELD, MilvusLocation,
                    MilvusStoreError, _call, _delete, _describe, _file_stat, _index_params, _index_settings,
                    _vector_index, create_collection, insert_rows, milvus_index)


def _share(total: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """A process's contiguous share [start, end) of the work list, in whole batches (a local build splits the
    same way), so that the processes' batches are those of a one-process run."""
    batches = -(-total // batch_size)
    return (min(total, rank * batches // world * batch_size), min(total, (rank + 1) * batches // world * batch_size))


def _check_collection(client, location: MilvusLocation, name: str, meta: dict, resume: bool, metadata) -> None:
    """Refuse (nothing changed) an existing collection this build may not write: one decd-search did not write,
    or, when resuming, one of another model or with other metadata fields."""
    where = location.describe(name)
    if not _call(location, "looking for the collection", client.has_collection, name):
        return
    stored_meta, stored_types = _describe(client, location, name)
    if stored_meta is None:
        raise MilvusStoreError(f"{where} exists and was not written by decd-search (no DECD {META_PROPERTY} "
                               f"property); nothing was changed: choose another --collection")
    if not resume:
        return
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
    if _call(location, "looking for the collection", client.has_collection, name):
        if not resume:
            _call(location, "dropping the collection", client.drop_collection, name)
        else:
            current = _index_settings(_vector_index(client, location, name), _describe(client, location, name)[0])
            if wanted is not None and wanted != current:
                _call(location, "releasing the collection", client.release_collection, name)
                _call(location, "dropping the old index", client.drop_index, name, VECTOR_FIELD)
                _call(location, "creating the index", client.create_index, name, _index_params(client, *wanted),
                      sync=False)
            _call(location, "loading the collection", client.load_collection, name)
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
        stat = _file_stat(gallery_dir / path)
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


def _write_batch(client, location: MilvusLocation, name: str, model, processor, gallery_dir: Path, batch: list,
                 changes: dict, skipped: list) -> None:
    """Hash, embed (or reuse the stored embedding of) and insert one batch of the work list, then delete the rows
    it replaces: the new row exists before the old one goes, so an interruption never loses an image."""
    encode, rewrite, replaced = [], [], []
    for path, action, rows, stat, wanted in batch:
        if action == "rewrite":
            rewrite.append((path, rows[0], rows[0][SHA_FIELD], stat, wanted))
            continue
        try:
            digest = file_sha256(gallery_dir / path)
        except OSError as error:
            skipped.append(dict(path=path, error=error.strerror or str(error)))
            replaced += [row[KEY_FIELD] for row in rows]
            continue
        if action == "check" and digest == rows[0][SHA_FIELD]:  # the same bytes: keep the embedding, new stat
            rewrite.append((path, rows[0], digest, stat, wanted))
        else:
            encode.append((path, action, rows, digest, stat, wanted))
    if encode:
        embeddings, kept, unreadable = _embed_files(model, processor, gallery_dir, [item[0] for item in encode])
        skipped += unreadable
        by_path = {item[0]: item for item in encode}
        if kept:
            items = [by_path[path] for path in kept]
            insert_rows(client, location, name, embeddings, kept, [item[3] for item in items],
                        [item[4] for item in items], [item[5] for item in items])
        kept = set(kept)
        for path, action, rows, *_ in encode:
            replaced += [row[KEY_FIELD] for row in rows]  # a changed file that is now unreadable loses its row too
            if path in kept:
                changes["new" if action == "new" else "changed"] += 1
    if rewrite:
        keys = [int(row[KEY_FIELD]) for _, row, *_ in rewrite]
        found = _call(location, "reading stored embeddings", client.get, name, ids=keys, output_fields=[VECTOR_FIELD],
                      consistency_level="Strong")
        vectors = {int(row[KEY_FIELD]): np.asarray(row[VECTOR_FIELD], dtype=np.float32) for row in found}
        kept = [item for item in rewrite if int(item[1][KEY_FIELD]) in vectors]
        insert_rows(client, location, name, [vectors[int(item[1][KEY_FIELD])] for item in kept],
                    [item[0] for item in kept], [item[2] for item in kept], [item[3] for item in kept],
                    [item[4] for item in kept])
        replaced += [int(item[1][KEY_FIELD]) for item in kept]
        changes["updated"] += len(kept)
    if replaced:
        _delete(client, location, name, replaced)


def _finish(client, location: MilvusLocation, name: str, meta: dict, wanted: Optional[tuple[str, dict]],
            wrote: bool, show_progress: bool) -> None:
    """Record the build in decd.meta; for an approximate index, flush when rows were written (seal the segments:
    Milvus indexes sealed segments only) and wait, with a progress bar, while the engine builds the index."""
    stored_meta, _ = _describe(client, location, name)
    kind, params = wanted or _index_settings(_vector_index(client, location, name), stored_meta)
    record = dict(stored_meta or meta, gallery_dir=meta["gallery_dir"], updated=meta["updated"],
                  num_files=meta["num_files"], model_id=meta["model_id"], backend=kind, index_params=params)
    _call(location, "recording the build", client.alter_collection_properties, name,
          properties={META_PROPERTY: json.dumps(record)})
    if kind == "FLAT":  # nothing to index: the rows are durable and searchable once inserted
        return
    if wrote:
        _call(location, "flushing", client.flush, name)
    if location.lite:
        _wait_for_lite_index(location, name, kind, show_progress)
        return
    info = _vector_index(client, location, name)
    if _index_done(info):
        return
    with tqdm(total=int(info.get("total_rows") or 0), desc=f"Milvus building the {kind} index", unit="row",
              disable=not show_progress) as bar:
        while not _index_done(info):
            time.sleep(1)
            info = _vector_index(client, location, name)
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
