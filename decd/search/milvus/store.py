"""Reaching a Milvus store and its collection: the URI, the connection, the schema, the rows and the index
type a `--backend` names (the collection's layout: docs/milvus.md)."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from ..backends import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, EXACT_BACKEND, check_knobs
from ..display import cut, display_path
from ..errors import IndexNotFoundError, MilvusStoreError
from ..format import PathLike, file_fingerprint, is_index_folder

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
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus's rule for collection and field names
MESSAGE_CHARACTERS = 500  # a Milvus error message is cut after this many characters (it may quote a whole filter)
PATHS_PER_CALL = 10_000  # paths read per call when a gallery is opened (at most 40 MB of 4096-byte paths)
LITE_LOGGER = "milvus_lite"  # the logger of Milvus Lite's engine, which runs in this process
ENGINE_LOG = "decd-engine.log"  # in a Milvus Lite store's folder: where its engine's log records go
ENGINE_LOG_BYTES = 1 << 22  # the engine's log is rotated past this size (one old file kept)


# ---- pymilvus, quietly ---------------------------------------------------------------------------
def import_pymilvus(uri: str = ""):
    """The `pymilvus` module, or an ImportError that says what to install (milvus-lite too for a .db path)."""
    try:
        import pymilvus
    except ImportError as error:
        raise ImportError(f"the Milvus gallery {uri!r} needs pymilvus: pip install 'decd[milvus]' (or pip install "
                          f"pymilvus milvus-lite)") from error
    return pymilvus


def milvus_errors(pymilvus) -> tuple:
    """What a pymilvus call raises when Milvus refuses it: its MilvusException, or gRPC's own error (a client made
    with a token the server no longer accepts gets UNAUTHENTICATED from each call)."""
    import grpc

    return pymilvus.exceptions.MilvusException, grpc.RpcError


_OUR_CALLS = threading.local()  # `depth`: how many of our calls this thread is inside


def _outside_our_calls(record: logging.LogRecord) -> bool:
    """The filter that drops pymilvus's log records (tracebacks of the errors it raises) while this thread is inside
    one of our calls: those errors are re-raised here as one line, and other pymilvus users keep their logs."""
    return not getattr(_OUR_CALLS, "depth", 0)


_PYMILVUS_LOGGERS = ("pymilvus.decorators", "pymilvus.client.iterator.query_iterator",
                     "pymilvus.milvus_client.milvus_client", "pymilvus.client.grpc_handler")


@contextmanager
def milvus_refusals(uri: str, message: Callable[[BaseException], str]):
    """Run Milvus calls quietly (`quiet_pymilvus`); an error Milvus raises becomes MilvusStoreError(message(error)),
    one line. The one place pymilvus's errors are caught."""
    pymilvus = import_pymilvus(uri)
    with quiet_pymilvus():
        try:
            yield
        except milvus_errors(pymilvus) as error:
            raise MilvusStoreError(message(error)) from None


@contextmanager
def quiet_pymilvus():
    for name in _PYMILVUS_LOGGERS:
        if _outside_our_calls not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_outside_our_calls)
    _OUR_CALLS.depth = getattr(_OUR_CALLS, "depth", 0) + 1
    try:
        yield
    finally:
        _OUR_CALLS.depth -= 1


def one_line(error: BaseException, expression: Optional[str] = None) -> str:
    """A Milvus error message on one line of at most MESSAGE_CHARACTERS (Lite points at the column with a line of
    carets: dropped). `expression`: the filter the message is about, which Milvus repeats in it (the user's message
    shows it once, cut if long: `shown_filter`): left out here."""
    if callable(getattr(error, "details", None)) and callable(getattr(error, "code", None)):  # a gRPC error
        message = f"{getattr(error.code(), 'name', error.code())}: {error.details()}"
    else:
        message = str(getattr(error, "message", "") or error)
    lines = [line.strip() for line in message.splitlines() if line.strip() and set(line.strip()) != {"^"}]
    if expression and expression.strip():
        lines = [line.replace(expression.strip(), "(the filter)") for line in lines if line != expression.strip()]
    return cut("; ".join(lines) or type(error).__name__, MESSAGE_CHARACTERS)


