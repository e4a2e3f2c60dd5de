"""Inference Endpoints handler for DECD (text-based person search).

Inference Endpoints instantiate ``EndpointHandler(path)`` with the model repository downloaded at
``path`` and call it with the request's JSON body. Request::

    {"inputs": {"text": "a woman in a red coat" | [...], "image": "<base64>" | ["<base64>", ...]},
     "parameters": {"mode": "text-to-image" | "image-to-text", "top_k": 5}}

- ``text-to-image`` (default): each caption is a query, the images are the candidates.
- ``image-to-text``: each image is a query, the captions are the candidates.

Response: for each query, its candidates best first, as
``{"index": candidate position in the request, "score": cosine similarity in [-1, 1],
"probability": softmax of the model's scaled logits over the candidates (a fraction)}``, plus
``"text"`` for caption candidates. One query gives that list; several give a list of lists.

Images are base64-encoded files (PNG, JPEG, ...), optionally as ``data:image/...;base64,`` URLs.
Bad requests raise ``ValueError`` with a message naming what is wrong.

Gallery search (optional): ``EndpointHandler(path, gallery=...)``, or the environment variable
``DECD_GALLERY``, names a gallery (an index folder written by ``decd-search index``, a folder of images,
encoded at start-up, or a Milvus collection: ``http://host:19530/crops`` or ``gallery.db/crops``, with a
token from ``DECD_MILVUS_TOKEN`` if the server needs one), opened once by ``decd.search.open_gallery`` and
checked against the model. A request with captions and no images, ``{"inputs": {"text": ...},
"parameters": {"top_k": 5}}``, then ranks the gallery for each caption: ``[{"index", "score", "rank",
"top_percent", "label", "path"}, ...]`` best first (``decd.search.describe_matches``, as the
``text-based-person-search`` pipeline returns; ``top_k`` default 10; places no image fills are left out).
For a Milvus gallery, ``parameters.filter`` (e.g. ``"camera == \"c12\""``) ranks only the matching images.
This mode needs the ``decd`` package installed next to the handler (``pip install decd``); requests with
images work without it.

Limits (``EndpointHandler(path, max_images=..., max_texts=..., max_image_bytes=..., max_text_chars=...,
max_request_pixels=...)``, defaults below) are checked before anything is decoded: the number of images and
captions, each image's encoded size (from the base64 length), each caption's length, and the pixels of all
the request's images together (width x height from each file's header: decoding time follows them); the
processor's ``max_image_pixels`` then refuses an image with too many pixels before its pixels are decoded.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any

MODES = ("text-to-image", "image-to-text")
MAX_IMAGES = 64  # images per request
MAX_TEXTS = 256  # captions per request
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # encoded (file) size of one image
MAX_TEXT_CHARS = 4096  # characters per caption (the tokenizer keeps at most the model's context anyway)
# Pixels of all a request's images together, as their headers declare them. Decoding time grows with them, and
# the other limits alone admit 64 images at the processor's pixel limit, far more decoding than a search needs;
# this admits two images at that limit, or a batch of camera photos.
MAX_REQUEST_PIXELS = 200_000_000
GALLERY_TOP_K = 10  # gallery matches per caption when the request sets no top_k


def _spine(path: Path):
    """The repository's own `inference_decd` (Hub layout: its code files sit next to config.json), loaded as
    transformers loads remote code; for a folder without code, this checkout's. Either way the model is
    loaded and images and captions are embedded by the same functions every DECD entry point uses."""
    if (path / "inference_decd.py").is_file():
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return sys.modules[get_class_from_dynamic_module("inference_decd.load_model", str(path)).__module__]
    checkout = str(Path(__file__).resolve().parent)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    import inference_decd

    return inference_decd


def _open_gallery(model, processor, gallery):
    """The gallery opened by `decd.search.open_gallery` (the `decd` package, not part of the Hub code)."""
    try:
        from decd.search import open_gallery
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("decd"):
            raise
        raise ImportError(f"gallery {gallery!r} (gallery= / DECD_GALLERY) needs the decd package: pip install decd"
                          ) from None
    return open_gallery(model, processor, gallery)


REQUEST_KEYS = ("inputs", "parameters")
INPUT_KEYS = ("text", "image")
PARAMETER_KEYS = ("mode", "top_k", "filter")


def _no_unknown_keys(value: dict, known: tuple[str, ...], where: str) -> None:
    """Refuse keys a request would otherwise have ignored (a misspelt "paramters" or "topk"), naming the accepted ones."""
    unknown = sorted(set(value) - set(known), key=str)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(repr(key) for key in unknown)}; the accepted ones "
                         f"are {', '.join(repr(key) for key in known)}.")


def _stored_pixels(data: bytes) -> tuple[int, bool]:
    """(width x height as an image file's header declares it, whether exactly), nothing decoded: (0, True) when PIL
    cannot read the header; the least it can be for a header PIL refuses to open as a decompression bomb."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sizes are what is being counted
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height, True
    except Image.DecompressionBombError:  # more than twice PIL's limit
        return 2 * Image.MAX_IMAGE_PIXELS + 1, False
    except Exception:  # noqa: BLE001 - any unreadable header (PIL raises several types): the loader names it
        return 0, True


def _as_list(value, name: str, limit: int | None = None) -> list:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"inputs.{name} must be a string or a non-empty list of strings, got {type(value).__name__}.")
    for index, item in enumerate(values):
        if not isinstance(item, str):
            raise ValueError(f"inputs.{name}[{index}] is a {type(item).__name__}: send each as a string.")
    if limit is not None and len(values) > limit:
        raise ValueError(f"inputs.{name} has {len(values)} items, more than the limit of {limit} per request "
                         f"(max_{name}s): split the request.")
    return values


