"""Tests of processing_decd: CLIP tokenisation, crops, caption quality, MCM masking, save/load, errors."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from captions_decd import caption_problem
from processing_decd import CLIP_MEAN, CLIP_STD, DecdProcessor
from tokenization_decd import MASK_TOKEN

from .test_tokenization import LONG_CAPTION, MASK_TOKEN_ID, REFERENCE_ENCODINGS

REPO_ROOT = Path(__file__).resolve().parent.parent





# ----------------------------------------------------------------------------- images
def test_pixel_values_shape_and_normalisation(processor):
    colour = (10, 128, 250)
    images = [
        PIL.Image.new("RGB", (64, 200), colour),
        np.full((50, 30, 3), colour, dtype=np.uint8),
        torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, 40, 20).clone(),
    ]
    pixel_values = processor(images=images)["pixel_values"]
    assert pixel_values.shape == (3, 3, 384, 128) and pixel_values.dtype == torch.float32
    expected = (torch.tensor(colour) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for index in range(3):
        for channel in range(3):
            assert torch.allclose(pixel_values[index, channel], expected[channel].expand(384, 128), atol=1e-5)


def test_single_image_and_convertible_modes(processor):
    single = processor(images=PIL.Image.new("RGB", (16, 16), (1, 2, 3)))["pixel_values"]
    assert single.shape == (1, 3, 384, 128)
    modes = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr"]
    images = [PIL.Image.new(mode, (20, 40)) for mode in modes] + [np.zeros((40, 20), dtype=np.uint8)]
    assert processor(images=images)["pixel_values"].shape == (len(images), 3, 384, 128)
    grey = processor(images=PIL.Image.new("L", (8, 8), 200))["pixel_values"][0]
    assert torch.allclose(grey[0, 0, 0], (200 / 255 - torch.tensor(CLIP_MEAN[0])) / CLIP_STD[0], atol=1e-5)


def test_text_and_images_together(processor):
    batch = processor(text=["a man in a red coat", "a woman"], images=[PIL.Image.new("RGB", (10, 30))] * 2)
    assert set(batch) == {"input_ids", "attention_mask", "caption_quality", "pixel_values"}
    assert batch["caption_quality"].dtype == torch.float32 and batch["caption_quality"].shape == (2,)


# ----------------------------------------------------------------------------- MCM masking



# ----------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(processor, tmp_path):
    custom = DecdProcessor(image_size=(256, 96), quality_reference_words=8, mask_probability=0.2)
    custom.save_pretrained(tmp_path)
    loaded = DecdProcessor.from_pretrained(tmp_path)
    assert loaded.image_size == (256, 96)
    assert loaded.quality_reference_words == 8 and loaded.mask_probability == 0.2
    assert loaded.tokenizer.mask_token == MASK_TOKEN and loaded.tokenizer.mask_token_id == MASK_TOKEN_ID
    assert len(loaded.tokenizer) == len(custom.tokenizer)

    texts = [caption for caption, _ in REFERENCE_ENCODINGS if caption_problem(caption) is None] + [LONG_CAPTION]
    images = [PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 25, 3), dtype=np.uint8))]
    before, after = custom(text=texts, images=images), loaded(text=texts, images=images)
    assert set(before) == set(after)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert after["pixel_values"].shape == (1, 3, 256, 96)
    masks = [
        proc.mask_captions(before["input_ids"], before["attention_mask"], torch.Generator().manual_seed(5))
        for proc in (custom, loaded)
    ]
    assert all(torch.equal(masks[0][key], masks[1][key]) for key in masks[0])


def test_module_loads_alone_next_to_saved_processor(processor, tmp_path):
    # As Hub remote code: the module file copied alone, without the decd package or its assets.
    processor.save_pretrained(tmp_path / "saved")
    shutil.copy(REPO_ROOT / "processing_decd.py", tmp_path / "saved" / "processing_decd.py")
    spec = importlib.util.spec_from_file_location("copied_processing_decd", tmp_path / "saved" / "processing_decd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded = module.DecdProcessor.from_pretrained(tmp_path / "saved")
    assert loaded(text="a photo of a cat")["input_ids"][0].tolist() == REFERENCE_ENCODINGS[0][1]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "text, message",
    [
        (["a man", ""], "Caption 1"),
        (["a man", "ok", "   \t"], "Caption 2"),
        (["a man", 123], "Caption 1"),
        ([None], "Caption 0"),
        ([], "empty list"),
        (42, "string or a list"),
    ],
)
def test_bad_text_is_refused(processor, text, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text)


@pytest.mark.parametrize(
    "bad_image, message",
    [
        (np.zeros((8, 8, 2), dtype=np.uint8), "1, 3 or 4"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "empty"),
        (np.zeros((8, 0), dtype=np.uint8), "empty"),
        (torch.zeros(2, 8, 8), "1, 3 or 4"),
        (np.full((8, 8, 3), np.nan), "NaN"),
        (np.zeros((8, 8, 3), dtype=bool), "not an image"),
        (PIL.Image.new("RGB", (0, 5)), "empty"),
        ("no/such/file.png", "no such image file"),
        (b"not an image at all", "not a readable image"),
        (3.5, "float"),
    ],
)
def test_bad_image_is_refused_with_its_index(processor, bad_image, message):
    good = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=message) as error:
        processor(images=[good, good, bad_image])
    assert ("Image 2" if not isinstance(bad_image, str) else bad_image) in str(error.value)


def test_nothing_given_is_refused(processor):
    with pytest.raises(ValueError, match="neither"):
        processor()
