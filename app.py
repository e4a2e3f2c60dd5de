"""DECD person-search demo: describe a person (or drop a photo of them), see the best-matching crops of a gallery.

A Gradio Blocks app, ready for a Hugging Face Space (Spaces run ``python app.py``). Gradio is an
optional extra of the ``decd`` package (Gradio 6): ``pip install "decd[app]"`` or
``pip install -r requirements-app.txt``.

Configuration (a command-line option wins over its environment variable):

==================  =================  ==========================================================
option              environment        meaning
==================  =================  ==========================================================
``--model``         ``DECD_MODEL``     a DECD model folder (``save_pretrained``) or Hub id, loaded
                                       by ``inference_decd.load_model`` like every entry point
``--gallery``       ``DECD_GALLERY``   a folder of images (searched recursively, encoded at
                                       startup), an index folder written by
                                       ``decd.search.GalleryIndex.build`` / ``decd-search index``,
                                       or a Milvus collection (``gallery.db/crops``,
                                       ``http://host:19530/crops``; a filter box appears when it
                                       has metadata fields); default: the synthetic benchmark's
                                       test split (generated once, offline, cached), with
                                       examples from its captions
``--collection``    ``DECD_COLLECTION``  the Milvus collection, when the URI names none
(none)              ``DECD_MILVUS_TOKEN``  a token for a Milvus server that needs one
``--images-root``   ``DECD_IMAGES``    where an index's images are, if not where it was built
``--host``          ``GRADIO_SERVER_NAME``  default 127.0.0.1 (Spaces set 0.0.0.0 themselves)
``--port``          ``GRADIO_SERVER_PORT``  default 7860
``--device``        ``DECD_DEVICE``    cpu / cuda (default: cuda if available)
==================  =================  ==========================================================

A Space published by ``decd.hub.publish_space`` (``scripts/push_space.py``) carries ``space_config.json``
next to this file with the model id (and gallery folder), used when neither is set.

In the page: Enter in the description box searches; a photo (upload / drop / paste a crop) ranks the
gallery by image similarity; Top-k re-runs the last search; examples run when clicked; problems are
written in the status line above the results (which stay). Captions read "#rank · score · top p% of N ·
file", explained under the results (``decd.search.SCORE_EXPLANATION``).

Examples::

    python app.py --model path/to/decd-model --gallery path/to/crops
    DECD_MODEL=user/decd-cuhk-pedes DECD_GALLERY=gallery_index python app.py --port 7861

In code (tests do this)::

    model, processor = load_model("path/to/decd-model")
    gallery = load_gallery(model, processor, "path/to/crops")
    build_demo(model, processor, gallery).launch(prevent_thread_lock=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

# The checkout's flat modules and `decd` package sit next to this file (as they do in a Space).
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from decd.search import (SCORE_EXPLANATION, GalleryIndex, GalleryIndexError, SkippedImagesWarning,  # noqa: E402
                         check_top_k, describe_match, filter_options, open_gallery)
from decd.search import Gallery as SearchableGallery  # noqa: E402
from decd.search.format import check_gallery_paths  # noqa: E402
from decd.search.milvus import is_milvus_uri  # noqa: E402
from decd.serve import GalleryFiles, Query, SearchBatcher, default_threads, image_endpoint, image_url  # noqa: E402
from inference_decd import ModelLoadError  # noqa: E402
from inference_decd import load_model as spine_load_model  # noqa: E402

PathLike = Union[str, os.PathLike]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_TOP_K = 10
MAX_TOP_K = 50
# Searches the app runs at once (Gradio's default is one): those that arrive together share one forward pass.
CONCURRENCY = 32
# Sessions Gradio keeps (its default is 10,000): each API call is a session holding a copy of the page's
# configuration, so scripts calling the API fill memory until that many are held.
SESSIONS = 1000
EXAMPLE_DESCRIPTIONS = (
    "A woman with long black hair, wearing a white t-shirt, blue jeans and white sneakers.",
    "A man in a dark jacket and black trousers, carrying a backpack.",
    "A young person wearing a red top, a short skirt and carrying a handbag.",
)


EMPTY_QUERY_MESSAGE = "Describe the person you are looking for (clothes, colours, bags, hair, ...), then press Enter."
# Written next to app.py by `decd.hub.publish_space` (a Space has no command line): defaults for
# --model / --gallery, below the command line and the environment.
SPACE_CONFIG_FILE = "space_config.json"


class AppConfigError(Exception):
    """A startup problem the user can fix (missing model or gallery): printed as one message, no traceback."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def load_model(name: PathLike, device: Optional[Union[str, torch.device]] = None):
    """(model, processor) in eval mode on `device`, through the one loader (`inference_decd.load_model`).

    `name` is a DECD folder or a Hub id; problems become an `AppConfigError` with one readable line.
    """
    name = str(name)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise AppConfigError(f"DECD_MODEL {name!r} is a file; give a model folder or a Hub id")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name):
        raise AppConfigError(f"model folder {name!r} does not exist (DECD_MODEL / --model)")
    try:
        return spine_load_model(path if path.is_dir() else name, device)
    except ModelLoadError as error:
        raise AppConfigError(str(error)) from error


