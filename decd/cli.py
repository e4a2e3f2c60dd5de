"""`decd-search`: index a folder of pedestrian crops, then find people in it by description.

    decd-search index GALLERY_DIR --model MODEL --output INDEX [--batch_size 64] [--no-resume]
                      [--backend exact|HNSW32|IVF4096,Flat|IVF4096,PQ64|...]
    decd-search index GALLERY_DIR --model MODEL --store URI [--collection NAME] [--token T]
                      [--metadata crops.csv] [--backend exact|HNSW|IVF_FLAT|IVF1024,PQ64|...] [--replace]
    torchrun --nproc_per_node N -m decd.cli index GALLERY_DIR --model MODEL --output INDEX    (N processes: CPUs, GPUs)
    accelerate launch --num_processes N -m decd.cli index GALLERY_DIR --model MODEL --output INDEX   (N GPUs)
    decd-search query INDEX "a woman in a red coat" [--model MODEL] [--top_k 10] [--grid out.png]
                      [--no-verify]
                      [--backend exact|faiss] [--nprobe 32] [--ef_search 256] [--rerank 100]
    decd-search query URI [--collection NAME] "a woman in a red coat" [--filter 'camera == "c12"'] [...]
    decd-search query INDEX --image query_crop.png [...]     (search by photo: re-identification)
    decd-search serve GALLERY --model MODEL [--host 127.0.0.1] [--port 8000] [--max_batch 32] [--max_queue 256]

`index` encodes every image under GALLERY_DIR (recursively) into the index folder INDEX; an interrupted run resumes
where it stopped; as N processes (torchrun; `accelerate launch` on GPUs) each encodes its share (same index, bit
for bit, as one process; docs/large-galleries.md). `--backend` also builds an approximate FAISS index
(index-factory string) that `query` then uses.
`--store URI` writes a Milvus collection instead of a folder (`decd.search.MilvusGallery`: a Milvus Lite path
`gallery.db` or `http://host:19530`); a re-run inserts only what is missing or changed and deletes what is gone; on
a server one build writes a collection at a time, and a collection of another folder is refused unless `--replace`
makes it this folder's. `query` prints the ranked images with their cosine similarity (with the rank as a share of
the gallery, `decd.search.describe_match`) and optionally draws them (`--grid`); `--image PATH` ranks the gallery by
image-image similarity to a photo of the person instead of (or besides) a description. By default `query` loads the
model recorded in the index. `serve` answers searches over HTTP, many clients at once (`decd.serve`,
docs/serving.md). User errors (empty description, missing index, index built by another model, ...) print one line
on stderr and exit with status 1; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from captions_decd import caption_problem

from .processes import ProcessCountError, end_processes, process_state
from .search import (SCORE_EXPLANATION, GalleryIndex, GalleryIndexError, MilvusGallery, describe_match, filter_options,
                     open_gallery)
from .search.backends import check_knobs, import_faiss
from .search.display import check_top_k, describe_status, display_path, printable
from .search.format import check_output_folder
from .search.milvus import TOKEN_ENV, is_milvus_uri

EXIT_USER_ERROR = 1


class _UserError(Exception):
    """An error whose message is all the user needs (printed without a traceback)."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decd-search", description="Text-based person search over a folder of pedestrian crops."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{index,query,serve}")

    index = commands.add_parser("index", help="encode a folder of images into a search index")
    index.add_argument("gallery_dir", metavar="GALLERY_DIR", help="folder of person crops (searched recursively)")
    index.add_argument("--model", required=True, help="DECD model folder or Hub id")
    where = index.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", metavar="INDEX", help="index folder to write")
    where.add_argument("--store", metavar="URI",
                       help="write a Milvus collection instead: a Milvus Lite path ending in .db, or http://HOST:19530 "
                            "(docs/milvus.md)")
    index.add_argument("--collection", default=None,
                       help="--store: the collection (default: the gallery folder's name, made a valid Milvus name)")
    index.add_argument("--token", default=None, help=f"--store: a token for a server that needs one (env {TOKEN_ENV})")
    index.add_argument("--metadata", default=None, metavar="CSV",
                       help="--store: a CSV with a `path` column and one column per field to filter on (camera, ...)")
    index.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default: 64)")
    index.add_argument("--no-resume", dest="resume", action="store_false",
                       help="start over instead of resuming an unfinished build in INDEX (--store: drop and rebuild "
                            "the collection)")
    index.add_argument("--replace", action="store_true",
                       help="--store: a collection of another gallery folder becomes this folder's (the rows of "
                            "images this folder lacks are deleted); without it, such a collection is refused")
    index.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.add_argument("--backend", default=None, metavar="SPEC",
                       help="exact (default), or a FAISS index-factory string built for approximate search: "
                            "HNSW32, IVF4096,Flat, IVF4096,PQ64, ... (needs faiss; see docs/large-galleries.md). "
                            "--store: the Milvus index: exact (FLAT), HNSW, IVF_FLAT, IVF1024,PQ64, ... (default: "
                            "the collection's, FLAT for a new one)")
    index.add_argument("--train_size", type=int, default=None,
                       help="gallery vectors that train an IVF/PQ backend (default: 64 per IVF list, at least 65536)")

    query = commands.add_parser("query", help="rank the indexed images for a description")
    query.add_argument("index", metavar="INDEX",
                       help="index folder written by `decd-search index`, or a Milvus store (gallery.db[/COLLECTION], "
                            "http://HOST:19530[/COLLECTION])")
    query.add_argument("descriptions", metavar="DESCRIPTION", nargs="*", help="what the person looks like")
    query.add_argument("--image", dest="images", action="append", default=[], metavar="PATH",
                       help="a photo (crop) of the person: rank the gallery by image similarity (repeatable)")
    query.add_argument("--model", default=None, help="model folder or Hub id (default: the one recorded in INDEX)")
    query.add_argument("--top_k", type=int, default=10, help="results per description (default: 10)")
    query.add_argument("--grid", default=None, metavar="PNG", help="also draw the top-k images into this PNG")
    query.add_argument("--backend", default=None,
                       help="default: the backend INDEX was built with; exact: chunked matrix multiply; "
                            "faiss: faiss.IndexFlatIP (also exact)")
    query.add_argument("--nprobe", type=int, default=None,
                       help="IVF backends: lists visited per query (default 32; more: slower, closer to exact)")
    query.add_argument("--rerank", type=int, default=None, metavar="N",
                       help="approximate backends: re-score the best N candidates exactly from embeddings.npy "
                            "(e.g. 100 for a PQ index)")
    query.add_argument("--ef_search", type=int, default=None,
                       help="HNSW backends: candidate list size (default 256; more: slower, closer to exact)")
    query.add_argument("--collection", default=None, help="Milvus: the collection (default: the store's only one)")
    query.add_argument("--token", default=None, help=f"Milvus: a token for a server that needs one (env {TOKEN_ENV})")
    query.add_argument("--filter", default=None, metavar="EXPRESSION",
                       help="Milvus: rank only the rows matching a Milvus boolean expression over the collection's "
                            "fields, e.g. 'camera == \"c12\" and timestamp >= 1700000000'")
    query.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    query.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip the full read that checks the embeddings' checksum and values (faster for a "
                            "large index already checked)")
    _add_serve_parser(commands)
    return parser


