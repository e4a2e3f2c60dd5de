"""`open_gallery`: the one place that turns what a user calls "the gallery" into a `Gallery`: a searchable
`GalleryIndex` or, for a Milvus URI, a `MilvusGallery`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .backends import EXACT_BACKEND
from .display import display_path
from .encode import (IMAGE_EXTENSIONS, encode_gallery, extension_names, join_batches, list_images, none_readable,
                     warn_skipped)
from .errors import GalleryIndexError, IndexNotFoundError
from .format import META_FILE, index_meta, is_index_folder, model_checksum
from .index import GalleryIndex
from .milvus import MilvusGallery, is_milvus_uri
from .protocol import Gallery


def open_gallery(model, processor, source: Any, *, batch_size: int = 64, show_progress: bool = False,
                 verify: bool = True, model_id: Optional[str] = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 collection: Optional[str] = None, token: Optional[str] = None) -> Gallery:
    """A `Gallery` for `source`, checked against `model`:

    - a Milvus store: `http(s)://host:port[/COLLECTION]` or a Milvus Lite path `gallery.db[/COLLECTION]`
      (`collection=` names the collection otherwise; `token=` for a server that needs one, default
      $DECD_MILVUS_TOKEN): `MilvusGallery.open`, whose `search` also takes `filter=` (see `filter_options`);
    - an index folder (it holds meta.json, or partial/ of an unfinished build), or a path that does not
      exist: `GalleryIndex.load` (memory-mapped), which says what is wrong, if anything (one line); a
      file is refused;
    - any other folder: every image under it (recursively, `extensions`), encoded now in memory in
      batches of `batch_size` like `GalleryIndex.build` would (same embeddings); unreadable files are
      left out with one `SkippedImagesWarning` that counts and names them, and listed in `index.skipped`.
      `index.paths` are relative to the folder (`index.gallery_dir`); `index.path` is None;
    - a list (or tuple) of image paths and/or PIL images: `GalleryIndex.from_images` (an unreadable
      item raises: a list is expected to be valid);
    - a `Gallery` (a `GalleryIndex`, a `MilvusGallery`): returned as it is.

    Args:
        model, processor: the DECD model and its processor. `model=None` is allowed for an index only
            (nothing is then checked against a model: the caller does it once it has one, as
            `decd-search query` does with the model the index names).
        show_progress: a tqdm bar while a folder or a list is encoded.
        verify: for an index folder, read it whole once (sha256, finite values; `GalleryIndex.load`), and
            for any index check that `model` built it (`StaleIndexError` naming both models).
            False: cheap checks only, for an index checked before.
        model_id: recorded as the model's name in an encoded gallery's `meta`.

    Raises:
        IndexNotFoundError / GalleryIndexError: one line naming the path and what to do (a missing
            folder, an unfinished or damaged index, a folder without images or with none readable; for
            Milvus, `MilvusStoreError`: a server that does not answer, a Lite store held by another process).
        StaleIndexError: the index was built by another model.
        TypeError: `source` is none of the above.
    """
    if collection is not None and not (is_milvus_uri(source) or isinstance(source, MilvusGallery)):
        raise GalleryIndexError(f"collection {collection!r} names a Milvus collection, but the gallery {source!r} is "
                                f"not a Milvus store (a path ending in .db, or http://host:port)")
    if is_milvus_uri(source):
        index = MilvusGallery.open(source, collection=collection, token=token)
    elif isinstance(source, (str, os.PathLike)):
        if (path := Path(source).expanduser()).is_file():
            raise GalleryIndexError(f"the gallery {display_path(path)!r} is a file: give an index folder (built with "
                                    f"`decd-search index`) or a folder of images")
        if not path.is_dir() or is_index_folder(path):
            index = GalleryIndex.load(path, verify=verify)
        else:  # encoded in memory: the listing, batches and skipping of `build_index` (so the same embeddings)
            extensions = extension_names(extensions)
            files = list_images(path, extensions)
            if model is None or processor is None:  # without a model, `open_gallery` opens an index only
                raise IndexNotFoundError(f"{display_path(path)!r} has no {META_FILE}: not a gallery index (its "
                                         f"images can only be searched with a model and processor to encode them)")
            embeddings, paths, skipped = join_batches(list(encode_gallery(model, processor, path, files, batch_size,
                                                                          show_progress=show_progress)))
            meta = index_meta(model, processor, model_id, model_checksum(model), path, extensions, len(files))
            if not paths:
                raise none_readable(len(files), meta["gallery_dir"], skipped)
            meta.update(backend=EXACT_BACKEND, embedding_dim=int(embeddings.shape[1]), count=len(paths),
                        skipped=skipped, num_skipped=len(skipped))
            warn_skipped(skipped, len(files), meta["gallery_dir"], "the returned GalleryIndex's `skipped`",
                         stacklevel=2)
            return GalleryIndex(embeddings, paths, meta)
    elif isinstance(source, Gallery):
        index = source
    elif isinstance(source, Sequence):
        if model is None or processor is None:
            raise ValueError("a gallery given as a list of images is encoded now: it needs the model and its processor")
        return GalleryIndex.from_images(model, processor, source, batch_size, model_id, show_progress)
    else:
        raise TypeError(f"the gallery must be an index folder, a folder of images, a list of images, a Milvus URI, "
                        f"a GalleryIndex or a MilvusGallery, not {type(source).__name__}")
    if verify and model is not None:  # checked once here, not on every search
        index.verify_model(model, model_id)
    return index