# --------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------


@dataclass
class Gallery:
    """A searchable gallery: what `open_gallery` opened (`index`) and where its images are (`root`).

    `index` does the ranking (a `decd.search.GalleryIndex`: exact cosine top-k, or a `MilvusGallery`); the
    images of its results are `root / path`. For a local gallery, `paths[i]` is the image of row i and
    `embeddings` is `index.embeddings` ([count, dim] float32, possibly memory-mapped); a Milvus gallery
    (possibly more rows than fit in memory) lists none: `paths` is empty.
    """

    paths: list[Path]
    index: SearchableGallery
    source: str
    image_roots: list[Path] = field(default_factory=list)  # folders the app serves the images from
    notes: list[str] = field(default_factory=list)
    root: Optional[Path] = None  # the folder the index's relative paths are under
    _searcher: Optional[tuple] = field(default=None, repr=False, compare=False)

    def searcher(self, model, processor) -> SearchBatcher:
        """The `decd.serve.SearchBatcher` that answers this gallery's searches with `model` (made on first use): the
        app's concurrent searches share its forward passes, as the service's do."""
        with _SEARCHER_LOCK:
            if self._searcher is None or self._searcher[0] is not model:
                self._searcher = (model, SearchBatcher(model, processor, self.index))
            return self._searcher[1]

    @property
    def embeddings(self):
        return self.index.embeddings

    @property
    def filter_fields(self) -> dict:
        """The metadata fields a filter can use ({} for a gallery without any: no filter box)."""
        return dict(getattr(self.index, "metadata_fields", None) or {})

    def image(self, relative: str) -> Path:
        return (self.root / relative).resolve() if self.root is not None else Path(relative).resolve()

    def __len__(self) -> int:
        return len(self.index)


_SEARCHER_LOCK = threading.Lock()


def check_gallery_path(gallery: Optional[PathLike]) -> Union[Path, str]:
    """`gallery` as a Path (a Milvus URI as it is), or AppConfigError saying what to set when it is missing or
    not a folder."""
    if gallery is None or str(gallery).strip() == "":
        raise AppConfigError("no gallery given: set DECD_GALLERY (or --gallery) to a folder of person crops "
                             "or to an index folder built with `decd-search index`")
    if is_milvus_uri(gallery):  # opened (and checked) by open_gallery
        return str(gallery)
    path = Path(gallery).expanduser()
    if not path.exists():
        raise AppConfigError(f"gallery {str(path)!r} does not exist (DECD_GALLERY / --gallery): give a folder of "
                             f"person crops or an index folder built with `decd-search index`")
    if not path.is_dir():
        raise AppConfigError(f"gallery {str(path)!r} is not a folder (DECD_GALLERY / --gallery)")
    return path