class _QuietHandler(RotatingFileHandler):
    """A log file that never writes to the terminal, not even when it cannot be written (then its records are lost)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


_ENGINE_LOG: dict = {}


def route_engine_log(store: Path) -> Path:
    """Send Milvus Lite's log records to ENGINE_LOG in the `store` folder, never to the terminal: one file for all the
    stores this process has open, in the one it opened last (`engine_log`). Lite runs in this process and logs a
    traceback of every request it fails (thousands of lines for a deeply nested filter) with Python's logging, whose
    last-resort handler writes to stderr; the errors themselves reach the user as one line from here, which names
    this file. Returns its path."""
    logger = logging.getLogger(LITE_LOGGER)
    logger.propagate = False
    target = Path(os.path.abspath(store)) / ENGINE_LOG
    if (current := _ENGINE_LOG.get("handler")) is not None and current.baseFilename == str(target):
        return target
    handler = _QuietHandler(target, maxBytes=ENGINE_LOG_BYTES, backupCount=1, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if current is not None:
        logger.removeHandler(current)
        current.close()
    _ENGINE_LOG["handler"] = handler
    return target


def engine_log() -> Optional[str]:
    """The file Milvus Lite's log records go to now (see `route_engine_log`), or None before a store is opened."""
    return getattr(_ENGINE_LOG.get("handler"), "baseFilename", None)


# ---- Naming a store and a collection -------------------------------------------------------------
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
    return path.suffix == ".db" and path.name != ".db" and (
        not path.is_dir() or not any(path.iterdir()) or (path / "LOCK").exists() or (path / "collections").is_dir())


def is_milvus_uri(source: Any) -> bool:
    """Whether `source` names a Milvus store: `http(s)://...`, or a path ending in `.db` (Milvus Lite), optionally
    followed by `/COLLECTION`. A local index folder (it holds meta.json) never is one."""
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip():
        return False
    path = Path(text).expanduser()  # a local index folder named *.db stays a local index (is_index_folder)
    return text.startswith(("http://", "https://")) or (
        (_lite_candidate(path) or _lite_candidate(path.parent)) and not is_index_folder(path))


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
        db_name, named = parts[0] if len(parts) == 2 else "", parts[-1] if parts else None
    else:
        if _lite_candidate(path := Path(text).expanduser()):
            uri = os.path.abspath(path)
        elif _lite_candidate(path.parent):
            uri, named = os.path.abspath(path.parent), path.name
        else:
            raise MilvusStoreError(f"{text!r} is not a Milvus store: give a Milvus Lite path ending in .db "
                                   f"(optionally /COLLECTION) or http://HOST:PORT")
    if collection and named and collection != named:
        raise MilvusStoreError(f"two collection names: {named!r} in {text!r} and {collection!r} (--collection); "
                               f"give one")
    if (name := collection or named) is not None and not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise MilvusStoreError(f"{name!r} is not a valid Milvus name: it must start with a letter or '_' and hold "
                               f"only letters, digits and '_' (at most 255)")
    return MilvusLocation(uri, name, db_name)


