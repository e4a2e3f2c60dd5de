"""`decd-search serve`: a gallery searched over HTTP by many clients at once, one forward pass per batch of queries.

`SearchBatcher` gathers concurrent searches (from the service's requests or the app's events) into batches and
answers each batch with one text forward pass and one image forward pass; `GalleryFiles` names the image files a
gallery may serve; `create_app` is the FastAPI application (`POST /search`, `GET /images/...`, `GET /health`,
`/docs`). How to run it, the API, and why FastAPI with uvicorn: docs/serving.md.
"""

# No `from __future__ import annotations`: FastAPI reads the request model from the handler's annotation at runtime.
import asyncio
import dataclasses
import json
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import torch

from captions_decd import caption_problem
from inference_decd import decode_base64, embed_images, embed_texts

from .search import GalleryIndex, GalleryIndexError, SearchResult, check_top_k, describe_matches, filter_options
from .search.format import path_problem

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_TOP_K = 10
MAX_TOP_K = 100  # results per request by default (--max_top_k): an answer stays a small JSON document
DEFAULT_MAX_BATCH = 32  # queries per forward pass
DEFAULT_MAX_WAIT_MS = 2.0  # how long a batch's first query waits for company while the model is idle
DEFAULT_MAX_QUEUE = 256  # queries waiting for the model; one more is answered 503 (Retry-After)
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a request's body (a base64 image is 4/3 of its file)
REQUEST_KEYS = ("text", "image", "top_k", "filter")