def load_gallery(
    model,
    processor,
    gallery: PathLike,
    batch_size: int = 32,
    images_root: Optional[PathLike] = None,
    show_progress: bool = True,
    verify: bool = True,
    collection: Optional[str] = None,
) -> Gallery:
    """The gallery to search, opened by `decd.search.open_gallery`: an index folder (loaded), an image
    folder (encoded now, tqdm bar; unreadable images are left out and counted in `notes`) or a Milvus
    collection (`collection` names it when the URI does not; token: $DECD_MILVUS_TOKEN).

    Raises AppConfigError with a readable message when the folder is missing or holds no images, or when
    the index was built with another model (`verify`; False also skips the index's full checksum read).
    """
    path = check_gallery_path(gallery)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedImagesWarning)  # reported in the notes below instead
            index = open_gallery(model, processor, path, batch_size=batch_size, show_progress=show_progress,
                                 verify=verify, collection=collection)
    except GalleryIndexError as error:  # missing/unfinished/stale index, no readable images, Milvus errors...
        raise AppConfigError(str(error)) from error
    except (OSError, ImportError) as error:
        raise AppConfigError(f"could not read the gallery {str(path)!r}: {error}") from error
    if not isinstance(index, GalleryIndex):  # a Milvus collection: its images are listed per search only
        root = Path(images_root).expanduser() if images_root is not None else index.gallery_dir
        return Gallery([], index, source=f"Milvus {index.collection.where}",
                       image_roots=[root.resolve()] if root is not None else [], root=root)
    built = index.path is not None  # an index folder, not a folder encoded just now
    root = _index_images_root(index, path, images_root) if built else path
    if built and images_root is not None:  # the index's paths were checked against its own folder: now against this
        try:
            check_gallery_paths(index.paths, root, f"index {str(path)!r} in the images root {str(root)!r}")
        except GalleryIndexError as error:
            raise AppConfigError(str(error)) from error
    paths = [(root / relative).resolve() for relative in index.paths]
    notes = []
    missing = sum(1 for image in paths[:100] if not image.is_file()) if built else 0
    if missing:
        notes.append(f"{missing} of the first {min(100, len(paths))} indexed images are missing under "
                     f"{root} (set DECD_IMAGES / --images-root to the gallery folder)")
    if index.skipped:
        notes.append(f"{len(index.skipped)} unreadable image(s) were left out"
                     + (" when the index was built" if built else " (not images, or damaged)"))
    return Gallery(paths, index, source=f"{'index' if built else 'folder'} {path}", image_roots=[root.resolve()],
                   notes=notes, root=root)


def _index_images_root(index: GalleryIndex, index_folder: Path, images_root: Optional[PathLike]) -> Path:
    """Where the index's relative paths live: `images_root`, else the folder it was built from, which must exist
    (an AppConfigError at start otherwise: no other folder is guessed, and so none is served by mistake)."""
    if images_root is not None:
        root = Path(images_root).expanduser()
        if not root.is_dir():
            raise AppConfigError(f"images root {str(root)!r} (DECD_IMAGES / --images-root) is not a folder")
        return root
    built_from = index.gallery_dir
    if built_from is not None and built_from.is_dir():
        return built_from
    raise AppConfigError(f"the images of index {str(index_folder)!r} were in {str(built_from)!r}, which does not "
                         "exist here: set DECD_IMAGES / --images-root to the folder that holds them now")


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


def caption(rank: int, score: float, path: PathLike, gallery_size: int) -> str:
    """ "#rank · cosine · top p% of N · file name": `decd.search.describe_match`'s label and the file name."""
    return f"{describe_match(rank, score, gallery_size)['label']} · {Path(path).name}"


def _ranked(model, processor, gallery: Gallery, query: Query) -> list[tuple[Path, str, str]]:
    """(image file, caption, path relative to the gallery) of each match, best first, from the gallery's batcher."""
    filter_options(gallery.index, query.filter)  # a gallery that cannot filter: a ValueError, before any work
    top_k = min(check_top_k(query.top_k, "Top-k"), len(gallery))  # ValueError for 0, -5, NaN, "abc", ...
    result = gallery.searcher(model, processor).search(dataclasses.replace(query, top_k=top_k))
    ranked = [(score, relative) for score, index, relative
              in zip(result.scores[0].tolist(), result.indices[0].tolist(), result.paths[0]) if index >= 0]
    return [(gallery.image(relative), caption(rank, score, relative, result.searched), relative)  # with a filter:
            for rank, (score, relative) in enumerate(ranked, start=1)]                  # of the images it lets through


def _text_matches(model, processor, gallery: Gallery, description: str, top_k, filter: Optional[str] = None):
    description = (description or "").strip()
    if not description:
        raise ValueError(EMPTY_QUERY_MESSAGE)
    return _ranked(model, processor, gallery, Query(text=description, top_k=top_k,
                                                    filter=(filter or "").strip() or None))


def _image_matches(model, processor, gallery: Gallery, image, top_k, filter: Optional[str] = None):
    if image is None or (isinstance(image, str) and not image.strip()):
        raise ValueError("Upload or drop a photo (a crop) of the person to search by photo.")
    photo = processor.load_image(image)  # ValueError naming the file when it is unreadable or too large
    return _ranked(model, processor, gallery, Query(image=photo, top_k=top_k, filter=(filter or "").strip() or None))


