"""Text-to-image retrieval evaluation of a DECD model on a gallery and queries (`datasets` splits)."""

from __future__ import annotations

from typing import Any

import torch

from inference_decd import embed_images, embed_texts

from .data import image_sources
from .metrics import retrieval_metrics


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
    """Embed the gallery and the queries once each and compute text-to-image retrieval metrics (percent).

    `gallery` rows need `image` and `person_id`, `queries` rows `caption` and `person_id` (the splits
    `load_person_search` returns). Images are opened by `load_image` from the stored path or bytes,
    never by `datasets`' own decoder, so evaluation sees the pixels every other entry point sees. Under
    several processes (`accelerator` given) each process embeds its share and the embeddings are
    gathered; every process gets the same metrics.
    """
    common = dict(batch_size=batch_size, show_progress=show_progress, accelerator=accelerator,
                  num_workers=num_workers)
    image_embeddings = embed_images(model, processor, image_sources(gallery), **common)
    text_embeddings = embed_texts(model, processor, list(queries["caption"]), **common)
    similarity = text_embeddings @ image_embeddings.t()
    metrics = retrieval_metrics(
        similarity, torch.as_tensor(queries["person_id"]), torch.as_tensor(gallery["person_id"])
    )
    if return_similarity:
        return metrics, similarity
    return metrics


__all__ = ["evaluate_retrieval"]
