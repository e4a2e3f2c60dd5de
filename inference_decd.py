"""Loading a trained DECD model and embedding images and captions with it: the inference spine.

Every entry point (training's evaluation, `decd-search`, the search pipeline, the app, the Inference
Endpoints `handler.py`) loads a model with `load_model` and embeds with `embed_images` / `embed_texts`, so
they all see the same pixels and give the same embeddings. This flat module travels to the Hugging Face Hub
with the model's code (the handler loads it from there), so it imports only torch, tqdm and its siblings.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

try:  # relative imports when loaded as Hub remote code (transformers copies the siblings)
    from .image_loading_decd import decode_base64, is_single_image
    from .modeling_decd import DecdModel
    from .processing_decd import DecdProcessor
except ImportError:  # installed as top-level modules
    from image_loading_decd import decode_base64, is_single_image
    from modeling_decd import DecdModel
    from processing_decd import DecdProcessor


class ModelLoadError(ValueError):
    """A model folder or Hub id that does not hold a loadable DECD model (the message says why)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path, device=None, dtype=None, **overrides: Any
) -> tuple["DecdModel", DecdProcessor]:
    """A saved DECD model and its processor from a folder or a Hub id, in eval mode on `device`.

    Args:
        name_or_path: a folder written by `save_pretrained` or a Hub repository id.
        device: where the model goes (default: CUDA when available, else CPU).
        dtype: the model's dtype (default: as saved).
        overrides: `DecdConfig` fields to change (e.g. `num_identities=...` to continue training).

    Returns:
        (model, processor). A folder without processor files gets the default processor for the
        model's image size (with a warning).

    Raises:
        ModelLoadError naming the model: missing folder or config, another model type, no safetensors.
    """
    name = str(name_or_path)
    if os.path.isfile(name):  # e.g. path/to/config.json or model.safetensors: the folder holding it is the model
        raise ModelLoadError(f"could not load the model {name!r}: it is a file; pass the folder that holds it "
                             f"({os.path.dirname(os.path.abspath(name))!r})")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ModelLoadError(f"could not load the model {name!r}: the folder has no config.json; pass a folder "
                             "written by save_pretrained, examples/train.py or decd-convert")
    try:
        model = DecdModel.from_pretrained(name, dtype=dtype, **overrides)
    except (OSError, ValueError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise ModelLoadError(f"could not load the model {name!r}: {lines[0]}") from error
    processor = load_processor(name, model)
    return model.to(default_device() if device is None else torch.device(device)).eval(), processor


def load_processor(name_or_path, model: "DecdModel") -> DecdProcessor:
    """The processor saved with a model; a folder without one gets the default for the model's crop size."""
    try:
        return DecdProcessor.from_pretrained(str(name_or_path))
    except (OSError, ValueError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"{name_or_path} has no loadable processor ({reason}); using the default DecdProcessor for "
                      f"{tuple(model.config.image_size)} crops.", stacklevel=3)
        return DecdProcessor(image_size=model.config.image_size)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _embed(model, items, collate, features, batch_size, show_progress, accelerator, num_workers, description):
    """L2-normalised float32 CPU embeddings of `items`, in order, encoded `batch_size` at a time."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    if accelerator is not None:  # each process encodes its share; the shares are gathered below
        loader = accelerator.prepare(loader)
    if show_progress is None:
        show_progress = len(items) >= 10 * batch_size
    device = _model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for batch in tqdm(loader, desc=description, disable=not show_progress, leave=False):
            batch = {key: value.to(device) for key, value in batch.items()}
            embeddings = F.normalize(features(**batch).pooler_output.float(), dim=-1)
            if accelerator is not None:
                embeddings = accelerator.gather_for_metrics(embeddings)
            chunks.append(embeddings.cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError(f"{description}: nothing to embed (an empty list).")
    return torch.cat(chunks)


def _image_batch(processor, images):  # module-level functions (with `partial`): picklable for DataLoader workers
    return {"pixel_values": processor(images=list(images), return_tensors="pt")["pixel_values"]}


def _caption_batch(processor, texts):
    batch = processor(text=list(texts), return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def embed_images(model, processor, images, batch_size: int = 64, show_progress: bool | None = None,
                 accelerator=None, num_workers: int = 0) -> torch.Tensor:
    """Image embeddings [len(images), projection_dim]: float32, L2-normalised, on the CPU, in input order.

    `images` is one image or a sequence of anything `load_image` opens (paths, bytes, PIL images, `datasets`
    Image values, arrays); each is opened and preprocessed by `processor`. `show_progress` (default: when
    there are ten batches or more) shows a tqdm bar; `num_workers` decodes in DataLoader workers; with
    an `accelerate` `accelerator`, each process encodes its share and every process gets them all.
    """
    return _embed(model, _as_list(images, "images", single=_is_one_image), partial(_image_batch, processor),
                  model.get_image_features, batch_size, show_progress, accelerator, num_workers, "Embedding images")


def embed_texts(model, processor, texts, batch_size: int = 256, show_progress: bool | None = None,
                accelerator=None, num_workers: int = 0) -> torch.Tensor:
    """Caption embeddings [len(texts), projection_dim]: float32, L2-normalised, on the CPU, in input order.

    `texts` is a string or a sequence of strings; the rest as for `embed_images`.
    """
    return _embed(model, _as_list(texts, "texts", single=lambda item: isinstance(item, str)),
                  partial(_caption_batch, processor), model.get_text_features, batch_size, show_progress, accelerator,
                  num_workers, "Embedding captions")


def _is_one_image(item) -> bool:
    return is_single_image(item) and not isinstance(item, (list, tuple))


def _as_list(items, name: str, single) -> list:
    """`items` as a list: one item (a path, a caption, an image) becomes a list of one; a list or another sequence
    stays; anything else is refused naming its type."""
    if single(items):
        return [items]
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__") or not hasattr(items, "__getitem__"):
        raise TypeError(f"{name} must be one item or a sequence of them, got {type(items).__name__}")
    return items


__all__ = ["ModelLoadError", "decode_base64", "default_device", "embed_images", "embed_texts", "load_model",
           "load_processor"]
