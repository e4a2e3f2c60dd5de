"""Galleries in a Milvus collection (Milvus Lite, a server, a cluster or managed Milvus), as docs/milvus.md describes.

One job per module: `store` reaches the store and its collections (URIs, the connection, index types, and
`MilvusCollection`: the schema, the record, the rows), `metadata` reads the sidecar CSV, `gallery` is the
`MilvusGallery` users open and search, `build` writes it, `lease` lets one build write a server collection at a
time, `server` starts a standalone server on this machine.
"""

from .gallery import MilvusGallery
from .server import LocalMilvusServer
from .store import TOKEN_ENV, is_milvus_uri

__all__ = ["LocalMilvusServer", "MilvusGallery", "TOKEN_ENV", "is_milvus_uri"]
