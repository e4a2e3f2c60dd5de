"""Tests of processing_decd: CLIP tokenisation, crops, caption quality, MCM masking, save/load, errors."""

import gzip
import html
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("processing_decd") is None:  # plain `pytest` from a checkout that is not installed
    sys.path.insert(0, str(REPO_ROOT))

from processing_decd import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    MASK_TOKEN,
    STOP_WORDS,
    DecdProcessor,
    compute_caption_quality,
    default_clip_tokenizer,
)

START_OF_TEXT_ID, END_OF_TEXT_ID, MASK_TOKEN_ID = 49406, 49407, 49408

# (caption, ids). Generated once with the independent re-implementation of OpenAI's
# simple_tokenizer below (reading OpenAI's bpe_simple_vocab_16e6.txt.gz) so no download is needed.
REFERENCE_ENCODINGS = [
    (
        'a photo of a cat',
        [
            49406, 320, 1125, 539, 320, 2368, 49407
        ],
    ),
    (
        'A woman wearing a red T-shirt, blue jeans and white sneakers.',
        [
            49406, 320, 2308, 3309, 320, 736, 339, 268, 2523, 267, 1746, 10157, 537, 1579, 17397, 269, 49407
        ],
    ),
    (
        "The man's backpack is black; he isn't carrying anything!",
        [
            49406, 518, 786, 568, 14894, 533, 1449, 282, 797, 2923, 713, 9920, 3582, 256, 49407
        ],
    ),
    (
        'Numbers: 12345 and 3.14, plus 2nd/3rd floor at 10:30am.',
        [
            49406, 6121, 281, 272, 273, 274, 275, 276, 537, 274, 269, 272, 275, 267, 3097, 273, 1764, 270, 274,
            1973, 4125, 536, 272, 271, 281, 274, 271, 687, 269, 49407
        ],
    ),
    (
        'Café naïve résumé — 東京 😀 Ünïcödé Straße',
        [
            49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 2005, 48338, 21078, 361, 7334, 6522, 77, 35689,
            66, 7255, 67, 4166, 1894, 127, 253, 324, 49407
        ],
    ),
    (
        '  multiple   spaces\tand\nnewlines  ',
        [
            49406, 6470, 9006, 537, 1218, 3418, 49407
        ],
    ),
    (
        "rock'n'roll it's '''quoted''' (brackets) [square] {curly} <angle> #hash @at $5 100% a&b",
        [
            49406, 2172, 262, 333, 262, 3341, 585, 568, 6, 8445, 27706, 6, 8445, 263, 36183, 264, 314, 3999,
            316, 346, 20795, 348, 283, 6946, 285, 258, 19199, 287, 536, 259, 276, 272, 271, 271, 260, 320, 261,
            321, 49407
        ],
    ),
    (
        "she'll they've we're i'm he'd",
        [
            49406, 1043, 1342, 889, 1200, 649, 982, 328, 880, 797, 1896, 49407
        ],
    ),
    (
        'He is WEARING A GREY-ish Hoodie...',
        [
            49406, 797, 533, 3309, 320, 5046, 268, 1061, 13444, 678, 49407
        ],
    ),
    (
        'Мужчина в синей куртке',
        [
            49406, 38018, 39729, 140, 114, 141, 229, 16701, 22705, 27080, 140, 366, 23669, 16701, 22705, 22176,
            140, 373, 27152, 39729, 16370, 17875, 27152, 140, 369, 49407
        ],
    ),
]
LONG_CAPTION = " ".join(f"word{index} blue" for index in range(100))
# First 75 BPE tokens of LONG_CAPTION between start- and end-of-text: what CLIP's truncation gives.
LONG_CAPTION_IDS = [
    49406, 2653, 271, 1746, 2653, 272, 1746, 2653, 273, 1746, 2653, 274, 1746, 2653, 275, 1746, 2653,
    276, 1746, 2653, 277, 1746, 2653, 278, 1746, 2653, 279, 1746, 2653, 280, 1746, 2653, 272, 271, 1746,
    2653, 272, 272, 1746, 2653, 272, 273, 1746, 2653, 272, 274, 1746, 2653, 272, 275, 1746, 2653, 272,
    276, 1746, 2653, 272, 277, 1746, 2653, 272, 278, 1746, 2653, 272, 279, 1746, 2653, 272, 280, 1746,
    2653, 273, 271, 1746, 2653, 49407
]


