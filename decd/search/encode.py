"""The one encoding path of gallery files: listing a folder, `encode_gallery` (what the index build, a folder gallery
and the Milvus build all consume), and the process state of a build with or without `accelerate`."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterator, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from inference_decd import embed_images

from .display import display_path
from .errors import BuildInterrupted, GalleryIndexError, IndexNotFoundError, SkippedImagesWarning
from .format import PathLike, check_gallery_paths, file_fingerprint

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


def extension_names(extensions: Sequence[str]) -> tuple[str, ...]:
    """Extensions as a gallery records them: lower case, without the dot ('.PNG' -> 'png')."""
    return tuple(extension.lower().lstrip(".") for extension in extensions)


def list_images(gallery_dir: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                exclude: Optional[PathLike] = None) -> list[str]:
    """Image files under `gallery_dir` (recursive), as sorted POSIX paths relative to it.

    `extensions` are matched case-insensitively, with or without a leading dot. Files under `exclude` (e.g. an
    index folder placed inside the gallery) are left out. Raises IndexNotFoundError for a missing folder and
    GalleryIndexError for a file or a folder without images (naming the extensions looked for), and for a file
    that `decd.search.format.path_problem` refuses (a link to a file outside the folder, a name that is not an
    image's), naming it.
    """
    if not (root := Path(gallery_dir)).exists():
        raise IndexNotFoundError(f"gallery folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise GalleryIndexError(f"gallery {str(root)!r} is not a folder")
    suffixes = ["." + extension for extension in extension_names(extensions)]
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        if excluded is not None and Path(folder).resolve() == excluded:
            subfolders[:] = []
            continue
        found += [(Path(folder) / name).relative_to(root).as_posix() for name in files
                  if os.path.splitext(name)[1].lower() in suffixes]
    if not found:
        raise GalleryIndexError(f"no images found under {str(root)!r} (looked recursively for {', '.join(suffixes)})")
    check_gallery_paths(found, root, f"the gallery folder {display_path(root)!r}", links_to_files_only=True,
                        remedy="a gallery is the image files inside its folder: copy a linked image into it (or "
                               "remove the link), and give image extensions only")
    return sorted(found)


@dataclass
class EncodedBatch:
    """One batch of `encode_gallery`: the files at listing positions [start, end) and what became of them."""

    start: int
    files: list[str]  # the batch's files (relative paths), in listing order
    fingerprints: dict[str, Optional[list[int]]]  # [size, mtime ns] of each file before it was read (None: gone)
    paths: list[str]  # the files encoded, in order: the rows of `embeddings`
    embeddings: Optional[np.ndarray]  # [len(paths), dim] float32, L2-normalised; None when none was encoded
    skipped: list[dict]  # {"path", "error"} of each file that could not be read

    @property
    def end(self) -> int:
        return self.start + len(self.files)


def join_batches(batches: Sequence[EncodedBatch]) -> tuple[Optional[np.ndarray], list[str], list[dict]]:
    """(embeddings of the files encoded, in order: None when none was, their paths, the files skipped) of batches."""
    blocks = [batch.embeddings for batch in batches if batch.embeddings is not None]
    return (np.concatenate(blocks) if blocks else None, [path for batch in batches for path in batch.paths],
            [item for batch in batches for item in batch.skipped])


def encode_gallery(model, processor, folder: PathLike, files: Sequence[str], batch_size: int = 64, *,
                   share: tuple[int, int] = (0, 1), done: Collection[int] = (), max_batches: Optional[int] = None,
                   select: Optional[Callable[[list[str]], list[str]]] = None, show_progress: bool = False,
                   desc: str = "Encoding gallery") -> Iterator[EncodedBatch]:
    """Encode `files` (paths relative to `folder`) in whole batches of `batch_size`, one `EncodedBatch` per batch.

    Each file is opened by `processor.load_image` and the readable ones of a batch are embedded together by
    `inference_decd.embed_images`; an unreadable file is skipped with the reason. A batch is always the same
    `batch_size` files of the listing, so whoever encodes it (one process or several, now or on a resume) gets
    the same embeddings, bit for bit.

    Args:
        share: (process index, number of processes): this process encodes its contiguous share of the batches,
            so that processes that each encode their share together encode every batch once.
        done: start positions of batches encoded before (a resumed build): skipped, counted as progress.
        max_batches: raise `BuildInterrupted` before encoding more than this many batches in this call.
        select: called with each batch's files before any is read; returns those to encode (the others are
            yielded unencoded, e.g. a Milvus build keeps the stored embedding of a file whose bytes did not change).
        show_progress, desc: a tqdm bar over this process's share of the files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    folder, (rank, world) = Path(folder), share
    batches = -(-len(files) // batch_size)
    first, last = rank * batches // world * batch_size, (rank + 1) * batches // world * batch_size
    todo = [start for start in range(first, min(last, len(files)), batch_size) if start not in done]
    total = min(last, len(files)) - min(first, len(files))
    progress = total - sum(min(batch_size, len(files) - start) for start in todo)
    with tqdm(total=total, initial=progress, desc=desc + (f" (process {rank} of {world})" if world > 1 else ""),
              unit="img", disable=not show_progress) as bar:
        for count, start in enumerate(todo):
            if max_batches is not None and count >= max_batches:
                raise BuildInterrupted(f"stopped after {max_batches} batches ({progress} of {total} files done); "
                                       f"build again with the same model and folder to resume")
            names = list(files[start:start + batch_size])
            # before reading: a file that changes while it is read is seen as changed later
            fingerprints = {name: file_fingerprint(folder / name) for name in names}
            embeddings, paths, skipped = _embed_files(model, processor, folder, names if select is None
                                                      else select(names))
            yield EncodedBatch(start, names, fingerprints, paths, embeddings, skipped)
            progress += len(names)
            bar.update(len(names))


def _embed_files(model, processor, folder: Path,
                 names: list[str]) -> tuple[Optional[np.ndarray], list[str], list[dict]]:
    """Embed one batch of gallery files: (embeddings or None, the names embedded, the files skipped with why)."""
    images, kept, skipped = [], [], []
    for name in names:
        try:
            images.append(processor.load_image(folder / name, name=name))
            kept.append(name)
        except ValueError as error:  # load_image names the file and says what is wrong
            skipped.append(skipped_file(name, error))
    if not images:
        return None, kept, skipped
    return embed_images(model, processor, images, batch_size=len(images), show_progress=False).numpy(), kept, skipped


def skipped_file(name: str, error: Exception) -> dict:
    """A gallery file a build leaves out: {"path": its name, "error": why} (the loader's message without the name it
    starts with; an OSError's own words)."""
    return dict(path=name, error=(getattr(error, "strerror", None) or str(error)).removeprefix(f"{name}: "))


def none_readable(num_files: int, gallery_dir: str, skipped: list[dict]) -> GalleryIndexError:
    """The error for a gallery none of whose files could be read, with the first reasons."""
    reasons = "; ".join(f"{item['path']}: {item['error']}" for item in skipped[:3])
    return GalleryIndexError(f"none of the {num_files} image files under {gallery_dir!r} could be read ({reasons})")


def warn_skipped(skipped: list[dict], num_files: int, gallery_dir: str, listed_in: str, stacklevel: int = 1) -> None:
    """One `SkippedImagesWarning` for the unreadable files of a gallery: how many, the first five with the reason,
    and where all are listed. `stacklevel` counts from the caller, as in `warnings.warn`."""
    if not skipped:
        return
    listed = "; ".join(f"{display_path(item['path'])} ({display_path(item['error'])})" for item in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {num_files} in {display_path(gallery_dir)!r}: "
                  f"{listed}{more} (all listed in {listed_in})", SkippedImagesWarning, stacklevel=stacklevel + 1)


# ---- Several processes (torchrun, accelerate launch: decd.processes) or one ----------------------
class SingleProcess:
    """The process state of a build without `accelerate` (what a build uses of its `PartialState`): one process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


@contextlib.contextmanager
def one_share(state):
    """Run this process's share of a build: whether it ends or fails, the other processes are waited for (so none
    waits for this one forever), and only then is a failure raised. Not after Ctrl-C, which reaches them too."""
    failure = None
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - raised below, after the other processes are told
        failure = error
    if state.num_processes > 1 and not isinstance(failure, KeyboardInterrupt):
        state.wait_for_everyone()
    if failure is not None:
        raise failure