class EndpointHandler:
    """Scores captions against person crops with a DECD dual encoder (see the module docstring)."""

    def __init__(self, path: str = "", max_images: int | None = MAX_IMAGES, max_texts: int | None = MAX_TEXTS,
                 max_image_bytes: int | None = MAX_IMAGE_BYTES, max_text_chars: int | None = MAX_TEXT_CHARS,
                 gallery=None, max_request_pixels: int | None = MAX_REQUEST_PIXELS):
        """Load the model in `path`; the `max_*` limits (None: no limit) and `gallery` (default: $DECD_GALLERY,
        else none) are described in the module docstring."""
        for name, value in dict(max_images=max_images, max_texts=max_texts, max_image_bytes=max_image_bytes,
                                max_text_chars=max_text_chars, max_request_pixels=max_request_pixels).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        self.max_images, self.max_texts = max_images, max_texts
        self.max_image_bytes, self.max_text_chars = max_image_bytes, max_text_chars
        self.max_request_pixels = max_request_pixels
        folder = Path(path) if path else Path(__file__).resolve().parent
        self.spine = _spine(folder)
        self.model, self.processor = self.spine.load_model(str(folder))
        if gallery is None:
            gallery = os.environ.get("DECD_GALLERY") or None
        self.gallery = _open_gallery(self.model, self.processor, gallery) if gallery is not None else None

    def __call__(self, data: dict) -> list | dict:
        if not isinstance(data, dict):
            raise ValueError(f"The request body must be a JSON object, got {type(data).__name__}.")
        _no_unknown_keys(data, REQUEST_KEYS, "the request")
        inputs = data.get("inputs")
        if not isinstance(inputs, dict):
            raise ValueError('The request needs "inputs": {"text": [...], "image": <base64 or list of base64>}.')
        _no_unknown_keys(inputs, INPUT_KEYS, "inputs")
        missing = [key for key in ("text", "image") if key not in inputs]
        if missing and not (missing == ["image"] and self.gallery is not None):  # captions alone: gallery search
            raise ValueError(f"inputs lacks {missing}: send both captions (\"text\") and images (\"image\").")
        parameters = data.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ValueError(f'"parameters" must be a JSON object, e.g. {{"mode": "text-to-image"}}, got '
                             f"{parameters!r}.")
        _no_unknown_keys(parameters, PARAMETER_KEYS, "parameters")
        mode = parameters.get("mode", "text-to-image")
        if mode not in MODES:
            raise ValueError(f"parameters.mode must be one of {MODES}, got {mode!r}.")
        top_k = parameters.get("top_k")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"parameters.top_k must be a positive integer, got {top_k!r} "
                             f"({type(top_k).__name__}).")
        expression = parameters.get("filter")
        if expression is not None and (not isinstance(expression, str) or not missing):
            raise ValueError("parameters.filter must be a string (a Milvus expression), and goes with a gallery search "
                             "(captions without images).")

        texts = _as_list(inputs["text"], "text", self.max_texts)
        if missing:
            if mode != "text-to-image":
                raise ValueError(f"parameters.mode {mode!r} needs images (\"image\"); without them the captions "
                                 f"search the gallery (text-to-image).")
            return self._search_gallery(texts, GALLERY_TOP_K if top_k is None else top_k, expression)
        encoded = _as_list(inputs["image"], "image", self.max_images)
        self._check_lengths(texts)
        raw = [self.spine.decode_base64(item, f"inputs.image[{index}]", self.max_image_bytes, "max_image_bytes")
               for index, item in enumerate(encoded)]
        self._check_pixels(raw)
        images = [self.processor.load_image(data, name=f"inputs.image[{index}]") for index, data in enumerate(raw)]
        text_embeds = self.spine.embed_texts(self.model, self.processor, texts)
        image_embeds = self.spine.embed_images(self.model, self.processor, images)
        logit_scale = float(self.model.logit_scale.exp())
        cosine = text_embeds @ image_embeds.T  # [texts, images]
        if mode == "image-to-text":
            cosine = cosine.T
        probabilities = (logit_scale * cosine).softmax(dim=-1)

        answers = []
        for scores, probs in zip(cosine.tolist(), probabilities.tolist()):
            ranked = sorted(range(len(scores)), key=lambda index: (-scores[index], index))[:top_k]
            entries = [{"index": index, "score": scores[index], "probability": probs[index]} for index in ranked]
            if mode == "image-to-text":  # caption candidates: say which caption
                for entry in entries:
                    entry["text"] = texts[entry["index"]]
            answers.append(entries)
        return answers[0] if len(answers) == 1 else answers

    def _check_pixels(self, raw: list[bytes]) -> None:
        """Refuse a request whose images hold more than `max_request_pixels` together, from their headers (nothing
        is decoded; an image whose header PIL cannot read is left to the loader, which names what is wrong)."""
        if self.max_request_pixels is None:
            return
        counts = [_stored_pixels(data) for data in raw]
        total = sum(pixels for pixels, _ in counts)
        if total > self.max_request_pixels:
            least = "" if all(exact for _, exact in counts) else "at least "
            raise ValueError(f"inputs.image holds {least}{total:,} pixels in its {len(raw)} images, more than the limit "
                             f"of {self.max_request_pixels:,} per request (max_request_pixels): send fewer or smaller "
                             "images, or split the request.")

    def _check_lengths(self, texts: list) -> None:
        for index, text in enumerate(texts):
            if self.max_text_chars is not None and isinstance(text, str) and len(text) > self.max_text_chars:
                raise ValueError(f"inputs.text[{index}] has {len(text):,} characters, more than the limit of "
                                 f"{self.max_text_chars:,} (max_text_chars): shorten it.")

    def _search_gallery(self, texts: list, top_k: int, expression: str | None = None) -> list:
        """Each caption's `top_k` best gallery images, described as the search pipeline describes them."""
        from decd.search import describe_matches, filter_options  # importable: the gallery was opened with it

        self._check_lengths(texts)
        options = filter_options(self.gallery, expression)  # a gallery that cannot filter: before any encoding
        result = self.gallery.search(self.spine.embed_texts(self.model, self.processor, texts), top_k=top_k, **options)
        answers = [[match for match in describe_matches(result, row=row) if match["index"] >= 0]
                   for row in range(len(texts))]
        return answers[0] if len(answers) == 1 else answers