def default_threads() -> int:
    """Threads for the forward passes on a CPU: every core this process may use but one, which the server's event
    loop (HTTP, JSON) needs; more threads than free cores make each forward pass wait for the slowest thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


class Overloaded(Exception):
    """The batcher's queue is full: answer 503 and ask the client to come back in `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the search queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class RequestError(ValueError):
    """A request the service refuses, naming the field at fault (None: the body as a whole)."""

    def __init__(self, field: Optional[str], message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Query:
    """One search: a description (`text`) or a photo already opened by `load_image` (`image`), `top_k` results,
    and a Milvus `filter` expression (None: the whole gallery)."""

    text: Optional[str] = None
    image: Any = None
    top_k: int = DEFAULT_TOP_K
    filter: Optional[str] = None


_STOP = object()


class SearchBatcher:
    """Answers searches submitted from any thread with one forward pass per batch (dynamic batching).

    A worker thread takes the first waiting query, then whatever else arrives within `max_wait_ms` (without
    waiting once `max_batch` are in), embeds the batch's descriptions in one `embed_texts` call and its photos in
    one `embed_images` call, and ranks the gallery with `gallery.search` once per distinct (top_k, filter) in the
    batch: the two steps of `gallery.search_text` / `search_image`, with the forward pass shared. Each query gets
    the `SearchResult` (one row) that `gallery.search` gives it alone, up to float noise (descriptions are padded
    to the batch's longest; each row is still encoded on its own). At most `max_queue` queries wait: `submit`
    raises `Overloaded` beyond that, so a burst is refused at once instead of waiting without limit.

    The model and the gallery are used by the worker thread only (the caller checked the gallery against the
    model when it opened it).
    """

    def __init__(self, model, processor, gallery, max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_queue: int = DEFAULT_MAX_QUEUE):
        for name, value, least in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                   ("max_wait_ms", max_wait_ms, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least \
                    or (name != "max_wait_ms" and not float(value).is_integer()) or not math.isfinite(value):
                raise ValueError(f"{name} must be a{' whole' if name != 'max_wait_ms' else ''} number of at least "
                                 f"{least}, got {value!r}")
        self.model, self.processor, self.gallery = model, processor, gallery
        self.max_batch, self.max_queue, self.max_wait = int(max_batch), int(max_queue), max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue(self.max_queue)
        self._batch_seconds = 0.05  # running mean of a batch's time, for Retry-After
        self.batches = self.queries = 0
        self._thread = threading.Thread(target=self._run, name="decd-search-batcher", daemon=True)
        self._thread.start()

    # ---- callers --------------------------------------------------------------------------------------------
    def submit(self, query: Query) -> Future:
        """Queue `query`; a Future of its `SearchResult` (one row). Raises `Overloaded` when the queue is full."""
        if not self._thread.is_alive():
            raise RuntimeError("the search batcher is closed")
        future: Future = Future()
        try:
            self._queue.put_nowait((query, future))
        except queue.Full:
            raise Overloaded(self.retry_after()) from None
        return future

    def search(self, query: Query, timeout: Optional[float] = None) -> SearchResult:
        """`submit` and wait for the answer (for threads: the app's event handlers)."""
        return self.submit(query).result(timeout)

    async def search_async(self, query: Query) -> SearchResult:
        """`submit` and await the answer (for coroutines: the service's request handlers)."""
        return await asyncio.wrap_future(self.submit(query))

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Whole seconds until the queue has room again, from the recent time per batch (at least 1)."""
        return max(1, math.ceil((self._queue.qsize() / self.max_batch + 1) * self._batch_seconds))

    def close(self, timeout: float = 30.0) -> None:
        """Answer what is queued, then stop the worker."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # ---- the worker -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch, stop = self._collect()
            if batch:
                started = time.perf_counter()
                self._answer(batch)
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)
                self.batches += 1
                self.queries += len(batch)
            if stop:
                return

    def _collect(self) -> tuple[list, bool]:
        """(the next batch, whether a stop came): the first query waits as long as needed, the others at most until
        `max_wait` after it; what is queued already is taken at once."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    @torch.no_grad()
    def _answer(self, batch: list) -> None:
        live = [(query, future) for query, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        embeddings: list = [None] * len(live)
        try:
            for kind, embed, extra in (("text", embed_texts, {}), ("image", embed_images, {"show_progress": False})):
                rows = [number for number, (query, _) in enumerate(live) if getattr(query, kind) is not None]
                if rows:  # one forward pass for all of this kind
                    found = embed(self.model, self.processor, [getattr(live[row][0], kind) for row in rows],
                                  batch_size=len(rows), **extra)
                    for position, row in enumerate(rows):
                        embeddings[row] = found[position]
        except BaseException as error:  # noqa: BLE001 - every caller gets the error, the worker goes on
            for _, future in live:
                future.set_exception(error)
            return
        groups: dict[tuple, list[int]] = {}
        for number, (query, _) in enumerate(live):
            groups.setdefault((query.top_k, query.filter), []).append(number)
        for (top_k, expression), rows in groups.items():
            try:
                result = self.gallery.search(torch.stack([embeddings[row] for row in rows]), top_k=top_k,
                                             **filter_options(self.gallery, expression))
            except BaseException as error:  # noqa: BLE001 - e.g. a filter Milvus rejects: these callers only
                for row in rows:
                    live[row][1].set_exception(error)
                continue
            for position, row in enumerate(rows):
                live[row][1].set_result(_one_row(result, position))


def _one_row(result: SearchResult, row: int) -> SearchResult:
    """Row `row` of a batch's result, as the search of that query alone returns it."""
    return dataclasses.replace(
        result, scores=result.scores[row:row + 1].clone(), indices=result.indices[row:row + 1].clone(),
        paths=None if result.paths is None else result.paths[row:row + 1],
        status=None if getattr(result, "status", None) is None else result.status[row:row + 1])


class GalleryFiles:
    """The image files a gallery names, found by their path relative to the gallery folder: what may be served.

    A local gallery's paths are known up front (a set); a Milvus gallery is asked whether it holds a row with that
    path (a one-row filtered search), and the answers are remembered (`cache_size` of them). Anything else (a file
    beside the gallery's images, the index folder, `..`) is not found, nor is a path `decd.search.format.path_problem`
    refuses (one that leaves the folder `root`, through `..` or a symbolic link made since the gallery was opened).
    """

    def __init__(self, gallery, root: Optional[Path] = None, cache_size: int = 4096):
        self.gallery = gallery
        root = root if root is not None else getattr(gallery, "gallery_dir", None)
        self.root = Path(root) if root is not None else None
        local = isinstance(gallery, GalleryIndex)
        self._names = frozenset(gallery.paths or ()) if local else None
        self._known: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def file(self, relative: str) -> Optional[Path]:
        """The file of the gallery image `relative`, or None when the gallery names no such image (or it is gone)."""
        if not isinstance(relative, str) or path_problem(relative, self.root) is not None or not self._named(relative):
            return None
        path = self.root / relative if self.root is not None else Path(relative)
        return path if path.is_file() else None

    def _named(self, relative: str) -> bool:
        if self._names is not None:
            return relative in self._names
        with self._lock:
            if relative in self._known:
                self._known.move_to_end(relative)
                return self._known[relative]
        probe = torch.zeros(1, self.gallery.embedding_dim)
        probe[0, 0] = 1.0  # any query: the filter decides whether a row comes back
        expression = f"path == {json.dumps(relative, ensure_ascii=False)}"
        try:
            found = self.gallery.search(probe, top_k=1, filter=expression).indices  # [1, 0] when no row matches
            named = found.shape[1] > 0 and int(found[0, 0]) >= 0
        except GalleryIndexError:  # a path Milvus cannot even express: not a gallery image
            named = False
        with self._lock:
            self._known[relative] = named
            while len(self._known) > self._cache_size:
                self._known.popitem(last=False)
        return named


def image_endpoint(files: GalleryFiles):
    """The `GET /images/{path}` handler of the service and the app: the gallery's image file, served in place, or 404
    for anything the gallery does not name."""
    from fastapi.responses import FileResponse, JSONResponse

    async def image(path: str):
        """An image of the gallery, by the `path` a search returned; nothing else is served."""
        found = await asyncio.to_thread(files.file, path)
        if found is None:
            return JSONResponse({"detail": f"the gallery has no image {path!r}", "field": "path"}, status_code=404)
        return FileResponse(found)

    return image


def image_url(relative: str, prefix: str = "/images/") -> str:
    """The URL path under which `GalleryFiles` serves the gallery image `relative`."""
    return prefix + quote(relative)


def decode_image(data: str, processor) -> Any:
    """A request's base64 image (a data: URL, line breaks allowed) opened by the processor's `load_image`; a
    `RequestError` naming "image" when it is not base64 or not a readable image."""
    try:
        return processor.load_image(decode_base64(data, "image"), name="image")
    except ValueError as error:
        raise RequestError("image", str(error)) from None


def check_query(text: Optional[str], image: Optional[str], top_k: Any, expression: Optional[str], processor,
                gallery, max_top_k: int = MAX_TOP_K) -> Query:
    """A `Query` from a request's fields, each checked by its one rule: a description has a word
    (`caption_problem`), a photo decodes (`decode_image`), `top_k` is a positive whole number (`check_top_k`) up to
    `max_top_k`, a filter goes to a gallery that can filter (`filter_options`). Raises `RequestError` naming the
    field."""
    if (text is None) == (image is None):
        raise RequestError(None, 'send either "text" (a description) or "image" (a base64 photo), not both or neither')
    try:
        top_k = check_top_k(top_k)
    except ValueError as error:
        raise RequestError("top_k", str(error)) from None
    if top_k > max_top_k:
        raise RequestError("top_k", f"top_k must be at most {max_top_k}, got {top_k}")
    try:
        filter_options(gallery, expression)
    except GalleryIndexError as error:
        raise RequestError("filter", str(error)) from None
    if text is not None:
        problem = caption_problem(text)
        if problem is not None:
            raise RequestError("text", f"text is {problem}: describe the person (clothes, colours, bags, ...)")
        return Query(text=text, top_k=top_k, filter=expression or None)
    return Query(image=decode_image(image, processor), top_k=top_k, filter=expression or None)


def matches(result: SearchResult) -> list[dict]:
    """A one-row result as the service answers it: `describe_matches` (rank, score, top_percent, label, path,
    file_status) plus `image_url`, places nothing filled left out."""
    found = [match for match in describe_matches(result) if match["index"] >= 0]
    for match in found:
        if match.get("path") is not None:
            match["image_url"] = image_url(match["path"])
    return found


def create_app(model, processor, gallery, *, source: str = "", max_batch: int = DEFAULT_MAX_BATCH,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_queue: int = DEFAULT_MAX_QUEUE,
               max_top_k: int = MAX_TOP_K, max_request_bytes: int = MAX_REQUEST_BYTES,
               images_root: Optional[Path] = None):
    """The FastAPI application serving `gallery` (opened and checked against `model` by `open_gallery`).

    Routes: `POST /search`, `GET /images/{path}`, `GET /health`, and FastAPI's `/docs` and `/openapi.json`.
    The batcher is `app.state.batcher`; it stops when the application shuts down.
    """
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    batcher = SearchBatcher(model, processor, gallery, max_batch=max_batch, max_wait_ms=max_wait_ms,
                            max_queue=max_queue)
    files = GalleryFiles(gallery, images_root)

    class SearchRequest(BaseModel):
        """Exactly one of `text` and `image`."""

        model_config = ConfigDict(extra="forbid", strict=True)
        text: Optional[str] = Field(None, description="what the person looks like", examples=[
            "a woman in a red coat carrying a black backpack"])
        image: Optional[str] = Field(None, description="a photo (crop) of the person: the image file in base64, or a "
                                                       "data: URL; ranks the gallery by image similarity")
        top_k: int | float = Field(DEFAULT_TOP_K, description=f"results (a whole number, 1 to {max_top_k})")
        filter: Optional[str] = Field(None, description='a Milvus gallery: a boolean expression over its fields, e.g. '
                                                        'camera == "c12"')

    class Match(BaseModel):
        index: int = Field(description="the gallery row (a Milvus gallery: the row's key)")
        rank: int
        score: float = Field(description="cosine similarity of the query's and the image's embeddings (-1 to 1)")
        top_percent: float = Field(description="the rank as a share of the images searched, in percent")
        label: str
        path: Optional[str] = Field(None, description="the image, relative to the gallery folder")
        image_url: Optional[str] = Field(None, description="where this service serves the image")
        file_status: Optional[str] = Field(None, description='"deleted" or "changed" since indexing')

    class SearchResponse(BaseModel):
        results: list[Match]
        searched: int = Field(description="images ranked: the gallery, or those the filter let through")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="DECD text-based person search", lifespan=lifespan,
                  description="Rank a gallery of pedestrian crops by a description or a photo. docs/serving.md")
    app.state.batcher, app.state.files = batcher, files

    def refuse(status: int, field: Optional[str], message: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"detail": message, "field": field}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input (a whole base64 image); this one names the field in one line.
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = where[0] if where else None
        if first.get("type") == "extra_forbidden":
            message = (f"unknown key {field!r}; the accepted ones are "
                       f"{', '.join(repr(key) for key in REQUEST_KEYS)}")
        elif first.get("type") == "json_invalid" or field is None:
            message = ('the body must be a JSON object such as {"text": "a man in a blue jacket", "top_k": 5} '
                       f"({first.get('msg', 'not valid')})")
            field = None
        else:
            message = f"{field}: {first.get('msg', 'not valid')}"
        return refuse(422, field, message)

    app.add_middleware(_BodyLimit, limit=max_request_bytes)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True,
              responses={422: {"description": "a bad request; `field` names the field"},
                         413: {"description": "the body is larger than the limit"},
                         503: {"description": "too many searches waiting; retry after `Retry-After` seconds"}})
    async def search(body: SearchRequest):
        """Rank the gallery for a description (`text`) or a photo (`image`): the best `top_k`, best first."""
        try:
            if body.image is not None:  # decoding an image is work: off the event loop
                query = await asyncio.to_thread(check_query, body.text, body.image, body.top_k, body.filter,
                                                processor, gallery, max_top_k)
            else:
                query = check_query(body.text, body.image, body.top_k, body.filter, processor, gallery, max_top_k)
            result = await batcher.search_async(query)
        except RequestError as error:
            return refuse(422, error.field, str(error))
        except Overloaded as busy:
            return refuse(503, None, str(busy), headers={"Retry-After": str(busy.retry_after)})
        except GalleryIndexError as error:  # e.g. a filter Milvus rejects
            return refuse(400, "filter" if body.filter else None, str(error))
        return {"results": matches(result), "searched": int(result.searched)}

    app.add_api_route("/images/{path:path}", image_endpoint(files), methods=["GET"], response_class=FileResponse,
                      responses={404: {"description": "the gallery names no such image"}})

    @app.get("/health")
    async def health() -> dict:
        """200 once the model and the gallery are loaded (they are before the server listens)."""
        return {"status": "ok", "gallery": source, "images": len(gallery), "model": getattr(gallery, "model_id", None),
                "waiting": batcher.waiting, "max_queue": batcher.max_queue}

    return app


class _BodyLimit:
    """ASGI middleware: a request whose Content-Length is over `limit` bytes is answered 413 before its body is read
    (a body sent without a length is read as FastAPI reads any)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                from fastapi.responses import JSONResponse

                message = f"the body has {int(length):,} bytes, more than the limit of {self.limit:,}"
                await JSONResponse({"detail": message, "field": None}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def run(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "GalleryFiles", "Overloaded", "Query", "RequestError", "SearchBatcher",
           "check_query", "create_app", "decode_image", "default_threads", "image_endpoint", "image_url", "matches",
           "run"]
