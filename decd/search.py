"""Search a folder of pedestrian crops with a text description: a gallery index on disk.

`GalleryIndex.build` encodes every image under a folder once with a DECD model and stores the
L2-normalised image embeddings; `GalleryIndex.search_text` then ranks the whole gallery for a
description by cosine similarity: exact top-k by default (`backend="faiss"` is also exact: `IndexFlatIP`),
or, for an index built with `backend=SPEC` (a FAISS index-factory string such as HNSW32, IVF4096,Flat or
IVF4096,PQ64), an approximate search in that index. Several processes (`accelerate launch`) can build one
index together: each encodes a contiguous share of the batches, the main process joins the shards.

Index folder layout (all written by `build`, read by `load`):

- `embeddings.npy`: float32 `[count, embedding_dim]`, one L2-normalised row per image, in `paths` order.
  `load` memory-maps it, so opening a 10^6-image index (2 GB at dim 512) costs nothing and `search`
  reads it one chunk at a time.
- `paths.json`: the images' paths relative to the gallery folder (POSIX separators), sorted. File names
  that are not valid UTF-8 are kept losslessly: Python reads them as str with lone surrogates
  (surrogateescape) and JSON stores those as `\\udcXX` escapes, which read back as the same str, so the
  file opens again; `display_path` shows them printable (`caf\\xe9.png`).
- `meta.json`: `format` ("decd-gallery-index"), `format_version`, `model_id`, `model_checksum`,
  `embedding_dim`, `image_size`, `created` (UTC, ISO 8601), `count`, `embeddings_sha256` (sha256 of the
  `embeddings.npy` file, computed while it is written), `gallery_dir`, `extensions`, `skipped`
  (unreadable files with the reason), `num_skipped` and `backend` ("exact" or a FAISS index-factory
  string; for the latter also `ann_file`, `ann_sha256`, `ann_bytes`, `ann_train_size`, `ann_nlist`). It is
  written last: a folder without it is an unfinished build.
- `ann.faiss`: only for an approximate backend, the FAISS index (`faiss.write_index`) whose ids are the
  rows of `embeddings.npy`; `load` checks its size and (verify) its sha256.
- `partial/` exists only while a build is unfinished: `progress.json` (tagged with `format`; model
  checksum, listing sha256, batch size) and shards `shard_<start position>.{npy,json}` of whole encoded
  batches that a new `build` with the same model, file listing and batch size resumes from, with any
  number of processes.

Ownership: `build` never deletes or overwrites a file it did not write. It refuses (GalleryIndexError,
nothing changed) an output folder that holds the gallery, or that is not empty and is neither a DECD
index (meta.json with the `format` tag) nor an unfinished DECD build (`partial/progress.json` with the
tag, and nothing but shard files in `partial/`); in a folder it owns it only touches the files named
above (other files there are left alone).

`load` checks that an index is whole (JSON files, shape, dtype, counts; by default also the sha256 and
that every value is finite: `verify=False` skips that full read) and says "rebuild it" otherwise.

Model checksum (`model_checksum`): sha256 over what determines an image or caption embedding, namely the
encoder and projection tensors (name, dtype, shape and raw bytes of every tensor under `text_model.`,
`vision_model.`, `text_projection.`, `visual_projection.`; all tensors for a model without them) and the
encoders' configs. It hashes the parameters in memory rather than the `model.safetensors` file so that
a model built in code, the same model after `save_pretrained` / `from_pretrained`, and the same model
with its training-only decoder detached all get the same checksum, while any retraining or a
different dtype changes it. Hashing costs about one pass over the weights.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_decd import embed_images, embed_texts

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")
INDEX_FORMAT = "decd-gallery-index"  # the `format` tag of meta.json and partial/progress.json: proof of ownership
INDEX_FORMAT_VERSION = 2  # 2: meta.json records `format` and `embeddings_sha256`
DEFAULT_CHUNK_SIZE = 65536  # gallery rows scored at once: Q x 65536 float32 scores (16 MB for 64 queries)
EMBEDDINGS_FILE = "embeddings.npy"
PATHS_FILE = "paths.json"
META_FILE = "meta.json"
PARTIAL_DIR = "partial"
PROGRESS_FILE = "progress.json"
HASH_BLOCK = 1 << 23  # bytes read (or written) at a time when hashing embeddings.npy
# Everything a build may create in the index folder (besides `partial/`): nothing else is ever touched.
ANN_FILE = "ann.faiss"  # the FAISS index of an approximate backend (meta.json `backend`), next to embeddings.npy
_OWNED_FILES = (META_FILE, PATHS_FILE, EMBEDDINGS_FILE, ANN_FILE, META_FILE + ".tmp", PATHS_FILE + ".tmp",
                EMBEDDINGS_FILE + ".tmp.npy", ANN_FILE + ".tmp")
# Shards are named by the listing position they start at (12 digits; 5-digit names are format-2 shards).
_SHARD_FILE = re.compile(r"shard_(\d{5}|\d{12})\.(npy|json)(\.tmp(\.npy)?)?|progress\.json(\.tmp)?")
_ENCODER_PREFIXES = ("text_model.", "vision_model.", "text_projection.", "visual_projection.")
_VOLATILE_CONFIG_KEYS = ("transformers_version", "architectures", "auto_map", "dtype", "torch_dtype")


class GalleryIndexError(ValueError):
    """A user-facing problem with a gallery or an index (the message says what to do)."""


class IndexNotFoundError(GalleryIndexError, FileNotFoundError):
    """A gallery folder or an index folder that does not exist (or an unfinished index)."""


class StaleIndexError(GalleryIndexError):
    """The index was built by another model than the one asked to search it."""


class BuildInterrupted(RuntimeError):
    """`build(..., max_batches=N)` stopped after N batches; the progress is saved, build again to resume."""


# --------------------------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------------------------


def _config_fingerprint(config) -> dict:
    """The parts of a config that shape an embedding, without keys that change on save/load."""
    if config is None:
        return {}
    fields = {}
    for name in ("text_config", "vision_config"):
        sub_config = getattr(config, name, None)
        if sub_config is not None:
            values = sub_config.to_dict()
            fields[name] = {
                key: value
                for key, value in values.items()
                if not key.startswith("_") and key not in _VOLATILE_CONFIG_KEYS
            }
    for name in ("projection_dim", "image_size", "model_type"):
        value = getattr(config, name, None)
        if value is not None:
            fields[name] = list(value) if isinstance(value, (tuple, list)) else value
    return fields


def model_checksum(model: torch.nn.Module) -> str:
    """sha256 hex digest of a model's encoder weights and encoder configs (see the module docstring)."""
    state = model.state_dict()
    names = sorted(name for name in state if name.startswith(_ENCODER_PREFIXES)) or sorted(state)
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(json.dumps(_config_fingerprint(config), sort_keys=True, default=str).encode())
    for name in names:
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        raw = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()


