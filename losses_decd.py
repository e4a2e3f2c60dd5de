"""DECD's losses as pure functions of tensors (docs/method.md, "Losses").

- `sew_loss`: similarity-distribution matching with caption-quality-adaptive margins, both directions, in one of
  `SEW_FORMULATIONS` (docs/method.md, "Sew loss"); with `margin=0` every formulation is exactly IRRA's SDM loss.
- `masked_caption_loss`: cross-entropy of the MCM head on the masked positions, with the helpers that decide
  what it scores: `sample_mcm_rows` (which pairs of a batch go through MCM), `masked_positions` (which positions
  of a caption) and `batch_vocabulary` (which vocabulary rows, when only the batch's own words are candidates).
  `masked_positions` and `batch_vocabulary_fixed` give the same choices in tensors whose shapes are known
  before the data, which a compiled step needs (no data-dependent shapes, no host synchronisation).
- `identity_loss`: identity classification of both modalities.
- `gather_with_grad`: the ONE helper that knows about processes; the Sew loss uses the global batch.

This flat module travels to the Hugging Face Hub as remote code, so it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of positions the MCM loss ignores (PyTorch's cross-entropy default)
# Readings of the paper's Sew loss (docs/method.md, "Sew loss"): how caption quality q_i and the strength m act.
#   tighten   positives of caption i must beat its negatives by m * q_i (informative captions held tighter)
#   relax     positives of caption i are eased by m * (1 - q_i) (vague captions held looser; informative ones: SDM)
#   compress  SDM plus a pull of every same-identity caption-image pair together in both directions, weighted by
#             the caption's quality: m / tau * mean_i sum_j Q_ij q_i (1 - s_ij), and the same over image rows
SEW_FORMULATIONS = ("tighten", "relax", "compress")


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` [batch, ...] from every process along dim 0, keeping gradients.

    With one process (or no initialised process group) it returns the tensor unchanged. All processes
    must pass the same batch size (accelerate's `even_batches`, the default, guarantees it).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    if torch.distributed.get_world_size() == 1:
        return tensor
    # torch's functional collectives: autograd (the backward sums each slice's gradients back to its process) and
    # torch.compile; torch.distributed.nn.functional.all_gather, which they replace, is deprecated.
    from torch.distributed import _functional_collectives as collectives

    gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    return gather(tensor.contiguous(), 0, torch.distributed.group.WORLD)


def sew_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    person_ids: torch.Tensor,
    caption_quality: torch.Tensor | None = None,
    margin: float = 0.1,
    temperature: float | torch.Tensor = 0.02,
    formulation: str = "tighten",
) -> torch.Tensor:
    """Sew loss: similarity-distribution matching guided by caption quality, in both directions.

    Args:
        image_embeds: [batch, dim] image i of pair i (normalised here; any scale accepted).
        text_embeds: [batch, dim] caption i of pair i.
        person_ids: [batch] identity of pair i; every same-identity pair is a positive.
        caption_quality: [batch] q_i in [0, 1] (information density of caption i); `None` means q = 1.
        margin: the strength m, in cosine units (0 gives IRRA's SDM in every formulation).
        temperature: tau; logits are cosine / tau.
        formulation: one of `SEW_FORMULATIONS`: "tighten" shifts caption i's positive logits by -m * q_i / tau,
            "relax" by +m * (1 - q_i) / tau, "compress" adds the quality-weighted pull of positives.

    Returns:
        Scalar: mean over captions of KL(softmax(z_i) || Q_i) + mean over images of KL(softmax(u_i) || Q_i),
        Q being the identity-normalised positive mask (see docs/method.md), plus the pull for "compress".
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must both be [batch, dim], got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}."
        )
    if formulation not in SEW_FORMULATIONS:
        raise ValueError(f"formulation must be one of {SEW_FORMULATIONS}, got {formulation!r}.")
    batch_size = image_embeds.shape[0]
    if person_ids.shape != (batch_size,):
        raise ValueError(f"person_ids must have shape [{batch_size}], got {tuple(person_ids.shape)}.")
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    similarity = text_embeds @ image_embeds.t()  # s_ij = cos(text_i, image_j)
    positives = (person_ids[:, None] == person_ids[None, :]).float()
    target = positives / positives.sum(dim=1, keepdim=True)  # symmetric: same-identity rows count alike
    if caption_quality is None:
        caption_quality = similarity.new_ones(batch_size)
    quality = caption_quality.to(similarity.dtype)
    # Shift of caption i's positive similarities (row i of text->image, column i of image->text).
    shift = {"tighten": -margin * quality, "relax": margin * (1 - quality)}.get(formulation)
    if shift is None:
        shift = similarity.new_zeros(batch_size)
    text_to_image = (similarity + shift[:, None] * positives) / temperature
    image_to_text = (similarity.t() + shift[None, :] * positives) / temperature
    log_target = torch.log(target + 1e-8)

    def matching(logits):
        log_prob = F.log_softmax(logits, dim=1)
        return (log_prob.exp() * (log_prob - log_target)).sum(dim=1).mean()

    loss = matching(text_to_image) + matching(image_to_text)
    if formulation == "compress" and margin != 0:
        distance = target * (1 - similarity)  # Q_ij (1 - s_ij) on same-identity pairs
        pull = (distance * quality[:, None]).sum(dim=1).mean() + (distance.t() * quality[None, :]).sum(dim=1).mean()
        loss = loss + margin / temperature * pull
    return loss