def _add_serve_parser(commands) -> None:
    """`serve GALLERY --model M`: the HTTP service of decd.serve (docs/serving.md)."""
    from .serve import DEFAULT_HOST, DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS, DEFAULT_PORT, MAX_TOP_K

    serve = commands.add_parser("serve", help="answer searches over HTTP, many clients at once (docs/serving.md)")
    serve.add_argument("gallery", metavar="GALLERY",
                       help="an index folder, a folder of images (encoded at start), or a Milvus store")
    serve.add_argument("--model", required=True, help="DECD model folder or Hub id")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 lets any "
                            "machine that reaches this one search and fetch the gallery's images: docs/serving.md)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    serve.add_argument("--collection", default=None, help="Milvus: the collection (default: the store's only one)")
    serve.add_argument("--token", default=None, help=f"Milvus: a token for a server that needs one (env {TOKEN_ENV})")
    serve.add_argument("--max_batch", type=int, default=DEFAULT_MAX_BATCH,
                       help=f"queries per forward pass at most (default {DEFAULT_MAX_BATCH})")
    serve.add_argument("--max_wait_ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                       help=f"how long a batch waits for more queries at most (default {DEFAULT_MAX_WAIT_MS})")
    serve.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                       help=f"queries waiting at most; more are answered 503 (default {DEFAULT_MAX_QUEUE})")
    serve.add_argument("--max_top_k", type=int, default=MAX_TOP_K, help=f"largest top_k (default {MAX_TOP_K})")
    serve.add_argument("--batch_size", type=int, default=64, help="a folder of images: images per forward pass")
    serve.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    serve.add_argument("--threads", type=int, default=None,
                       help="CPU threads of a forward pass (default: the cores but one, left to the HTTP server)")
    serve.add_argument("--no-verify", dest="verify", action="store_false",
                       help="an index folder: skip the full read that checks its embeddings")


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`decd-search`'s command line. `query` takes its options before, between or after the description(s), as
    the synopsis above shows: argparse's intermixed parsing, which works on one subcommand's parser only (not on
    a parser with subparsers), so the query subparser parses the arguments after `query`."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["query"]:  # the top-level parser has no options of its own: the command comes first
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        return commands.choices["query"].parse_intermixed_args(argv[1:], argparse.Namespace(command="query"))
    return parser.parse_args(argv)


def _load_model(name: str, device: Optional[str]):
    """The one model loader (`inference_decd.load_model`); its refusals become one-line user errors."""
    from inference_decd import ModelLoadError, load_model

    try:
        return load_model(name, device)
    except ModelLoadError as error:
        raise _UserError(str(error)) from error


def _require_faiss(backend: str | None) -> None:
    """A one-line user error when `backend` needs faiss and it is not installed."""
    if backend not in (None, "exact"):
        try:
            import_faiss(backend)
        except ImportError as error:
            raise _UserError(str(error)) from error


def _run_index(arguments) -> int:
    if arguments.batch_size < 1:
        raise _UserError(f"--batch_size must be at least 1, got {arguments.batch_size}")
    if not Path(arguments.gallery_dir).is_dir():
        raise _UserError(f"gallery folder {arguments.gallery_dir!r} does not exist")
    if arguments.store is None:
        given = [f"--{name}" for name in ("collection", "token", "metadata") if getattr(arguments, name) is not None]
        given += ["--replace"] if arguments.replace else []
        if given:
            raise _UserError(f"{', '.join(given)} go with --store (a Milvus collection), not --output")
        check_output_folder(arguments.output, arguments.gallery_dir)  # before the (slow) model load
        _require_faiss(arguments.backend)
    elif arguments.train_size is not None:
        raise _UserError("--train_size trains a local FAISS index (--output); Milvus trains its own index")
    else:  # what can be checked before the (slow) model load: the URI, the index type, the CSV, pymilvus
        from .search.milvus.metadata import read_metadata
        from .search.milvus.store import import_pymilvus, milvus_index, parse_location

        location = parse_location(arguments.store, arguments.collection)
        if arguments.backend is not None:
            milvus_index(arguments.backend, location.lite)
        if arguments.metadata is not None:
            read_metadata(arguments.metadata)
        try:
            import_pymilvus(arguments.store)
        except ImportError as error:
            raise _UserError(str(error)) from error
    # The processes a launcher started (torchrun, accelerate launch on GPUs), joined on CPUs too, or this one alone.
    try:
        state = process_state(f"-m decd.cli {shlex.join(arguments.argv)}", arguments.device)
    except ProcessCountError as error:
        raise _UserError(str(error)) from None
    if state.num_processes > 1:
        _report_each_share()
    device = arguments.device if arguments.device is not None or state.num_processes == 1 \
        else state.device  # several processes: this process's GPU, or the CPU
    model, processor = _load_model(arguments.model, device)
    if arguments.store is not None:
        return _run_index_milvus(arguments, model, processor, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped files are printed below instead
        index = GalleryIndex.build(
            model, processor, arguments.gallery_dir, arguments.output, batch_size=arguments.batch_size,
            model_id=arguments.model, resume=arguments.resume, show_progress=not arguments.quiet,
            backend=arguments.backend or "exact", train_size=arguments.train_size, distributed=state,
        )
    if state is not None and not state.is_main_process:
        return 0  # the main process reports
    print(f"Indexed {len(index)} images from {display_path(arguments.gallery_dir)} into {display_path(arguments.output)} "
          f"(model {index.model_id}, checksum {index.model_checksum[:12]}"
          + (f", backend {index.backend}" if index.backend != "exact" else "") + ").")
    _print_skipped(index.skipped, f"unreadable file(s) (listed in {Path(arguments.output) / 'meta.json'})")
    return 0


def _report_each_share() -> None:
    """Several processes: each says on stderr what it encoded (the builds log one line per process)."""
    logger = logging.getLogger("decd.search")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("decd-search index: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _print_skipped(skipped: Sequence[dict], what: str, shown: int = 20) -> None:
    """List the files a build left out (the first `shown`, then a count), names and reasons escaped for the terminal."""
    if not skipped:
        return
    print(f"Skipped {len(skipped)} {what}:")
    for item in skipped[:shown]:
        print(f"  {display_path(item['path'])}: {display_path(item['error'])}")
    if len(skipped) > shown:
        print(f"  ... and {len(skipped) - shown} more")


def _run_index_milvus(arguments, model, processor, state) -> int:
    """`index --store`: write the gallery into a Milvus collection (`MilvusGallery.build`)."""
    from .search.milvus.metadata import MetadataRowsWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", UserWarning)  # the skipped files are printed below instead
            warnings.simplefilter("always", MetadataRowsWarning)  # printed below
            gallery = MilvusGallery.build(
                model, processor, arguments.gallery_dir, arguments.store, collection=arguments.collection,
                token=arguments.token, metadata=arguments.metadata, batch_size=arguments.batch_size,
                model_id=arguments.model, resume=arguments.resume, show_progress=not arguments.quiet,
                backend=arguments.backend, distributed=state, replace=arguments.replace,
            )
    except ImportError as error:  # pymilvus / milvus-lite missing: what to install
        raise _UserError(str(error)) from error
    for warning in caught:
        if issubclass(warning.category, MetadataRowsWarning):
            print(f"Note: {warning.message}", file=sys.stderr)
    if gallery is None:
        return 0  # the main process reports
    changes = gallery.changes
    print(f"Indexed {display_path(arguments.gallery_dir)} into Milvus {gallery.collection.where} "
          f"(model {gallery.model_id}, checksum {gallery.model_checksum[:12]}, index {gallery.backend}): "
          f"{len(gallery)} images; {changes['new']} new, {changes['changed']} changed, {changes['updated']} "
          f"rewritten without re-encoding, {changes['removed']} removed, {changes['unchanged']} unchanged.")
    _print_skipped(gallery.skipped, "file(s) (tried again on the next run)")
    return 0


def _print_table(query: str, paths: Sequence[str], scores: Sequence[float], gallery_size: int,
                 status: Optional[Sequence[Optional[str]]] = None) -> None:
    # names are shown escaped (not UTF-8, control characters); None: a place an approximate backend could not fill
    paths = [display_path(path) if path is not None else "-" for path in paths]
    print(f"Query: {printable(query)}")
    width = max([len("path")] + [len(path) for path in paths])
    print(f"{'rank':>4}  {'score':>7}  {'top %':>7}  path")
    print(f"{'-' * 4}  {'-' * 7}  {'-' * 7}  {'-' * width}")
    for rank, (path, score) in enumerate(zip(paths, scores), start=1):
        match = describe_match(rank, score, gallery_size)
        note = describe_status(status[rank - 1]) if status else ""
        print(f"{rank:>4}  {score:>7.4f}  {match['top_percent']:>6.3g}%  {path}" + (f"  ({note})" if note else ""))
    flagged = sum(1 for state in status or () if state)
    if flagged:
        print(f"{flagged} of these images were deleted or changed since indexing: run `decd-search index` again "
              "to update the index")


def _decode_argument(text: str) -> str:
    """A description from sys.argv: bytes the locale could not decode arrive as lone surrogates
    (surrogateescape); they are decoded as UTF-8 if they are UTF-8, otherwise refused in one line."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:  # lone surrogates that are not escaped bytes, or bytes that are not UTF-8
        raise _UserError(f"the description {display_path(text)!r} is not valid UTF-8 text: set the terminal "
                         f"to UTF-8 (e.g. LANG=C.UTF-8) or type it in ASCII") from None


def _run_query(arguments) -> int:
    descriptions = [_decode_argument(description).strip() for description in arguments.descriptions]
    images = [_decode_argument(image) for image in arguments.images]
    if not descriptions and not images:
        raise _UserError("give a description (what the person looks like) or --image PATH (a photo of the person)")
    for image in images:
        if not Path(image).is_file():
            raise _UserError(f"query image {display_path(image)!r} does not exist")
    if not all(descriptions):
        raise _UserError("the description is empty: say what the person looks like, e.g. \"a woman in a red coat\"")
    for description in descriptions:  # the processor's rule for a caption, said before the model loads
        problem = caption_problem(description)
        if problem is not None:
            raise _UserError(f"the description {printable(description)!r} is {problem}")
    try:
        check_top_k(arguments.top_k, "--top_k")
        check_knobs(arguments.nprobe, arguments.ef_search, arguments.rerank, prefix="--")
    except ValueError as error:
        raise _UserError(str(error)) from None
    if not is_milvus_uri(arguments.index):
        _require_faiss(arguments.backend)  # before the index is read
    try:
        index = open_gallery(None, None, arguments.index, verify=arguments.verify,  # the model: below
                             collection=arguments.collection, token=arguments.token)
    except ImportError as error:  # a Milvus store without pymilvus / milvus-lite: what to install
        raise _UserError(str(error)) from error
    search_options = filter_options(index, arguments.filter)
    backend = arguments.backend
    if isinstance(index, GalleryIndex):  # a local index: exact, faiss, or the FAISS index it was built with
        backend = backend or index.backend
        if backend not in ("exact", "faiss", index.backend):
            raise _UserError(f"--backend must be exact, faiss or {index.backend} (the backend "
                             f"{display_path(arguments.index)!r} was built with), got {backend!r}")
        _require_faiss(backend)
    model_name = arguments.model or index.model_id
    if not model_name or model_name.startswith("<in-memory"):
        raise _UserError(f"the index {display_path(arguments.index)!r} records no loadable model ({model_name}); pass --model")
    model, processor = _load_model(model_name, arguments.device)
    index.verify_model(model, model_name)  # the stale-model check, for text and image queries alike
    queries, rows = [], []  # (label, SearchResult, row) per query, in the order given
    ann_options = dict(nprobe=arguments.nprobe, ef_search=arguments.ef_search, rerank=arguments.rerank,
                       **search_options)
    if descriptions:
        result = index.search_text(model, processor, descriptions, top_k=arguments.top_k, backend=backend,
                                   verify=False, **ann_options)
        queries += [f'"{description}"' for description in descriptions]
        rows += [(result, row) for row in range(len(descriptions))]
    if images:
        try:
            result = index.search_image(model, processor, images, top_k=arguments.top_k, backend=backend,
                                        verify=False, **ann_options)
        except ValueError as error:  # load_image: unreadable / not an image, naming the file
            raise _UserError(str(error)) from error
        queries += [f"photo {display_path(image)}" for image in images]
        rows += [(result, row) for row in range(len(images))]
    print(f"{SCORE_EXPLANATION}\n")
    for number, (query, (result, row)) in enumerate(zip(queries, rows)):
        if number:
            print()
        _print_table(query, result.paths[row], result.scores[row].tolist(), result.searched,
                     result.status[row] if getattr(result, "status", None) else None)
        if not result.paths[row] or result.paths[row][0] is None:
            print(f"(no image matches --filter {arguments.filter})" if arguments.filter else "(no image)")
    if arguments.grid:
        from .visualize import retrieval_grid

        # Only the shown images are passed (and opened): {gallery row: its path}.
        ranked = [result.indices[row].tolist() for result, row in rows]
        shown = {gallery_index: index.image_path(gallery_index) for row in ranked for gallery_index in row
                 if gallery_index >= 0}  # -1: a place an approximate backend could not fill (drawn empty)
        try:
            grid = retrieval_grid(
                [query.strip('"') for query in queries], shown, ranked, None, arguments.grid, top_k=arguments.top_k,
                title=f"Top {len(ranked[0])} of {rows[0][0].searched} images"
                      + (f" where {printable(arguments.filter)}" if arguments.filter else ""),
                scores=[result.scores[row].tolist() for result, row in rows],
            )
        except ValueError as error:  # load_image names the missing or unreadable file
            raise _UserError(f"could not draw the grid: {error} (was the gallery moved since indexing?)") from error
        print(f"\nWrote {grid}")
    return 0


def _run_serve(arguments) -> int:
    """`serve`: open the gallery (checked against the model), then answer HTTP requests until interrupted."""
    try:
        import uvicorn  # noqa: F401

        from .serve import create_app, run
    except ImportError as error:  # fastapi / uvicorn: the `serve` extra
        raise _UserError(f"serving needs FastAPI and uvicorn: pip install 'decd[serve]' ({error})") from error
    for name in ("max_batch", "max_queue", "max_top_k", "batch_size", "threads"):
        if getattr(arguments, name) is not None and getattr(arguments, name) < 1:
            raise _UserError(f"--{name} must be at least 1, got {getattr(arguments, name)}")
    if not arguments.max_wait_ms >= 0:
        raise _UserError(f"--max_wait_ms must be at least 0, got {arguments.max_wait_ms}")
    import torch

    from .serve import default_threads

    torch.set_num_threads(arguments.threads or default_threads())
    model, processor = _load_model(arguments.model, arguments.device)
    try:
        gallery = open_gallery(model, processor, arguments.gallery, batch_size=arguments.batch_size,
                               show_progress=True, verify=arguments.verify, model_id=arguments.model,
                               collection=arguments.collection, token=arguments.token)
    except ImportError as error:  # a Milvus store without pymilvus / milvus-lite
        raise _UserError(str(error)) from error
    app = create_app(model, processor, gallery, source=display_path(arguments.gallery),
                     max_batch=arguments.max_batch, max_wait_ms=arguments.max_wait_ms, max_queue=arguments.max_queue,
                     max_top_k=arguments.max_top_k)
    print(f"Serving {len(gallery)} images of {display_path(arguments.gallery)} on "
          f"http://{arguments.host}:{arguments.port} (API: /docs)", file=sys.stderr)
    if arguments.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {arguments.host}: any machine that reaches this one can search the gallery and fetch "
              "its images, without authentication (docs/serving.md)", file=sys.stderr)
    run(app, arguments.host, arguments.port)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `decd-search`; returns the exit status (0 on success, 1 on a user error)."""
    arguments = parse_arguments(argv)
    arguments.argv = list(sys.argv[1:] if argv is None else argv)  # named again in a message on how to launch it
    try:
        if arguments.command == "index":
            return _run_index(arguments)
        if arguments.command == "serve":
            return _run_serve(arguments)
        return _run_query(arguments)
    except (_UserError, GalleryIndexError) as error:
        print(f"decd-search {arguments.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"decd-search {arguments.command}: interrupted"
              + ("; run the same command again to resume" if arguments.command == "index" else ""), file=sys.stderr)
        return 130
    finally:
        end_processes()


if __name__ == "__main__":
    sys.exit(main())