def _listed(found) -> list[tuple[str, str]]:
    return [(str(image), text) for image, text, _ in found]


def search_gallery(model, processor, gallery: Gallery, description: str, top_k: int = DEFAULT_TOP_K,
                   filter: Optional[str] = None) -> list[tuple[str, str]]:
    """The `top_k` best gallery images for `description`, best first: [(image path, caption), ...].

    `filter`: a Milvus gallery's boolean expression over its fields (only matching images are ranked).
    Raises ValueError for an empty description or a filter Milvus rejects. (The gallery was checked
    against the model when loaded.)
    """
    return _listed(_text_matches(model, processor, gallery, description, top_k, filter))


def search_gallery_by_image(model, processor, gallery: Gallery, image, top_k: int = DEFAULT_TOP_K,
                            filter: Optional[str] = None) -> list[tuple[str, str]]:
    """The `top_k` gallery images most similar to a photo of the person (image-image cosine), best first.

    `image` is anything `load_image` opens (the uploaded file's path, a PIL image, ...): opened by the
    processor and encoded by `embed_images`, exactly like the gallery. Raises ValueError when it is
    missing or unreadable (the message names the problem). `filter` as for `search_gallery`.
    """
    return _listed(_image_matches(model, processor, gallery, image, top_k, filter))


def _shown(found, request) -> list[tuple[str, str]]:
    """The results grid's items: each image by its URL on this app's /images/ route (`decd.serve.GalleryFiles`: the
    file is served in place, and only files the gallery names are), or by its file when the call did not come
    through Gradio (tests, notebooks). Gradio passes URLs through without copying or checking anything, while a
    file path costs a scan of every registered static path per result."""
    raw = getattr(request, "request", None)
    if raw is None:
        return _listed(found)
    from gradio import route_utils

    root = route_utils.get_root_url(request=raw, route_path=route_utils.get_api_call_path(request=raw),
                                    root_path=raw.scope.get("root_path") or None)
    return [(root + image_url(relative), text) for _, text, relative in found]


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


