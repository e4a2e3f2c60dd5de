"""Search a gallery of pedestrian crops by description or by photo: a gallery index on disk, or a Milvus collection.

`open_gallery` opens what a user calls "the gallery" (an index folder, a folder or list of images, a Milvus
collection) as a `Gallery`, the one interface the CLI, the pipeline, the app and the endpoint handler search:
`search_text` / `search_image` / `search` give a `SearchResult`, worded by `describe_match(es)`. `GalleryIndex.build`
and `MilvusGallery.build` write galleries; both encode with `encode_gallery`, the one encoding path.

One module, one job (import a module's other names from it):

- `errors`: the errors every module raises;
- `display`: how a match is worded and paths and text are printed;
- `backends`: exact chunked top-k, the FAISS (approximate) indexes and recall;
- `format`: the index folder (docs/index-format.md): files, ownership, checks, the model checksum;
- `encode`: listing a folder and `encode_gallery`; one process or several;
- `build`: the resumable, multi-process build of an index folder;
- `protocol`: the `Gallery` protocol and `SearchResult`;
- `index`: `GalleryIndex`, a local gallery (an index folder, or images encoded in memory);
- `gallery`: `open_gallery`;
- `milvus`: `MilvusGallery`, a gallery in a Milvus collection (docs/milvus.md), and `LocalMilvusServer`.
"""

from .display import SCORE_EXPLANATION, check_top_k, describe_match, describe_matches
from .encode import encode_gallery
from .errors import (BuildInterrupted, GalleryIndexError, IndexNotFoundError, MilvusStoreError, SkippedImagesWarning,
                     StaleIndexError)
from .gallery import open_gallery
from .index import GalleryIndex
from .milvus import MilvusGallery
from .protocol import Gallery, SearchResult, filter_options

__all__ = [
    "SCORE_EXPLANATION",
    "BuildInterrupted",
    "Gallery",
    "GalleryIndex",
    "GalleryIndexError",
    "IndexNotFoundError",
    "MilvusGallery",
    "MilvusStoreError",
    "SearchResult",
    "SkippedImagesWarning",
    "StaleIndexError",
    "check_top_k",
    "describe_match",
    "describe_matches",
    "encode_gallery",
    "filter_options",
    "open_gallery",
]
