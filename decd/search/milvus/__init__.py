"""Galleries in a Milvus collection (Milvus Lite, a server, a cluster or managed Milvus), as docs/milvus.md describes;
one job per module, each named in its own docstring."""

from .gallery import MilvusGallery
from .server import LocalMilvusServer
from .store import TOKEN_ENV, is_milvus_uri

__all__ = ["LocalMilvusServer", "MilvusGallery", "TOKEN_ENV", "is_milvus_uri"]