def sample_mcm_rows(batch_size: int, fraction: float, device=None, generator: torch.Generator | None = None):
    """The pairs of a training batch whose masked caption goes through MCM: `round(fraction * batch_size)` rows
    (at least one) drawn at random without replacement, in random order; None when `fraction >= 1` (every row).

    Drawn anew at every step, they make the MCM loss an unbiased estimate of the whole batch's loss.
    """
    if fraction >= 1:
        return None
    rows = torch.randperm(batch_size, device=device, generator=generator)
    return rows[: max(1, round(fraction * batch_size))]


def batch_vocabulary(words: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vocabulary rows the MCM head scores when only the batch's words are candidates.

    Args:
        words: token ids of the batch's captions (any shape; padding excluded by the caller).
        targets: [positions] the masked tokens' ids (all of them occur in `words` or are added here).

    Returns:
        (candidates [num_candidates], sorted distinct token ids of `words` and `targets`;
         targets [positions] mapped to their position in `candidates`).
    """
    candidates = torch.unique(torch.cat([words.flatten(), targets]))
    return candidates, torch.searchsorted(candidates, targets)


def masked_positions(labels: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A fixed number of positions per caption, its masked ones first (in order), and their labels.

    Args:
        labels: [rows, length] MCM labels (IGNORE_INDEX where nothing is masked).
        count: positions kept per caption; None (or at least `length`): every position, in place.

    Returns:
        (positions [rows, count] LongTensor, or None for every position; labels [rows, count] at them). A
        caption with fewer masked tokens is padded with unmasked positions, whose label is IGNORE_INDEX; one with
        more keeps its first `count`.
    """
    if count is None or count >= labels.shape[1]:
        return None, labels
    positions = torch.argsort((labels == IGNORE_INDEX).to(torch.int8), dim=1, stable=True)[:, :count]
    return positions, labels.gather(1, positions)


def batch_vocabulary_fixed(
    words: torch.Tensor, words_valid: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`batch_vocabulary` in tensors whose size is known before the data: `words.numel() + targets.numel()`
    candidate slots holding each distinct id of the valid words and of the targets once, sorted, the other slots
    marked invalid (the caller sets their logits to -inf, so the softmax is the one over the distinct words).

    Args:
        words: token ids of the batch's captions (any shape); words_valid: the same shape, False for padding.
        targets: masked tokens' ids (any shape), IGNORE_INDEX where nothing is scored.

    Returns:
        (candidates [slots] ids (0 in invalid slots), targets mapped to their candidate slot (IGNORE_INDEX kept),
        valid [slots] bool).
    """
    scored = targets != IGNORE_INDEX
    ids = torch.cat([words.flatten(), targets.flatten()])
    keep = torch.cat([words_valid.flatten().bool(), scored.flatten()])
    beyond = torch.iinfo(ids.dtype).max  # sorts after every real id
    ordered = torch.sort(torch.where(keep, ids, torch.full_like(ids, beyond))).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    valid = first & (ordered != beyond)
    mapped = torch.searchsorted(ordered, torch.where(scored, targets, torch.zeros_like(targets)))  # first slot of an id
    return torch.where(valid, ordered, 0), torch.where(scored, mapped, IGNORE_INDEX), valid


def masked_caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the MCM head over masked positions only (labels are IGNORE_INDEX elsewhere)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def identity_loss(
    classifier: nn.Module, image_features: torch.Tensor, text_features: torch.Tensor, person_ids: torch.Tensor
) -> torch.Tensor:
    """Identity classification on both modalities, averaged: (CE(image) + CE(text)) / 2."""
    image_loss = F.cross_entropy(classifier(image_features).float(), person_ids)
    text_loss = F.cross_entropy(classifier(text_features).float(), person_ids)
    return (image_loss + text_loss) / 2


__all__ = [
    "IGNORE_INDEX",
    "SEW_FORMULATIONS",
    "batch_vocabulary",
    "batch_vocabulary_fixed",
    "gather_with_grad",
    "identity_loss",
    "masked_caption_loss",
    "masked_positions",
    "sample_mcm_rows",
    "sew_loss",
]
