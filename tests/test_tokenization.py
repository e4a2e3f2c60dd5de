"""CLIP's tokenizer with DECD's mask token (tokenization_decd): OpenAI's vocabulary and ids, truncation, the mask token."""

import gzip
import html
import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

from tokenization_decd import MASK_TOKEN, default_clip_tokenizer

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
    assert processor.tokenizer(caption, truncation=True, max_length=77)["input_ids"] == expected_ids


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


def test_default_tokenizer_builds_offline():
    tokenizer = default_clip_tokenizer()
    assert tokenizer("a photo of a cat")["input_ids"] == REFERENCE_ENCODINGS[0][1]