def _lite_locked(folder: Path) -> bool:
    """Whether another process holds the Milvus Lite folder's lock (a flock on its LOCK file; closing the file
    releases the lock this takes)."""
    import fcntl

    try:
        with open(folder / "LOCK", "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:  # held, or no LOCK file
        return isinstance(error, BlockingIOError)
    return False


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
        route_engine_log(path)

    def refused(error: BaseException) -> str:
        if location.lite and _lite_locked(Path(location.uri)):
            return (f"Milvus Lite store {display_path(location.uri)!r} is held by another process (Milvus Lite lets "
                    f"one process open a store: a running app, endpoint or build may hold it); stop that process, "
                    f"or serve the gallery from a Milvus server (docs/milvus.md)")
        if location.lite:
            return f"Milvus Lite could not open {display_path(location.uri)!r}: {one_line(error)}"
        return (f"Milvus at {location.uri} does not answer (tried a gRPC connection to "
                f"{urllib.parse.urlsplit(location.uri).netloc} for up to {timeout:g} s: {one_line(error)}); start "
                f"the server, or check the URI and the token (--token / {TOKEN_ENV})")

    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    with milvus_refusals(location.uri, refused):
        return pymilvus.MilvusClient(uri=location.uri, token=token or "", db_name=location.db_name, timeout=timeout)


def call_milvus(location: MilvusLocation, what: str, function, *args, **kwargs):
    """`function(*args, **kwargs)` (a MilvusClient method) with Milvus's errors as one MilvusStoreError line."""
    with milvus_refusals(location.uri, lambda error: f"Milvus refused {what} ({location.describe()}): "
                                                     f"{one_line(error)}"):
        return function(*args, **kwargs)


# ---- Index types (--backend) and their search parameters -----------------------------------------
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
    check_knobs(nprobe, ef_search)
    if kind.startswith("HNSW"):
        return dict(ef=max(int(ef_search or DEFAULT_EF_SEARCH), top_k))
    if kind.startswith("IVF"):
        return dict(nprobe=min(int(nprobe or DEFAULT_NPROBE), int(params.get("nlist") or DEFAULT_NLIST)))
    return {}


# ---- The collection: schema, meta, rows ----------------------------------------------------------
def _data_types(pymilvus) -> dict:
    return {"int": pymilvus.DataType.INT64, "float": pymilvus.DataType.DOUBLE, "str": pymilvus.DataType.VARCHAR}


def json_property(description: dict, key: str) -> Any:
    """The JSON value of property `key` in a collection's description (None when it has none, or not valid JSON)."""
    try:
        return json.loads((description.get("properties") or {}).get(key) or "null")
    except ValueError:
        return None


@dataclass(frozen=True)
class MilvusCollection:
    """One collection of a store, reached through one client: its schema, its `decd.meta` record, its vector index
    and its rows. Every call that Milvus refuses is one MilvusStoreError line naming the collection (`call`)."""

    client: Any
    location: MilvusLocation
    name: str

    @property
    def where(self) -> str:
        """'collection 'crops' in http://host:19530', for messages."""
        return self.location.describe(self.name)

    def call(self, what: str, method: str, *args, **kwargs):
        """The client's `method` on this collection (its name first), Milvus's errors as one line saying `what`."""
        return call_milvus(self.location, what, getattr(self.client, method), self.name, *args, **kwargs)

    def exists(self) -> bool:
        return bool(self.call("looking for the collection", "has_collection"))

    def create(self, schema, properties: dict) -> None:
        self.call("creating the collection", "create_collection", schema=schema, properties=properties)

    def create_gallery(self, dim: int, metadata_types: dict, kind: str, params: dict, meta: dict) -> None:
        """Create a gallery collection (the schema of docs/milvus.md, the vector index `kind` with `params`, the
        `decd.meta` property), loaded."""
        pymilvus = import_pymilvus(self.location.uri)
        schema = pymilvus.MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field(KEY_FIELD, pymilvus.DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, pymilvus.DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field(PATH_FIELD, pymilvus.DataType.VARCHAR, max_length=MAX_PATH_BYTES)
        schema.add_field(SHA_FIELD, pymilvus.DataType.VARCHAR, max_length=64)
        schema.add_field(STAT_FIELD, pymilvus.DataType.VARCHAR, max_length=64)
        for field, kind_of_value in metadata_types.items():
            options = dict(max_length=MAX_TEXT_BYTES) if kind_of_value == "str" else {}
            schema.add_field(field, _data_types(pymilvus)[kind_of_value], **options)
        self.create(schema, {META_PROPERTY: json.dumps(meta)})
        self.set_index(kind, params)

    def set_index(self, kind: str, params: dict, replace: bool = False) -> None:
        """Give the embedding field the index `kind` with `params` (`replace`: instead of the one it has), and load
        the collection. sync=False: pymilvus's own wait for the index asks for a timestamp Milvus Lite cannot give
        (its server thread then logs a traceback); an empty collection's index is ready at once, and a build waits
        for the others at its end (`finish_build`)."""
        if replace:
            self.call("releasing the collection", "release_collection")
            self.call("dropping the old index", "drop_index", VECTOR_FIELD)
        index_params = self.client.prepare_index_params()
        index_params.add_index(field_name=VECTOR_FIELD, index_type=kind, metric_type="IP", index_name=VECTOR_FIELD,
                               params=dict(params))
        self.call("creating the index", "create_index", index_params, sync=False)
        self.load()

    def load(self) -> None:
        self.call("loading the collection", "load_collection")

    def describe(self) -> dict:
        return self.call("describing the collection", "describe_collection")

    def set_property(self, what: str, key: str, value: Any) -> None:
        """Record `value` as JSON in the collection's property `key` (`json_property` reads it)."""
        self.call(what, "alter_collection_properties", properties={key: json.dumps(value)})

    def record(self) -> tuple[Optional[dict], dict]:
        """(the decd.meta object or None when decd-search did not write it, {metadata field: "int"|"float"|"str"})."""
        description = self.describe()
        meta = json_property(description, META_PROPERTY)
        names = {value: key for key, value in _data_types(import_pymilvus(self.location.uri)).items()}
        fields = {field["name"]: names.get(field["type"], "str") for field in description.get("fields", [])
                  if field["name"] not in OWN_FIELDS}
        return (meta if isinstance(meta, dict) and meta.get("format") == MILVUS_FORMAT else None), fields

    def index_info(self) -> dict:
        """describe_index of the embedding field: index_type, its build parameters, state and row counts."""
        return self.call("describing the index", "describe_index", VECTOR_FIELD) or {}

    def index_settings(self, meta: Optional[dict] = None) -> tuple[str, dict]:
        """(index type, build parameters as numbers) from describe_index (a server returns them as strings; Milvus
        Lite returns none: then those that decd.meta, `meta`, recorded for that type)."""
        info = self.index_info()
        kind = str(info.get("index_type") or "FLAT")
        params = {key: int(info[key]) for key in ("M", "efConstruction", "nlist", "m", "nbits") if key in info}
        if not params and meta and meta.get("backend") == kind:
            params = dict(meta.get("index_params") or {})
        return kind, params

    def insert_rows(self, rows: Sequence[dict]) -> list[int]:
        """Insert rows ({field: value}; `gallery_row`), ROWS_PER_CALL per call; returns the keys Milvus assigned,
        in order."""
        return [int(key) for start in range(0, len(rows), ROWS_PER_CALL)
                for key in self.call("inserting rows", "insert", list(rows[start:start + ROWS_PER_CALL]))["ids"]]

    def delete_rows(self, keys: Sequence[int]) -> None:
        keys = [int(key) for key in keys]
        for start in range(0, len(keys), ROWS_PER_CALL):
            self.call("deleting rows", "delete", ids=keys[start:start + ROWS_PER_CALL])

    def pages(self, what: str, fields: Sequence[str], size: int, consistency: str) -> Iterator[list[dict]]:
        """Every row's key and `fields`, `size` rows at a time in key order (a query with a limit returns the smallest
        keys, in order). pymilvus's query_iterator is not used: against a 2.3 server it falls back to a client-side
        timestamp and can miss rows written just before."""
        last = None
        while rows := self.call(what, "query", filter="" if last is None else f"{KEY_FIELD} > {last}", limit=size,
                                output_fields=[KEY_FIELD, *fields], consistency_level=consistency):
            yield rows
            last = max(int(row[KEY_FIELD]) for row in rows)

    def read_rows(self, fields: Sequence[str]) -> dict[str, list[dict]]:
        """Every row's key, path, sha256, stat and metadata `fields`, grouped by path: one Strong read."""
        stored: dict[str, list[dict]] = {}
        total = 0  # rows read
        for rows in self.pages("reading the collection", [PATH_FIELD, SHA_FIELD, STAT_FIELD, *fields], ROWS_PER_CALL,
                               "Strong"):
            for row in rows:
                stored.setdefault(row[PATH_FIELD], []).append(row)
            total += len(rows)
        if total != (expected := self.count_rows("Strong")):  # a page that was not the next keys would leave rows out
            raise MilvusStoreError(f"reading {self.where} returned {total} of its {expected} rows; run the build again")
        return stored

    def read_paths(self, consistency: str = "Strong") -> list[str]:
        """Every row's path, PATHS_PER_CALL at a time in key order (what `MilvusGallery.open` checks; rows written
        meanwhile are checked when a search returns them)."""
        return [row[PATH_FIELD] for rows in self.pages("reading the paths", [PATH_FIELD], PATHS_PER_CALL, consistency)
                for row in rows]

    def count_rows(self, consistency: str, filter: str = "") -> int:
        rows = self.call("counting rows", "query", filter=filter, output_fields=["count(*)"],
                         consistency_level=consistency)
        return int(rows[0]["count(*)"]) if rows else 0


def gallery_row(embedding: np.ndarray, path: str, sha256: str, stat: str, metadata: dict) -> dict:
    """One image's row: its embedding, path, sha256, file stat (`stat_text`) and metadata fields."""
    return {VECTOR_FIELD: np.asarray(embedding, dtype=np.float32), PATH_FIELD: path, SHA_FIELD: sha256,
            STAT_FIELD: stat, **metadata}


def stat_text(path: Path) -> Optional[str]:
    """`file_fingerprint` (size, mtime) as the text of the file_stat field; None when the file is gone."""
    fingerprint = file_fingerprint(path)
    return None if fingerprint is None else ":".join(map(str, fingerprint))
