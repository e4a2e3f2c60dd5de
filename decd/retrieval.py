"""Encoding a gallery and queries with a DECD model, and text-to-image retrieval evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .metrics import retrieval_metrics


class _ImageCollator:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        return {"pixel_values": self.processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]}


class _CaptionCollator:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        batch = self.processor(text=[row["caption"] for row in rows], return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def _encode(model, dataset, collator, encode, batch_size, accelerator, num_workers, show_progress, description):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers)
    if accelerator is not None:
        loader = accelerator.prepare(loader)
    device = next(model.parameters()).device
    chunks = []
    for batch in tqdm(loader, desc=description, disable=not show_progress, leave=False):
        batch = {name: value.to(device) for name, value in batch.items()}
        embeddings = F.normalize(encode(**batch).float(), dim=-1)
        if accelerator is not None:
            embeddings = accelerator.gather_for_metrics(embeddings)
        chunks.append(embeddings.cpu())
    return torch.cat(chunks)


def encode_gallery(model, processor, gallery, batch_size=64, accelerator=None, num_workers=0, show_progress=True):
    """L2-normalised image embeddings [len(gallery), projection_dim] in gallery order (rows need `image`)."""
    return _encode(model, gallery, _ImageCollator(processor), model.get_image_features, batch_size, accelerator,
                   num_workers, show_progress, "Encoding gallery")


def encode_queries(model, processor, queries, batch_size=64, accelerator=None, num_workers=0, show_progress=True):
    """L2-normalised caption embeddings [len(queries), projection_dim] in query order (rows need `caption`)."""
    return _encode(model, queries, _CaptionCollator(processor), model.get_text_features, batch_size, accelerator,
                   num_workers, show_progress, "Encoding queries")


def evaluate_retrieval(
    model,
    processor,
    gallery,
    queries,
    batch_size: int = 64,
    accelerator: Any = None,
    num_workers: int = 0,
    show_progress: bool = True,
    return_similarity: bool = False,
):
    """Encode the gallery and the queries once each and compute text-to-image retrieval metrics (percent).

    Under several processes (`accelerator` given) each process encodes its share and the embeddings
    are gathered; every process gets the same metrics.
    """
    model.eval()
    image_embeddings = encode_gallery(model, processor, gallery, batch_size, accelerator, num_workers, show_progress)
    text_embeddings = encode_queries(model, processor, queries, batch_size, accelerator, num_workers, show_progress)
    similarity = text_embeddings @ image_embeddings.t()
    metrics = retrieval_metrics(
        similarity, torch.as_tensor(queries["person_id"]), torch.as_tensor(gallery["person_id"])
    )
    if return_similarity:
        return metrics, similarity
    return metrics


__all__ = ["encode_gallery", "encode_queries", "evaluate_retrieval"]
