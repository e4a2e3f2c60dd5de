"""Search a folder of pedestrian crops with a text description (or a photo): a gallery index on disk.

`GalleryIndex.build` encodes every image under a folder once with a DECD model and stores the
L2-normalised image embeddings; `GalleryIndex.search_text` then ranks the whole gallery for a
description by cosine similarity: exact top-k by default (`backend="faiss"` is also exact: `IndexFlatIP`),
or, for an index built with `backend=SPEC` (a FAISS index-factory string such as HNSW32, IVF4096,Flat or
IVF4096,PQ64), an approximate search in that index. Several processes (`accelerate launch`) can build one
index together: each encodes a contiguous share of the batches, the main process joins the shards.
`open_gallery` opens whatever a user calls "the gallery" (an index folder, a folder of images, a list of
images, a Milvus collection) the same way for the pipeline, the app, `decd-search query` and the Inference
Endpoints handler. Galleries past one machine live in Milvus (`MilvusGallery`: Milvus Lite, a server, a
cluster or managed Milvus), searched through the same interface, with filters on metadata fields.

One module per job:

- `format`: the index folder (files, ownership, integrity checks) and the model checksum it records;
- `build`: the resumable multi-process build, and the same encoding of a folder in memory;
- `backends`: exact chunked top-k and the FAISS (approximate) indexes;
- `index`: `GalleryIndex` (build, load, search) and `SearchResult`;
- `milvus`: a gallery in a Milvus collection (`MilvusGallery`: schema, build and update, search, errors) and
  `LocalMilvusServer`, a standalone server on this machine;
- `gallery`: `open_gallery` and `filter_options`;
- `display`: how a match is worded (`describe_match`, `SCORE_EXPLANATION`) and paths are printed.
"""

from .backends import (DEFAULT_CHUNK_SIZE, DEFAULT_EF_SEARCH, DEFAULT_NPROBE, DEFAULT_TRAIN_SIZE, EXACT_BACKEND,
                       ann_num_lists, ann_search, ann_train_size, build_ann_index, exact_top_k, import_faiss,
                       new_ann_index, recall_at_k, rerank_exact, set_ann_parameters)
from .build import IMAGE_EXTENSIONS, BuildInterrupted, SkippedImagesWarning, list_images
from .display import (SCORE_EXPLANATION, check_top_k, describe_match, describe_matches, describe_status, display_path, printable,
                      top_percent)
from .format import (ANN_FILE, EMBEDDINGS_FILE, INDEX_FORMAT, INDEX_FORMAT_VERSION, META_FILE, PATHS_FILE,
                     GalleryIndexError, IndexNotFoundError, StaleIndexError, check_output_folder, file_sha256,
                     model_checksum, model_identifier)
from .gallery import filter_options, open_gallery
from .index import GalleryIndex, SearchResult
from .milvus import (MILVUS_FORMAT, TOKEN_ENV, LocalMilvusServer, MilvusGallery, MilvusStoreError,
                     default_collection_name, is_milvus_uri, milvus_index, open_milvus_gallery, read_metadata)

__all__ = [
    "ANN_FILE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_NPROBE",
    "DEFAULT_TRAIN_SIZE",
    "EMBEDDINGS_FILE",
    "EXACT_BACKEND",
    "IMAGE_EXTENSIONS",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "LocalMilvusServer",
    "META_FILE",
    "MILVUS_FORMAT",
    "MilvusGallery",
    "MilvusStoreError",
    "PATHS_FILE",
    "SCORE_EXPLANATION",
    "BuildInterrupted",
    "GalleryIndex",
    "GalleryIndexError",
    "IndexNotFoundError",
    "SearchResult",
    "SkippedImagesWarning",
    "StaleIndexError",
    "TOKEN_ENV",
    "ann_num_lists",
    "ann_search",
    "ann_train_size",
    "build_ann_index",
    "check_output_folder",
    "default_collection_name",
    "describe_match",
    "describe_matches",
    "check_top_k",
    "describe_status",
    "display_path",
    "printable",
    "exact_top_k",
    "file_sha256",
    "filter_options",
    "import_faiss",
    "is_milvus_uri",
    "list_images",
    "milvus_index",
    "model_checksum",
    "model_identifier",
    "new_ann_index",
    "open_gallery",
    "open_milvus_gallery",
    "read_metadata",
    "recall_at_k",
    "rerank_exact",
    "set_ann_parameters",
    "top_percent",
]
