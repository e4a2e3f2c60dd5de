"""A gallery in a Milvus collection (`pymilvus.MilvusClient`): Milvus Lite, a server, a cluster or managed Milvus.

The same client code reaches every deployment; only the URI differs:

- Milvus Lite (embedded in this process, for one machine): a local path ending in `.db` (Milvus Lite keeps it
  as a folder). One process at a time may open it.
- A standalone server or a cluster: `http://host:19530`; managed Milvus (Zilliz Cloud): its `https://` URI and
  a token (`token=`, `--token` or the environment variable `DECD_MILVUS_TOKEN`).

Naming a collection: `STORE/COLLECTION`, e.g. `gallery.db/crops` or `http://host:19530/crops`
(`http://host:19530/DATABASE/COLLECTION` for a database other than the default), or the store alone with
`collection=` / `--collection`; a store that holds one DECD collection needs no name at all. A build's default
collection name is the gallery folder's name made a valid Milvus name (`default_collection_name`).

The collection (one row per image):

- `id` INT64 primary key, assigned by Milvus (`auto_id`): unique without any coordination between the
  processes of a build, and never reused when rows are replaced;
- `embedding` FLOAT_VECTOR: the L2-normalised image embedding (inner product = cosine similarity);
- `path` VARCHAR: the image's path relative to the gallery folder (POSIX separators, as in a local index);
- `sha256` VARCHAR: sha256 of the file's bytes, what decides whether a file changed;
- `file_stat` VARCHAR: "size:mtime_ns" when the row was written. A re-run hashes only files whose stat
  differs (so re-checking 10^6 unchanged files costs 10^6 `stat` calls, not a read of every file); a file
  whose stat changed but whose bytes did not (a copied gallery) is rewritten with its stored embedding
  and new stat, never re-embedded. A change that keeps both size and mtime is not seen: rebuild with
  `resume=False` after such an edit;
- the metadata columns of an optional sidecar CSV keyed by `path` (camera, timestamp, ...), as INT64,
  DOUBLE or VARCHAR scalar fields that filters can use.

The collection property `decd.meta` holds a JSON object like a local index's meta.json (`format`
"decd-milvus-gallery", `model_checksum`, `model_id`, `embedding_dim`, `gallery_dir`, `backend`, the metadata
fields...). Properties rather than the description, because Milvus Lite does not keep descriptions.

One job per file: `store.py` reaches the store and the collection (URIs, the connection, the schema, rows, index
types), `metadata.py` reads the sidecar CSV, `gallery.py` is the `MilvusGallery` users open and search, `build.py`
holds the steps of its build, `server.py` starts a standalone server on this machine.

Consistency: a search is "Strong" by default (it sees every write acknowledged before it); a server's default
("Bounded") can miss rows written in the last few seconds. Reads made by a build are always "Strong".
"""

from .gallery import MilvusGallery, open_milvus_gallery
from .metadata import read_metadata
from .server import LocalMilvusServer
from .store import (DEFAULT_CONSISTENCY, MILVUS_FORMAT, MILVUS_FORMAT_VERSION, TOKEN_ENV, MilvusLocation,
                    MilvusStoreError, check_collection_name, connect, create_collection, default_collection_name,
                    import_pymilvus, insert_rows, is_milvus_uri, milvus_index, parse_location, search_parameters)

__all__ = ["DEFAULT_CONSISTENCY", "LocalMilvusServer", "MILVUS_FORMAT", "MILVUS_FORMAT_VERSION", "MilvusGallery",
           "MilvusLocation", "MilvusStoreError", "TOKEN_ENV", "check_collection_name", "connect", "create_collection",
           "default_collection_name", "import_pymilvus", "insert_rows", "is_milvus_uri", "milvus_index",
           "open_milvus_gallery", "parse_location", "read_metadata", "search_parameters"]
