"""What DECD reads off a caption's text: whether it is one, its quality (information density), its masked copy.

- `caption_problem`: the one rule for what a caption must contain (a word that is not a stop word), which the
  processor, the dataset loader and every search entry point apply;
- `compute_caption_quality`: q = min(1, distinct informative words / reference), the Sew loss's margin scale.
- `mask_caption_tokens`: the Masking Caption Modeling rule (15%; 80/10/10; never special tokens; at least
  one per caption), which `DecdProcessor.mask_captions` applies with its tokenizer's special ids.

See docs/method.md. This flat module travels to the Hugging Face Hub as remote code, so it imports only the
standard library and torch.
"""

import re
from collections.abc import Sequence

import torch

try:  # relative imports when loaded as Hub remote code (transformers copies the siblings)
    from .losses_decd import IGNORE_INDEX
except ImportError:  # installed as top-level modules
    from losses_decd import IGNORE_INDEX

# Function words of English: articles, pronouns and determiners, prepositions, auxiliary and modal
# verbs, conjunctions, and the fragments the word regex leaves from contractions ("man's" -> "s").
# Deliberately only function words: nouns and verbs that recur in person descriptions ("man",
# "woman", "person", "wearing") are left out because the list must not encode a data set.
STOP_WORDS = frozenset(
    """
    a an the
    i me my mine myself we us our ours ourselves you your yours yourself yourselves
    he him his himself she her hers herself it its itself they them their theirs themselves
    this that these those who whom whose which what whoever whatever
    each every either neither some any all both few many much more most other another such
    own same no not nor
    about above across after against along among around as at before behind below beneath beside
    besides between beyond by down during for from in inside into near of off on onto out outside
    over past per since than through throughout till to toward towards under underneath until up
    upon via with within without
    am is are was were be been being
    has have had having do does did doing
    can could may might must shall should will would
    and or but so yet if then because although though while whereas whether
    also too very just only there here where when how why
    s t d m ll re ve
    """.split()
)

_WORD_PATTERN = re.compile(r"[a-z]+")
_ANY_WORD = re.compile(r"[^\W_]+")  # letters or digits, in any script
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u2060-\u2064\ufeff]")  # zero-width characters, soft hyphen


def caption_problem(text: str) -> str | None:
    """Why `text` is not a caption, or None: a caption holds at least one word (letters or digits, any script)
    that is not an English function word (`STOP_WORDS`); zero-width characters and whitespace of any kind
    (non-breaking spaces included) do not count."""
    visible = _INVISIBLE.sub("", text)
    if not visible.strip():
        return "empty or whitespace only"
    if not set(_ANY_WORD.findall(visible.lower())) - STOP_WORDS:
        return "made of punctuation or function words only (a, the, with, ...): say what the person looks like"
    return None


def compute_caption_quality(texts: str | Sequence[str], reference_words: int = 12) -> torch.FloatTensor:
    """Caption quality ("information density") q = min(1, n / reference_words).

    n is the number of DISTINCT informative words of a caption: lower-cased alphabetic words
    (regex ``[a-z]+`` on ``text.lower()``) that are not in ``STOP_WORDS``. Digits and non-ASCII
    letters are not part of words.

    Args:
        texts: one caption or a sequence of captions.
        reference_words: number of distinct informative words at which quality saturates at 1.

    Returns:
        float32 tensor of shape [batch], values in [0, 1] (a fraction).
    """
    if reference_words <= 0:
        raise ValueError(f"reference_words must be a positive number of words, got {reference_words}.")
    if isinstance(texts, str):
        texts = [texts]
    counts = [len(set(_WORD_PATTERN.findall(text.lower())) - STOP_WORDS) for text in texts]
    counts = torch.tensor(counts, dtype=torch.float32)
    return torch.clamp(counts / reference_words, max=1.0)


def mask_caption_tokens(
    input_ids,
    attention_mask=None,
    *,
    mask_token_id: int,
    never_masked: Sequence[int],
    ordinary_vocab_size: int,
    mask_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> dict:
    """Mask caption tokens for the Masking Caption Modeling loss (BERT-style, see docs/method.md).

    Candidates are attended tokens whose id is not in `never_masked` (start-of-text, end-of-text/padding,
    the mask token). Each candidate is selected with probability `mask_probability`; a caption with
    candidates but no selection gets one selected at random. Selected tokens become `mask_token_id` (80%),
    a uniformly random ordinary token (10%; ids below `ordinary_vocab_size`), or stay unchanged (10%).

    Args:
        input_ids: LongTensor [batch, length]; not modified.
        attention_mask: [batch, length], 1 for real tokens; default: all ones.
        generator: torch.Generator on the device of `input_ids` for reproducible masks.

    Returns:
        dict with ``masked_input_ids`` (LongTensor [batch, length]) and ``mcm_labels`` (LongTensor
        [batch, length]: the original id at selected positions, IGNORE_INDEX (-100) elsewhere).
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}."
        )
    never_masked = torch.tensor(sorted(set(never_masked)), device=input_ids.device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, never_masked)

    # Every draw happens on every call so the generator advances the same way whatever the data.
    shape, device = input_ids.shape, input_ids.device
    selection_draws = torch.rand(shape, generator=generator, device=device)
    fallback_draws = torch.rand(shape, generator=generator, device=device)
    action_draws = torch.rand(shape, generator=generator, device=device)
    random_tokens = torch.randint(0, ordinary_vocab_size, shape, generator=generator, device=device)

    selected = candidates & (selection_draws < mask_probability)
    # At least one selection per caption that has candidates: the candidate with the largest draw.
    needs_one = candidates.any(dim=1) & ~selected.any(dim=1)
    fallback_position = fallback_draws.masked_fill(~candidates, -1.0).argmax(dim=1)
    fallback = torch.zeros_like(selected)
    fallback[torch.arange(shape[0], device=device), fallback_position] = True
    selected |= fallback & needs_one[:, None]

    masked_input_ids = input_ids.clone()
    to_mask = selected & (action_draws < 0.8)
    to_random = selected & (action_draws >= 0.8) & (action_draws < 0.9)
    masked_input_ids[to_mask] = mask_token_id
    masked_input_ids[to_random] = random_tokens[to_random]
    mcm_labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {"masked_input_ids": masked_input_ids, "mcm_labels": mcm_labels}


__all__ = ["STOP_WORDS", "caption_problem", "compute_caption_quality", "mask_caption_tokens"]
