"""From training rows to model inputs: IRRA's image augmentation and the collator of `DecdTrainer`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


# IRRA's augmentation: flip 0.5, pad 10 + random crop back, random erasing (p 0.5, area 0.02-0.4).
def augment_person_crops(
    pixel_values: torch.Tensor,
    flip_probability: float = 0.5,
    padding: int = 10,
    erase_probability: float = 0.5,
    erase_area: tuple[float, float] = (0.02, 0.4),
    erase_aspect: tuple[float, float] = (0.3, 3.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment normalised crops [batch, 3, H, W] (returns a new tensor of the same shape).

    Padding and erasing fill with 0, i.e. the dataset mean colour after CLIP normalisation.
    """
    batch, _, height, width = pixel_values.shape
    padded = torch.nn.functional.pad(pixel_values, (padding, padding, padding, padding))
    output = torch.empty_like(pixel_values)
    draws = torch.rand(batch, 8, generator=generator)
    for index in range(batch):
        top = int(draws[index, 0] * (2 * padding + 1))
        left = int(draws[index, 1] * (2 * padding + 1))
        crop = padded[index, :, top : top + height, left : left + width]
        if draws[index, 2] < flip_probability:
            crop = crop.flip(-1)
        crop = crop.clone()
        if draws[index, 3] < erase_probability:
            area = height * width * (erase_area[0] + (erase_area[1] - erase_area[0]) * draws[index, 4].item())
            log_low, log_high = math.log(erase_aspect[0]), math.log(erase_aspect[1])
            aspect = math.exp(log_low + (log_high - log_low) * draws[index, 5].item())
            erase_h = min(height, max(1, int(round(math.sqrt(area * aspect)))))
            erase_w = min(width, max(1, int(round(math.sqrt(area / aspect)))))
            y = int(draws[index, 6] * (height - erase_h + 1))
            x = int(draws[index, 7] * (width - erase_w + 1))
            crop[:, y : y + erase_h, x : x + erase_w] = 0
        output[index] = crop
    return output


@dataclass
class DecdTrainingCollator:
    """Rows of a training split (`image`, `caption`, `person_id`) -> a `DecdModel.forward` batch.

    `image` may be anything `load_image` opens; `DecdTrainer` hands over the stored path or bytes, so
    the processor opens each image the way every other entry point does. Adds `caption_quality`, and
    MCM inputs (`masked_input_ids`, `mcm_labels`) when `mask_captions`. Captions are padded to the batch's
    longest, or with `pad_to_context` to the whole context (77 tokens): the fixed shape a compiled step needs.
    """

    processor: Any
    augment: bool = True
    mask_captions: bool = True
    pad_to_context: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            text=[row["caption"] for row in rows], images=[row["image"] for row in rows], return_tensors="pt",
            padding="max_length" if self.pad_to_context else True,
        )
        features = dict(batch)
        if self.augment:
            features["pixel_values"] = augment_person_crops(features["pixel_values"])
        if self.mask_captions:
            features.update(self.processor.mask_captions(features["input_ids"], features["attention_mask"]))
        features["person_ids"] = torch.tensor([int(row["person_id"]) for row in rows], dtype=torch.long)
        return features


__all__ = ["DecdTrainingCollator", "augment_person_crops"]
