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
"""

from __future__ import annotations

import base64
import binascii
import sys
from pathlib import Path
from typing import Any

MODES = ("text-to-image", "image-to-text")


def _spine(path: Path):
    """The repository's own `modeling_decd` (Hub layout: its code files sit next to config.json), loaded as
    transformers loads remote code; for a folder without code, this checkout's. Either way the model is
    loaded and images and captions are embedded by the same functions every DECD entry point uses."""
    if (path / "modeling_decd.py").is_file():
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return sys.modules[get_class_from_dynamic_module("modeling_decd.DecdModel", str(path)).__module__]
    checkout = str(Path(__file__).resolve().parent)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    import modeling_decd

    return modeling_decd


def _decode_base64(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise ValueError(f"inputs.image[{index}] is a {type(item).__name__}: send each image as a base64 string.")
    data = item.split(",", 1)[1] if item.startswith("data:") else item
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"inputs.image[{index}] is not valid base64 ({error}).") from None


def _as_list(value, name: str) -> list:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"inputs.{name} must be a string or a non-empty list of strings.")
    return values


class EndpointHandler:
    """Scores captions against person crops with a DECD dual encoder (see the module docstring)."""

    def __init__(self, path: str = ""):
        folder = Path(path) if path else Path(__file__).resolve().parent
        self.spine = _spine(folder)
        self.model, self.processor = self.spine.load_model(str(folder))

    def __call__(self, data: dict) -> list | dict:
        if not isinstance(data, dict):
            raise ValueError(f"The request body must be a JSON object, got {type(data).__name__}.")
        inputs = data.get("inputs")
        if not isinstance(inputs, dict):
            raise ValueError('The request needs "inputs": {"text": [...], "image": <base64 or list of base64>}.')
        missing = [key for key in ("text", "image") if key not in inputs]
        if missing:
            raise ValueError(f"inputs lacks {missing}: send both captions (\"text\") and images (\"image\").")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError('"parameters" must be a JSON object, e.g. {"mode": "text-to-image"}.')
        mode = parameters.get("mode", "text-to-image")
        if mode not in MODES:
            raise ValueError(f"parameters.mode must be one of {MODES}, got {mode!r}.")
        top_k = parameters.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"parameters.top_k must be a positive integer, got {top_k!r}.")

        texts = _as_list(inputs["text"], "text")
        images = [self.processor.load_image(_decode_base64(item, index), name=f"inputs.image[{index}]")
                  for index, item in enumerate(_as_list(inputs["image"], "image"))]
        text_embeds = self.spine.embed_texts(self.model, self.processor, texts)
        image_embeds = self.spine.embed_images(self.model, self.processor, images)
        logit_scale = float(self.model.log_logit_scale.detach().exp())
        cosine = text_embeds @ image_embeds.T  # [texts, images]
        if mode == "image-to-text":
            cosine = cosine.T
        probabilities = (logit_scale * cosine).softmax(dim=-1)

        answers = []
        for scores, probs in zip(cosine.tolist(), probabilities.tolist()):
            ranked = sorted(range(len(scores)), key=lambda index: (-scores[index], index))[:top_k]
            entries = []
            for index in ranked:
                entry = {"index": index, "score": scores[index], "probability": probs[index]}
                if mode == "image-to-text":
                    entry["text"] = texts[index]
                entries.append(entry)
            answers.append(entries)
        return answers[0] if len(answers) == 1 else answers
