"""The index folder on disk, as docs/index-format.md specifies it (tests/test_search_format.py checks the two agree):
its files, who owns them, how they are checked, and the model that made them."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence, Union

import numpy as np
import torch

from .backends import DEFAULT_CHUNK_SIZE, EXACT_BACKEND, is_exact
from .display import display_path
from .errors import GalleryIndexError, IndexNotFoundError, StaleIndexError

PathLike = Union[str, os.PathLike]

INDEX_FORMAT = "decd-gallery-index"  # the `format` tag of meta.json and partial/progress.json: proof of ownership
INDEX_FORMAT_VERSION = 3  # 2: meta.json records `format` and `embeddings_sha256`; 3: files.json
READABLE_FORMAT_VERSIONS = (2, 3)
EMBEDDINGS_FILE, PATHS_FILE, META_FILE, FILES_FILE = "embeddings.npy", "paths.json", "meta.json", "files.json"
ANN_FILE = "ann.faiss"  # the FAISS index of an approximate backend (meta.json `backend`), next to embeddings.npy
PARTIAL_DIR, PROGRESS_FILE, LOCK_FILE = "partial", "progress.json", ".build.lock"
# Everything a build writes in the index folder besides `partial/` (each first as NAME.tmp, or
# embeddings.npy.tmp.npy, renamed into place); nothing else there is ever touched.
INDEX_FILES = (META_FILE, PATHS_FILE, FILES_FILE, EMBEDDINGS_FILE, ANN_FILE)
# Shards are named by the listing position they start at (12 digits; 5-digit names are format-2 shards).
SHARD_FILE = re.compile(r"shard_(\d{5}|\d{12})\.(npy|json)(\.tmp(\.npy)?)?|progress\.json(\.tmp)?")
HASH_BLOCK = 1 << 23  # bytes read (or written) at a time when hashing embeddings.npy
_ENCODER_PREFIXES = ("text_model.", "vision_model.", "text_projection.", "visual_projection.")
_VOLATILE_CONFIG_KEYS = ("transformers_version", "architectures", "auto_map", "dtype", "torch_dtype")
_DTYPES = ("float32", "float16", "bfloat16")  # the precisions a model may be loaded in (meta.json model_checksum_as)
_REBUILD = "rebuild it with `decd-search index` (or GalleryIndex.build)"


# ---- Files and ownership -------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    """The JSON value in `path`, or None if it is missing or not valid JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any, private: bool = False) -> None:
    """Write JSON atomically (temporary file + rename), so an interruption never leaves half a file; `private`: the
    file is its user's only (mode 600) from the moment it is created."""
    temporary = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666), "w") as file:
        json.dump(value, file, indent=1)
    os.replace(temporary, path)


def file_fingerprint(path: Union[str, os.PathLike]) -> Optional[list[int]]:
    """[size in bytes, modification time in ns] of a file, or None when it is gone: what tells a changed file."""
    try:
        status = os.stat(path)
        return [status.st_size, status.st_mtime_ns]
    except OSError:
        return None


