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

Consistency: a search is "Strong" by default (it sees every write acknowledged before it); a server's default
("Bounded") can miss rows written in the last few seconds. Reads made by a build are always "Strong".
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backends import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, EXACT_BACKEND
from .build import IMAGE_EXTENSIONS, BuildInterrupted, _embed_files, _gallery_files, warn_skipped
from .display import display_path
from .format import (GalleryIndexError, IndexNotFoundError, PathLike, RecordedModel, StaleIndexError, _model_meta,
                     check_model, file_fingerprint, file_sha256, model_checksum)
from .index import GalleryIndex, SearchResult

MILVUS_FORMAT = "decd-milvus-gallery"  # the `format` of the decd.meta property: proof that a DECD build made it
MILVUS_FORMAT_VERSION = 1
META_PROPERTY = "decd.meta"
KEY_FIELD, VECTOR_FIELD, PATH_FIELD, SHA_FIELD, STAT_FIELD = "id", "embedding", "path", "sha256", "file_stat"
OWN_FIELDS = (KEY_FIELD, VECTOR_FIELD, PATH_FIELD, SHA_FIELD, STAT_FIELD)
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX; a longer relative path is skipped and reported
MAX_TEXT_BYTES = 65535  # the largest VARCHAR Milvus allows (storage follows the values, not this bound)
TOKEN_ENV = "DECD_MILVUS_TOKEN"
CONNECT_TIMEOUT = 10.0  # seconds to wait for a server to answer before saying it does not
DEFAULT_CONSISTENCY = "Strong"
ROWS_PER_CALL = 2000  # rows per insert / read call: ~4 MB at dim 512, far below gRPC's 64 MB message limit
MAX_TOP_K = 16384  # Milvus's largest search limit
# Milvus Lite's own list (milvus_lite.index.factory); it accepts other names at creation and fails only when
# a segment is indexed, so they are refused here, before anything is encoded.
LITE_INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")
DEFAULT_HNSW_M = 32  # links per node, as the local backend HNSW32
DEFAULT_EF_CONSTRUCTION = 200  # hnswlib's default build-time candidate list
DEFAULT_NLIST = 1024  # IVF lists when the backend names none (IVF_FLAT); IVF4096,Flat names its own
_METADATA_TYPES = ("int", "float", "str")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus's rule for collection and field names
_INT64 = (-(1 << 63), (1 << 63) - 1)
# The components of a standalone server, whose advertised address `LocalMilvusServer` pins to 127.0.0.1.
_SERVER_COMPONENTS = ("proxy", "rootCoord", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


class MilvusStoreError(GalleryIndexError):
    """A problem with a Milvus store or collection that the user can fix (one line naming the URI and what to do)."""


# --------------------------------------------------------------------------------------------
# pymilvus, quietly
# --------------------------------------------------------------------------------------------


def import_pymilvus(uri: str = ""):
    """The `pymilvus` module, or an ImportError that says what to install (milvus-lite too for a .db path)."""
    try:
        import pymilvus
    except ImportError as error:
        raise ImportError(f"the Milvus gallery {uri!r} needs pymilvus: pip install 'decd[milvus]' (or pip install "
                          f"pymilvus milvus-lite)") from error
    return pymilvus


class _OwnCalls(logging.Filter):
    """Drops pymilvus's log records (tracebacks of the errors it raises) while this thread is inside one of our
    calls: those errors are re-raised here as one line, and other pymilvus users in the process keep their logs."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_QUIET = _OwnCalls()
_PYMILVUS_LOGGERS = ("pymilvus.decorators", "pymilvus.client.iterator.query_iterator",
                     "pymilvus.milvus_client.milvus_client", "pymilvus.client.grpc_handler")


@contextmanager
def _quiet():
    for name in _PYMILVUS_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    _QUIET.local.depth = getattr(_QUIET.local, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.local.depth -= 1


def _reason(error: BaseException) -> str:
    """A Milvus error message on one line (Lite points at the column with a line of carets: dropped)."""
    message = str(getattr(error, "message", "") or error)
    lines = [line.strip() for line in message.splitlines() if line.strip() and set(line.strip()) != {"^"}]
    return "; ".join(lines) or type(error).__name__


# --------------------------------------------------------------------------------------------
# Naming a store and a collection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MilvusLocation:
    """Where a collection is: `uri` as MilvusClient takes it, the collection (None: not named) and the database."""

    uri: str
    collection: Optional[str] = None
    db_name: str = ""

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://"))

    def describe(self, collection: Optional[str] = None) -> str:
        """'collection 'crops' in http://host:19530' (the database too when it is not the default)."""
        name = collection or self.collection
        store = self.uri + (f" (database {self.db_name})" if self.db_name else "")
        return f"collection {name!r} in {store}" if name else store


def _lite_candidate(path: Path) -> bool:
    """A path meant as a Milvus Lite store: it ends in .db and is not some other existing folder."""
    if path.suffix != ".db" or path.name == ".db":
        return False
    return not path.is_dir() or not any(path.iterdir()) or (path / "LOCK").exists() or (path / "collections").is_dir()


def is_milvus_uri(source: Any) -> bool:
    """Whether `source` names a Milvus store: `http(s)://...`, or a path ending in `.db` (Milvus Lite), optionally
    followed by `/COLLECTION`. A local index folder (it holds meta.json) never is one."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    text = os.fspath(source)
    if not isinstance(text, str) or not text.strip():
        return False
    if text.startswith(("http://", "https://")):
        return True
    from .format import is_index_folder  # a local index folder named *.db stays a local index

    path = Path(text).expanduser()
    return (_lite_candidate(path) or _lite_candidate(path.parent)) and not is_index_folder(path)


def check_collection_name(name: str) -> str:
    """`name` if it is a valid Milvus collection (or field) name, else MilvusStoreError saying the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MilvusStoreError(f"{name!r} is not a valid Milvus name: it must start with a letter or '_' and hold "
                               f"only letters, digits and '_' (at most 255)")
    return name


def default_collection_name(gallery_dir: PathLike) -> str:
    """The gallery folder's name as a valid Milvus collection name: other characters become '_', and a name
    that starts with a digit gets the prefix 'g_' ('my-crops' -> 'my_crops', '2024 cam' -> 'g_2024_cam')."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(gallery_dir).resolve().name) or "gallery"
    return ("g_" + name if not re.match(r"[A-Za-z_]", name) else name)[:255]


def parse_location(source: Union[str, os.PathLike], collection: Optional[str] = None) -> MilvusLocation:
    """The store, collection and database that `source` (+ `collection`) name; see the module docstring."""
    text = os.fspath(source)
    db_name, named = "", None
    if text.startswith(("http://", "https://")):
        split = urllib.parse.urlsplit(text)
        parts = [part for part in split.path.split("/") if part]
        if split.query or split.fragment or len(parts) > 2 or not split.netloc:
            raise MilvusStoreError(f"{text!r} is not a Milvus URI of the form http://HOST:PORT[/COLLECTION] or "
                                   f"http://HOST:PORT/DATABASE/COLLECTION")
        uri = f"{split.scheme}://{split.netloc}"
        if len(parts) == 2:
            db_name = parts[0]
        named = parts[-1] if parts else None
    else:
        path = Path(text).expanduser()
        if _lite_candidate(path):
            uri = os.path.abspath(path)
        elif _lite_candidate(path.parent):
            uri, named = os.path.abspath(path.parent), path.name
        else:
            raise MilvusStoreError(f"{text!r} is not a Milvus store: give a Milvus Lite path ending in .db "
                                   f"(optionally /COLLECTION) or http://HOST:PORT")
    if collection and named and collection != named:
        raise MilvusStoreError(f"two collection names: {named!r} in {text!r} and {collection!r} (--collection); "
                               f"give one")
    name = collection or named
    if name is not None:
        check_collection_name(name)
    return MilvusLocation(uri, name, db_name)


def _lite_locked(folder: Path) -> bool:
    """Whether another process holds the Milvus Lite folder's lock (a flock on its LOCK file)."""
    import fcntl

    try:
        descriptor = os.open(folder / "LOCK", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return False
    finally:
        os.close(descriptor)


def connect(location: MilvusLocation, token: Optional[str] = None, create: bool = False,
            timeout: float = CONNECT_TIMEOUT):
    """A `MilvusClient` for `location`; every failure is one line (MilvusStoreError / IndexNotFoundError /
    ImportError) naming the URI and what to do. A Milvus Lite store that does not exist is created only
    with `create` (a build); opening one for a search says to build it."""
    pymilvus = import_pymilvus(location.uri)
    if location.lite:
        path = Path(location.uri)
        if not create and not path.exists():
            raise IndexNotFoundError(f"Milvus Lite store {display_path(path)!r} does not exist; build it with "
                                     f"`decd-search index GALLERY --model M --store {display_path(path)}`")
        if not path.parent.is_dir():
            raise MilvusStoreError(f"the folder of the Milvus Lite store {display_path(path)!r} does not exist")
        try:
            import milvus_lite  # noqa: F401
        except ImportError as error:
            raise ImportError(f"the Milvus Lite store {display_path(path)!r} needs milvus-lite: pip install "
                              f"'decd[milvus]' (or pip install milvus-lite)") from error
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    with _quiet():
        try:
            return pymilvus.MilvusClient(uri=location.uri, token=token or "", db_name=location.db_name,
                                         timeout=timeout)
        except pymilvus.exceptions.MilvusException as error:
            reason = _reason(error)
            if location.lite:
                if _lite_locked(Path(location.uri)):
                    raise MilvusStoreError(
                        f"Milvus Lite store {display_path(location.uri)!r} is held by another process (Milvus Lite "
                        f"lets one process open a store: a running app, endpoint or build may hold it); stop that process, "
                        f"or serve the gallery from a Milvus server (docs/milvus.md)") from None
                raise MilvusStoreError(f"Milvus Lite could not open {display_path(location.uri)!r}: {reason}") from None
            host = urllib.parse.urlsplit(location.uri).netloc
            raise MilvusStoreError(
                f"Milvus at {location.uri} does not answer (tried a gRPC connection to {host} for up to "
                f"{timeout:g} s: {reason}); start the server, or check the URI and the token (--token / "
                f"{TOKEN_ENV})") from None


def _call(location: MilvusLocation, what: str, function, *args, **kwargs):
    """`function(*args, **kwargs)` (a MilvusClient method) with Milvus's errors as one MilvusStoreError line."""
    pymilvus = import_pymilvus(location.uri)
    with _quiet():
        try:
            return function(*args, **kwargs)
        except pymilvus.exceptions.MilvusException as error:
            raise MilvusStoreError(f"Milvus refused {what} ({location.describe()}): {_reason(error)}") from None


# --------------------------------------------------------------------------------------------
# Index types (--backend) and their search parameters
# --------------------------------------------------------------------------------------------


def milvus_index(backend: Optional[str], lite: bool = False) -> tuple[str, dict]:
    """(Milvus index type, build parameters) for a `--backend` string (inner-product metric).

    exact / FLAT: exact search. The local FAISS-style strings map to their Milvus kind: HNSW32 -> HNSW (M 32),
    IVF4096,Flat -> IVF_FLAT (nlist 4096), IVF4096,SQ8 -> IVF_SQ8, IVF4096,PQ64 -> IVF_PQ (m 64). Milvus names
    are taken as they are (HNSW, IVF_FLAT, IVF_SQ8 with default parameters; AUTOINDEX, DISKANN, SCANN, ... where
    the engine has them). Milvus Lite has only `LITE_INDEX_TYPES`: others are refused here.
    """
    spec = EXACT_BACKEND if backend is None else str(backend).strip()
    upper = spec.upper()
    if spec == EXACT_BACKEND or upper == "FLAT":
        kind, params = "FLAT", {}
    elif match := re.fullmatch(r"HNSW(\d*)", upper):
        kind, params = "HNSW", dict(M=int(match[1] or DEFAULT_HNSW_M), efConstruction=DEFAULT_EF_CONSTRUCTION)
    elif match := re.fullmatch(r"IVF(\d+),(FLAT|SQ8|PQ(\d+))", upper):
        kind = {"FLAT": "IVF_FLAT", "SQ8": "IVF_SQ8"}.get(match[2], "IVF_PQ")
        params = dict(nlist=int(match[1]), **(dict(m=int(match[3]), nbits=8) if match[3] else {}))
    elif upper in ("IVF_FLAT", "IVF_SQ8"):
        kind, params = upper, dict(nlist=DEFAULT_NLIST)
    elif upper == "IVF_PQ":
        raise MilvusStoreError("backend IVF_PQ needs its sub-quantizer count: e.g. IVF1024,PQ64 (nlist 1024, m 64)")
    elif re.fullmatch(r"[A-Z][A-Z0-9_]*", upper):
        kind, params = upper, {}
    else:
        raise MilvusStoreError(f"backend {spec!r} is not a Milvus index: use exact (FLAT), HNSW / HNSW32, IVF_FLAT / "
                               f"IVF1024,Flat, IVF_SQ8, IVF1024,PQ64 or another Milvus index type")
    if lite and kind not in LITE_INDEX_TYPES:
        raise MilvusStoreError(f"Milvus Lite has no {kind} index (it has {', '.join(LITE_INDEX_TYPES)}); use one of "
                               f"those, or a Milvus server (http://...) for {kind}")
    return kind, params


def search_parameters(kind: str, params: dict, top_k: int, nprobe: Optional[int] = None,
                      ef_search: Optional[int] = None) -> dict:
    """The search-time knobs of an index kind: HNSW `ef` (`ef_search`, default DEFAULT_EF_SEARCH, raised to
    top_k), IVF `nprobe` (default DEFAULT_NPROBE, at most nlist); none for the others."""
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if kind.startswith("HNSW"):
        return dict(ef=max(int(ef_search or DEFAULT_EF_SEARCH), top_k))
    if kind.startswith("IVF"):
        nlist = int(params.get("nlist") or DEFAULT_NLIST)
        return dict(nprobe=min(int(nprobe or DEFAULT_NPROBE), nlist))
    return {}


# --------------------------------------------------------------------------------------------
# The metadata sidecar CSV
# --------------------------------------------------------------------------------------------


def _metadata_type(values: list[str]) -> str:
    """int when every value is an integer in int64's range, float when every value is a finite number, else str."""
    if all(re.fullmatch(r"[+-]?\d+", value) and _INT64[0] <= int(value) <= _INT64[1] for value in values):
        return "int"
    try:
        if all(math.isfinite(float(value)) for value in values):
            return "float"
    except ValueError:
        pass
    return "str"


def _typed(value: str, kind: str, where: str):
    """`value` (CSV text) as `kind`; MilvusStoreError naming `where` when it is not one."""
    try:
        if kind == "int":
            number = int(value)
            if not _INT64[0] <= number <= _INT64[1]:
                raise ValueError(value)
            return number
        if kind == "float":
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
    except ValueError:
        raise MilvusStoreError(f"{where}: {value!r} is not {'an integer' if kind == 'int' else 'a finite number'}, "
                               f"the field's type") from None
    if len(value.encode("utf-8", "surrogateescape")) > MAX_TEXT_BYTES:
        raise MilvusStoreError(f"{where}: the value is longer than Milvus's {MAX_TEXT_BYTES} bytes")
    return value


def read_metadata(csv_path: PathLike, types: Optional[dict] = None) -> tuple[dict, dict]:
    """(field types {column: "int"|"float"|"str"}, {path: {column: value}}) of a metadata CSV.

    The CSV has a `path` column (the image's path relative to the gallery folder, as `decd-search` prints it) and
    one column per field; every cell holds a value (Milvus scalar fields have no null). Each column's type is
    inferred (`_metadata_type`), or given by `types` (an existing collection's fields: the CSV must have exactly
    those columns). Raises MilvusStoreError naming the file, the line and the column.
    """
    csv_path = Path(csv_path)
    name = display_path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            lines = [(number, row) for number, row in enumerate(reader, start=2) if any(cell.strip() for cell in row)]
    except OSError as error:
        raise MilvusStoreError(f"cannot read the metadata file {name!r}: {error.strerror or error}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise MilvusStoreError(f"the metadata file {name!r} is not a UTF-8 CSV file ({error})") from None
    header = [column.strip() for column in header or []]
    if PATH_FIELD not in header:
        raise MilvusStoreError(f"the metadata file {name!r} has no {PATH_FIELD!r} column (the image's path relative to "
                               f"the gallery folder); its columns: {', '.join(header) or 'none'}")
    columns = [column for column in header if column != PATH_FIELD]
    for column in columns:
        if column in OWN_FIELDS or not _NAME.fullmatch(column) or header.count(column) > 1:
            raise MilvusStoreError(f"the metadata file {name!r} has a column {column!r} that cannot be a field: names "
                                   f"start with a letter or '_', hold letters, digits and '_', appear once, and are "
                                   f"not {', '.join(OWN_FIELDS)}")
    if types is not None and set(columns) != set(types):
        raise MilvusStoreError(f"the metadata file {name!r} has the columns {', '.join(columns) or 'none'}, the "
                               f"collection the fields {', '.join(types) or 'none'}: give a CSV with exactly those "
                               f"fields, or build into a new collection")
    rows: dict[str, dict[str, str]] = {}
    for number, row in lines:
        if len(row) != len(header):
            raise MilvusStoreError(f"{name} line {number} has {len(row)} cells for {len(header)} columns")
        record = dict(zip(header, (cell.strip() for cell in row)))
        path = record.pop(PATH_FIELD)
        if not path or path in rows:
            problem = "an empty path" if not path else f"{path!r} appears twice"
            raise MilvusStoreError(f"{name} line {number}: {problem}")
        for column, value in record.items():
            if not value:
                raise MilvusStoreError(f"{name} line {number} ({path}): column {column!r} is empty; every image needs "
                                       f"a value (Milvus fields have no null)")
        rows[path] = record
    if types is None:
        types = {column: _metadata_type([record[column] for record in rows.values()]) for column in columns}
    values = {path: {column: _typed(record[column], types[column], f"{name} ({path}), column {column!r}")
                     for column in types} for path, record in rows.items()}
    return dict(types), values


# --------------------------------------------------------------------------------------------
# The collection: schema, meta, rows
# --------------------------------------------------------------------------------------------


def _data_types(pymilvus) -> dict:
    return {"int": pymilvus.DataType.INT64, "float": pymilvus.DataType.DOUBLE, "str": pymilvus.DataType.VARCHAR}


def create_collection(client, location: MilvusLocation, name: str, dim: int, metadata_types: dict, kind: str,
                      params: dict, meta: dict) -> None:
    """Create the collection (schema above, the vector index `kind` with `params`, the `decd.meta` property), loaded."""
    pymilvus = import_pymilvus(location.uri)
    schema = pymilvus.MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    schema.add_field(KEY_FIELD, pymilvus.DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, pymilvus.DataType.FLOAT_VECTOR, dim=int(dim))
    schema.add_field(PATH_FIELD, pymilvus.DataType.VARCHAR, max_length=MAX_PATH_BYTES)
    schema.add_field(SHA_FIELD, pymilvus.DataType.VARCHAR, max_length=64)
    schema.add_field(STAT_FIELD, pymilvus.DataType.VARCHAR, max_length=64)
    for field, kind_of_value in metadata_types.items():
        options = dict(max_length=MAX_TEXT_BYTES) if kind_of_value == "str" else {}
        schema.add_field(field, _data_types(pymilvus)[kind_of_value], **options)
    _call(location, "creating the collection", client.create_collection, name, schema=schema,
          properties={META_PROPERTY: json.dumps(meta)})
    # sync=False: pymilvus's own wait for the index asks for a timestamp Milvus Lite cannot give (its server
    # thread then logs a traceback); an empty collection's index is ready at once, and `_finish` waits for others.
    _call(location, "creating the index", client.create_index, name, _index_params(client, kind, params), sync=False)
    _call(location, "loading the collection", client.load_collection, name)


def _index_params(client, kind: str, params: dict):
    index_params = client.prepare_index_params()
    index_params.add_index(field_name=VECTOR_FIELD, index_type=kind, metric_type="IP", index_name=VECTOR_FIELD,
                           params=dict(params))
    return index_params


def _describe(client, location: MilvusLocation, name: str) -> tuple[Optional[dict], dict]:
    """(the decd.meta object or None, {metadata field: "int"|"float"|"str"}) of a collection."""
    pymilvus = import_pymilvus(location.uri)
    description = _call(location, "describing the collection", client.describe_collection, name)
    try:
        meta = json.loads((description.get("properties") or {}).get(META_PROPERTY) or "null")
    except ValueError:
        meta = None
    names = {value: key for key, value in _data_types(pymilvus).items()}
    fields = {field["name"]: names.get(field["type"], "str") for field in description.get("fields", [])
              if field["name"] not in OWN_FIELDS}
    return (meta if isinstance(meta, dict) and meta.get("format") == MILVUS_FORMAT else None), fields


def _vector_index(client, location: MilvusLocation, name: str) -> dict:
    """describe_index of the embedding field: index_type, its build parameters, state and row counts."""
    return _call(location, "describing the index", client.describe_index, name, VECTOR_FIELD) or {}


def _index_settings(info: dict, meta: Optional[dict] = None) -> tuple[str, dict]:
    """(index type, build parameters as numbers) from describe_index (a server returns them as strings; Milvus
    Lite returns none: then those that decd.meta recorded for that type)."""
    kind = str(info.get("index_type") or "FLAT")
    params = {key: int(info[key]) for key in ("M", "efConstruction", "nlist", "m", "nbits") if key in info}
    if not params and meta and meta.get("backend") == kind:
        params = dict(meta.get("index_params") or {})
    return kind, params


def insert_rows(client, location: MilvusLocation, name: str, embeddings: np.ndarray, paths: Sequence[str],
                sha256s: Sequence[str], stats: Sequence[str], metadata: Sequence[dict]) -> list[int]:
    """Insert one row per embedding (ROWS_PER_CALL per call); returns the keys Milvus assigned, in order."""
    keys = []
    for start in range(0, len(paths), ROWS_PER_CALL):
        rows = [{VECTOR_FIELD: np.asarray(embeddings[position], dtype=np.float32), PATH_FIELD: paths[position],
                 SHA_FIELD: sha256s[position], STAT_FIELD: stats[position], **metadata[position]}
                for position in range(start, min(start + ROWS_PER_CALL, len(paths)))]
        done = _call(location, "inserting rows", client.insert, name, rows)
        keys += [int(key) for key in done["ids"]]
    return keys


def _delete(client, location: MilvusLocation, name: str, keys: Sequence[int]) -> None:
    keys = [int(key) for key in keys]
    for start in range(0, len(keys), ROWS_PER_CALL):
        _call(location, "deleting rows", client.delete, name, ids=keys[start:start + ROWS_PER_CALL])


def _read_rows(client, location: MilvusLocation, name: str, fields: Sequence[str]) -> dict[str, list[dict]]:
    """Every row's key, path, sha256, stat and metadata, grouped by path: one Strong read of the collection, a
    page of ROWS_PER_CALL keys at a time in key order. (pymilvus's query_iterator is not used: against a 2.3
    server it falls back to a client-side timestamp and can miss rows written just before.)"""
    stored: dict[str, list[dict]] = {}
    last, total = None, 0
    while True:
        rows = _call(location, "reading the collection", client.query, name,
                     filter="" if last is None else f"{KEY_FIELD} > {last}", limit=ROWS_PER_CALL,
                     output_fields=[KEY_FIELD, PATH_FIELD, SHA_FIELD, STAT_FIELD, *fields],
                     consistency_level="Strong")  # a query with a limit returns the smallest keys, in order
        if not rows:
            break
        for row in rows:
            stored.setdefault(row[PATH_FIELD], []).append(row)
        last, total = max(int(row[KEY_FIELD]) for row in rows), total + len(rows)
    expected = _count(client, location, name, "Strong")
    if total != expected:  # a page that was not the next keys in order would leave rows out
        raise MilvusStoreError(f"reading {location.describe(name)} returned {total} of its {expected} rows; "
                               f"run the build again")
    return stored


def _count(client, location: MilvusLocation, name: str, consistency: str) -> int:
    rows = _call(location, "counting rows", client.query, name, filter="", output_fields=["count(*)"],
                 consistency_level=consistency)
    return int(rows[0]["count(*)"]) if rows else 0


def _file_stat(path: Path) -> Optional[str]:
    """`file_fingerprint` (size, mtime) as the text of the file_stat field; None when the file is gone."""
    fingerprint = file_fingerprint(path)
    return None if fingerprint is None else ":".join(map(str, fingerprint))


# --------------------------------------------------------------------------------------------
# The gallery object
# --------------------------------------------------------------------------------------------


class _SingleProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


class MilvusGallery(RecordedModel):
    """A gallery in a Milvus collection, searched like a `GalleryIndex`: `search` / `search_text` / `search_image`
    return a `SearchResult` whose `indices` are the rows' Milvus keys (int64) and `paths` their paths relative
    to `gallery_dir`; `len`, `image_path(key)`, `model_id`, `model_checksum`, `verify_model`, `backend` (the
    Milvus index type) as for a local index. `search(..., filter='camera == "c12"')` takes a Milvus boolean
    expression over `filter_fields`. Open one with `MilvusGallery.open` (or `open_gallery`), write one with
    `MilvusGallery.build`.
    """

    # The same text and photo searches as a local index: they check the model, embed with
    # inference_decd, and call this object's `search` (which takes `filter=`).
    search_text = GalleryIndex.search_text
    search_image = GalleryIndex.search_image

    def __init__(self, client, location: MilvusLocation, name: str, meta: dict, metadata_fields: dict,
                 consistency: str = DEFAULT_CONSISTENCY):
        self.client, self.location, self.name, self.meta = client, location, name, meta
        self.metadata_fields = dict(metadata_fields)
        self.consistency = consistency
        self.path = None  # no index folder: the embeddings live in Milvus
        self.skipped: list[dict] = []  # unreadable files the last `build` of this object left out
        self.changes: dict[str, int] = {}  # what that build did (see `build`)
        self._paths: dict[int, str] = {}  # key -> relative path of rows seen in searches, for image_path
        self.index_type, self.index_params = _index_settings(_vector_index(client, location, name), meta)
        self._count = _count(client, location, name, consistency)

    # ---- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, source: Union[str, os.PathLike], collection: Optional[str] = None, token: Optional[str] = None,
             consistency: str = DEFAULT_CONSISTENCY) -> "MilvusGallery":
        """Open the DECD collection that `source` (+ `collection`) names, loading it for search if needed.

        Raises IndexNotFoundError (no such store or collection, naming the DECD collections there),
        MilvusStoreError (no answer, a Lite store held by another process, not a DECD collection) or ImportError.
        """
        location = parse_location(source, collection)
        client = connect(location, token)
        names = _call(location, "listing collections", client.list_collections)
        name = location.collection
        if name is None:
            ours = [candidate for candidate in names if _describe(client, location, candidate)[0] is not None]
            if len(ours) != 1:
                raise IndexNotFoundError(
                    f"{location.describe()} holds {len(ours)} DECD collections ({', '.join(ours) or 'none'}): name one "
                    f"with --collection NAME (collection=) or {location.uri}/NAME")
            name = ours[0]
        elif name not in names:
            ours = [candidate for candidate in names if _describe(client, location, candidate)[0] is not None]
            raise IndexNotFoundError(f"there is no {location.describe(name)} (DECD collections there: "
                                     f"{', '.join(ours) or 'none'}); build it with `decd-search index GALLERY "
                                     f"--model M --store {location.uri} --collection {name}`")
        meta, fields = _describe(client, location, name)
        if meta is None:
            raise MilvusStoreError(f"{location.describe(name)} was not written by decd-search (no DECD {META_PROPERTY} "
                                   f"property); give a collection built with `decd-search index --store`")
        if meta.get("format_version") != MILVUS_FORMAT_VERSION:
            raise MilvusStoreError(f"{location.describe(name)} has format version {meta.get('format_version')}, this "
                                   f"code reads version {MILVUS_FORMAT_VERSION}; rebuild it with --no-resume")
        _call(location, "loading the collection", client.load_collection, name)
        return cls(client, location, name, meta, fields, consistency)

    # ---- properties -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"MilvusGallery(count={len(self)}, {self.location.describe(self.name)}, index={self.index_type}, "
                f"model_id={self.model_id!r})")

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def backend(self) -> str:
        """The collection's Milvus index type (FLAT, HNSW, IVF_FLAT, ...)."""
        return self.index_type

    @property
    def embedding_dim(self) -> int:
        return int(self.meta["embedding_dim"])

    @property
    def filter_fields(self) -> dict:
        """The fields a filter can use: {name: "int" | "float" | "str"} (the path and the metadata fields)."""
        return {PATH_FIELD: "str", **self.metadata_fields}

    def describe_fields(self) -> str:
        return ", ".join(f"{field} ({kind})" for field, kind in self.filter_fields.items())

    def image_path(self, index: int) -> Optional[Path]:
        """The absolute path of the image whose key is `index` (looked up in Milvus unless a search returned it)."""
        key = int(index)
        if key not in self._paths:
            rows = _call(self.location, "reading a row", self.client.get, self.name, ids=[key],
                         output_fields=[PATH_FIELD], consistency_level=self.consistency)
            if not rows:
                raise MilvusStoreError(f"{self.location.describe(self.name)} has no row with key {key}")
            self._paths[key] = rows[0][PATH_FIELD]
        relative = self._paths[key]
        return self.gallery_dir / relative if self.gallery_dir is not None else Path(relative)

    def close(self) -> None:
        self.client.close()

    # ---- searching --------------------------------------------------------------------------------
    def verify_model(self, model, model_id: Optional[str] = None) -> None:
        """Raise `StaleIndexError` (naming both models and the collection) unless `model` built the collection."""
        try:
            check_model(self.meta, model, model_id)
        except StaleIndexError as error:
            raise StaleIndexError(f"{self.location.describe(self.name)}: {error} (decd-search index GALLERY --model M "
                                  f"--store {self.uri} --collection {self.name} --no-resume)") from None

    def search(self, queries, top_k: int = 10, filter: Optional[str] = None, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None, backend: Optional[str] = None, rerank: Optional[int] = None,
               model=None, processor=None, **unused) -> SearchResult:
        """Rank the collection for each query by cosine similarity, in Milvus.

        Args:
            queries: embeddings [num_queries, dim] or [dim] (normalised here), or description(s) with `model`
                and `processor` (see `search_text`).
            top_k: results per query (clamped to the collection's size; at most MAX_TOP_K).
            filter: a Milvus boolean expression over `filter_fields`, e.g. 'camera == "c12" and timestamp >=
                1700000000'; only matching rows are ranked. Rows with fewer matches are padded with key -1,
                score -inf and path None.
            nprobe, ef_search: IVF lists visited / HNSW candidate list (DEFAULT_NPROBE, DEFAULT_EF_SEARCH).
            backend: None or the collection's own index type (searching always uses it).
            rerank: not available (it re-reads a local index's embeddings.npy); None or 0.
            `chunk_size` and `device` (knobs of a local exact search) are accepted and ignored.
        """
        if isinstance(queries, str) or (isinstance(queries, (list, tuple)) and queries
                                        and all(isinstance(query, str) for query in queries)):
            if model is None or processor is None:
                raise ValueError("searching with text needs `model` and `processor` (or pass embeddings)")
            return self.search_text(model, processor, queries, top_k=top_k, filter=filter, nprobe=nprobe,
                                    ef_search=ef_search, backend=backend, rerank=rerank)
        if backend not in (None, self.backend):
            raise MilvusStoreError(f"{self.location.describe(self.name)} is searched with its own {self.backend} "
                                   f"index; --backend (backend=) chooses a local index's search, give none")
        if rerank:
            raise MilvusStoreError("--rerank (rerank=) re-scores from a local index's embeddings.npy; a Milvus "
                                   "collection has none: give none (choose FLAT for exact scores)")
        unknown = set(unused) - {"chunk_size", "device"}
        if unknown:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        queries = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.embedding_dim:
            raise ValueError(f"queries must be [num_queries, {self.embedding_dim}], got {tuple(queries.shape)}")
        queries = F.normalize(queries.float().cpu(), dim=-1).numpy()
        limit = min(int(top_k), max(len(self), 1), MAX_TOP_K)
        parameters = dict(metric_type="IP", params=search_parameters(self.index_type, self.index_params, limit,
                                                                        nprobe, ef_search))
        pymilvus = import_pymilvus(self.uri)
        with _quiet():
            try:
                hits = self.client.search(self.name, data=list(queries), limit=limit, filter=filter or "",
                                          output_fields=[PATH_FIELD, STAT_FIELD], search_params=parameters,
                                          anns_field=VECTOR_FIELD, consistency_level=self.consistency)
            except pymilvus.exceptions.MilvusException as error:
                if filter:
                    raise MilvusStoreError(f"Milvus rejected the filter {filter!r} ({_reason(error)}); the fields "
                                           f"of {self.location.describe(self.name)} are: {self.describe_fields()}"
                                           ) from None
                raise MilvusStoreError(f"Milvus refused the search ({self.location.describe(self.name)}): "
                                       f"{_reason(error)}") from None
        width = max([len(row) for row in hits] + [0])
        scores = np.full((len(queries), width), -np.inf, dtype=np.float32)
        keys = np.full((len(queries), width), -1, dtype=np.int64)
        paths: list[list[Optional[str]]] = [[None] * width for _ in range(len(queries))]
        status: list[list[Optional[str]]] = [[None] * width for _ in range(len(queries))]
        for row, found in enumerate(hits):
            for place, hit in enumerate(found):
                key, path = int(hit[KEY_FIELD]), hit["entity"][PATH_FIELD]
                scores[row, place], keys[row, place], paths[row][place] = hit["distance"], key, path
                status[row][place] = self._file_status(path, hit["entity"][STAT_FIELD])
                self._paths[key] = path
        return SearchResult(scores=torch.from_numpy(scores), indices=torch.from_numpy(keys), paths=paths,
                            status=status)

    def _file_status(self, path: str, stat: str) -> Optional[str]:
        """"deleted" or "changed" when the image's file is gone or has another size or time than when its row was
        written (as a local index's `file_status`), None when it is the same (or the gallery folder is unknown)."""
        if self.gallery_dir is None:
            return None
        current = _file_stat(self.gallery_dir / path)
        return "deleted" if current is None else None if current == stat else "changed"

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        processor,
        gallery_dir: PathLike,
        store: Union[str, os.PathLike],
        collection: Optional[str] = None,
        token: Optional[str] = None,
        metadata: Optional[PathLike] = None,
        batch_size: int = 64,
        model_id: Optional[str] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        resume: bool = True,
        show_progress: bool = True,
        max_batches: Optional[int] = None,
        backend: Optional[str] = None,
        distributed=None,
    ) -> Optional["MilvusGallery"]:
        """Write (or bring up to date) the collection of every image under `gallery_dir` in the Milvus `store`.

        Args:
            store: a Milvus Lite path (`gallery.db`, created if needed) or `http://host:port`, optionally
                followed by `/COLLECTION` (see the module docstring).
            collection: the collection (default: named in `store`, else `default_collection_name(gallery_dir)`).
            token: for a server that needs one (default: $DECD_MILVUS_TOKEN).
            metadata: a CSV with a `path` column and one column per scalar field (`read_metadata`); every image
                needs a row. A collection built with metadata needs the same columns on every update.
            batch_size: images per forward pass (and per insert).
            resume: True: bring an existing collection up to date: insert the images it lacks, re-embed those
                whose bytes changed (sha256), delete rows of files that are gone, rewrite rows whose metadata or
                file stat changed with their stored embedding. An interrupted build resumes this way. False:
                drop the collection and build it again (for another model).
            max_batches: stop (`BuildInterrupted`) after this many batches of this call; for time-boxed jobs and tests.
            backend: the vector index (`milvus_index`): None keeps an existing collection's and gives FLAT (exact)
                to a new one; another index than the collection's re-indexes it without re-embedding.
            distributed: an `accelerate` `PartialState` when several processes build together (`accelerate
                launch`, a server only): each process embeds and inserts a contiguous share of the files to
                encode; the main process creates the collection and deletes rows of files that are gone.

        Unreadable files are skipped with one `SkippedImagesWarning` (listed in the result's `skipped`, and
        tried again on the next build). Returns the opened `MilvusGallery` with `changes` = {"new", "changed",
        "updated", "removed", "unchanged"} counts (new/changed/updated: this process's share), on the main
        process; None on the others.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        state = distributed if distributed is not None else _SingleProcess()
        main, rank, world = state.is_main_process, int(state.process_index), int(state.num_processes)
        gallery_dir = Path(gallery_dir)
        extensions = tuple(extension.lower().lstrip(".") for extension in extensions)
        location = parse_location(store, collection)
        name = location.collection or default_collection_name(gallery_dir)
        check_collection_name(name)
        if location.lite and world > 1:
            raise MilvusStoreError(f"Milvus Lite ({display_path(location.uri)}) lets one process open a store: build "
                                   f"with one process, or into a Milvus server (--store http://HOST:19530)")
        wanted = milvus_index(backend, location.lite) if backend is not None else None
        files = _gallery_files(gallery_dir, extensions)
        types, values = read_metadata(metadata) if metadata is not None else ({}, {})
        missing = [path for path in files if metadata is not None and path not in values]
        if missing:
            examples = ", ".join(display_path(path) for path in missing[:3])
            raise MilvusStoreError(f"the metadata file {display_path(metadata)!r} has no row for {len(missing)} of the "
                                   f"{len(files)} images (e.g. {examples}); every image needs one")
        dim = getattr(getattr(model, "config", None), "projection_dim", None)
        if not isinstance(dim, int):
            raise ValueError(f"cannot tell the embedding size of {type(model).__name__} (no config.projection_dim)")
        checksum = model_checksum(model)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        meta = dict(_model_meta(model, processor, model_id, checksum), format=MILVUS_FORMAT,
                    format_version=MILVUS_FORMAT_VERSION, embedding_dim=dim, gallery_dir=str(gallery_dir.resolve()),
                    extensions=list(extensions), metadata_fields=types, updated=now, num_files=len(files))
        client = connect(location, token, create=True)
        where = location.describe(name)
        _check_collection(client, location, name, meta, resume, metadata)  # every process, before any writes
        state.wait_for_everyone()
        if main:
            _prepare_collection(client, location, name, meta, types, wanted, resume)
        state.wait_for_everyone()
        stored_meta, types = _describe(client, location, name)
        if stored_meta is None or stored_meta.get("model_checksum") != checksum:
            raise MilvusStoreError(f"process {rank} of {world} finds {where} prepared for another model")
        if metadata is not None:
            types, values = read_metadata(metadata, types)  # the collection's field types win over the CSV's guess
        stored = _read_rows(client, location, name, list(types))
        state.wait_for_everyone()  # every process has read the rows before any process writes
        plan = _plan(gallery_dir, files, stored, values, types)
        if main and plan.gone:
            _delete(client, location, name, plan.gone)
        todo = plan.work
        share = _share(len(todo), batch_size, rank, world)
        changes = dict(new=0, changed=0, updated=0, removed=len(plan.gone), unchanged=plan.unchanged)
        skipped = list(plan.skipped)
        bar = tqdm(total=share[1] - share[0], desc="Indexing gallery into Milvus"
                   + (f" (process {rank} of {world})" if world > 1 else ""), unit="img",
                   disable=not show_progress or not main)
        failure = None
        try:
            for done, start in enumerate(range(share[0], share[1], batch_size)):
                if max_batches is not None and done >= max_batches:
                    raise BuildInterrupted(f"stopped after {max_batches} batches ({start - share[0]} of "
                                           f"{share[1] - share[0]} files to encode done); build again to resume")
                batch = todo[start:min(start + batch_size, share[1])]
                _write_batch(client, location, name, model, processor, gallery_dir, batch, changes, skipped)
                bar.update(len(batch))
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the other processes are told
            failure = error
        finally:
            bar.close()
        if world > 1 and not isinstance(failure, KeyboardInterrupt):
            state.wait_for_everyone()
        if failure is not None:
            raise failure
        if not main:
            return None
        _finish(client, location, name, meta, wanted, bool(plan.work or plan.gone), show_progress)
        gallery = cls(client, location, name, *_describe(client, location, name))
        gallery.skipped, gallery.changes = skipped, changes
        warn_skipped(dict(skipped=skipped, num_files=len(files), gallery_dir=meta["gallery_dir"]),
                     "the returned MilvusGallery's `skipped`; they are tried again on the next build", stacklevel=2)
        return gallery


def _share(total: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """A process's contiguous share [start, end) of the work list, in whole batches (a local build splits the
    same way), so that the processes' batches are those of a one-process run."""
    batches = -(-total // batch_size)
    return (min(total, rank * batches // world * batch_size), min(total, (rank + 1) * batches // world * batch_size))


def _check_collection(client, location: MilvusLocation, name: str, meta: dict, resume: bool, metadata) -> None:
    """Refuse (nothing changed) an existing collection this build may not write: one decd-search did not write,
    or, when resuming, one of another model or with other metadata fields."""
    where = location.describe(name)
    if not _call(location, "looking for the collection", client.has_collection, name):
        return
    stored_meta, stored_types = _describe(client, location, name)
    if stored_meta is None:
        raise MilvusStoreError(f"{where} exists and was not written by decd-search (no DECD {META_PROPERTY} "
                               f"property); nothing was changed: choose another --collection")
    if not resume:
        return
    if stored_meta.get("model_checksum") != meta["model_checksum"]:
        raise StaleIndexError(
            f"{where} holds embeddings of {stored_meta.get('model_id')} (checksum "
            f"{str(stored_meta.get('model_checksum'))[:12]}), this model is {meta['model_id']} (checksum "
            f"{meta['model_checksum'][:12]}): pass --no-resume (resume=False) to replace them, or choose "
            f"another --collection")
    if metadata is not None:
        read_metadata(metadata, stored_types)  # the same columns, with values of the fields' types
    elif stored_types:
        raise MilvusStoreError(f"{where} has the metadata fields {', '.join(stored_types)}: give the CSV with them "
                               f"(--metadata)")


def _prepare_collection(client, location: MilvusLocation, name: str, meta: dict, types: dict,
                        wanted: Optional[tuple[str, dict]], resume: bool) -> None:
    """Main process, after `_check_collection`: create the collection (dropping it first when not `resume`), or
    give an existing one the wanted index, rebuilt from its stored vectors."""
    if _call(location, "looking for the collection", client.has_collection, name):
        if not resume:
            _call(location, "dropping the collection", client.drop_collection, name)
        else:
            current = _index_settings(_vector_index(client, location, name), _describe(client, location, name)[0])
            if wanted is not None and wanted != current:
                _call(location, "releasing the collection", client.release_collection, name)
                _call(location, "dropping the old index", client.drop_index, name, VECTOR_FIELD)
                _call(location, "creating the index", client.create_index, name, _index_params(client, *wanted),
                      sync=False)
            _call(location, "loading the collection", client.load_collection, name)
            return
    kind, params = wanted or milvus_index(None)
    create_collection(client, location, name, meta["embedding_dim"], types, kind, params,
                      dict(meta, backend=kind, index_params=params))


@dataclass
class _Plan:
    work: list  # (path, action, old rows, stat, metadata) in listing order; action: new | changed | check | rewrite
    gone: list  # keys of rows whose file is no longer listed
    unchanged: int
    skipped: list  # listed files that cannot be stored (name not UTF-8, too long, no stat)


def _plan(gallery_dir: Path, files: list[str], stored: dict[str, list[dict]], values: dict, types: dict) -> _Plan:
    """What each listed file needs, decided the same way by every process (same listing, same rows read)."""
    work, skipped, unchanged = [], [], 0
    stored = dict(stored)
    for path in files:
        rows = stored.pop(path, [])
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            skipped.append(dict(path=path, error="the file name is not valid UTF-8, which Milvus stores text as; "
                                                  "rename the file"))
            continue
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            skipped.append(dict(path=path, error=f"the path is longer than {MAX_PATH_BYTES} bytes"))
            continue
        stat = _file_stat(gallery_dir / path)
        if stat is None:
            skipped.append(dict(path=path, error="the file is gone or cannot be read (stat failed)"))
            continue
        wanted = values.get(path, {})
        if not rows:
            action = "new"
        elif len(rows) > 1:  # an interrupted replacement left two rows: encode it again, delete both
            action = "changed"
        elif rows[0][STAT_FIELD] != stat:
            action = "check"
        elif any(rows[0].get(field) != wanted.get(field) for field in types):
            action = "rewrite"
        else:
            unchanged += 1
            continue
        work.append((path, action, rows, stat, wanted))
    gone = [int(row[KEY_FIELD]) for rows in stored.values() for row in rows]
    return _Plan(work, gone, unchanged, skipped)


def _write_batch(client, location: MilvusLocation, name: str, model, processor, gallery_dir: Path, batch: list,
                 changes: dict, skipped: list) -> None:
    """Hash, embed (or reuse the stored embedding of) and insert one batch of the work list, then delete the rows
    it replaces: the new row exists before the old one goes, so an interruption never loses an image."""
    encode, rewrite, replaced = [], [], []
    for path, action, rows, stat, wanted in batch:
        if action == "rewrite":
            rewrite.append((path, rows[0], rows[0][SHA_FIELD], stat, wanted))
            continue
        try:
            digest = file_sha256(gallery_dir / path)
        except OSError as error:
            skipped.append(dict(path=path, error=error.strerror or str(error)))
            replaced += [row[KEY_FIELD] for row in rows]
            continue
        if action == "check" and digest == rows[0][SHA_FIELD]:  # the same bytes: keep the embedding, new stat
            rewrite.append((path, rows[0], digest, stat, wanted))
        else:
            encode.append((path, action, rows, digest, stat, wanted))
    if encode:
        embeddings, kept, unreadable = _embed_files(model, processor, gallery_dir, [item[0] for item in encode])
        skipped += unreadable
        by_path = {item[0]: item for item in encode}
        if kept:
            items = [by_path[path] for path in kept]
            insert_rows(client, location, name, embeddings, kept, [item[3] for item in items],
                        [item[4] for item in items], [item[5] for item in items])
        kept = set(kept)
        for path, action, rows, *_ in encode:
            replaced += [row[KEY_FIELD] for row in rows]  # a changed file that is now unreadable loses its row too
            if path in kept:
                changes["new" if action == "new" else "changed"] += 1
    if rewrite:
        keys = [int(row[KEY_FIELD]) for _, row, *_ in rewrite]
        found = _call(location, "reading stored embeddings", client.get, name, ids=keys, output_fields=[VECTOR_FIELD],
                      consistency_level="Strong")
        vectors = {int(row[KEY_FIELD]): np.asarray(row[VECTOR_FIELD], dtype=np.float32) for row in found}
        kept = [item for item in rewrite if int(item[1][KEY_FIELD]) in vectors]
        insert_rows(client, location, name, [vectors[int(item[1][KEY_FIELD])] for item in kept],
                    [item[0] for item in kept], [item[2] for item in kept], [item[3] for item in kept],
                    [item[4] for item in kept])
        replaced += [int(item[1][KEY_FIELD]) for item in kept]
        changes["updated"] += len(kept)
    if replaced:
        _delete(client, location, name, replaced)


def _finish(client, location: MilvusLocation, name: str, meta: dict, wanted: Optional[tuple[str, dict]],
            wrote: bool, show_progress: bool) -> None:
    """Record the build in decd.meta; for an approximate index, flush when rows were written (seal the segments:
    Milvus indexes sealed segments only) and wait, with a progress bar, while the engine builds the index."""
    stored_meta, _ = _describe(client, location, name)
    kind, params = wanted or _index_settings(_vector_index(client, location, name), stored_meta)
    record = dict(stored_meta or meta, gallery_dir=meta["gallery_dir"], updated=meta["updated"],
                  num_files=meta["num_files"], model_id=meta["model_id"], backend=kind, index_params=params)
    _call(location, "recording the build", client.alter_collection_properties, name,
          properties={META_PROPERTY: json.dumps(record)})
    if kind == "FLAT":  # nothing to index: the rows are durable and searchable once inserted
        return
    if wrote:
        _call(location, "flushing", client.flush, name)
    if location.lite:
        _wait_for_lite_index(location, name, kind, show_progress)
        return
    info = _vector_index(client, location, name)
    if _index_done(info):
        return
    with tqdm(total=int(info.get("total_rows") or 0), desc=f"Milvus building the {kind} index", unit="row",
              disable=not show_progress) as bar:
        while not _index_done(info):
            time.sleep(1)
            info = _vector_index(client, location, name)
            bar.total = int(info.get("total_rows") or 0)
            bar.n = int(info.get("indexed_rows") or 0)
            bar.refresh()
    if str(info.get("state")) == "Failed":
        raise MilvusStoreError(f"Milvus failed to build the {kind} index of {location.describe(name)}: "
                               f"{info.get('index_state_fail_reason') or info.get('fail_reason') or 'no reason given'}")


def _index_done(info: dict) -> bool:
    """Whether a server has indexed what it will index (or failed). A server reports "Finished" while segments
    that compaction merged still wait for their index (`pending_index_rows`); those are searched exactly,
    slowly, until then."""
    state = str(info.get("state", "Finished"))
    return state == "Failed" or (state == "Finished" and not int(info.get("pending_index_rows") or 0))


def _wait_for_lite_index(location: MilvusLocation, name: str, kind: str, show_progress: bool) -> None:
    """Wait while Milvus Lite indexes the flushed rows. It does so in a background thread and its describe_index
    reports every row indexed at once, so the wait goes through its engine (this process runs it); otherwise
    the build would return while the index is still being built, and the process would wait for it at exit
    without saying why. Another milvus-lite version without that engine API is not waited for."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        engine = server_manager_instance._servers[os.path.abspath(location.uri)][1]
        drain = engine.get_collection(name, **({"database_name": location.db_name} if location.db_name else {}))
        drain = drain._wait_for_bg
    except (ImportError, AttributeError, KeyError, TypeError, IndexError):
        return
    with tqdm(total=None, desc=f"Milvus Lite building the {kind} index", bar_format="{desc}: {elapsed}",
              disable=not show_progress) as bar:
        drain()
        bar.update(0)


def open_milvus_gallery(source, collection: Optional[str] = None, token: Optional[str] = None,
                        consistency: str = DEFAULT_CONSISTENCY) -> MilvusGallery:
    """`MilvusGallery.open`: what `open_gallery` runs for a Milvus URI."""
    return MilvusGallery.open(source, collection=collection, token=token, consistency=consistency)


# --------------------------------------------------------------------------------------------
# A standalone server on this machine (tests, benchmarks, trying a server out)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalMilvusServer:
    """A Milvus standalone server from the PyPI package `milvus` (`milvus-server`: the server with its own
    etcd and local storage), with its data, logs and unpacked binaries in `data_dir`.

    Every component's advertised address is 127.0.0.1, so nothing is announced beyond this machine. `start`
    waits until the server answers a client (`uri`), and raises MilvusStoreError with the log's tail if it
    exits or does not answer within `start_timeout` seconds; `stop` ends it by its own process id. Also a
    context manager.
    """

    def __init__(self, data_dir: PathLike, port: Optional[int] = None, start_timeout: float = 180.0):
        self.data_dir = Path(data_dir)
        self.port = port
        self.start_timeout = start_timeout
        self.process: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        script = shutil.which("milvus-server", path=os.path.dirname(sys.executable)) or shutil.which("milvus-server")
        if script is None:
            raise MilvusStoreError("milvus-server is not installed next to this Python: pip install 'decd[milvus]' "
                                   "(the PyPI package milvus)")
        extra = [argument for component in _SERVER_COMPONENTS
                 for argument in ("--extra-config", f"{component}.ip=127.0.0.1")]
        return [script, "--data", str(self.data_dir), "--proxy-port", str(self.port), *extra]

    def start(self) -> "LocalMilvusServer":
        if self.process is not None:
            return self
        self.port = self.port or _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "server.log", "w")
        try:  # a session of its own: `stop` can end the server's child processes with it
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        pymilvus = import_pymilvus(self.uri)
        reason = "it did not open its port"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise MilvusStoreError(f"the Milvus server exited with status {code} while starting; log tail: "
                                       f"{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                with _quiet():
                    client = pymilvus.MilvusClient(uri=self.uri, timeout=5)
                    client.list_collections()
                    client.close()
                return self
            except (OSError, pymilvus.exceptions.MilvusException) as error:
                reason = _reason(error)
                time.sleep(0.5)
        self.stop()
        raise MilvusStoreError(f"the Milvus server did not answer on {self.uri} within {self.start_timeout:g} s "
                               f"({reason}); log tail: {self.log_tail()}")

    def server_pid(self) -> Optional[int]:
        """The process id of the milvus binary (a child of the `milvus-server` launcher), for its memory."""
        if self.process is None:
            return None
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # a process that ended meanwhile
            if int(fields[1]) == self.process.pid:  # the parent's id follows the state
                return int(status.parent.name)
        return None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the launcher's output and of the server's stderr, on one line each joined by ' | '."""
        tail = []
        for name in ("server.log", "logs/milvus-stderr.log"):
            path = self.data_dir / name
            if path.is_file():
                tail += [f"[{name}] {line}" for line in path.read_text(errors="replace").splitlines()[-lines:]]
        return " | ".join(tail) or "(no log)"

    def stop(self) -> None:
        """SIGINT to the launcher (it stops the server), then SIGKILL to its session if it is still there."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # the launcher's session: its id is the launcher's own process id
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def __enter__(self) -> "LocalMilvusServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
