"""Search a gallery of pedestrian crops by description or by photo: a gallery index on disk, or a Milvus collection.

`open_gallery` opens what a user calls "the gallery" (an index folder, a folder or list of images, a Milvus
collection) as a `Gallery`, the one interface the CLI, the pipeline, the app and the endpoint handler search:
`search_text` / `search_image` / `search` give a `SearchResult`, worded by `describe_match(es)`. `GalleryIndex.build`
and `MilvusGallery.build` write galleries; both encode with `encode_gallery`, the one encoding path.

One module per job (README.md, "Layout: one owner per job"); import a module's other names from it.
"""

from .display import SCORE_EXPLANATION, check_top_k, describe_match, describe_matches
from .encode import encode_gallery
from .errors import (BuildInterrupted, GalleryIndexError, IndexNotFoundError, MilvusStoreError, SkippedImagesWarning,
                     StaleIndexError)
from .gallery import open_gallery
from .index import GalleryIndex
from .milvus import MilvusGallery
from .protocol import Gallery, SearchResult, filter_options

__all__ = ["SCORE_EXPLANATION", "BuildInterrupted", "Gallery", "GalleryIndex", "GalleryIndexError",
           "IndexNotFoundError", "MilvusGallery", "MilvusStoreError", "SearchResult", "SkippedImagesWarning",
           "StaleIndexError", "check_top_k", "describe_match", "describe_matches", "encode_gallery", "filter_options",
           "open_gallery"]