def file_sha256(source: Union[str, os.PathLike, BinaryIO]) -> str:
    """sha256 hex digest of a file (a path, or a binary file open at its start), read `HASH_BLOCK` bytes at a time
    (index files, converted checkpoints, gallery images)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            return file_sha256(file)
    digest = hashlib.sha256()
    while block := source.read(HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def _is_ours(record: Any, legacy_keys: Sequence[str]) -> bool:
    """Whether a meta.json / progress.json record was written by `build` (its `format` tag, or, for
    version-1 folders written before the tag existed, `format_version` 1 with that version's keys)."""
    return isinstance(record, dict) and (record.get("format") == INDEX_FORMAT or (
        record.get("format_version") == 1 and all(key in record for key in legacy_keys)))


def remove_partial(folder: Path) -> None:
    """Delete the build's own files in `partial/` (never anything else), then the folder if empty."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_file() and SHARD_FILE.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something that is not ours appeared in it: leave it
        folder.rmdir()


def check_output_folder(output: PathLike, gallery_dir: PathLike) -> None:
    """Raise GalleryIndexError (nothing changed) for an output folder whose files `build` could destroy:
    one that holds the gallery, or a non-empty folder that is neither a DECD index nor an unfinished DECD build."""
    output, gallery_dir = Path(output), Path(gallery_dir)
    fix = "choose a new or empty folder for --output"
    if gallery_dir.is_dir() and gallery_dir.resolve().is_relative_to(output.resolve()):
        raise GalleryIndexError(f"the gallery {display_path(gallery_dir)!r} is inside the output folder "
                                f"{display_path(output)!r}: {fix} (outside the gallery, or a subfolder of it)")
    if not output.exists():
        return
    if not output.is_dir():
        raise GalleryIndexError(f"output {display_path(output)!r} is a file, not a folder: {fix}")
    if not (entries := {entry.name for entry in output.iterdir()} - {LOCK_FILE}):
        return
    meta_ours = _is_ours(read_json(output / META_FILE), ("model_checksum", "count"))
    partial = output / PARTIAL_DIR  # ours: a progress.json written by `build` and nothing but shard files
    partial_ours = (partial.is_dir()
                    and _is_ours(read_json(partial / PROGRESS_FILE), ("model_checksum", "listing_sha256"))
                    and all(entry.is_file() and SHARD_FILE.fullmatch(entry.name) for entry in partial.iterdir()))
    if PARTIAL_DIR in entries and not partial_ours:
        raise GalleryIndexError(f"{display_path(partial)!r} was not written by a DECD index build (no DECD "
                                f"{PROGRESS_FILE}, or files that are not shards); {fix}, or move it away")
    if not (meta_ours or partial_ours):
        raise GalleryIndexError(f"output folder {display_path(output)!r} is not empty and is not a DECD gallery "
                                f"index (no DECD {META_FILE}); nothing was changed: {fix}")


# ---- The paths a gallery records: image files inside its folder ----------------------------------
# Extensions PIL opens that name data or documents it can read a picture out of, not pictures: never gallery images.
_NOT_PICTURES = frozenset({".bufr", ".grib", ".h5", ".hdf", ".fit", ".fits", ".eps", ".ps", ".mpeg", ".mpg", ".wmf",
                           ".emf"})
_SUFFIXES: dict[int, frozenset] = {}
RECORDED_BY_SOMEONE_ELSE = ("it was not written by decd-search as it is (edited, or from elsewhere): nothing of it was "
                            "opened; rebuild it from the gallery folder with `decd-search index`")


def image_suffixes() -> frozenset:
    """The file name extensions (lower case, with the dot) a gallery image may have: those of the formats PIL opens
    (its plugins registered now), less `_NOT_PICTURES`."""
    from PIL import Image

    Image.init()
    if (key := len(Image.EXTENSION)) not in _SUFFIXES:  # the key grows when a plugin registers more formats
        _SUFFIXES.clear()
        _SUFFIXES[key] = frozenset(suffix.lower() for suffix, kind in Image.EXTENSION.items()
                                   if kind in Image.OPEN) - _NOT_PICTURES
    return _SUFFIXES[key]


def path_problem(relative: Any, gallery_dir: Optional[PathLike] = None) -> Optional[str]:
    """Why `relative`, a path a gallery records, does not name an image file inside the gallery folder, or None when
    it does. The one rule for every such path: an index's paths.json, a folder listing, a Milvus collection's rows,
    the files the app and the service serve. The path is relative (POSIX), does not go up ('..'), has an image file
    name (`image_suffixes`) and, when `gallery_dir` exists, no symbolic link on its way leads outside the folder.

    The reason is worded to follow the path: "'../x.txt' goes up out of the gallery folder ('..')".
    """
    if not isinstance(relative, str) or not relative:
        return "is not a file name"
    if "\x00" in relative:
        return "holds a NUL character"
    if os.path.isabs(relative):
        return "is an absolute path, not one relative to the gallery folder"
    if ".." in relative.split("/"):
        return "goes up out of the gallery folder ('..')"
    if (suffix := os.path.splitext(relative)[1].lower()) not in image_suffixes():
        return f"is not an image file name ({suffix or 'no extension'})"
    if gallery_dir is None or not os.path.isdir(gallery_dir):
        return None
    root = os.path.realpath(gallery_dir)
    target = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, target]) != root:
        return f"leads through a symbolic link to {target}, outside the gallery folder {root}"
    return None


def check_gallery_dir(gallery_dir: Any, where: str) -> Optional[Path]:
    """A gallery folder as a record names it (meta.json, a collection's decd.meta): None, or an absolute path that
    does not go up ('..'), as a build writes it; GalleryIndexError naming `where` otherwise."""
    if gallery_dir is None:
        return None
    if not (isinstance(gallery_dir, str) and os.path.isabs(gallery_dir) and ".." not in gallery_dir.split("/")
            and "\x00" not in gallery_dir):
        raise GalleryIndexError(f"{where} records the gallery folder {display_path(str(gallery_dir))!r}, which is not "
                                f"an absolute path without '..'; {RECORDED_BY_SOMEONE_ELSE}")
    return Path(gallery_dir)


def check_gallery_paths(paths: Sequence[str], gallery_dir: Optional[PathLike], where: str,
                        remedy: str = RECORDED_BY_SOMEONE_ELSE, links_to_files_only: bool = False) -> None:
    """Raise GalleryIndexError naming the first of `paths` (relative to `gallery_dir`) that `path_problem` refuses,
    and `where` they are recorded ("index 'x' (paths.json)"), followed by `remedy`.

    Every path is checked by `path_problem`; the symbolic links are found one folder at a time (a `scandir` of each
    folder that holds a path, not a `stat` of each path), so a 10^6-image gallery is checked in about a read of its
    folders. `links_to_files_only` (a folder being listed): a link to something other than a regular file (a device,
    a pipe) is left to `load_image`, which refuses it without reading it; only a file's bytes could be embedded and
    served from outside.
    """
    def refuse(number: int, relative: Any, problem: str) -> GalleryIndexError:
        name = display_path(relative) if isinstance(relative, str) else relative
        return GalleryIndexError(f"{where}: entry {number} ({name!r}) {problem}; {remedy}")

    by_folder: dict[str, list[tuple[int, str]]] = {}
    for number, relative in enumerate(paths):
        if (problem := path_problem(relative)) is not None:
            raise refuse(number, relative, problem)
        folder, _, name = relative.rpartition("/")
        by_folder.setdefault(folder, []).append((number, name))
    if gallery_dir is None or not os.path.isdir(gallery_dir):
        return
    root = os.path.realpath(gallery_dir)
    for folder, names in by_folder.items():
        real = os.path.realpath(os.path.join(root, folder))
        if os.path.commonpath([root, real]) != root:  # the folder itself is (behind) a link out
            number, name = names[0]
            relative = f"{folder}/{name}"
            raise refuse(number, relative, path_problem(relative, gallery_dir))
        try:
            with os.scandir(real) as entries:
                links = {entry.name for entry in entries if entry.is_symlink()}
        except OSError:  # gone or unreadable: nothing in it can lead anywhere
            continue
        for number, name in names:
            relative = f"{folder}/{name}" if folder else name
            if name in links and not (links_to_files_only and not os.path.isfile(os.path.join(real, name))) \
                    and (problem := path_problem(relative, gallery_dir)) is not None:
                raise refuse(number, relative, problem)


# ---- Reading an index folder ---------------------------------------------------------------------
def is_index_folder(path: Path) -> bool:
    """Whether `path` is meant as an index folder (finished or not): it holds meta.json or partial/.
    `read_index` then says what is wrong with it, if anything."""
    return (path / META_FILE).exists() or (path / PARTIAL_DIR).exists()


def read_index(path: PathLike, mmap: bool = True, verify: bool = True) -> tuple[np.ndarray, list[str], dict]:
    """(embeddings [count, dim] float32, paths, meta) of an index folder, checked to be whole.

    See `GalleryIndex.load` for `mmap` and `verify` (the full read: sha256 of the files, finite values).
    Raises IndexNotFoundError (no such folder, an unfinished build) or GalleryIndexError (damaged or
    outdated: one line that says to rebuild it).
    """
    if not (path := Path(path)).is_dir():
        raise IndexNotFoundError(f"index folder {display_path(path)!r} does not exist; build it with "
                                 f"GalleryIndex.build or `decd-search index`")
    if not (path / META_FILE).exists():
        state = "an unfinished build (run the build again to resume)" if (path / PARTIAL_DIR).exists() \
            else "not a gallery index"
        raise IndexNotFoundError(f"{display_path(path)!r} has no {META_FILE}: {state}")

    def damaged(what: str) -> GalleryIndexError:
        return GalleryIndexError(f"index {display_path(path)!r} is damaged: {what}; {_REBUILD}")

    if not isinstance(meta := read_json(path / META_FILE), dict):
        raise damaged(f"{META_FILE} is not a valid JSON object")
    if meta.get("format_version") not in READABLE_FORMAT_VERSIONS or meta.get("format") != INDEX_FORMAT:
        raise GalleryIndexError(f"index {display_path(path)!r} has format version {meta.get('format_version')}, "
                                f"this code reads version {INDEX_FORMAT_VERSION}; {_REBUILD}")
    count, dim, expected = meta.get("count"), meta.get("embedding_dim"), meta.get("embeddings_sha256")
    if not (isinstance(count, int) and count > 0 and isinstance(dim, int) and dim > 0
            and isinstance(expected, str)):
        raise damaged(f"{META_FILE} lacks a valid count, embedding_dim or embeddings_sha256")
    if not (isinstance(paths := read_json(path / PATHS_FILE), list) and all(isinstance(item, str) for item in paths)):
        raise damaged(f"{PATHS_FILE} is missing or not a JSON list of paths")
    if len(paths) != count:
        raise damaged(f"{PATHS_FILE} lists {len(paths)} paths, {META_FILE} says {count}")
    # An index folder is input from whoever wrote it: every path it records must stay inside its gallery folder.
    gallery_dir = check_gallery_dir(meta.get("gallery_dir"), f"index {display_path(path)!r} ({META_FILE})")
    check_gallery_paths(paths, gallery_dir, f"index {display_path(path)!r} ({PATHS_FILE})")
    if meta["format_version"] >= 3:
        files = read_json(path / FILES_FILE)
        fingerprints = files.get("fingerprints") if isinstance(files, dict) else None
        if not (isinstance(fingerprints, list) and len(fingerprints) == count):
            raise damaged(f"{FILES_FILE} is missing or does not hold one fingerprint per path")
        meta = dict(meta, fingerprints=fingerprints)  # kept in memory beside meta.json's own fields
    try:
        embeddings = np.load(path / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise damaged(f"{EMBEDDINGS_FILE} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(embeddings, np.ndarray) or embeddings.dtype != np.float32 \
            or embeddings.shape != (count, dim):
        raise damaged(f"{EMBEDDINGS_FILE} holds {getattr(embeddings, 'dtype', '?')} "
                      f"{tuple(getattr(embeddings, 'shape', ()))}, expected float32 ({count}, {dim})")
    if verify:
        if file_sha256(path / EMBEDDINGS_FILE) != expected:
            raise damaged(f"{EMBEDDINGS_FILE} does not match the checksum recorded at build time")
        for start in range(0, count, DEFAULT_CHUNK_SIZE):
            if not np.isfinite(block := np.asarray(embeddings[start:start + DEFAULT_CHUNK_SIZE])).all():
                row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise damaged(f"{EMBEDDINGS_FILE} row {row} ({display_path(paths[row])}) is not finite")
    if not isinstance(backend := meta.get("backend", EXACT_BACKEND), str) or not backend:
        raise damaged(f"{META_FILE} has no valid backend")
    if not is_exact(backend):  # the approximate index: present, the size recorded, the bytes (verify)
        if not (ann_path := path / ANN_FILE).is_file() or ann_path.stat().st_size != meta.get("ann_bytes"):
            raise damaged(f"{ANN_FILE} (the {backend} index) is missing or has another size than recorded")
        if verify and file_sha256(ann_path) != meta.get("ann_sha256"):
            raise damaged(f"{ANN_FILE} does not match the checksum recorded at build time")
    return embeddings, paths, meta


# ---- The model that made an index ----------------------------------------------------------------
def _config_fingerprint(config) -> dict:
    """The parts of a config that shape an embedding, without keys that change on save/load."""
    fields = {name: {key: value for key, value in sub_config.to_dict().items()
                     if not key.startswith("_") and key not in _VOLATILE_CONFIG_KEYS}
              for name in ("text_config", "vision_config") if (sub_config := getattr(config, name, None)) is not None}
    return dict(fields, **{name: list(value) if isinstance(value, (tuple, list)) else value
                           for name in ("projection_dim", "image_size", "model_type")
                           if (value := getattr(config, name, None)) is not None})


def model_checksum(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> str:
    """sha256 hex digest of a model's encoder weights and encoder configs (docs/index-format.md); with `dtype`,
    of the weights cast to it (what the same model loaded in that dtype would give)."""
    state = model.state_dict()
    names = sorted(name for name in state if name.startswith(_ENCODER_PREFIXES)) or sorted(state)
    digest = hashlib.sha256()
    digest.update(json.dumps(_config_fingerprint(getattr(model, "config", None)), sort_keys=True, default=str).encode())
    for name in names:
        tensor = state[name].detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def model_identifier(model: torch.nn.Module, model_id: Optional[str] = None) -> str:
    """A human-readable id: `model_id` if given, else the folder / Hub id the model was loaded from.

    Local folders are made absolute so that `decd-search query` can reload the model from anywhere.
    """
    name = str(model_id if model_id is not None else getattr(model, "name_or_path", "") or "")
    return os.path.abspath(name) if name and os.path.isdir(name) else name or f"<in-memory {type(model).__name__}>"


def _dtype(model) -> Optional[str]:
    """The precision of a model's weights as meta.json records it ("float32"), None without floating-point ones."""
    return next((str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()), None)


def model_meta(model, processor, model_id: Optional[str], checksum: str) -> dict:
    """The meta.json fields that say which model made the embeddings, and when."""
    dtype = _dtype(model)
    # The checksums this model would have loaded in another precision: a query model in another dtype is then
    # told apart from another model (see check_model).
    other = {cast: model_checksum(model, getattr(torch, cast)) for cast in _DTYPES if cast != dtype}
    return dict(format_version=INDEX_FORMAT_VERSION, model_id=model_identifier(model, model_id),
                model_checksum=checksum, model_class=type(model).__name__, model_dtype=dtype, model_checksum_as=other,
                image_size=list(getattr(processor, "image_size", []) or []) or None,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def index_meta(model, processor, model_id: Optional[str], checksum: str, gallery_dir: Path,
               extensions: Sequence[str], num_files: int) -> dict:
    """The meta.json fields of an index known before the encoding: the model, the folder, what was listed."""
    return dict(format=INDEX_FORMAT, **model_meta(model, processor, model_id, checksum),
                gallery_dir=str(gallery_dir.resolve()), extensions=list(extensions), num_files=num_files)


def check_model(meta: dict, model, model_id: Optional[str] = None) -> None:
    """Raise `StaleIndexError` (naming both models) unless `model` has the checksum recorded in `meta`; when only the
    dtype differs (the same weights loaded in float16 for a float32 index, say), the message says so."""
    if (checksum := model_checksum(model)) == meta.get("model_checksum"):
        return
    built = f"index built by {meta.get('model_id')} (checksum {(meta.get('model_checksum') or 'unknown')[:12]})"
    given = f"model is {model_identifier(model, model_id)} (checksum {checksum[:12]})"
    current, recorded = _dtype(model), meta.get("model_dtype")
    if recorded and current and current != recorded:
        same = (meta.get("model_checksum_as") or {}).get(current) == checksum
        raise StaleIndexError(f"{built} in {recorded}, {given} in {current}: " + (
                f"the same weights in another dtype, whose embeddings differ slightly from the index's (enough to "
                f"reorder close results); load the model in {recorded} (dtype=torch.{recorded}) or rebuild the index "
                "with this one" if same else "another model in another dtype; rebuild the index"))
    raise StaleIndexError(f"{built}, {given}; rebuild the index")
