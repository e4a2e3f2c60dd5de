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
import io
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import AutoModel, AutoProcessor

MODES = ("text-to-image", "image-to-text")


def _load(path: Path):
    """Model + processor from `path`, with the repository's own code when it ships it (Hub layout)."""
    if (path / "modeling_decd.py").is_file():
        # A Hub repository (or save_pretrained folder): its code files sit next to config.json.
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        return model, processor
    # A folder without code (e.g. weights only) loaded from a checkout: register the checkout's classes.
    checkout = str(Path(__file__).resolve().parent)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    import modeling_decd  # noqa: F401  (registers DecdConfig / DecdModel / DecdProcessor with the Auto classes)

    return AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _decode_image(item: Any, index: int) -> Image.Image:
    if not isinstance(item, str):
        raise ValueError(f"inputs.image[{index}] is a {type(item).__name__}: send each image as a base64 string.")
    data = item.split(",", 1)[1] if item.startswith("data:") else item
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"inputs.image[{index}] is not valid base64 ({error}).") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"inputs.image[{index}] decodes from base64 but is not a readable image ({error}).") from None
    return image.convert("RGB")


def _as_list(value, name: str) -> list:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"inputs.{name} must be a string or a non-empty list of strings.")
    return values


class EndpointHandler:
    """Scores captions against person crops with a DECD dual encoder (see the module docstring)."""

    def __init__(self, path: str = ""):
        folder = Path(path) if path else Path(__file__).resolve().parent
        self.model, self.processor = _load(folder)
        self.model.eval()

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
        images = [_decode_image(item, index) for index, item in enumerate(_as_list(inputs["image"], "image"))]
        batch = self.processor(text=texts, images=images, return_tensors="pt")
        with torch.no_grad():
            text_embeds = F.normalize(self.model.get_text_features(batch["input_ids"], batch["attention_mask"]), dim=-1)
            image_embeds = F.normalize(self.model.get_image_features(batch["pixel_values"]), dim=-1)
            logit_scale = self.model.log_logit_scale.exp()
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