def gallery_examples(gallery_path: Optional[PathLike], count: int = 4) -> list[str]:
    """Example descriptions that match the gallery: for a split of the synthetic benchmark
    (`ROOT/imgs/val` or `ROOT/imgs/test`, e.g. the default gallery), captions of that split's queries
    (`decd.data.load_person_search`), one per identity, spread over the split; else generic examples."""
    if gallery_path is not None:
        folder = Path(gallery_path).expanduser()
        root = folder.parent.parent
        if folder.name in ("val", "test") and folder.parent.name == "imgs" and (root / "reid_raw.json").is_file():
            try:
                from decd.data import load_person_search

                queries = load_person_search("synthetic", data_dir=root, split=folder.name,
                                             verify_images=False)["queries"]
                first, seen = [], set()
                for caption_text, person in zip(queries["caption"], queries["person_id"]):
                    if person not in seen:
                        seen.add(person)
                        first.append(caption_text)
                if first:
                    step = max(1, len(first) // count)
                    return first[::step][:count]
            except Exception as error:  # examples are a nicety: never stop the app for them
                print(f"warning: no examples from {root}: {error}", file=sys.stderr)
    return list(EXAMPLE_DESCRIPTIONS)


def _import_gradio():
    try:
        import gradio
    except ImportError as error:
        raise ImportError("the demo needs Gradio, an optional extra: pip install 'decd[app]' "
                          "(or pip install -r requirements-app.txt)") from error
    return gradio


# Results reflow from 2 columns on a phone to 6+ on a desktop; captions wrap instead of being cut off.
APP_CSS = """
#decd-results .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)) !important;
  grid-template-rows: none !important;
}
#decd-results .grid-wrap { max-height: none !important; height: auto !important; overflow: visible !important; }
#decd-results .caption-label {
  white-space: normal !important; overflow-wrap: anywhere; max-width: none !important; opacity: .92 !important;
  left: 0 !important; right: 0 !important; bottom: 0 !important; border-radius: 0 !important; line-height: 1.25;
}
#decd-status { min-height: 1.5em; }
"""


def _escape(text: str) -> str:
    """User text shown inside a Markdown status line, without Markdown/HTML taking effect."""
    return "".join("\\" + char if char in "\\`*_{}[]<>()#+-.!|~" else char for char in text)


def build_demo(model, processor, gallery: Gallery, title: str = "DECD text-based person search",
               examples: Optional[Sequence[str]] = None):
    """The Gradio Blocks app.

    UI: a one-line description box (Enter or the Search button searches), a photo box (upload or drop a
    crop: searches by image similarity), a Top-k slider (re-runs the last search), examples that run
    when clicked, a status line that says what happened or what went wrong (the previous results stay),
    and a results grid that reflows to the screen width.

    API (gradio_client): "/search" (description, top_k) -> gallery and "/search_image" (image, top_k) ->
    gallery; they raise `gr.Error` with the message for an empty query. `examples` default to generic
    descriptions (see `gallery_examples` for ones that match a synthetic gallery).

    A gallery with metadata fields (a Milvus collection built with --metadata) also gets a filter box (a
    Milvus expression such as `camera == "c12"`): every search ranks only the matching images, and the
    API's searches take it as a third input.
    """
    gr = _import_gradio()
    examples = list(EXAMPLE_DESCRIPTIONS) if examples is None else list(examples)
    max_k = max(1, min(MAX_TOP_K, len(gallery)))
    # The gallery's images are served in place by the /images/ route (added at launch), and exactly those: the files
    # the gallery names, never their folder (other files beside them stay private).
    files = GalleryFiles(gallery.index, gallery.root)

    def _top_k(top_k):  # checked where it is used (_ranked): one rule, one message, for the UI and the API
        return DEFAULT_TOP_K if top_k is None else top_k

    def _photo(photo):
        # The photo's events take Gradio's upload record as it comes (preprocess=False): Gradio's own decoding
        # answers an unreadable or oversized file with a bare "Error", `load_image` names the file and the problem.
        return photo.get("path") if isinstance(photo, dict) else photo

    # Each handler's last input is the filter box, or an empty state when there is none, so that Gradio's request
    # (passed by position, after the inputs) always lands in `request`. Gradio finds that parameter by its type,
    # which this module's postponed annotations hide from it: it is set below.
    def search(description: str, top_k: float, filter: Optional[str] = "",
               request: gr.Request = None) -> list[tuple[str, str]]:
        """Rank the gallery for a description: [(image, "#rank · score · top p% of N · file name"), ...]."""
        try:
            return _shown(_text_matches(model, processor, gallery, description, _top_k(top_k), filter), request)
        except ValueError as error:  # a message for the API caller, no traceback in the log
            raise gr.Error(str(error), print_exception=False) from None

    def search_image(image, top_k: float, filter: Optional[str] = "",
                     request: gr.Request = None) -> list[tuple[str, str]]:
        """Rank the gallery by similarity to a photo of the person (re-identification)."""
        try:
            return _shown(_image_matches(model, processor, gallery, _photo(image), _top_k(top_k), filter), request)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None

    def _ui(search_fn, query, top_k: float, what: str, mode: str, filter: Optional[str] = "", request=None):
        """(results, status, mode) for the UI: an error keeps the results and explains itself."""
        started = time.perf_counter()
        filter = filter or ""
        try:
            found = _shown(search_fn(model, processor, gallery, query, _top_k(top_k), filter), request)
        except ValueError as error:  # a photo's or a filter's error quotes user text: escaped
            return gr.skip(), f"⚠️ {_escape(str(error)) if mode == 'image' or filter else error}", gr.skip()
        seconds = time.perf_counter() - started
        where = f" where {_escape(filter.strip())}" if (filter or "").strip() else ""
        among = f" of {len(gallery)} images" if not where else " matches"  # captions count the filtered images
        return found, (f"**{len(found)}** best{among} for {what}{where} ({seconds:.2f} s). Best "
                       f"first; see *Reading the results* below."), mode

    def ui_text(description: str, top_k: float, filter: Optional[str] = "", request: gr.Request = None):
        return _ui(_text_matches, description, top_k, f"“{_escape((description or '').strip())}”", "text", filter,
                   request)

    def ui_image(image, top_k: float, filter: Optional[str] = "", request: gr.Request = None):
        image = _photo(image)
        if image is None:  # the photo was cleared: keep everything as it is
            return gr.skip(), gr.skip(), gr.skip()
        return _ui(_image_matches, image, top_k, "the photo (image similarity)", "image", filter, request)

    def ui_rerun(mode: str, description: str, image, top_k: float, filter: Optional[str] = "",
                 request: gr.Request = None):
        """Top-k (or the filter) changed: run the last kind of search again, if there is one."""
        if mode == "image" and _photo(image) is not None:
            return ui_image(image, top_k, filter, request)
        if (description or "").strip():
            return ui_text(description, top_k, filter, request)
        return gr.skip(), gr.skip(), gr.skip()

    for handler in (search, search_image, ui_text, ui_image, ui_rerun):
        handler.__annotations__["request"] = gr.Request
    info = f"{len(gallery)} images ({gallery.source})"
    model_name = getattr(model, "name_or_path", "") or type(model).__name__
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nDescribe a pedestrian and press **Enter**, or drop a photo of the person: the "
                    f"gallery is ranked by cosine similarity of DECD's text and image embeddings.\n\n"
                    f"Model: `{model_name}` · gallery: {info}")
        for note in gallery.notes:
            gr.Markdown(f"⚠️ {note}")
        mode = gr.State("text")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                description = gr.Textbox(label="Description (press Enter to search)", lines=1, max_lines=1,
                                         placeholder="e.g. a woman in a red coat carrying a black bag",
                                         elem_id="decd-description")
                with gr.Row():
                    top_k = gr.Slider(1, max_k, value=min(DEFAULT_TOP_K, max_k), step=1, label="Top-k",
                                      min_width=180, elem_id="decd-top-k")
                    button = gr.Button("Search", variant="primary", min_width=120, elem_id="decd-search")
                fields = gallery.filter_fields
                filter_box = gr.Textbox(
                    label="Filter (a Milvus expression; Enter applies it)", lines=1, max_lines=1,
                    placeholder=" and ".join(f'{name} == "..."' if kind == "str" else f"{name} >= ..."
                                             for name, kind in list(fields.items())[:2]),
                    info="fields: " + ", ".join(f"{name} ({kind})" for name, kind in fields.items()) + ", path (str)",
                    elem_id="decd-filter") if fields else None
            with gr.Column(scale=2, min_width=240):
                photo = gr.Image(label="…or search by photo (upload or drop a crop of the person)",
                                 type="filepath", sources=["upload", "clipboard"], height=200,
                                 elem_id="decd-photo")
        status = gr.Markdown("Type a description and press Enter, or drop a photo.", elem_id="decd-status")
        results = gr.Gallery(label="Best matches", columns=5, object_fit="contain", height="auto",
                             preview=False, elem_id="decd-results")
        gr.Markdown(f"**Reading the results.** Each caption is *#rank · score · top p% of N · file*. "
                    f"{SCORE_EXPLANATION}")
        ui_outputs = [results, status, mode]
        filtered = [filter_box if filter_box is not None else gr.State("")]  # the handlers' last input
        if examples:
            shown = gr.Examples(examples=[[text] for text in examples], inputs=[description],
                                label="Examples (click one to search)", api_visibility="private")
            shown.load_input_event.then(ui_text, [description, top_k, *filtered], ui_outputs,
                                        api_visibility="private")
        button.click(ui_text, [description, top_k, *filtered], ui_outputs, api_visibility="private")
        description.submit(ui_text, [description, top_k, *filtered], ui_outputs, api_visibility="private")  # Enter
        raw = dict(preprocess=False)  # every event that takes the photo: see _photo
        photo.upload(ui_image, [photo, top_k, *filtered], ui_outputs, api_visibility="private", **raw)
        top_k.release(ui_rerun, [mode, description, photo, top_k, *filtered], ui_outputs, api_visibility="private",
                      **raw)
        if filter_box is not None:
            filter_box.submit(ui_rerun, [mode, description, photo, top_k, filter_box], ui_outputs,
                              api_visibility="private", **raw)
        # The API: the same searches, raising errors instead of writing a status line. Bound to buttons that
        # are never shown so that they keep the gallery as their output.
        api_text = gr.Button(visible=False)
        api_text.click(search, [description, top_k, *filtered], results, api_name="search")
        api_image = gr.Button(visible=False)
        api_image.click(search_image, [photo, top_k, *filtered], results, api_name="search_image", **raw)
    demo.queue(default_concurrency_limit=CONCURRENCY)  # searches at once: the batcher shares their forward passes
    # Gradio 6 takes css at launch(): every launch of this demo gets the app's layout rules.
    plain_launch = demo.launch

    def launch(*args, **kwargs):
        kwargs.setdefault("css", APP_CSS)
        kwargs.setdefault("state_session_capacity", SESSIONS)
        from fastapi.routing import APIRoute

        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["routes"] = [*app_kwargs.get("routes", []), APIRoute("/images/{path:path}", image_endpoint(files),
                                                                        methods=["GET"], include_in_schema=False)]
        return plain_launch(*args, app_kwargs=app_kwargs, **kwargs)

    demo.launch = launch
    demo.search_fn = search  # for tests and notebooks: the API's handlers and the UI's
    demo.search_image_fn = search_image
    demo.ui_search_fn = ui_text
    demo.ui_search_image_fn = ui_image
    demo.ui_rerun_fn = ui_rerun
    demo.filter_box = filter_box  # None unless the gallery has metadata fields
    demo.gallery_files = files  # what /images/ serves
    return demo


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def space_config(folder: PathLike = _HERE) -> dict:
    """The defaults a Space was published with (`space_config.json` next to app.py: "model", "gallery"), or {}."""
    path = Path(folder) / SPACE_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise AppConfigError(f"{path} is not valid JSON ({error})") from error
    gallery = config.get("gallery")
    if gallery and not Path(gallery).is_absolute():  # relative to the Space's folder
        config["gallery"] = str(Path(folder) / gallery)
    return config


