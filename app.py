"""DECD person-search demo: type a description, see the best-matching people of a gallery of crops.

A Gradio Blocks app, ready for a Hugging Face Space (Spaces run ``python app.py``). Gradio is an
optional extra of the ``decd`` package (Gradio 6): ``pip install "decd[app]"`` or
``pip install -r requirements-app.txt``.

Configuration (a command-line option wins over its environment variable):

==================  =================  ==========================================================
option              environment        meaning
==================  =================  ==========================================================
``--model``         ``DECD_MODEL``     a DECD model folder (``save_pretrained``) or Hub id, loaded
                                       by ``modeling_decd.load_model`` like every entry point
``--gallery``       ``DECD_GALLERY``   a folder of images (searched recursively, encoded at
                                       startup), or an index folder written by
                                       ``decd.search.GalleryIndex.build`` / ``decd-search index``
``--images-root``   ``DECD_IMAGES``    where an index's images are, if not where it was built
``--host``          ``GRADIO_SERVER_NAME``  default 127.0.0.1 (Spaces set 0.0.0.0 themselves)
``--port``          ``GRADIO_SERVER_PORT``  default 7860
``--device``        ``DECD_DEVICE``    cpu / cuda (default: cuda if available)
==================  =================  ==========================================================

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
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

# The checkout's flat modules and `decd` package sit next to this file (as they do in a Space).
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from decd.search import GalleryIndex, GalleryIndexError, list_images  # noqa: E402  (after the sys.path set-up)
from modeling_decd import ModelLoadError, embed_texts  # noqa: E402
from modeling_decd import load_model as spine_load_model  # noqa: E402

PathLike = Union[str, os.PathLike]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_TOP_K = 10
MAX_TOP_K = 50
EXAMPLE_DESCRIPTIONS = (
    "A woman with long black hair, wearing a white t-shirt, blue jeans and white sneakers.",
    "A man in a dark jacket and black trousers, carrying a backpack.",
    "A young person wearing a red top, a short skirt and carrying a handbag.",
)


class AppConfigError(Exception):
    """A startup problem the user can fix (missing model or gallery): printed as one message, no traceback."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def load_model(name: PathLike, device: Optional[Union[str, torch.device]] = None):
    """(model, processor) in eval mode on `device`, through the one loader (`modeling_decd.load_model`).

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
    """A searchable gallery: absolute image paths and their L2-normalised embeddings, in row order.

    `index` does the ranking (exact cosine top-k, `decd.search.GalleryIndex`); `paths[i]` is the image of
    row i and `embeddings` is `index.embeddings` ([count, dim] float32, possibly memory-mapped).
    """

    paths: list[Path]
    index: GalleryIndex
    source: str
    image_roots: list[Path] = field(default_factory=list)  # folders the app serves the images from
    notes: list[str] = field(default_factory=list)

    @property
    def embeddings(self):
        return self.index.embeddings

    def __len__(self) -> int:
        return len(self.paths)


def check_gallery_path(gallery: Optional[PathLike]) -> Path:
    """`gallery` as a Path, or AppConfigError saying what to set when it is missing or not a folder."""
    if gallery is None or str(gallery).strip() == "":
        raise AppConfigError("no gallery given: set DECD_GALLERY (or --gallery) to a folder of person crops "
                             "or to an index folder built with `decd-search index`")
    path = Path(gallery).expanduser()
    if not path.exists():
        raise AppConfigError(f"gallery {str(path)!r} does not exist (DECD_GALLERY / --gallery): give a folder of "
                             f"person crops or an index folder built with `decd-search index`")
    if not path.is_dir():
        raise AppConfigError(f"gallery {str(path)!r} is not a folder (DECD_GALLERY / --gallery)")
    return path


def _is_index_folder(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "embeddings.npy").is_file()


def load_gallery(
    model,
    processor,
    gallery: PathLike,
    batch_size: int = 32,
    images_root: Optional[PathLike] = None,
    show_progress: bool = True,
    verify: bool = True,
) -> Gallery:
    """The gallery to search: an index folder (loaded) or an image folder (encoded now, tqdm bar).

    Raises AppConfigError with a readable message when the folder is missing or holds no images, or when
    the index was built with another model (`verify`).
    """
    path = check_gallery_path(gallery)
    try:
        if _is_index_folder(path):
            index = GalleryIndex.load(path)
            if verify:
                index.verify_model(model)
            root = _index_images_root(index, path, images_root)
            paths = [(root / relative).resolve() for relative in index.paths]
            notes = []
            missing = sum(1 for image in paths[:100] if not image.is_file())
            if missing:
                notes.append(f"{missing} of the first {min(100, len(paths))} indexed images are missing under "
                             f"{root} (set DECD_IMAGES / --images-root to the gallery folder)")
            if index.skipped:
                notes.append(f"{len(index.skipped)} unreadable image(s) were left out when the index was built")
            return Gallery(paths, index, source=f"index {path}", image_roots=[root.resolve()], notes=notes)
        files = list_images(path)
        if not files:
            raise AppConfigError(f"no images (.jpg, .png, ...) under the gallery folder {str(path)!r}")
        paths = [(path / relative).resolve() for relative in files]
        index = GalleryIndex.from_images(model, processor, [str(image) for image in paths],
                                         batch_size=batch_size, show_progress=show_progress)
        return Gallery(paths, index, source=f"folder {path}", image_roots=[path.resolve()])
    except GalleryIndexError as error:  # missing/unfinished/stale index, unreadable images, ...
        raise AppConfigError(str(error)) from error
    except OSError as error:
        raise AppConfigError(f"could not read the gallery {str(path)!r}: {error}") from error


def _index_images_root(index: GalleryIndex, index_folder: Path, images_root: Optional[PathLike]) -> Path:
    """Where the index's relative paths live: `images_root`, else the build folder, else the index's parent."""
    if images_root is not None:
        return Path(images_root).expanduser()
    built_from = index.gallery_dir
    if built_from is not None and built_from.is_dir():
        return built_from
    return index_folder.resolve().parent  # an index shipped inside (or next to) its gallery folder


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


def caption(rank: int, score: float, path: PathLike) -> str:
    return f"{rank} · {score:.3f} · {Path(path).name}"


def search_gallery(model, processor, gallery: Gallery, description: str, top_k: int = DEFAULT_TOP_K
                   ) -> list[tuple[str, str]]:
    """The `top_k` best gallery images for `description`, best first: [(image path, caption), ...].

    Raises ValueError for an empty description.
    """
    description = (description or "").strip()
    if not description:
        raise ValueError("Describe the person you are looking for (clothes, colours, bags, hair, ...).")
    top_k = max(1, min(int(top_k), len(gallery)))
    query = embed_texts(model, processor, [description])
    result = gallery.index.search(query, top_k=top_k)
    scores, indices = result.scores[0].tolist(), result.indices[0].tolist()
    return [(str(gallery.paths[index]), caption(rank, score, gallery.paths[index]))
            for rank, (score, index) in enumerate(zip(scores, indices), start=1)]


def _import_gradio():
    try:
        import gradio
    except ImportError as error:
        raise ImportError("the demo needs Gradio, an optional extra: pip install 'decd[app]' "
                          "(or pip install -r requirements-app.txt)") from error
    return gradio


def build_demo(model, processor, gallery: Gallery, title: str = "DECD text-based person search",
               examples: Sequence[str] = EXAMPLE_DESCRIPTIONS):
    """The Gradio Blocks app. Its search button calls `search(description, top_k)`, API name "search"."""
    gr = _import_gradio()
    max_k = max(1, min(MAX_TOP_K, len(gallery)))
    # Serve the gallery images in place: no copy into Gradio's cache per search, and images outside the
    # working and temp folders are allowed (Gradio refuses those otherwise). Everything under these
    # folders becomes downloadable from the app, so point DECD_GALLERY at the crops, not at a home folder.
    if gallery.image_roots:
        gr.set_static_paths([str(root) for root in gallery.image_roots])

    def search(description: str, top_k: float) -> list[tuple[str, str]]:
        """Rank the gallery for a description: [(image, "rank · score · file name"), ...], best first."""
        try:
            return search_gallery(model, processor, gallery, description,
                                  DEFAULT_TOP_K if top_k is None else int(top_k))
        except ValueError as error:  # a message for the user (toast / API error), no traceback in the log
            raise gr.Error(str(error), print_exception=False) from None

    info = f"{len(gallery)} images ({gallery.source})"
    model_name = getattr(model, "name_or_path", "") or type(model).__name__
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nType a description of a pedestrian; the gallery is ranked by cosine "
                    f"similarity of DECD's text and image embeddings.\n\n"
                    f"Model: `{model_name}` · gallery: {info}")
        for note in gallery.notes:
            gr.Markdown(f"⚠️ {note}")
        with gr.Row():
            description = gr.Textbox(label="Description", placeholder="Describe the person…", lines=2, scale=4)
            with gr.Column(scale=1, min_width=160):
                top_k = gr.Slider(1, max_k, value=min(DEFAULT_TOP_K, max_k), step=1, label="Top-k")
                button = gr.Button("Search", variant="primary")
        results = gr.Gallery(label="Best matches (rank · score · file name)", columns=5, object_fit="contain",
                             height="auto", preview=False)
        if examples:
            gr.Examples(examples=[[text] for text in examples], inputs=[description])
        button.click(search, inputs=[description, top_k], outputs=results, api_name="search")
        # Enter in the text box searches too; only the button's event is part of the API.
        description.submit(search, inputs=[description, top_k], outputs=results, api_visibility="private")
    demo.search_fn = search  # for tests and notebooks: the click handler itself
    return demo


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    environ = os.environ
    parser = argparse.ArgumentParser(description="DECD text-based person search demo (Gradio).")
    parser.add_argument("--model", default=environ.get("DECD_MODEL"),
                        help="DECD model folder or Hub id (env DECD_MODEL)")
    parser.add_argument("--gallery", default=environ.get("DECD_GALLERY"),
                        help="folder of person crops, or an index folder (env DECD_GALLERY)")
    parser.add_argument("--images-root", default=environ.get("DECD_IMAGES"),
                        help="folder holding an index's images if they moved since the build (env DECD_IMAGES)")
    parser.add_argument("--host", default=environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
                        help=f"address to listen on (default {DEFAULT_HOST}; env GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                        help=f"port (default {DEFAULT_PORT}; env GRADIO_SERVER_PORT)")
    parser.add_argument("--device", default=environ.get("DECD_DEVICE"), help="cpu, cuda, ... (env DECD_DEVICE)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass when encoding a folder")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = _parse_args(argv)
    try:
        _import_gradio()
        if not arguments.model:
            raise AppConfigError("no model given: set DECD_MODEL (or --model) to a DECD model folder or Hub id")
        gallery_path = check_gallery_path(arguments.gallery)  # fail fast, before loading the model
        model, processor = load_model(arguments.model, arguments.device)
        gallery = load_gallery(model, processor, gallery_path, batch_size=arguments.batch_size,
                               images_root=arguments.images_root)
    except (AppConfigError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in gallery.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"Gallery: {len(gallery)} images ({gallery.source})", file=sys.stderr)
    demo = build_demo(model, processor, gallery)
    demo.launch(server_name=arguments.host, server_port=arguments.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