def model_identifier(model: torch.nn.Module, model_id: Optional[str] = None) -> str:
    """A human-readable id: `model_id` if given, else the folder / Hub id the model was loaded from.

    Local folders are made absolute so that `decd-search query` can reload the model from anywhere.
    """
    name = model_id if model_id is not None else getattr(model, "name_or_path", "") or ""
    name = str(name)
    if name and os.path.isdir(name):
        return os.path.abspath(name)
    return name or f"<in-memory {type(model).__name__}>"


def _short(checksum: Optional[str]) -> str:
    return (checksum or "unknown")[:12]


def _model_meta(model, processor, model_id: Optional[str], checksum: str) -> dict:
    """The meta.json fields that say which model made the embeddings, and when."""
    return dict(format_version=INDEX_FORMAT_VERSION, model_id=model_identifier(model, model_id),
                model_checksum=checksum, model_class=type(model).__name__,
                image_size=list(getattr(processor, "image_size", []) or []) or None,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# --------------------------------------------------------------------------------------------
# Exact top-k
# --------------------------------------------------------------------------------------------


def _sorted_top_k(scores: torch.Tensor, indices: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` best candidates per row by (score descending, gallery index ascending).

    scores, indices: [num_queries, num_candidates]. Two stable sorts: by index, then by score.
    """
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :top_k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _chunk_top_k(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one [num_queries, chunk] score block with ties at the k-th score broken by lower index.

    `torch.topk` picks an arbitrary one of several values tied with the k-th best. Asking it for k + 1
    shows where that can happen (the (k+1)-th value equals the k-th); only those rows are redone with a
    stable sort, so the common case costs one `topk`.
    """
    probe = min(top_k + 1, scores.shape[1])
    values, columns = torch.topk(scores, probe, dim=1, sorted=True)
    if probe == top_k:  # the whole chunk is selected: no choice to make
        return values, columns
    ambiguous = torch.nonzero(values[:, top_k] == values[:, top_k - 1]).flatten()
    values, columns = values[:, :top_k].clone(), columns[:, :top_k].clone()
    if ambiguous.numel():
        order = torch.argsort(scores[ambiguous], dim=1, descending=True, stable=True)[:, :top_k]
        columns[ambiguous] = order
        values[ambiguous] = scores[ambiguous].gather(1, order)
    return values, columns


def exact_top_k(
    queries: torch.Tensor,
    gallery: Union[torch.Tensor, np.ndarray],
    top_k: int = 10,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of `queries` against `gallery`, `chunk_size` gallery rows at a time.

    Args:
        queries: [num_queries, dim] float tensor (normalise it first for cosine similarity).
        gallery: [num_gallery, dim] float32 tensor or numpy array (a memory-mapped array is read one
            chunk at a time, so memory stays at one chunk of scores and `top_k` candidates per query).
        top_k: results per query; clamped to `num_gallery`.
        chunk_size: gallery rows scored per matrix multiply (memory: num_queries x chunk_size x 4 bytes).
        device: where the multiplies run (default: the queries' device).

    Returns:
        (scores [num_queries, k] float32, indices [num_queries, k] int64), best first; equal scores are
        ordered by lower gallery index, so results do not depend on `chunk_size`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    num_gallery = int(gallery.shape[0])
    if num_gallery == 0:
        raise ValueError("the gallery is empty")
    device = torch.device(device) if device is not None else queries.device
    # [dim, num_queries]: `block @ queries_t` is the faster GEMM shape on MKL for a few dozen queries
    # (benchmarks/results/design_notes.md); the [chunk, num_queries] scores are then transposed for a row-wise topk.
    queries_t = queries.to(device=device, dtype=torch.float32).T.contiguous()
    top_k = min(top_k, num_gallery)
    best_scores = best_indices = None
    for start in range(0, num_gallery, chunk_size):
        block = gallery[start:start + chunk_size]
        if isinstance(block, np.ndarray):
            # A read-only memory map cannot back a tensor directly; copy one chunk (bounded).
            block = torch.from_numpy(block if block.flags.writeable else np.array(block))
        block = block.to(device=device, dtype=torch.float32, non_blocking=True)
        scores = (block @ queries_t).T.contiguous()
        scores = torch.nan_to_num_(scores, nan=float("-inf"))  # a damaged (NaN) row never ranks first
        values, columns = _chunk_top_k(scores, min(top_k, scores.shape[1]))
        columns = columns + start
        if best_scores is None:
            best_scores, best_indices = values, columns
        else:
            best_scores, best_indices = _sorted_top_k(
                torch.cat([best_scores, values], dim=1), torch.cat([best_indices, columns], dim=1), top_k
            )
    return _sorted_top_k(best_scores, best_indices, top_k)


# --------------------------------------------------------------------------------------------
# Index building helpers
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


def _write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file + rename), so an interruption never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def display_path(path: Union[str, os.PathLike]) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 (kept in `paths` as lone
    surrogates, Python's surrogateescape) are shown as backslash escapes, e.g. ``caf\\xe9.png``."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_json(path: Path) -> Any:
    """The JSON value in `path`, or None if it is missing or not valid JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _is_ours(record: Any, legacy_keys: Sequence[str]) -> bool:
    """Whether a meta.json / progress.json record was written by `build` (its `format` tag, or, for
    version-1 folders written before the tag existed, `format_version` 1 with that version's keys)."""
    if not isinstance(record, dict):
        return False
    if record.get("format") == INDEX_FORMAT:
        return True
    return record.get("format_version") == 1 and all(key in record for key in legacy_keys)


def _partial_is_ours(folder: Path) -> bool:
    """`partial/` holds a progress.json written by `build` and nothing but shard files."""
    if not _is_ours(_read_json(folder / PROGRESS_FILE), ("model_checksum", "listing_sha256")):
        return False
    return all(entry.is_file() and _SHARD_FILE.fullmatch(entry.name) for entry in folder.iterdir())


def _remove_partial(folder: Path) -> None:
    """Delete the build's own files in `partial/` (never anything else), then the folder if empty."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_file() and _SHARD_FILE.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something that is not ours appeared in it: leave it


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
    entries = {entry.name for entry in output.iterdir()}
    if not entries:
        return
    meta_ours = _is_ours(_read_json(output / META_FILE), ("model_checksum", "count"))
    partial = output / PARTIAL_DIR
    partial_ours = partial.is_dir() and _partial_is_ours(partial)
    if PARTIAL_DIR in entries and not partial_ours:
        raise GalleryIndexError(f"{display_path(partial)!r} was not written by a DECD index build (no DECD "
                                f"{PROGRESS_FILE}, or files that are not shards); {fix}, or move it away")
    if not (meta_ours or partial_ours):
        raise GalleryIndexError(f"output folder {display_path(output)!r} is not empty and is not a DECD gallery "
                                f"index (no DECD {META_FILE}); nothing was changed: {fix}")


def _write_embeddings(path: Path, folder: Path, shards: list[dict], shape: tuple[int, int]) -> str:
    """Write the shards' rows as one float32 .npy file, one shard in memory at a time; returns the
    sha256 of the file's bytes, computed as they are written (no second pass)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, dict(descr=np.lib.format.dtype_to_descr(np.dtype("<f4")), fortran_order=False, shape=shape))
    digest = hashlib.sha256()
    rows = 0
    with open(path, "wb") as file:
        file.write(header.getvalue())
        digest.update(header.getvalue())
        for shard in shards:
            if not shard["paths"]:
                continue  # a shard of unreadable files only
            block = np.ascontiguousarray(np.load(folder / shard["file"]), dtype="<f4")
            if block.ndim != 2 or block.shape != (len(shard["paths"]), shape[1]):
                raise GalleryIndexError(f"{display_path(folder / shard['file'])} does not match its record; "
                                        f"build again with resume=False (--no-resume)")
            data = memoryview(block).cast("B")
            file.write(data)
            digest.update(data)
            rows += len(block)
        file.flush()
        os.fsync(file.fileno())
    if rows != shape[0]:
        raise GalleryIndexError(f"the shards in {display_path(folder)} hold {rows} rows for {shape[0]} paths; "
                                f"build again with resume=False (--no-resume)")
    return digest.hexdigest()


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 hex digest of a file, read `HASH_BLOCK` bytes at a time (index files, converted checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


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
              skipped: list[dict]) -> int:
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
                      skipped=self._staged_skipped, file=f"{stem}.npy")
        _write_json(self.folder / f"{stem}.json", record)
        self.shards.append(record)  # sorted when tiled
        self._clear_staged()

    def _clear_staged(self) -> None:
        self._staged, self._staged_paths, self._staged_skipped = [], [], []
        self._staged_start = self._staged_end = None
        self._staged_batches = 0


class _SingleProcess:
    """The process state of a build without `accelerate`: one process, nothing to wait for."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Approximate backends (FAISS index-factory strings)
# --------------------------------------------------------------------------------------------

EXACT_BACKEND = "exact"
# Search-time defaults, chosen with benchmarks/search.py (recall@10 and speed per setting: README
# "Benchmarks", benchmarks/results/search_ann_*_cpu.json). Raise them for more recall, lower them for more speed.
DEFAULT_NPROBE = 32  # IVF lists visited per query (of nlist; IVF4096: about 0.8% of the gallery scanned)
DEFAULT_EF_SEARCH = 256  # HNSW candidate-list size (raised to top_k)
DEFAULT_TRAIN_SIZE = 64  # training sample: this many vectors per IVF list (faiss warns below 39), at least 2**16


def _is_exact(backend: Optional[str]) -> bool:
    return backend is None or backend == EXACT_BACKEND


def new_ann_index(spec: str, dim: int):
    """An empty FAISS index for the index-factory string `spec` with the inner-product metric.

    Raises GalleryIndexError naming the string when FAISS cannot parse it (or it does not fit `dim`),
    and ImportError (how to install it) without faiss.
    """
    faiss = import_faiss(spec)
    if not isinstance(spec, str) or not spec.strip() or spec.strip() != spec:
        raise GalleryIndexError(f"backend {spec!r} is not a FAISS index factory string (e.g. HNSW32, IVF4096,Flat)")
    try:
        return faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        reason = re.sub(r"^Error in .*? at \S+: ", "", reason)
        raise GalleryIndexError(
            f"backend {spec!r} is not a FAISS index factory string for {dim}-dim embeddings ({reason}); "
            f"use 'exact' or e.g. HNSW32, IVF4096,Flat, IVF4096,PQ64 (see the FAISS wiki 'The index factory')"
        ) from None


def ann_num_lists(index) -> Optional[int]:
    """nlist of an IVF index (None for any other kind)."""
    faiss = import_faiss()
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def ann_train_size(spec_index, count: int, train_size: Optional[int] = None) -> int:
    """How many gallery vectors train the index: `train_size`, else DEFAULT_TRAIN_SIZE per IVF list (at least 2**16)."""
    if train_size is None:
        train_size = max(DEFAULT_TRAIN_SIZE * (ann_num_lists(spec_index) or 0), 1 << 16)
    return int(min(count, train_size))


def _check_ann_size(index, spec: str, count: int) -> None:
    """Refuse an IVF index with more lists than gallery images (FAISS would fail or warn deep inside)."""
    lists = ann_num_lists(index)
    if lists is not None and count < lists:
        raise GalleryIndexError(
            f"backend {spec!r} has {lists} IVF lists but the gallery holds only {count} images: an IVF index "
            f"needs at least one image per list (39 or more for good lists); use fewer lists (e.g. "
            f"IVF{max(1, count // 39)},Flat), HNSW32, or 'exact'"
        )


def build_ann_index(embeddings: np.ndarray, spec: str, train_size: Optional[int] = None, seed: int = 0,
                    chunk_size: int = DEFAULT_CHUNK_SIZE):
    """A FAISS index `spec` (inner product) holding every row of `embeddings`, in row order (FAISS id = row).

    Indexes that need training (IVF, PQ, ...) are trained on `ann_train_size` rows drawn without
    replacement with `seed` (sorted, so a memory map is read in order); rows are added `chunk_size` at a
    time, so memory is the index plus one chunk. Raises GalleryIndexError for a bad string or an IVF
    index with more lists than gallery rows.
    """
    count, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    index = new_ann_index(spec, dim)
    _check_ann_size(index, spec, count)
    if not index.is_trained:
        size = ann_train_size(index, count, train_size)
        rows = np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False)) if size < count \
            else np.arange(count)
        sample = np.ascontiguousarray(np.asarray(embeddings[rows]), dtype=np.float32)
        try:
            index.train(sample)
        except RuntimeError as error:
            raise GalleryIndexError(f"training the FAISS index {spec!r} on {size} images failed: {error}") from None
        del sample
    for start in range(0, count, chunk_size):
        index.add(np.ascontiguousarray(embeddings[start:start + chunk_size], dtype=np.float32))
    return index


def set_ann_parameters(index, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> dict:
    """Set the search-time knobs that `index` has (IVF `nprobe`, HNSW `efSearch`, defaults DEFAULT_NPROBE
    and DEFAULT_EF_SEARCH); returns the ones set. A knob the index lacks is ignored."""
    faiss = import_faiss()
    parameters, settings = faiss.ParameterSpace(), {}
    lists = ann_num_lists(index)
    for name, value, default in (("nprobe", nprobe, DEFAULT_NPROBE), ("efSearch", ef_search, DEFAULT_EF_SEARCH)):
        value = default if value is None else int(value)
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
        if name == "nprobe" and lists is not None:
            value = min(value, lists)
        try:
            parameters.set_index_parameter(index, name, value)
        except RuntimeError:  # "could not set parameter": this kind of index has no such knob
            continue
        settings[name] = value
    return settings


def ann_search(index, queries: np.ndarray, top_k: int, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) [num_queries, top_k] from a FAISS index; rows the index could not fill are -1."""
    set_ann_parameters(index, nprobe, ef_search)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(top_k))
    return scores, rows.astype(np.int64)


def rerank_exact(embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray,
                 top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score approximate candidates exactly: (scores, rows) [num_queries, top_k] of the best `top_k` of
    each row of `candidates` (gallery rows, -1 = none) by the inner product with the stored embeddings.

    Only the candidates' rows are read (once each, in row order: a memory-mapped `embeddings.npy` is read
    from disk, so a compressed index such as IVF4096,PQ64 needs RAM for its codes only). Ties are ordered
    by lower gallery row; places with no candidate keep row -1 and score -inf.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    rows = np.unique(candidates[candidates >= 0])
    vectors = np.asarray(embeddings[rows], dtype=np.float32) if rows.size else np.zeros((0, queries.shape[1]), np.float32)
    exact = np.asarray(queries, dtype=np.float32) @ vectors.T  # [num_queries, unique candidates]
    positions = np.searchsorted(rows, np.where(candidates >= 0, candidates, rows[0] if rows.size else 0))
    scores = np.take_along_axis(exact, positions, axis=1) if rows.size else np.zeros(candidates.shape, np.float32)
    scores = np.where(candidates >= 0, scores, -np.inf).astype(np.float32)
    scores, order = _sorted_top_k(torch.from_numpy(scores), torch.from_numpy(candidates), min(top_k, candidates.shape[1]))
    return scores.numpy(), order.numpy()


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / |truth_i| (rows of gallery ids; -1 in `found` never counts)."""
    found, truth = np.asarray(found), np.asarray(truth)
    if found.shape[0] != truth.shape[0]:
        raise ValueError(f"{found.shape[0]} result rows for {truth.shape[0]} ground-truth rows")
    hits = [len(set(row[row >= 0].tolist()) & set(expected.tolist())) / len(expected)
            for row, expected in zip(found, truth)]
    return float(np.mean(hits))


# --------------------------------------------------------------------------------------------
# Reading a score (one wording for the app, `decd-search query` and the pipeline)
# --------------------------------------------------------------------------------------------

SCORE_EXPLANATION = (
    "score: cosine similarity of the query's and the image's DECD embeddings (-1 to 1, higher is closer). "
    "Its scale depends on the query (one query's best match may score 0.3, another's 0.8), so compare "
    "results of one query, not scores across queries. top p%: the image's rank among all the gallery's "
    "images (top 1% of 400 = among the best 4)."
)


def top_percent(rank: int, gallery_size: int) -> float:
    """The share of the gallery (in percent) ranked at or above `rank` (1-based): 1 of 400 -> 0.25."""
    if gallery_size < 1 or rank < 1:
        raise ValueError(f"rank and gallery_size must be at least 1, got rank={rank}, gallery_size={gallery_size}")
    return 100.0 * rank / gallery_size


def describe_match(rank: int, score: float, gallery_size: int) -> dict:
    """A ranked result in readable form: `{"rank", "score", "top_percent", "label"}`.

    `label` is what the app's captions, `decd-search query` and the pipeline show:
    "#1 · 0.284 · top 0.25% of 400" (score = cosine similarity; see `SCORE_EXPLANATION`).
    """
    percent = top_percent(rank, gallery_size)
    return dict(rank=int(rank), score=float(score), top_percent=percent,
                label=f"#{int(rank)} · {float(score):.3f} · top {percent:.3g}% of {int(gallery_size)}")


@dataclass
class SearchResult:
    """Ranked gallery results for a batch of queries, best first.

    scores: [num_queries, k] cosine similarities (float32); indices: [num_queries, k] gallery rows (int64);
    paths: per query, the k images' paths relative to the gallery folder (None for an in-memory gallery
    of PIL images).
    """

    scores: torch.Tensor
    indices: torch.Tensor
    paths: Optional[list[list[str]]]

    def __len__(self) -> int:
        return int(self.indices.shape[0])


class GalleryIndex:
    """L2-normalised image embeddings of a gallery, their paths and the model that made them.

    Attributes:
        embeddings: [count, embedding_dim] float32 numpy array (memory-mapped when loaded from disk).
        paths: image paths relative to `gallery_dir` (or None for a gallery of in-memory images).
        meta: the `meta.json` dictionary (see the module docstring).
        path: the index folder (None for an in-memory index).
    """

    def __init__(self, embeddings: np.ndarray, paths: Optional[list[str]], meta: dict,
                 path: Optional[PathLike] = None):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [count, dim], got shape {embeddings.shape}")
        if paths is not None and len(paths) != embeddings.shape[0]:
            raise ValueError(f"{len(paths)} paths for {embeddings.shape[0]} embeddings")
        self.embeddings = embeddings
        self.paths = paths
        self.meta = meta
        self.path = Path(path) if path is not None else None
        self._faiss_index = self._ann_index = None  # FAISS indexes, built or read on first use

    # ---- properties -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        return (f"GalleryIndex(count={len(self)}, embedding_dim={self.embedding_dim}, "
                f"model_id={self.model_id!r}, path={str(self.path) if self.path else None!r})")

    @property
    def embedding_dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def model_id(self) -> Optional[str]:
        return self.meta.get("model_id")

    @property
    def model_checksum(self) -> Optional[str]:
        return self.meta.get("model_checksum")

    @property
    def gallery_dir(self) -> Optional[Path]:
        return Path(self.meta["gallery_dir"]) if self.meta.get("gallery_dir") else None

    @property
    def skipped(self) -> list[dict]:
        """Unreadable files left out of the index: [{"path": relative path, "error": reason}, ...]."""
        return list(self.meta.get("skipped", []))

    def image_path(self, index: int) -> Optional[Path]:
        """The absolute path of gallery row `index` (None without paths)."""
        if self.paths is None:
            return None
        relative = self.paths[int(index)]
        return self.gallery_dir / relative if self.gallery_dir is not None else Path(relative)

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
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
    ) -> Optional["GalleryIndex"]:
        """Encode every image under `gallery_dir` and write the index folder `output`.

        Args:
            model: a DECD model (anything with `get_image_features(pixel_values)` -> [batch, dim]).
            processor: its `DecdProcessor` (images -> `pixel_values`).
            gallery_dir: folder searched recursively for files with `extensions`.
            output: the index folder: new, empty, or one `build` wrote (an index there is replaced; an
                unfinished build there is resumed). Anything else is refused: see the module docstring.
            batch_size: images per forward pass.
            model_id: recorded as the model's name (default: the folder / Hub id it was loaded from).
            resume: continue an unfinished build in `output` if it was started with the same model
                (checksum) and the same file listing; False starts over.
            show_progress: a tqdm bar over the images.
            shard_batches: progress is saved every this many batches (and on any exception, including
                KeyboardInterrupt), so at most that much work is lost if the process is killed.
            max_batches: stop (raising `BuildInterrupted`, progress saved) after encoding this many
                batches in this call; for time-boxed jobs and tests.

            backend: "exact" (the default: no extra file; search multiplies against every row) or a FAISS
                index-factory string (HNSW32, IVF4096,Flat, IVF4096,PQ64, ...; inner product), built from the
                embeddings (trained on `train_size` of them where the index needs it, default
                `ann_train_size`) and written to `ann.faiss`; `search` then uses it by default.
            distributed: an `accelerate` `PartialState` (or `Accelerator`) when several processes build
                together (`accelerate launch`): each encodes a contiguous share of the batches into its
                own shards, and the main process joins them. The result is the same, bit for bit, as a
                one-process build with the same `batch_size` (same batches). Every process must call
                `build` with the same arguments and see the same gallery. None: this process alone.

        Images are encoded on the model's device.

        Unreadable files are skipped with a warning and listed in `meta["skipped"]`.

        Returns:
            The finished `GalleryIndex` (embeddings memory-mapped); with `distributed`, on the main process
            only: the others return None once their share is saved, without waiting for the join.

        Raises:
            IndexNotFoundError: `gallery_dir` does not exist.
            GalleryIndexError: no image files, none of them could be read, or `output` is not ours to
                write (it holds the gallery, or other files and no DECD index).
            BuildInterrupted: `max_batches` was reached before the end.
        """
        if batch_size < 1 or shard_batches < 1:
            raise ValueError(f"batch_size and shard_batches must be positive, got {batch_size}, {shard_batches}")
        state = distributed if distributed is not None else _SingleProcess()
        main, rank, world = state.is_main_process, int(state.process_index), int(state.num_processes)
        gallery_dir, output = Path(gallery_dir), Path(output)
        extensions = tuple(extension.lower().lstrip(".") for extension in extensions)
        check_output_folder(output, gallery_dir)  # before anything is written or removed
        files = list_images(gallery_dir, extensions, exclude=output)
        if not files:
            raise GalleryIndexError(
                f"no images found under {str(gallery_dir)!r} (looked recursively for "
                f"{', '.join('.' + extension for extension in extensions)})"
            )
        if not _is_exact(backend):  # a bad string or too small a gallery fails before the encoding
            dim = getattr(getattr(model, "config", None), "projection_dim", None)
            if isinstance(dim, int):
                _check_ann_size(new_ann_index(backend, dim), backend, len(files))
        checksum = model_checksum(model)
        listing = "\n".join(files).encode("utf-8", "surrogateescape")  # file names need not be UTF-8
        fingerprint = dict(format=INDEX_FORMAT, format_version=INDEX_FORMAT_VERSION, model_checksum=checksum,
                           listing_sha256=hashlib.sha256(listing).hexdigest(), batch_size=batch_size,
                           num_files=len(files), gallery_dir=str(gallery_dir.resolve()))
        state.wait_for_everyone()  # every process has checked the folder before the main one writes
        if main:
            output.mkdir(parents=True, exist_ok=True)
            for name in (META_FILE, EMBEDDINGS_FILE, PATHS_FILE, ANN_FILE):  # an old finished index is now stale
                (output / name).unlink(missing_ok=True)
            _ShardStore.prepare(output / PARTIAL_DIR, fingerprint, resume)
        state.wait_for_everyone()
        if _read_json(output / PARTIAL_DIR / PROGRESS_FILE) != fingerprint:
            raise GalleryIndexError(f"process {rank} of {world} sees another gallery listing, model or batch size "
                                    f"than the main process; every process must see the same folder and model")
        store = _ShardStore(output / PARTIAL_DIR)
        # This process's share: a contiguous run of whole batches, so that the batches (and the embeddings,
        # bit for bit) are those of a one-process build.
        num_batches = -(-len(files) // batch_size)
        covered = store.covered_batches(batch_size)
        share = (rank * num_batches // world, (rank + 1) * num_batches // world)
        todo = [batch * batch_size for batch in range(*share) if batch * batch_size not in covered]
        share_files = min(len(files), share[1] * batch_size) - min(len(files), share[0] * batch_size)
        bar = tqdm(total=share_files, initial=share_files - sum(min(batch_size, len(files) - start) for start in todo),
                   desc="Indexing gallery" + (f" (process {rank} of {world})" if world > 1 else ""), unit="img",
                   disable=not show_progress or not main)
        failure, done = None, 0
        try:
            for done, start in enumerate(todo):
                if max_batches is not None and done >= max_batches:
                    raise BuildInterrupted(
                        f"stopped after {max_batches} batches ({start} of {len(files)} files done); "
                        f"build again with the same model and folder to resume"
                    )
                names = files[start:start + batch_size]
                staged = store.stage(start, start + len(names), *_embed_files(model, processor, gallery_dir, names))
                if staged == shard_batches:
                    store.flush()
                bar.update(len(names))
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the other processes are told
            failure = error
        finally:
            store.flush()  # keep what was embedded, whether finished, interrupted or failed
            bar.close()
        if world > 1 and not isinstance(failure, KeyboardInterrupt):
            state.wait_for_everyone()  # all shards are written (or their process failed)
        if failure is not None:
            raise failure
        store.reload()
        shards = store.tiling(len(files))
        if shards is None:  # only with several processes: another one stopped or failed
            raise BuildInterrupted(f"another process stopped before its share of the {len(files)} files was "
                                   f"encoded; build again with the same model and folder to resume")
        meta = dict(format=INDEX_FORMAT, **_model_meta(model, processor, model_id, checksum),
                    gallery_dir=str(gallery_dir.resolve()), extensions=list(extensions), num_files=len(files))
        if not main:
            # Done here: the main process joins the shards (and trains an approximate index, which can take
            # longer than a collective's timeout at 10^8 images), so the others do not wait for it.
            return None
        index = cls._assemble(output / PARTIAL_DIR, shards, output, meta, backend, train_size)
        if index.skipped:
            listed = "; ".join(f"{display_path(item['path'])} ({display_path(item['error'])})"
                               for item in index.skipped[:5])
            more = f" and {len(index.skipped) - 5} more" if len(index.skipped) > 5 else ""
            warnings.warn(
                f"skipped {len(index.skipped)} unreadable image(s) of {len(files)}: {listed}{more} "
                f"(all listed in {output / META_FILE} under 'skipped')",
                stacklevel=3,  # the caller of build (torch.no_grad's wrapper is one frame)
            )
        return index

    @classmethod
    def _assemble(cls, folder: Path, shards: list[dict], output: Path, meta: dict, backend: str = EXACT_BACKEND,
                  train_size: Optional[int] = None) -> "GalleryIndex":
        """Join the shards into `embeddings.npy` (streamed, one shard in memory), build the approximate
        index if any, write paths/meta (meta last), clean up."""
        paths = [path for shard in shards for path in shard["paths"]]
        skipped = [item for shard in shards for item in shard["skipped"]]
        if not paths:
            reasons = "; ".join(f"{item['path']}: {item['error']}" for item in skipped[:3])
            raise GalleryIndexError(
                f"none of the {meta['num_files']} image files under {meta['gallery_dir']!r} could be read ({reasons})"
            )
        # The width of the saved embeddings, read off the first shard that holds a readable image.
        embedding_dim = next(int(np.load(folder / shard["file"], mmap_mode="r").shape[1]) for shard in shards
                             if shard["paths"])
        ann = None
        if not _is_exact(backend):  # before anything is written: a bad string, faiss missing, too few images
            ann = new_ann_index(backend, embedding_dim)
            _check_ann_size(ann, backend, len(paths))
        temporary = output / (EMBEDDINGS_FILE + ".tmp.npy")
        digest = _write_embeddings(temporary, folder, shards, (len(paths), embedding_dim))
        os.replace(temporary, output / EMBEDDINGS_FILE)
        embeddings = np.load(output / EMBEDDINGS_FILE, mmap_mode="r")
        meta = dict(meta, backend=EXACT_BACKEND if ann is None else backend)
        if ann is not None:  # the FAISS index of the embeddings, written to ann.faiss (temporary file + rename)
            index = build_ann_index(embeddings, backend, train_size=train_size)
            temporary = output / (ANN_FILE + ".tmp")
            import_faiss(backend).write_index(index, str(temporary))
            meta.update(ann_file=ANN_FILE, ann_sha256=file_sha256(temporary), ann_bytes=temporary.stat().st_size,
                        ann_train_size=0 if ann.is_trained else ann_train_size(index, len(paths), train_size),
                        ann_nlist=ann_num_lists(index))
            os.replace(temporary, output / ANN_FILE)
        _write_json(output / PATHS_FILE, paths)
        meta = dict(meta, embedding_dim=embedding_dim, count=len(paths), embeddings_sha256=digest,
                    skipped=skipped, num_skipped=len(skipped))
        _write_json(output / META_FILE, meta)
        _remove_partial(folder)
        return cls(embeddings, paths, meta, output)

    @classmethod
    @torch.no_grad()
    def from_images(cls, model, processor, images: Sequence[Any], batch_size: int = 64,
                    model_id: Optional[str] = None, show_progress: bool = False) -> "GalleryIndex":
        """An in-memory index of a list of images (anything `load_image` opens; nothing written).

        Paths are kept as given (`paths`, `None` if any item is a PIL image). Unreadable items raise:
        a list the caller assembled is expected to be valid, unlike a folder scan.
        """
        images = list(images)
        if not images:
            raise GalleryIndexError("the gallery is an empty list of images")
        embeddings = embed_images(model, processor, images, batch_size, show_progress=show_progress).numpy()
        has_paths = all(isinstance(item, (str, os.PathLike)) for item in images)
        paths = [str(item) for item in images] if has_paths else None
        meta = dict(_model_meta(model, processor, model_id, model_checksum(model)),
                    embedding_dim=int(embeddings.shape[1]), gallery_dir=None, count=len(images), skipped=[],
                    num_skipped=0)
        return cls(embeddings, paths, meta)

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: PathLike, mmap: bool = True, verify: bool = True) -> "GalleryIndex":
        """Open an index folder written by `build`, checking that it is whole.

        Args:
            path: the index folder.
            mmap: memory-map the embeddings (no read up front) instead of reading them into memory.
            verify: also read the whole embeddings file once to check its sha256 against the one
                recorded at build time and that every value is finite (one read of the file: a 10^6-image
                index at dim 512 is 2 GB). `verify=False` keeps the cheap
                checks only (JSON, shapes, dtype, counts): for an index verified before, when
                opening must be instant.

        Raises:
            IndexNotFoundError: no such folder, or an unfinished build.
            GalleryIndexError: a damaged or outdated index (one line; rebuild it).
        """
        path = Path(path)
        if not path.is_dir():
            raise IndexNotFoundError(f"index folder {display_path(path)!r} does not exist; build it with "
                                     f"GalleryIndex.build or `decd-search index`")
        if not (path / META_FILE).exists():
            state = "an unfinished build (run the build again to resume)" if (path / PARTIAL_DIR).exists() \
                else "not a gallery index"
            raise IndexNotFoundError(f"{display_path(path)!r} has no {META_FILE}: {state}")
        rebuild = "rebuild it with `decd-search index` (or GalleryIndex.build)"

        def damaged(what: str) -> GalleryIndexError:
            return GalleryIndexError(f"index {display_path(path)!r} is damaged: {what}; {rebuild}")

        meta = _read_json(path / META_FILE)
        if not isinstance(meta, dict):
            raise damaged(f"{META_FILE} is not a valid JSON object")
        if meta.get("format_version") != INDEX_FORMAT_VERSION or meta.get("format") != INDEX_FORMAT:
            raise GalleryIndexError(f"index {display_path(path)!r} has format version {meta.get('format_version')}, "
                                    f"this code reads version {INDEX_FORMAT_VERSION}; {rebuild}")
        count, dim, expected = meta.get("count"), meta.get("embedding_dim"), meta.get("embeddings_sha256")
        if not (isinstance(count, int) and count > 0 and isinstance(dim, int) and dim > 0
                and isinstance(expected, str)):
            raise damaged(f"{META_FILE} lacks a valid count, embedding_dim or embeddings_sha256")
        paths = _read_json(path / PATHS_FILE)
        if not (isinstance(paths, list) and all(isinstance(item, str) for item in paths)):
            raise damaged(f"{PATHS_FILE} is missing or not a JSON list of paths")
        if len(paths) != count:
            raise damaged(f"{PATHS_FILE} lists {len(paths)} paths, {META_FILE} says {count}")
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
                block = np.asarray(embeddings[start:start + DEFAULT_CHUNK_SIZE])
                if not np.isfinite(block).all():
                    row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                    raise damaged(f"{EMBEDDINGS_FILE} row {row} ({display_path(paths[row])}) is not finite")
        backend = meta.get("backend", EXACT_BACKEND)
        if not isinstance(backend, str) or not backend:
            raise damaged(f"{META_FILE} has no valid backend")
        if not _is_exact(backend):  # the approximate index: present, the size recorded, the bytes (verify)
            ann_path = path / ANN_FILE
            if not ann_path.is_file() or ann_path.stat().st_size != meta.get("ann_bytes"):
                raise damaged(f"{ANN_FILE} (the {backend} index) is missing or has another size than recorded")
            if verify and file_sha256(ann_path) != meta.get("ann_sha256"):
                raise damaged(f"{ANN_FILE} does not match the checksum recorded at build time")
        return cls(embeddings, paths, meta, path)

    # ---- searching --------------------------------------------------------------------------------
    def verify_model(self, model, model_id: Optional[str] = None) -> None:
        """Raise `StaleIndexError` unless `model` has the checksum the index was built with."""
        checksum = model_checksum(model)
        if checksum != self.model_checksum:
            raise StaleIndexError(
                f"index built by {self.model_id} (checksum {_short(self.model_checksum)}), model is "
                f"{model_identifier(model, model_id)} (checksum {_short(checksum)}); rebuild the index"
            )

    def search(
        self,
        queries: Union[torch.Tensor, np.ndarray, str, Sequence[str]],
        top_k: int = 10,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: Optional[str] = None,
        model=None,
        processor=None,
        device: Optional[Union[str, torch.device]] = None,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        rerank: Optional[int] = None,
    ) -> SearchResult:
        """Rank the gallery for each query by cosine similarity.

        Args:
            queries: query embeddings [num_queries, dim] or [dim] (normalised here), or description(s)
                (str / list of str), which need `model` and `processor` (see `search_text`).
            top_k: results per query (clamped to the gallery size).
            chunk_size: gallery rows scored at once (exact backend); results do not depend on it.
            backend: None (default): the backend the index was built with (`meta["backend"]`, "exact"
                when none); "exact" (chunked matrix multiply + top-k, ties by lower gallery index); "faiss"
                (`faiss.IndexFlatIP`, also exact; needs faiss installed, keeps its own copy of the
                embeddings, and orders equal scores its own way); or the index's own FAISS factory string
                (an approximate search in `ann.faiss`: rows it could not fill get index -1, score -inf
                and path None).
            device: where the exact backend multiplies (default CPU).
            nprobe: IVF lists visited per query (default DEFAULT_NPROBE): more is slower and closer to exact.
            ef_search: HNSW candidate list size (default DEFAULT_EF_SEARCH, raised to top_k): likewise.
            rerank: approximate backends: fetch this many candidates and re-score them exactly against
                `embeddings` (`rerank_exact`; read from disk when memory-mapped), keeping the best `top_k`.
                Restores the ranking a compressed (PQ) index loses; None or 0: the index's own scores.
        """
        if isinstance(queries, str) or (isinstance(queries, (list, tuple)) and queries
                                        and all(isinstance(query, str) for query in queries)):
            if model is None or processor is None:
                raise ValueError("searching with text needs `model` and `processor` (or pass embeddings)")
            return self.search_text(model, processor, queries, top_k=top_k, chunk_size=chunk_size,
                                    backend=backend, device=device, nprobe=nprobe, ef_search=ef_search,
                                    rerank=rerank)
        queries = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.embedding_dim:
            raise ValueError(f"queries must be [num_queries, {self.embedding_dim}], got {tuple(queries.shape)}")
        queries = F.normalize(queries.float(), dim=-1)
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
            found = ann_search(self._faiss_index, queries.cpu().numpy(), min(top_k, len(self)))
            scores, indices = torch.from_numpy(found[0]), torch.from_numpy(found[1])
        elif backend == recorded:
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}")
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
            built = f" or this index's own backend {recorded!r}" if not _is_exact(recorded) else \
                " (an approximate backend is chosen when the index is built: decd-search index --backend SPEC)"
            raise ValueError(f"backend must be 'exact', 'faiss'{built}, got {backend!r}")
        paths = None
        if self.paths is not None:
            paths = [[self.paths[index] if index >= 0 else None for index in row] for row in indices.tolist()]
        return SearchResult(scores=scores, indices=indices, paths=paths)

    @property
    def backend(self) -> str:
        """The search backend recorded at build time: "exact" or a FAISS index-factory string."""
        return self.meta.get("backend") or EXACT_BACKEND

    def ann_index(self):
        """The FAISS index of an approximate backend (`ann.faiss`), read on first use."""
        if _is_exact(self.backend):
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

    @torch.no_grad()
    def search_text(
        self,
        model,
        processor,
        texts: Union[str, Sequence[str]],
        top_k: int = 10,
        verify: bool = True,
        model_id: Optional[str] = None,
        **search_kwargs,
    ) -> SearchResult:
        """Encode descriptions with `model` and rank the gallery for each (one result row per text).

        `verify` first checks that `model` is the model the index was built with (`StaleIndexError`
        naming both otherwise); skip it only when that was checked already. Empty descriptions raise
        ValueError (from the processor). Other keyword arguments go to `search`.
        """
        if verify:
            self.verify_model(model, model_id)
        return self.search(embed_texts(model, processor, texts), top_k=top_k, **search_kwargs)

    @torch.no_grad()
    def search_image(
        self,
        model,
        processor,
        images: Any,
        top_k: int = 10,
        verify: bool = True,
        model_id: Optional[str] = None,
        **search_kwargs,
    ) -> SearchResult:
        """Rank the gallery by image-image cosine similarity for query photo(s) of a person (re-identification).

        `images` is one image or a list of them: anything `load_image` opens (path, bytes, PIL image,
        array); each is opened by the processor and encoded by `embed_images`, exactly like the gallery.
        `verify` checks that `model` built the index (`StaleIndexError` otherwise), as in `search_text`.
        Unreadable images raise ValueError naming the image (from `load_image`).
        """
        if verify:
            self.verify_model(model, model_id)
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no query image given")
        return self.search(embed_images(model, processor, list(images), batch_size=len(images), show_progress=False),
                           top_k=top_k, **search_kwargs)


def import_faiss(backend: str = "faiss"):
    """The `faiss` module, or an ImportError that says how to get it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            f"backend={backend!r} needs the optional FAISS package: `pip install faiss-cpu` (or faiss-gpu); "
            "backend='exact' needs nothing extra and gives the exact ranking"
        ) from error
    return faiss


__all__ = [
    "ANN_FILE",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_NPROBE",
    "IMAGE_EXTENSIONS",
    "ann_search",
    "build_ann_index",
    "new_ann_index",
    "recall_at_k",
    "rerank_exact",
    "set_ann_parameters",
    "BuildInterrupted",
    "GalleryIndex",
    "GalleryIndexError",
    "IndexNotFoundError",
    "SCORE_EXPLANATION",
    "SearchResult",
    "StaleIndexError",
    "describe_match",
    "exact_top_k",
    "import_faiss",
    "check_output_folder",
    "display_path",
    "list_images",
    "model_checksum",
    "top_percent",
]