def default_gallery() -> Path:
    """The gallery when none is configured: the synthetic benchmark's test split (400 crops of 100 people,
    generated once on this machine, offline, and cached under $DECD_CACHE)."""
    from decd.synthetic import generate_synthetic_person_search

    return generate_synthetic_person_search(progress=False) / "imgs" / "test"


def _parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    environ = os.environ
    try:
        published = space_config()
    except AppConfigError as error:
        print(f"warning: {error}", file=sys.stderr)
        published = {}
    parser = argparse.ArgumentParser(description="DECD text-based person search demo (Gradio).")
    parser.add_argument("--model", default=environ.get("DECD_MODEL") or published.get("model"),
                        help=f"DECD model folder or Hub id (env DECD_MODEL; else {SPACE_CONFIG_FILE})")
    parser.add_argument("--gallery", default=environ.get("DECD_GALLERY") or published.get("gallery"),
                        help="folder of person crops, or an index folder (env DECD_GALLERY; default: the "
                             "synthetic benchmark's test split)")
    parser.add_argument("--collection", default=environ.get("DECD_COLLECTION"),
                        help="the Milvus collection, when the --gallery URI names none (env DECD_COLLECTION; token: "
                             "env DECD_MILVUS_TOKEN)")
    parser.add_argument("--images-root", default=environ.get("DECD_IMAGES"),
                        help="folder holding an index's images if they moved since the build (env DECD_IMAGES)")
    parser.add_argument("--host", default=environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
                        help=f"address to listen on (default {DEFAULT_HOST}; env GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                        help=f"port (default {DEFAULT_PORT}; env GRADIO_SERVER_PORT)")
    parser.add_argument("--device", default=environ.get("DECD_DEVICE"), help="cpu, cuda, ... (env DECD_DEVICE)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass when encoding a folder")
    return parser.parse_args(argv)


def prepare(arguments: argparse.Namespace):
    """(model, processor, gallery, examples) for `arguments`; AppConfigError / ImportError say what is wrong."""
    _import_gradio()
    if not arguments.model:
        raise AppConfigError("no model given: set DECD_MODEL (or --model) to a DECD model folder or Hub id")
    if arguments.gallery:
        gallery_path = check_gallery_path(arguments.gallery)  # fail fast, before loading the model
    else:
        print("No gallery given (DECD_GALLERY / --gallery): searching the synthetic benchmark's test split.",
              file=sys.stderr)
        gallery_path = default_gallery()
    model, processor = load_model(arguments.model, arguments.device)
    gallery = load_gallery(model, processor, gallery_path, batch_size=arguments.batch_size,
                           images_root=arguments.images_root, collection=arguments.collection)
    return model, processor, gallery, gallery_examples(None if is_milvus_uri(gallery_path) else gallery_path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = _parse_args(argv)
    try:
        model, processor, gallery, examples = prepare(arguments)
    except (AppConfigError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in gallery.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"Gallery: {len(gallery)} images ({gallery.source})", file=sys.stderr)
    torch.set_num_threads(default_threads())  # a core for Gradio's event loop, the others for the forward passes
    demo = build_demo(model, processor, gallery, examples=examples)
    demo.launch(server_name=arguments.host, server_port=arguments.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
