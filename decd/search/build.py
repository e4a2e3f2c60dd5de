"""`build_index` (`GalleryIndex.build`): the resumable, multi-process build of an index folder, its batches saved as
shards in `partial/` as it goes (docs/index-format.md, "An unfinished build"), then joined into the index files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..processes import stop_together
from .backends import (EXACT_BACKEND, ann_num_lists, ann_train_size, build_ann_index, check_ann_size, import_faiss,
                       is_exact, new_ann_index)
from .display import display_path
from .encode import (IMAGE_EXTENSIONS, EncodedBatch, SingleProcess, encode_gallery, extension_names, join_batches,
                     list_images, none_readable, one_share, warn_skipped)
from .errors import BuildInterrupted, GalleryIndexError
from .format import (ANN_FILE, EMBEDDINGS_FILE, FILES_FILE, INDEX_FILES, INDEX_FORMAT, INDEX_FORMAT_VERSION, LOCK_FILE,
                     META_FILE, PARTIAL_DIR, PATHS_FILE, PROGRESS_FILE, SHARD_FILE, PathLike, check_output_folder,
                     file_fingerprint, file_sha256, index_meta, model_checksum, read_index, read_json, remove_partial,
                     write_json)

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

logger = logging.getLogger(__name__)

# ---- Saved progress: shards in partial/ ----------------------------------------------------------
class _ShardStore:
    """Encoded batches of an unfinished build: `partial/progress.json` + shard_<start>.{npy,json}, whole batches named
    by listing position, so that a build resumes with any number of processes (docs/index-format.md, "An unfinished
    build"); a shard's json, written after its npy, is the proof that it is complete."""

    def __init__(self, folder: Path, writer: Optional[dict] = None):
        self.folder, self.writer = folder, writer
        self.staged: list[EncodedBatch] = []  # encoded batches the next shard holds
        self.reload()

    @staticmethod
    def prepare(folder: Path, fingerprint: dict, resume: bool, gallery_dir: Path) -> None:
        """Keep `folder`'s shards if they belong to this build (same fingerprint) and `resume`, else clear it; write
        progress.json; delete the shards holding a file that changed (or went) since it was encoded: their batches
        are encoded again. Run by one process only (the main one)."""
        # `check_output_folder` made sure the folder is ours
        if folder.exists() and (not resume or read_json(folder / PROGRESS_FILE) != fingerprint):
            remove_partial(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / PROGRESS_FILE, fingerprint)
        for shard in _ShardStore(folder).shards:
            if any(file_fingerprint(gallery_dir / name) != recorded
                   for name, recorded in shard.get("fingerprints", {"": None}).items()):
                (folder / (Path(shard["file"]).stem + ".json")).unlink(missing_ok=True)  # the proof goes first
                (folder / shard["file"]).unlink(missing_ok=True)

    def reload(self) -> None:
        """Read every complete shard record (unreadable ones are ignored and redone)."""
        records = [read_json(path) for path in self.folder.glob("shard_*.json") if SHARD_FILE.fullmatch(path.name)]
        self.shards: list[dict] = [record for record in records if isinstance(record, dict)
                                   and {"start", "end", "paths", "skipped", "file"} <= set(record)]

    def tiling(self, num_files: int) -> Optional[list[dict]]:
        """Shards that cover [0, num_files) once each, in listing order (None while a part is missing); of two that
        start at one position, the longer."""
        chosen, position = [], 0
        for shard in sorted(self.shards, key=lambda record: (record["start"], -record["end"])):
            if shard["start"] == position and shard["end"] > position:
                chosen.append(shard)
                position = shard["end"]
        return chosen if position == num_files else None

    def stage(self, batch: EncodedBatch) -> int:
        """Hold one encoded batch for the next shard; a batch that does not follow the staged ones starts a new
        shard. Returns the number of batches now staged."""
        if self.staged and batch.start != self.staged[-1].end:
            self.flush()
        self.staged.append(batch)
        return len(self.staged)

    def flush(self) -> None:
        """Write the staged batches as one shard (npy, then its json: the proof it is complete)."""
        if not self.staged:
            return
        batches, stem = self.staged, f"shard_{self.staged[0].start:012d}"
        embeddings, paths, skipped = join_batches(batches)
        array = embeddings if embeddings is not None else np.zeros((0, 0), np.float32)  # unreadable only
        np.save(self.folder / f"{stem}.npy.tmp.npy", array.astype(np.float32, copy=False))  # temporary + rename
        os.replace(self.folder / f"{stem}.npy.tmp.npy", self.folder / f"{stem}.npy")
        record = dict(start=batches[0].start, end=batches[-1].end, paths=paths, skipped=skipped,
                      fingerprints={name: value for batch in batches for name, value in batch.fingerprints.items()},
                      file=f"{stem}.npy", writer=self.writer)
        write_json(self.folder / f"{stem}.json", record)
        self.shards.append(record)
        self.staged = []


def _write_embeddings(path: Path, blocks, shape: tuple[int, int]) -> str:
    """Write `blocks` (float32 arrays of rows, in order) as one .npy file, one block in memory at a time; returns
    the sha256 of the file's bytes, computed as they are written (no second pass)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, dict(descr=np.lib.format.dtype_to_descr(np.dtype("<f4")), fortran_order=False, shape=shape))
    digest, rows = hashlib.sha256(), 0
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


@contextlib.contextmanager
def _build_lock(output: Path, gallery_dir: Path):
    """One build at a time per index folder: an OS lock on `.build.lock` (released if the build dies), which
    names the build holding it; removed when the build ends (a build killed leaves it, unlocked and harmless)."""
    if fcntl is None:  # no POSIX locks on this platform: one build at a time is up to the user
        yield
        return
    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "a+") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            raise GalleryIndexError(f"another build is writing {display_path(output)!r} "
                                    f"({display_path(file.read().strip() or 'a build')}); wait for it to finish, or "
                                    f"build into another --output") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()}, host {socket.gethostname()}, gallery {gallery_dir.resolve()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        file.flush()
        try:
            yield
        finally:  # every write is done: the file can go before the lock does
            (output / LOCK_FILE).unlink(missing_ok=True)
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _reusable(output: Path, gallery_dir: Path, checksum: str, extensions,
              backend: str) -> tuple[Optional[tuple[np.ndarray, list[str], dict]], dict[str, int]]:
    """The finished index in `output` ((embeddings memory-mapped, paths, meta), unverified) when it is of the same
    gallery, model, extensions and backend, with {path: row} of its files that have not changed since: rows a build
    copies instead of embedding again. (None, {}) for anything else."""
    try:
        old = read_index(output, verify=False)
    except (GalleryIndexError, OSError):
        return None, {}
    _, paths, meta = old
    same = (meta.get("gallery_dir") == str(gallery_dir.resolve()) and meta.get("model_checksum") == checksum
            and list(meta.get("extensions") or []) == list(extensions) and meta.get("backend") == backend)
    if not same or "fingerprints" not in meta:
        return None, {}
    return old, {path: row for row, (path, recorded) in enumerate(zip(paths, meta["fingerprints"]))
                 if file_fingerprint(gallery_dir / path) == recorded}


# ---- The build -----------------------------------------------------------------------------------
@torch.no_grad()
def build_index(cls, model, processor, gallery_dir: PathLike, output: PathLike, batch_size: int = 64,
                model_id: Optional[str] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS, resume: bool = True,
                show_progress: bool = True, shard_batches: int = 16, max_batches: Optional[int] = None,
                backend: str = EXACT_BACKEND, train_size: Optional[int] = None, distributed=None):
    """Encode every image under `gallery_dir` and write the index folder `output` (`GalleryIndex.build`).

    Args:
        model: a DECD model (anything with `get_image_features(pixel_values)` -> [batch, dim]).
        processor: its `DecdProcessor` (images -> `pixel_values`).
        gallery_dir: folder searched recursively for files with `extensions`.
        output: the index folder: new, empty, or one `build` wrote (an index there is updated: only new and changed
            files are encoded; an unfinished build there is resumed). Anything else is refused: see
            `decd.search.format`.
        batch_size: images per forward pass.
        model_id: recorded as the model's name (default: the folder / Hub id it was loaded from).
        resume: continue an unfinished build in `output` if it was started with the same model (checksum) and the same
            file listing; False starts over.
        show_progress: a tqdm bar over the images.
        shard_batches: progress is saved every this many batches (and on any exception, including KeyboardInterrupt), so
            at most that much work is lost if the process is killed.
        max_batches: stop (raising `BuildInterrupted`, progress saved) after encoding this many batches in this call;
            for time-boxed jobs and tests.
        backend: "exact" (the default: no extra file; search multiplies against every row) or a FAISS index-factory
            string (HNSW32, IVF4096,Flat, IVF4096,PQ64, ...; inner product), built from the embeddings (trained on
            `train_size` of them where the index needs it, default `ann_train_size`) and written to `ann.faiss`;
            `search` then uses it by default.
        distributed: an `accelerate` `PartialState` (or `Accelerator`; `decd.processes.process_state`) when several
            processes build together (torchrun or accelerate launch: docs/large-galleries.md): each encodes a contiguous
            share of the batches into its own shards, and the main process joins them. The result is the same, bit for
            bit, as a one-process build with the same `batch_size` (same batches). Every process must call `build` with
            the same arguments and see the same gallery. None: this process alone.

    Images are encoded on the model's device. Unreadable files are skipped with one `SkippedImagesWarning` and listed in
    `meta["skipped"]`.

    Returns:
        The finished `GalleryIndex` (embeddings memory-mapped); with `distributed`, on the main process
        only: the others return None once their share is saved, without waiting for the join.

    Raises:
        IndexNotFoundError: `gallery_dir` does not exist.
        GalleryIndexError: no image files, none of them could be read, or `output` is not ours to write (it holds the
            gallery, or other files and no DECD index); a full disk (what was encoded stays: the same command resumes).
        BuildInterrupted: `max_batches` was reached before the end.
    """
    if batch_size < 1 or shard_batches < 1:
        raise ValueError(f"batch_size and shard_batches must be positive, got {batch_size}, {shard_batches}")
    state = distributed if distributed is not None else SingleProcess()
    main, rank, world = state.is_main_process, int(state.process_index), int(state.num_processes)
    gallery_dir, output = Path(gallery_dir), Path(output)
    check_output_folder(output, gallery_dir)  # before anything is written or removed
    with _full_disk_is_one_line(output), (_build_lock(output, gallery_dir) if main else contextlib.nullcontext()):
        extensions = extension_names(extensions)
        files = list_images(gallery_dir, extensions, exclude=output)
        if not is_exact(backend):  # a bad string or too small a gallery fails before the encoding
            if isinstance(dim := getattr(getattr(model, "config", None), "projection_dim", None), int):
                check_ann_size(new_ann_index(backend, dim), backend, len(files))
        checksum = model_checksum(model)
        # An index of this gallery by this model already there: its rows of unchanged files are kept (an update).
        old, reused = _reusable(output, gallery_dir, checksum, extensions, backend) if resume else (None, {})
        todo_files = [name for name in files if name not in reused]
        if reused and not todo_files and len(reused) == len(old[1]):
            return _opened(cls, read_index(output), output)  # nothing changed since: the index is current

        def digest(names) -> str:  # names need not be UTF-8
            return hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()

        fingerprint = dict(format=INDEX_FORMAT, format_version=INDEX_FORMAT_VERSION, model_checksum=checksum,
                           listing_sha256=digest(todo_files), reused_sha256=digest(sorted(reused)),
                           batch_size=batch_size, num_files=len(todo_files), gallery_dir=str(gallery_dir.resolve()))
        state.wait_for_everyone()  # every process has checked the folder before the main one writes
        if main:
            output.mkdir(parents=True, exist_ok=True)
            _ShardStore.prepare(output / PARTIAL_DIR, fingerprint, resume, gallery_dir)
        state.wait_for_everyone()
        mismatch = None if read_json(output / PARTIAL_DIR / PROGRESS_FILE) == fingerprint else GalleryIndexError(
            f"process {rank} of {world} sees another gallery listing, model or batch size than the main process; "
            f"every process must see the same folder and model")
        stop_together(state, mismatch)  # all stop now, rather than encode their shares and wait for this one at the end
        writer = dict(process=rank, processes=world, host=socket.gethostname(), pid=os.getpid())
        store = _ShardStore(output / PARTIAL_DIR, writer)
        # the batches complete shards hold (whole batches of this batch size): one pass, linear in the shards
        done = {start for shard in store.shards for start in range(shard["start"], shard["end"], batch_size)}
        batches = encode_gallery(model, processor, gallery_dir, todo_files, batch_size, share=(rank, world), done=done,
                                 max_batches=max_batches, show_progress=show_progress and main, desc="Indexing gallery")
        encoded = []  # (start, end) of the batches this process encodes in this call
        with one_share(state):  # all shards are written (or their process failed) before the join
            try:
                for batch in batches:
                    encoded.append((batch.start, batch.end))
                    if store.stage(batch) == shard_batches:
                        store.flush()
            except BaseException:
                with contextlib.suppress(OSError):  # e.g. the disk filled up: report the first failure, not this one
                    store.flush()  # keep what was embedded, whether interrupted or failed
                raise
            store.flush()
        if world > 1:
            logger.info("process %d of %d (pid %d on %s) encoded %d of the %d files%s", rank, world, writer["pid"],
                        writer["host"], sum(end - start for start, end in encoded), len(todo_files),
                        f" (listing positions {encoded[0][0]} to {encoded[-1][1] - 1})" if encoded else "")
        store.reload()
        if (shards := store.tiling(len(todo_files))) is None:  # with several processes only: one stopped or failed
            raise BuildInterrupted(f"another process stopped before its share of the {len(todo_files)} files was "
                                   f"encoded; build again with the same model and folder to resume")
        if not main:  # the main process joins the shards (and trains an approximate index, which can take longer
            return None  # than a collective's timeout at 10^8 images): the others do not wait for it
        meta = index_meta(model, processor, model_id, checksum, gallery_dir, extensions, len(files))
        return _opened(cls, _assemble(output / PARTIAL_DIR, shards, output, meta, backend, train_size, files, old,
                                      reused), output)


def _opened(cls, built: tuple[np.ndarray, list[str], dict], output: Path):
    """The finished index, opened; one `SkippedImagesWarning` for the files it left out, shown at `build`'s caller."""
    index = cls(*built, output)
    warn_skipped(index.skipped, index.meta["num_files"], index.meta["gallery_dir"],
                 f"{output / META_FILE} under 'skipped'", stacklevel=4)
    return index


@contextlib.contextmanager
def _full_disk_is_one_line(output: Path):
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise GalleryIndexError(f"the disk holding {display_path(output)!r} is full ({error.strerror}); free some "
                                "space and run the same command again: the build resumes where it stopped") from None


def _rows(paths: list[str], folder: Path, shards: list[dict], old_embeddings, reused: dict[str, int],
          chunk: int = 8192):
    """The embedding rows of the new index in `paths` order, `chunk` at a time: a reused file's row from the old
    index (memory-mapped), an encoded file's from its shard (one shard loaded at a time: the shards hold the encoded
    files in listing order)."""
    def encoded():
        for shard in shards:
            if (block := np.load(folder / shard["file"])).ndim != 2 or block.shape[0] != len(shard["paths"]):
                raise GalleryIndexError(f"{display_path(folder / shard['file'])} does not match its record; "
                                        f"build again with resume=False (--no-resume)")
            yield from block

    new_rows = encoded()
    for start in range(0, len(paths), chunk):
        yield np.stack([np.asarray(old_embeddings[reused[name]], dtype=np.float32) if name in reused
                        else next(new_rows) for name in paths[start:start + chunk]])


def _assemble(folder: Path, shards: list[dict], output: Path, meta: dict, backend: str, train_size: Optional[int],
              files: list[str], old: Optional[tuple], reused: dict[str, int]) -> tuple[np.ndarray, list[str], dict]:
    """Join the old index's reused rows and the shards into the new index files, written beside the old ones and
    swapped in only once all are complete (an interruption before leaves the old index whole), meta last."""
    encoded = {path: shard["fingerprints"].get(path) for shard in shards for path in shard["paths"]}
    skipped = [item for shard in shards for item in shard["skipped"]]
    old_embeddings, _, old_meta = old if reused else (None, None, None)
    if not (paths := [name for name in files if name in reused or name in encoded]):
        raise none_readable(meta["num_files"], meta["gallery_dir"], skipped)
    fingerprints = [old_meta["fingerprints"][reused[name]] if name in reused else encoded[name] for name in paths]
    # The width of the saved embeddings, read off the old index or the first shard that holds a readable image.
    embedding_dim = int(old_embeddings.shape[1]) if old_embeddings is not None else next(
        int(np.load(folder / shard["file"], mmap_mode="r").shape[1]) for shard in shards if shard["paths"])
    # before anything is written: a bad string, faiss missing, too few images
    ann = None if is_exact(backend) else new_ann_index(backend, embedding_dim)
    if ann is not None:
        check_ann_size(ann, backend, len(paths))
    staged = {name: output / (name + (".tmp.npy" if name == EMBEDDINGS_FILE else ".tmp")) for name in INDEX_FILES
              if name != META_FILE}
    digest = _write_embeddings(staged[EMBEDDINGS_FILE], _rows(paths, folder, shards, old_embeddings, reused),
                               (len(paths), embedding_dim))
    meta = dict(meta, backend=EXACT_BACKEND if ann is None else backend)
    if ann is not None:  # the FAISS index of the new embeddings
        index = build_ann_index(np.load(staged[EMBEDDINGS_FILE], mmap_mode="r"), backend, train_size=train_size)
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
    write_json(output / META_FILE, meta)
    remove_partial(folder)
    return np.load(output / EMBEDDINGS_FILE, mmap_mode="r"), paths, dict(meta, fingerprints=fingerprints)