@pytest.fixture(scope="module")
def processor():
    return DecdProcessor()


# ----------------------------------------------------------------------------- tokenisation
def test_vocabulary_and_special_tokens(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 49409  # 49,408 CLIP tokens + the mask token
    assert tokenizer.bos_token_id == START_OF_TEXT_ID
    assert tokenizer.eos_token_id == END_OF_TEXT_ID == tokenizer.pad_token_id
    assert tokenizer.mask_token == MASK_TOKEN and tokenizer.mask_token_id == MASK_TOKEN_ID
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == END_OF_TEXT_ID
    assert tokenizer.model_max_length == 77


def test_asset_files_are_openai_vocabulary():
    assets = REPO_ROOT / "decd" / "assets"
    vocab = json.loads((assets / "vocab.json").read_text(encoding="utf-8"))
    lines = (assets / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split()) for line in lines[1:]]
    assert len(vocab) == 49408 and len(merges) == 48894
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == START_OF_TEXT_ID and vocab["<|endoftext|>"] == END_OF_TEXT_ID
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    # Every merge joins two known tokens into the token with id 512 + its rank.
    for rank, (left, right) in enumerate(merges):
        assert len((left, right)) == 2 and left in vocab and right in vocab
        assert vocab[left + right] == 512 + rank
    assert (assets / "NOTICE").is_file()


@pytest.mark.parametrize("caption, expected_ids", REFERENCE_ENCODINGS)
def test_tokenisation_matches_openai_clip(processor, caption, expected_ids):
    assert processor(text=caption)["input_ids"][0].tolist() == expected_ids


def test_truncation_keeps_end_of_text_last(processor):
    ids = processor(text=[LONG_CAPTION, "a photo of a cat"])
    assert ids["input_ids"].shape == (2, 77)
    assert ids["input_ids"][0].tolist() == LONG_CAPTION_IDS
    assert ids["input_ids"][0, -1].item() == END_OF_TEXT_ID
    assert ids["attention_mask"][0].sum().item() == 77
    # Padding to the longest uses the end-of-text id with attention 0.
    assert ids["input_ids"][1, :7].tolist() == REFERENCE_ENCODINGS[0][1]
    assert (ids["input_ids"][1, 7:] == END_OF_TEXT_ID).all() and ids["attention_mask"][1].sum().item() == 7
    long_text = " ".join(["person"] * 200)
    truncated = processor(text=long_text)["input_ids"][0]
    assert truncated.shape == (77,) and truncated[-1].item() == END_OF_TEXT_ID


def test_mask_token_in_text_and_decoding(processor):
    ids = processor(text=f"a {MASK_TOKEN} of a cat")["input_ids"][0].tolist()
    assert ids == [START_OF_TEXT_ID, 320, MASK_TOKEN_ID, 539, 320, 2368, END_OF_TEXT_ID]
    assert processor.decode(REFERENCE_ENCODINGS[0][1], skip_special_tokens=True) == "a photo of a cat"
    assert processor.batch_decode([REFERENCE_ENCODINGS[0][1]], skip_special_tokens=True) == ["a photo of a cat"]


# A small, independent re-implementation of OpenAI's simple_tokenizer (no ftfy: the captions above
# need no text repair). It cross-checks the hard-coded ids when OpenAI's BPE file is installed.
def _bytes_to_unicode():
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    byte_values, code_points, shift = printable[:], printable[:], 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, map(chr, code_points)))


