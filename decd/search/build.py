"""The resumable, multi-process build of an index folder.

`build_index` (what `GalleryIndex.build` runs) lists a gallery folder, encodes it in whole batches of
`batch_size` files (unreadable files skipped and recorded), saves them as shards in `partial/` as it goes
(so a killed build resumes, with any number of processes), then joins the shards into the index files
(`decd.search.format`). `open_gallery` encodes a folder in memory with the same listing and batches.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from inference_decd import embed_images

from .backends import (EXACT_BACKEND, _check_ann_size, _is_exact, ann_num_lists, ann_train_size, build_ann_index,
                       import_faiss, new_ann_index)
from .display import display_path
from .format import (_SHARD_FILE, ANN_FILE, EMBEDDINGS_FILE, FILES_FILE, INDEX_FORMAT, INDEX_FORMAT_VERSION,
                     LOCK_FILE, META_FILE, PARTIAL_DIR, PATHS_FILE, PROGRESS_FILE, GalleryIndexError,
                     IndexNotFoundError, PathLike, _model_meta, _read_json, _remove_partial, _write_json,
                     check_output_folder, file_fingerprint, file_sha256, model_checksum, read_index)

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


class BuildInterrupted(RuntimeError):
    """`build(..., max_batches=N)` stopped after N batches; the progress is saved, build again to resume."""


class SkippedImagesWarning(UserWarning):
    """Some gallery files could not be read and were left out (all listed in the index's `skipped`)."""


# --------------------------------------------------------------------------------------------
# Listing and encoding gallery files
# --------------------------------------------------------------------------------------------


def list_images(gallery_dir: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                exclude: Optional[PathLike] = None) -> list[str]:
    """Image files under `gallery_dir` (recursive), as sorted POSIX paths relative to it.

    `extensions` are matched case-insensitively, with or without a leading dot. Files under `exclude`
    (e.g. an index folder placed inside the gallery) are left out.
    """
    root = Path(gallery_dir)
    if not root.exists():
        raise IndexNotFoundError(f"gallery folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise GalleryIndexError(f"gallery {str(root)!r} is not a folder")
    suffixes = {"." + extension.lower().lstrip(".") for extension in extensions}
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        if excluded is not None and Path(folder).resolve() == excluded:
            subfolders[:] = []
            continue
        for name in files:
            if os.path.splitext(name)[1].lower() in suffixes:
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def _embed_files(model, processor, folder: Path, names: list[str]) -> tuple[Optional[np.ndarray], list[str], list[dict]]:
    """Embed one batch of gallery files: (embeddings or None, the names embedded, the files skipped with why)."""
    images, kept, skipped = [], [], []
    for name in names:
        try:
            images.append(processor.load_image(folder / name, name=name))
            kept.append(name)
        except ValueError as error:  # load_image names the file and says what is wrong
            skipped.append(dict(path=name, error=str(error).removeprefix(f"{name}: ")))
    if not images:
        return None, kept, skipped
    return embed_images(model, processor, images, batch_size=len(images), show_progress=False).numpy(), kept, skipped


def _gallery_files(gallery_dir: Path, extensions: Sequence[str], exclude: Optional[Path] = None) -> list[str]:
    """`list_images`, refusing a folder that holds none (GalleryIndexError naming the folder and the extensions)."""
    files = list_images(gallery_dir, extensions, exclude=exclude)
    if not files:
        raise GalleryIndexError(
            f"no images found under {str(gallery_dir)!r} (looked recursively for "
            f"{', '.join('.' + extension for extension in extensions)})"
        )
    return files


def _none_readable(num_files: int, gallery_dir: str, skipped: list[dict]) -> GalleryIndexError:
    reasons = "; ".join(f"{item['path']}: {item['error']}" for item in skipped[:3])
    return GalleryIndexError(f"none of the {num_files} image files under {gallery_dir!r} could be read ({reasons})")


def _gallery_meta(model, processor, model_id: Optional[str], checksum: str, gallery_dir: Path,
                  extensions: Sequence[str], num_files: int) -> dict:
    """The meta.json fields known before the encoding: the model, the folder, what was listed."""
    return dict(format=INDEX_FORMAT, **_model_meta(model, processor, model_id, checksum),
                gallery_dir=str(gallery_dir.resolve()), extensions=list(extensions), num_files=num_files)


def warn_skipped(meta: dict, listed_in: str, stacklevel: int = 1) -> None:
    """One warning for the unreadable files of a gallery (`meta["skipped"]`): how many, the first five
    with the reason, and where all are listed. `stacklevel` counts from the caller, as in `warnings.warn`."""
    skipped = meta.get("skipped") or []
    if not skipped:
        return
    listed = "; ".join(f"{display_path(item['path'])} ({display_path(item['error'])})" for item in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {meta['num_files']} in "
                  f"{display_path(meta['gallery_dir'])!r}: {listed}{more} (all listed in {listed_in})",
                  SkippedImagesWarning, stacklevel=stacklevel + 1)


# --------------------------------------------------------------------------------------------
# Saved progress: shards in partial/
# --------------------------------------------------------------------------------------------


class _ShardStore:
    """Encoded batches of an unfinished build: `partial/progress.json` + shard_<start>.{npy,json}.

    A shard covers the listing positions [start, end) (whole batches) and holds the embeddings of the
    readable files among them; its json (written after its npy) is the proof that it is complete. Shards
    are named by their start position, not by the process that wrote them, so a build resumes with any
    number of processes: each process skips the batches of its share that a complete shard covers.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.shards: list[dict] = []
        self.reload()
        self._clear_staged()

    @staticmethod
    def prepare(folder: Path, fingerprint: dict, resume: bool) -> None:
        """Keep `folder`'s shards if they belong to this build (same fingerprint) and `resume`, else clear
        it; write progress.json. Run by one process only (the main one)."""
        if folder.exists():  # `check_output_folder` made sure it is ours
            if not resume or _read_json(folder / PROGRESS_FILE) != fingerprint:
                _remove_partial(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / PROGRESS_FILE, fingerprint)

    def reload(self) -> None:
        """Read every complete shard record (sorted by start; unreadable ones are ignored and redone)."""
        shards = []
        for shard_json in self.folder.glob("shard_*.json"):
            record = _read_json(shard_json)
            if not _SHARD_FILE.fullmatch(shard_json.name) or not isinstance(record, dict) \
                    or not {"start", "end", "paths", "skipped", "file"} <= set(record):
                continue
            shards.append(record)
        self.shards = sorted(shards, key=lambda record: (record["start"], -record["end"]))

    def covered_batches(self, batch_size: int) -> set[int]:
        """Start positions of the batches that complete shards hold (shards are whole batches of the
        fingerprint's batch size); one pass over the shards, so resuming 10^6 batches stays linear."""
        return {start for shard in self.shards for start in range(shard["start"], shard["end"], batch_size)}

    def tiling(self, num_files: int) -> Optional[list[dict]]:
        """Shards that cover [0, num_files) once each, in listing order (None while a part is missing)."""
        chosen, position = [], 0
        for shard in sorted(self.shards, key=lambda record: (record["start"], -record["end"])):
            if shard["start"] == position and shard["end"] > position:
                chosen.append(shard)
                position = shard["end"]
        return chosen if position == num_files else None

    def stage(self, start: int, end: int, embeddings: Optional[np.ndarray], paths: list[str],
              skipped: list[dict], fingerprints: dict) -> int:
        """Hold one embedded batch (listing positions [start, end)) for the next shard; a batch that does
        not follow the staged ones starts a new shard. Returns the number of batches now staged."""
        if self._staged_end is not None and start != self._staged_end:
            self.flush()
        if self._staged_start is None:
            self._staged_start = start
        if embeddings is not None:
            self._staged.append(embeddings)
        self._staged_paths.extend(paths)
        self._staged_skipped.extend(skipped)
        self._staged_fingerprints.update(fingerprints)
        self._staged_end = end
        self._staged_batches += 1
        return self._staged_batches

    def flush(self) -> None:
        """Write the staged batches as one shard (npy, then its json: the proof it is complete)."""
        if self._staged_end is None:
            return
        stem = f"shard_{self._staged_start:012d}"
        array = np.concatenate(self._staged) if self._staged else np.zeros((0, 0), np.float32)  # unreadable only
        np.save(self.folder / f"{stem}.npy.tmp.npy", array.astype(np.float32, copy=False))  # temporary + rename
        os.replace(self.folder / f"{stem}.npy.tmp.npy", self.folder / f"{stem}.npy")
        record = dict(start=self._staged_start, end=self._staged_end, paths=self._staged_paths,
                      skipped=self._staged_skipped, fingerprints=self._staged_fingerprints, file=f"{stem}.npy")
        _write_json(self.folder / f"{stem}.json", record)
        self.shards.append(record)  # sorted when tiled
        self._clear_staged()

    def drop_changed(self, gallery_dir: Path) -> int:
        """Delete the shards holding a file that changed (or went) since it was encoded: their batches are encoded
        again. Run by the main process only; returns how many shards were dropped."""
        changed = [shard for shard in self.shards
                   if any(file_fingerprint(gallery_dir / name) != recorded
                          for name, recorded in shard.get("fingerprints", {"": None}).items())]
        for shard in changed:
            (self.folder / (Path(shard["file"]).stem + ".json")).unlink(missing_ok=True)  # the proof goes first
            (self.folder / shard["file"]).unlink(missing_ok=True)
        self.shards = [shard for shard in self.shards if shard not in changed]
        return len(changed)

    def _clear_staged(self) -> None:
        self._staged_fingerprints: dict = {}
        self._staged, self._staged_paths, self._staged_skipped = [], [], []
        self._staged_start = self._staged_end = None
        self._staged_batches = 0


class _SingleProcess:
    """The process state of a build without `accelerate`: one process, nothing to wait for."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def _write_embeddings(path: Path, blocks, shape: tuple[int, int]) -> str:
    """Write `blocks` (float32 arrays of rows, in order) as one .npy file, one block in memory at a time; returns
    the sha256 of the file's bytes, computed as they are written (no second pass)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, dict(descr=np.lib.format.dtype_to_descr(np.dtype("<f4")), fortran_order=False, shape=shape))
    digest = hashlib.sha256()
    rows = 0
    with open(path, "wb") as file:
        file.write(header.getvalue())
        digest.update(header.getvalue())
        for block in blocks:
            data = memoryview(np.ascontiguousarray(block, dtype="<f4")).cast("B")
            file.write(data)
            digest.update(data)
            rows += len(block)
        file.flush()
        os.fsync(file.fileno())
    if rows != shape[0]:
        raise GalleryIndexError(f"{rows} rows were written for {shape[0]} paths; build again with resume=False "
                                f"(--no-resume)")
    return digest.hexdigest()


class _BuildLock:
    """One build at a time per index folder: an OS lock on `.build.lock` (released if the build dies), which
    names the build holding it; removed when the build ends (a build killed leaves it, unlocked and harmless)."""

    def __init__(self, output: Path, gallery_dir: Path):
        self.output, self.holder = output, dict(pid=os.getpid(), host=socket.gethostname(),
                                                gallery=str(gallery_dir.resolve()),
                                                started=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.file = None

    def __enter__(self):
        if fcntl is None:  # no POSIX locks on this platform: one build at a time is up to the user
            return self
        self.output.mkdir(parents=True, exist_ok=True)
        self.file = open(self.output / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "a build"
            self.file.close()
            raise GalleryIndexError(f"another build is writing {display_path(self.output)!r} ({display_path(holder)});"
                                    " wait for it to finish, or build into another --output") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(", ".join(f"{key} {value}" for key, value in self.holder.items()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:  # every write is done: the file can go before the lock does
            (self.output / LOCK_FILE).unlink(missing_ok=True)
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()


def _reusable(output: Path, gallery_dir: Path, checksum: str, extensions, backend: str) -> dict[str, int]:
    """{path: row} of an existing finished index of the same gallery, model, extensions and backend whose file has
    not changed since: rows a build copies instead of embedding again. Empty for anything else."""
    try:
        _, paths, meta = read_index(output, verify=False)
    except (GalleryIndexError, OSError):
        return {}
    same = (meta.get("gallery_dir") == str(gallery_dir.resolve()) and meta.get("model_checksum") == checksum
            and list(meta.get("extensions") or []) == list(extensions) and meta.get("backend") == backend)
    if not same or "fingerprints" not in meta:
        return {}
    return {path: row for row, (path, recorded) in enumerate(zip(paths, meta["fingerprints"]))
            if file_fingerprint(gallery_dir / path) == recorded}


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def build_index(
    model,
    processor,
    gallery_dir: PathLike,
    output: PathLike,
    batch_size: int = 64,
    model_id: Optional[str] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    resume: bool = True,
    show_progress: bool = True,
    shard_batches: int = 16,
    max_batches: Optional[int] = None,
    backend: str = EXACT_BACKEND,
    train_size: Optional[int] = None,
    distributed=None,
) -> Optional[tuple[np.ndarray, list[str], dict]]:
    """Write the index folder `output` for `gallery_dir`: see `GalleryIndex.build` for the arguments.

    Returns (embeddings memory-mapped from `output`, paths, meta) on the main process, None on the others.
    A full disk is one GalleryIndexError saying so (what was encoded stays: the same command resumes).
    """
    if batch_size < 1 or shard_batches < 1:
        raise ValueError(f"batch_size and shard_batches must be positive, got {batch_size}, {shard_batches}")
    state = distributed if distributed is not None else _SingleProcess()
    gallery_dir, output = Path(gallery_dir), Path(output)
    check_output_folder(output, gallery_dir)  # before anything is written or removed
    lock = _BuildLock(output, gallery_dir) if state.is_main_process else contextlib.nullcontext()
    try:
        with lock:
            return _build(model, processor, gallery_dir, output, batch_size, model_id, extensions, resume,
                          show_progress, shard_batches, max_batches, backend, train_size, state)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise GalleryIndexError(f"the disk holding {display_path(output)!r} is full ({error.strerror}); free some "
                                "space and run the same command again: the build resumes where it stopped") from None


def _build(model, processor, gallery_dir: Path, output: Path, batch_size, model_id, extensions, resume,
           show_progress, shard_batches, max_batches, backend, train_size, state):
    main, rank, world = state.is_main_process, int(state.process_index), int(state.num_processes)
    extensions = tuple(extension.lower().lstrip(".") for extension in extensions)
    files = _gallery_files(gallery_dir, extensions, exclude=output)
    if not _is_exact(backend):  # a bad string or too small a gallery fails before the encoding
        dim = getattr(getattr(model, "config", None), "projection_dim", None)
        if isinstance(dim, int):
            _check_ann_size(new_ann_index(backend, dim), backend, len(files))
    checksum = model_checksum(model)
    # An index of this gallery by this model already there: its rows of unchanged files are kept (an update).
    reused = _reusable(output, gallery_dir, checksum, extensions, backend) if resume else {}
    todo_files = [name for name in files if name not in reused]
    if reused and not todo_files and len(reused) == len(read_index(output, verify=False)[1]):
        embeddings, paths, meta = read_index(output)  # nothing changed since: the index is current
        return embeddings, paths, meta

    def digest(names) -> str:
        return hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()  # names need not be UTF-8

    fingerprint = dict(format=INDEX_FORMAT, format_version=INDEX_FORMAT_VERSION, model_checksum=checksum,
                       listing_sha256=digest(todo_files), reused_sha256=digest(sorted(reused)),
                       batch_size=batch_size, num_files=len(todo_files), gallery_dir=str(gallery_dir.resolve()))
    state.wait_for_everyone()  # every process has checked the folder before the main one writes
    if main:
        output.mkdir(parents=True, exist_ok=True)
        _ShardStore.prepare(output / PARTIAL_DIR, fingerprint, resume)
        _ShardStore(output / PARTIAL_DIR).drop_changed(gallery_dir)  # files replaced since their shard was written
    state.wait_for_everyone()
    if _read_json(output / PARTIAL_DIR / PROGRESS_FILE) != fingerprint:
        raise GalleryIndexError(f"process {rank} of {world} sees another gallery listing, model or batch size "
                                f"than the main process; every process must see the same folder and model")
    store = _ShardStore(output / PARTIAL_DIR)
    # This process's share: a contiguous run of whole batches, so that the batches (and the embeddings,
    # bit for bit) are those of a one-process build.
    num_batches = -(-len(todo_files) // batch_size)
    covered = store.covered_batches(batch_size)
    share = (rank * num_batches // world, (rank + 1) * num_batches // world)
    todo = [batch * batch_size for batch in range(*share) if batch * batch_size not in covered]
    share_files = min(len(todo_files), share[1] * batch_size) - min(len(todo_files), share[0] * batch_size)
    bar = tqdm(total=share_files,
               initial=share_files - sum(min(batch_size, len(todo_files) - start) for start in todo),
               desc="Indexing gallery" + (f" (process {rank} of {world})" if world > 1 else ""), unit="img",
               disable=not show_progress or not main)
    failure, done = None, 0
    try:
        for done, start in enumerate(todo):
            if max_batches is not None and done >= max_batches:
                raise BuildInterrupted(
                    f"stopped after {max_batches} batches ({start} of {len(todo_files)} files done); "
                    f"build again with the same model and folder to resume"
                )
            names = todo_files[start:start + batch_size]
            prints = {name: file_fingerprint(gallery_dir / name) for name in names}  # before reading: a later
            staged = store.stage(start, start + len(names),                          # change is seen as one
                                 *_embed_files(model, processor, gallery_dir, names), prints)
            if staged == shard_batches:
                store.flush()
            bar.update(len(names))
    except BaseException as error:  # noqa: BLE001 - re-raised below, after the other processes are told
        failure = error
    finally:
        try:
            store.flush()  # keep what was embedded, whether finished, interrupted or failed
        except OSError as error:  # e.g. the disk filled up: report the first failure, not this one
            failure = failure or error
        bar.close()
    if world > 1 and not isinstance(failure, KeyboardInterrupt):
        state.wait_for_everyone()  # all shards are written (or their process failed)
    if failure is not None:
        raise failure
    store.reload()
    shards = store.tiling(len(todo_files))
    if shards is None:  # only with several processes: another one stopped or failed
        raise BuildInterrupted(f"another process stopped before its share of the {len(todo_files)} files was "
                               f"encoded; build again with the same model and folder to resume")
    meta = _gallery_meta(model, processor, model_id, checksum, gallery_dir, extensions, len(files))
    if not main:
        # Done here: the main process joins the shards (and trains an approximate index, which can take
        # longer than a collective's timeout at 10^8 images), so the others do not wait for it.
        return None
    return _assemble(output / PARTIAL_DIR, shards, output, meta, backend, train_size, files, reused)


def _rows(files: list[str], folder: Path, shards: list[dict], old_embeddings, reused: dict[str, int],
          chunk: int = 8192):
    """The embedding rows of the new index in `files` order, `chunk` at a time: a reused file's row from the old
    index (memory-mapped), an encoded file's from its shard (one shard loaded at a time)."""
    new_rows = iter((shard, row) for shard in shards for row in range(len(shard["paths"])))
    new_kept = {path for shard in shards for path in shard["paths"]}
    loaded = {}
    sources = []
    for name in files:
        if name in reused:
            sources.append((None, reused[name]))
        elif name in new_kept:
            sources.append(next(new_rows))
        if len(sources) == chunk:
            yield _gather(sources, folder, old_embeddings, loaded)
            sources = []
    if sources:
        yield _gather(sources, folder, old_embeddings, loaded)


def _gather(sources, folder: Path, old_embeddings, loaded: dict) -> np.ndarray:
    rows = []
    for shard, row in sources:
        if shard is None:
            rows.append(np.asarray(old_embeddings[row], dtype=np.float32))
            continue
        if shard["file"] not in loaded:
            loaded.clear()  # shards come in order: one in memory at a time
            block = np.load(folder / shard["file"])
            if block.ndim != 2 or block.shape[0] != len(shard["paths"]):
                raise GalleryIndexError(f"{display_path(folder / shard['file'])} does not match its record; "
                                        f"build again with resume=False (--no-resume)")
            loaded[shard["file"]] = block
        rows.append(loaded[shard["file"]][row])
    return np.stack(rows)


def _assemble(folder: Path, shards: list[dict], output: Path, meta: dict, backend: str, train_size: Optional[int],
              files: list[str], reused: dict[str, int]) -> tuple[np.ndarray, list[str], dict]:
    """Join the old index's reused rows and the shards into the new index files, written beside the old ones and
    swapped in only once all are complete (an interruption before leaves the old index whole), meta last."""
    encoded = {path: shard["fingerprints"].get(path) for shard in shards for path in shard["paths"]}
    skipped = [item for shard in shards for item in shard["skipped"]]
    old_embeddings = old_fingerprints = None
    if reused:
        old_embeddings, _, old_meta = read_index(output, verify=False)
        old_fingerprints = old_meta["fingerprints"]
    paths = [name for name in files if name in reused or name in encoded]
    if not paths:
        raise _none_readable(meta["num_files"], meta["gallery_dir"], skipped)
    fingerprints = [old_fingerprints[reused[name]] if name in reused else encoded[name] for name in paths]
    # The width of the saved embeddings, read off the old index or the first shard that holds a readable image.
    embedding_dim = int(old_embeddings.shape[1]) if old_embeddings is not None else next(
        int(np.load(folder / shard["file"], mmap_mode="r").shape[1]) for shard in shards if shard["paths"])
    ann = None
    if not _is_exact(backend):  # before anything is written: a bad string, faiss missing, too few images
        ann = new_ann_index(backend, embedding_dim)
        _check_ann_size(ann, backend, len(paths))
    staged = {name: output / (name + ".tmp") for name in (EMBEDDINGS_FILE, PATHS_FILE, FILES_FILE, ANN_FILE)}
    staged[EMBEDDINGS_FILE] = output / (EMBEDDINGS_FILE + ".tmp.npy")
    digest = _write_embeddings(staged[EMBEDDINGS_FILE],
                               _rows(files, folder, shards, old_embeddings, reused), (len(paths), embedding_dim))
    meta = dict(meta, backend=EXACT_BACKEND if ann is None else backend)
    if ann is not None:  # the FAISS index of the new embeddings
        embeddings = np.load(staged[EMBEDDINGS_FILE], mmap_mode="r")
        index = build_ann_index(embeddings, backend, train_size=train_size)
        import_faiss(backend).write_index(index, str(staged[ANN_FILE]))
        meta.update(ann_file=ANN_FILE, ann_sha256=file_sha256(staged[ANN_FILE]),
                    ann_bytes=staged[ANN_FILE].stat().st_size,
                    ann_train_size=0 if ann.is_trained else ann_train_size(index, len(paths), train_size),
                    ann_nlist=ann_num_lists(index))
    staged[PATHS_FILE].write_text(json.dumps(paths, indent=1))
    staged[FILES_FILE].write_text(json.dumps({"fingerprints": fingerprints}))
    meta = dict(meta, embedding_dim=embedding_dim, count=len(paths), embeddings_sha256=digest,
                skipped=skipped, num_skipped=len(skipped))
    # The swap: the old index stops being one (no meta.json), the new files take its place, meta.json last.
    (output / META_FILE).unlink(missing_ok=True)
    for name, path in staged.items():
        if path.exists():
            os.replace(path, output / name)
        elif name == ANN_FILE:
            (output / ANN_FILE).unlink(missing_ok=True)  # an exact index has none
    _write_json(output / META_FILE, meta)
    _remove_partial(folder)
    return np.load(output / EMBEDDINGS_FILE, mmap_mode="r"), paths, dict(meta, fingerprints=fingerprints)
