"""CLIP's BPE tokenizer with DECD's mask token, built offline from the vocabulary shipped in `decd/assets`.

The vocabulary (OpenAI's, MIT; converted by `scripts/convert_clip_vocab.py`) is looked up lazily, and only
when a tokenizer is built from scratch rather than loaded with `from_pretrained`. This flat module travels
to the Hugging Face Hub as remote code, so it imports only the standard library and transformers.
"""

import importlib.resources
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

try:  # relative imports when loaded as Hub remote code (transformers copies the siblings)
    from .configuration_decd import CLIP_CONTEXT_LENGTH
except ImportError:  # installed as top-level modules
    from configuration_decd import CLIP_CONTEXT_LENGTH

MASK_TOKEN = "<|mask|>"  # appended to CLIP's vocabulary, so its id is configuration_decd.CLIP_VOCAB_SIZE


def _assets_directory():
    """Folder (a Path or importlib Traversable) holding the CLIP ``vocab.json`` and ``merges.txt``."""
    local = Path(__file__).resolve().parent / "decd" / "assets"
    if (local / "vocab.json").is_file():
        return local
    try:  # installed package; optional because this module may run alone as Hub remote code
        installed = importlib.resources.files("decd") / "assets"
        if (installed / "vocab.json").is_file():
            return installed
    except (ImportError, TypeError):
        pass
    raise FileNotFoundError(
        "The CLIP vocabulary (decd/assets/vocab.json, merges.txt) was not found. Install the `decd` package, "
        "or load a saved processor with DecdProcessor.from_pretrained(path)."
    )


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of OpenAI CLIP's BPE tokenizer (49,408 tokens), read once."""
    assets = _assets_directory()
    vocab = json.loads((assets / "vocab.json").read_text(encoding="utf-8"))
    lines = (assets / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = tuple(tuple(line.split()) for line in lines if line and not line.startswith("#version"))
    return vocab, merges


def default_clip_tokenizer(model_max_length: int = CLIP_CONTEXT_LENGTH) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer plus ``MASK_TOKEN`` as its mask token (the id after CLIP's vocabulary)."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), mask_token=MASK_TOKEN, model_max_length=model_max_length
    )


__all__ = ["MASK_TOKEN", "clip_vocabulary", "default_clip_tokenizer"]
