"""What DECD reads off captions (captions_decd): caption quality, and the MCM masking rule through the processor."""


import numpy as np
import pytest
import torch

from captions_decd import STOP_WORDS, compute_caption_quality
from processing_decd import DecdProcessor

from .helpers import BOS as START_OF_TEXT_ID, EOS as END_OF_TEXT_ID, MASK as MASK_TOKEN_ID

WORDS = "man woman young old wearing black white red blue green grey jacket coat shirt jeans shorts skirt shoes".split()
WORDS += "boots bag backpack carrying holding hair long short dark light striped with a the and of in on".split()



# ----------------------------------------------------------------------------- caption quality
def test_caption_quality_values():
    twelve_words = "woman wearing long black coat blue jeans white sneakers carrying red handbag"
    quality = compute_caption_quality(
        ["a the of and", "a man", twelve_words, twelve_words + " shoes hat", "red red RED shirt", "man 42 ok"]
    )
    assert quality.dtype == torch.float32 and quality.shape == (6,)
    expected = [0.0, 1 / 12, 1.0, 1.0, 2 / 12, 2 / 12]
    assert torch.allclose(quality, torch.tensor(expected))
    assert compute_caption_quality("blue shirt", reference_words=4).tolist() == [0.5]
    assert {"a", "the", "of", "with", "is", "and", "his", "s"} <= STOP_WORDS
    assert not {"man", "woman", "person", "wearing", "shirt"} & STOP_WORDS


def test_processor_caption_quality_uses_its_reference(processor):
    assert processor(text="blue shirt")["caption_quality"].tolist() == pytest.approx([2 / 12])
    small = DecdProcessor(processor.image_processor, processor.tokenizer, quality_reference_words=2)
    assert small(text="blue shirt")["caption_quality"].tolist() == [1.0]


def _synthetic_captions(count, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(15, 40))) for _ in range(count)]


def test_masking_statistics(processor):
    batch = processor(text=_synthetic_captions(2000))
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    original = input_ids.clone()
    result = processor.mask_captions(input_ids, attention_mask, generator=torch.Generator().manual_seed(0))
    masked, labels = result["masked_input_ids"], result["mcm_labels"]
    assert torch.equal(input_ids, original)  # not modified in place
    assert masked.shape == labels.shape == input_ids.shape and masked.dtype == labels.dtype == torch.long

    special = (input_ids == START_OF_TEXT_ID) | (input_ids == END_OF_TEXT_ID) | (attention_mask == 0)
    candidates = ~special
    selected = labels != -100
    assert not (selected & special).any()  # never start/end of text or padding
    assert torch.equal(masked[special], input_ids[special])
    assert torch.equal(labels[selected], input_ids[selected])
    assert torch.equal(masked[~selected], input_ids[~selected])
    assert selected.any(dim=1).all()  # at least one per caption

    fraction = selected.sum().item() / candidates.sum().item()
    assert abs(fraction - 0.15) < 0.015, fraction
    to_mask = (masked == MASK_TOKEN_ID) & selected
    unchanged = (masked == input_ids) & selected
    to_random = selected & ~to_mask & ~unchanged
    total = selected.sum().item()
    assert abs(to_mask.sum().item() / total - 0.8) < 0.03
    assert abs(to_random.sum().item() / total - 0.1) < 0.03
    assert abs(unchanged.sum().item() / total - 0.1) < 0.03
    assert (masked[to_random] < START_OF_TEXT_ID).all()  # random tokens are never special


def test_masking_is_reproducible_and_guarantees_one(processor):
    batch = processor(text=["a man", "red"])
    first = processor.mask_captions(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(3))
    second = processor.mask_captions(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(3))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert ((first["mcm_labels"] != -100).sum(dim=1) >= 1).all()
    # A caption with no candidate (only special tokens) gets nothing masked.
    empty = processor.mask_captions(torch.tensor([[START_OF_TEXT_ID, END_OF_TEXT_ID, END_OF_TEXT_ID]]))
    assert (empty["mcm_labels"] == -100).all()