def _openai_encode(bpe_path, text):
    import regex

    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(merge.split()) for merge in merges]
    byte_encoder = _bytes_to_unicode()
    tokens = list(byte_encoder.values())
    tokens += [token + "</w>" for token in tokens] + ["".join(merge) for merge in merges]
    encoder = {token: index for index, token in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    text = regex.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip().lower()
    ids = [encoder["<|startoftext|>"]]
    for piece in pattern.findall(text):
        word = tuple(byte_encoder[byte] for byte in piece.encode("utf-8"))
        word = word[:-1] + (word[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids.extend(encoder[token] for token in word)
    return ids + [encoder["<|endoftext|>"]]


def _installed_openai_bpe():
    """OpenAI's BPE file from the `openai-clip` package (`clip`, installed by the test set-up) or open_clip."""
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)  # finds the folder without importing (clip imports torchvision)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
            if candidate.is_file():
                return candidate
    return None


def test_reference_ids_match_independent_openai_bpe():
    bpe_path = _installed_openai_bpe()
    assert bpe_path is not None, "OpenAI's bpe_simple_vocab_16e6.txt.gz: `make setup` installs openai-clip (--no-deps)"
    for caption, expected_ids in REFERENCE_ENCODINGS:
        assert _openai_encode(bpe_path, caption) == expected_ids, caption
    assert _openai_encode(bpe_path, LONG_CAPTION)[:76] == LONG_CAPTION_IDS[:76]


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


# ----------------------------------------------------------------------------- MCM masking
WORDS = "man woman young old wearing black white red blue green grey jacket coat shirt jeans shorts skirt shoes".split()
WORDS += "boots bag backpack carrying holding hair long short dark light striped with a the and of in on".split()


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


# ----------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(processor, tmp_path):
    custom = DecdProcessor(image_size=(256, 96), quality_reference_words=8, mask_probability=0.2)
    custom.save_pretrained(tmp_path)
    loaded = DecdProcessor.from_pretrained(tmp_path)
    assert loaded.image_size == (256, 96)
    assert loaded.quality_reference_words == 8 and loaded.mask_probability == 0.2
    assert loaded.tokenizer.mask_token == MASK_TOKEN and loaded.tokenizer.mask_token_id == MASK_TOKEN_ID
    assert len(loaded.tokenizer) == len(custom.tokenizer)

    texts = [caption for caption, _ in REFERENCE_ENCODINGS] + [LONG_CAPTION]
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


def test_default_tokenizer_builds_offline():
    tokenizer = default_clip_tokenizer()
    assert tokenizer("a photo of a cat")["input_ids"] == REFERENCE_ENCODINGS[0][1]


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


def test_high_bit_depth_and_float_images_are_scaled_by_their_range_not_clipped(processor):
    ramp16 = np.linspace(0, 65535, 8 * 8).reshape(8, 8).astype(np.uint16)
    ramp8 = np.rint(ramp16 / 65535 * 255).astype(np.uint8)
    expected = processor(images=PIL.Image.fromarray(ramp8))["pixel_values"]
    for image in (PIL.Image.fromarray(ramp16), ramp16, PIL.Image.fromarray(ramp16.astype(np.int32), mode="I"),
                  PIL.Image.fromarray((ramp16 / 65535).astype(np.float32)), ramp16.astype(np.float64) / 65535):
        assert torch.equal(processor(images=image)["pixel_values"], expected), type(image)
    # Floats outside [0, 1] are stretched from their own range: 0..1000 reads like 0..1.
    stretched = processor(images=np.full((8, 8, 3), 1000.0) * np.linspace(0, 1, 8)[None, :, None])["pixel_values"]
    assert torch.equal(stretched, processor(images=np.ones((8, 8, 3)) * np.linspace(0, 1, 8)[None, :, None])
                       ["pixel_values"])


def test_alpha_is_composited_onto_white_for_every_alpha_mode(processor):
    white = processor(images=PIL.Image.new("RGB", (8, 8), (255, 255, 255)))["pixel_values"]
    transparent = [PIL.Image.new("RGBA", (8, 8), (10, 20, 30, 0)), PIL.Image.new("LA", (8, 8), (10, 0)),
                   np.zeros((8, 8, 4), dtype=np.uint8)]
    palette = PIL.Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    for image in transparent + [palette]:
        assert torch.equal(processor(images=image)["pixel_values"], white)
    half = processor(images=PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 128)))["pixel_values"][0, :, 0, 0]
    grey = processor(images=PIL.Image.new("RGB", (8, 8), (127, 127, 127)))["pixel_values"][0, :, 0, 0]
    assert torch.allclose(half, grey, atol=0.02)


def test_nothing_given_is_refused(processor):
    with pytest.raises(ValueError, match="neither"):
        processor()
