"""Processor for DECD: person crops and captions in, CLIP-style model inputs out.

This flat module also travels to the Hugging Face Hub as remote code (``trust_remote_code=True``),
so it imports only the standard library, numpy, PIL, torch and transformers. The default CLIP
vocabulary ships in the ``decd`` package (``decd/assets``); it is looked up lazily, and only when a
processor is built from scratch rather than loaded with ``from_pretrained``.

What it adds to a plain CLIP processor:

- person crops are resized to exactly ``image_size`` (384 x 128 by default), never centre-cropped;
- the tokenizer carries a mask token (``<|mask|>``, id 49408 after the 49,408 CLIP tokens);
- ``caption_quality`` (information density of each caption, see ``compute_caption_quality``);
- ``mask_captions`` for the Masking Caption Modeling loss.
"""

import importlib.resources
import io
import json
import re
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import transformers
from transformers import BatchFeature, CLIPTokenizer, ProcessorMixin
from transformers.utils import is_torchvision_available

MASK_TOKEN = "<|mask|>"
# OpenAI CLIP normalisation, per RGB channel, for pixel values in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = (384, 128)  # (height, width) of a person crop
CLIP_CONTEXT_LENGTH = 77
IGNORE_INDEX = -100  # label of positions the MCM loss ignores (PyTorch's cross-entropy default)

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
def _clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    assets = _assets_directory()
    vocab = json.loads((assets / "vocab.json").read_text(encoding="utf-8"))
    lines = (assets / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = tuple(tuple(line.split()) for line in lines if line and not line.startswith("#version"))
    return vocab, merges


def default_clip_tokenizer(model_max_length: int = CLIP_CONTEXT_LENGTH) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (49,408 tokens) plus ``MASK_TOKEN`` as its mask token (id 49408).

    Built offline from the vocabulary shipped in ``decd/assets``.
    """
    vocab, merges = _clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), mask_token=MASK_TOKEN, model_max_length=model_max_length
    )


def default_image_processor(image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE):
    """CLIP image processor that resizes to exactly (height, width) with bicubic resampling, no crop.

    The backend is the one ``AutoImageProcessor.from_pretrained`` picks (torchvision when installed,
    PIL otherwise), so a saved and reloaded processor computes exactly the same pixels. Choosing it
    here also avoids transformers' warning about ``CLIPImageProcessor`` falling back to PIL.
    """
    if is_torchvision_available() or not hasattr(transformers, "CLIPImageProcessorPil"):
        image_processor_class = transformers.CLIPImageProcessor
    else:
        image_processor_class = transformers.CLIPImageProcessorPil
    height, width = image_size
    return image_processor_class(
        do_resize=True,
        size={"height": height, "width": width},
        resample=PIL.Image.Resampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


# PIL modes that convert to RGB as they are; modes with alpha are composited onto white first, and
# high-bit-depth / float modes are scaled by their value range (see `load_image`).
_DIRECT_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # 100 megapixels: larger files are refused, not decoded


def _scale_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 values of an integer or float image, scaled by its value range (never clipped).

    uint8 stays as it is; 16-bit data (and other integers within [0, 65535] that exceed 255) is
    scaled by 255 / 65535; other integers within [0, 255] are taken as 8-bit; floats within [0, 1]
    are scaled by 255; anything else is stretched from its own minimum..maximum to 0..255.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name}: pixel type {array.dtype} is not an image; pass integers or floats.")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: the image holds NaN or infinite values; replace them before loading it.")
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(array.dtype, np.floating):
        scale_low, scale_high = (0.0, 1.0) if low >= 0 and high <= 1 else (low, high)
    elif array.dtype.itemsize == 2 and low >= 0:
        scale_low, scale_high = 0.0, 65535.0
    elif low >= 0 and high <= 255:
        scale_low, scale_high = 0.0, 255.0
    elif low >= 0 and high <= 65535:
        scale_low, scale_high = 0.0, 65535.0
    else:
        scale_low, scale_high = low, high
    if scale_high == scale_low:  # a constant image outside the usual ranges
        return np.zeros(array.shape, dtype=np.uint8)
    return np.rint((values - scale_low) * (255.0 / (scale_high - scale_low))).astype(np.uint8)


def _array_to_image(array: np.ndarray, name: str) -> PIL.Image.Image:
    """HxW or HxWxC (C in {1, 3, 4}) array of any numeric type to an L / RGB / RGBA PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}: expected height x width x channels with 1, 3 or 4 channels "
            "(numpy) or channels x height x width (torch)."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)}): pass a crop with non-zero size.")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return PIL.Image.fromarray(np.ascontiguousarray(_scale_to_uint8(array, name)), mode=mode)


def _to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """RGB by one rule for every mode: alpha composited onto white, high bit depths scaled by range."""
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in _HIGH_BIT_DEPTH_MODES:
        image = _array_to_image(np.asarray(image), name)
        mode = image.mode
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in _DIRECT_RGB_MODES:
        return image if mode == "RGB" else image.convert("RGB")
    raise ValueError(f"{name} has PIL mode {mode!r}, which has no RGB conversion here: convert it to RGB first.")


def _reduce_for(image: PIL.Image.Image, size) -> PIL.Image.Image:
    """Shrink by integer factors (box filter) while the image stays at least twice `size` on each axis.

    The factors are per axis: crops are resized to exactly `size` (no aspect-preserving crop), so a
    landscape photo going into a portrait input keeps 2x the needed resolution on both axes and no more
    (a 2000 x 1500 draft-decoded JPEG for 384 x 128 becomes 285 x 1500, 1.3 MB instead of 9 MB)."""
    if size is None:
        return image
    height, width = size
    factor_x, factor_y = max(1, int(image.width / width // 2)), max(1, int(image.height / height // 2))
    return image.reduce((factor_x, factor_y)) if max(factor_x, factor_y) >= 2 else image


def _describe_source(image) -> tuple[object, str | None]:
    """(what to open, its file name or None) for the sources `load_image` accepts."""
    if isinstance(image, dict) and ("path" in image or "bytes" in image):  # a `datasets.Image` value
        data, path = image.get("bytes"), image.get("path")
        return (data if data is not None else path), (str(path) if path is not None else None)
    if isinstance(image, (str, Path)) or hasattr(image, "__fspath__"):
        return image, str(image)
    return image, None


def load_image(image, size=None, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, name=None) -> PIL.Image.Image:
    """The RGB picture of an image source: the one way every DECD entry point opens an image.

    Args:
        image: a file path (str / os.PathLike), encoded file bytes, a PIL image, a `datasets` Image
            value (``{"path": ..., "bytes": ...}``), a numpy array (HxW or HxWxC, C in {1, 3, 4}) or a
            torch tensor (CxHxW or HxW).
        size: (height, width) the image is going to be resized to; large files are then decoded
            reduced (JPEG draft mode, then integer box reduction) to no less than twice that size, so
            memory follows the model's input size rather than the camera's.
        max_pixels: images with more pixels (width x height) are refused before decoding; None: no limit.
        name: what error messages call the image (default: its file path, else "image").

    Rules, the same for every source: EXIF orientation is applied; 16-bit and float images are scaled
    by their value range (16-bit by 255/65535, floats in [0, 1] by 255, other ranges from their own
    minimum..maximum), never clipped; alpha (RGBA, LA, transparent palettes) is composited onto white.

    Returns:
        An RGB `PIL.Image.Image`.

    Raises:
        ValueError naming the image: unreadable, truncated or missing file, too many pixels, empty
        image, NaN values, or a shape or type that is not an image.
    """
    source, path = _describe_source(image)
    name = name or path or "image"
    if isinstance(source, torch.Tensor):
        array = source.detach().cpu().numpy()
        return _reduce_for(_to_rgb(_array_to_image(np.moveaxis(array, 0, -1) if array.ndim == 3 else array, name),
                                   name), size)
    if isinstance(source, np.ndarray):
        return _reduce_for(_to_rgb(_array_to_image(source, name), name), size)
    if isinstance(source, PIL.Image.Image):
        return _finish(source, size, max_pixels, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif not (isinstance(source, (str, Path)) or hasattr(source, "__fspath__")):
        raise ValueError(
            f"{name} is a {type(image).__name__}: pass a file path, file bytes, a PIL image, a numpy array or a "
            "torch tensor."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # `max_pixels` decides
            opened = PIL.Image.open(source)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such image file.") from None
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{name}: {error}. Raise max_image_pixels (and PIL.Image.MAX_IMAGE_PIXELS) to load it.") \
            from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image I can read"
        raise ValueError(f"{name}: not a readable image ({type(error).__name__}: {error}).") from None
    try:
        return _finish(opened, size, max_pixels, name, from_file=True)
    finally:
        opened.close()


def _finish(image: PIL.Image.Image, size, max_pixels, name: str, from_file: bool = False) -> PIL.Image.Image:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{name} is empty ({width}x{height}): pass a crop with non-zero size.")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{name} has {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}; "
            "shrink it first or raise the limit (max_image_pixels)."
        )
    opened = image
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if from_file and size is not None and image.format == "JPEG":
            height_wanted, width_wanted = (2 * side for side in size)
            if orientation in _SWAPS_AXES:
                height_wanted, width_wanted = width_wanted, height_wanted
            image.draft(image.mode, (width_wanted, height_wanted))
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise ValueError(f"{name}: the image data cannot be decoded ({type(error).__name__}: {error}); "
                         "replace the file.") from None
    if orientation != 1:
        image = PIL.ImageOps.exif_transpose(image)  # a copy without the orientation tag: applied once
    result = _reduce_for(_to_rgb(image, name), size)
    return result.copy() if from_file and result is opened else result  # the caller closes the file


def _is_single_image(images) -> bool:
    if hasattr(images, "__fspath__") or isinstance(
            images, (PIL.Image.Image, str, Path, bytes, bytearray, memoryview, dict)):
        return True
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim <= 3
    return False


class DecdProcessor(ProcessorMixin):
    """Joins a CLIP image processor and a CLIP tokenizer (with a mask token) for DECD.

    Args:
        image_processor: CLIP image processor; default: bicubic resize to ``image_size``, no crop,
            CLIP mean/std.
        tokenizer: CLIP tokenizer carrying a mask token; default: ``default_clip_tokenizer()``.
        image_size: (height, width) in pixels of the model's input crops. Images are always resized
            to exactly this size, whatever size the image processor was configured with.
        quality_reference_words: distinct informative words at which caption quality reaches 1.
        mask_probability: fraction of caption tokens selected by ``mask_captions`` (0.15).
        max_image_pixels: images with more pixels are refused (see ``load_image``); None: no limit.

    Caption quality and masking are set here and only here (the model config does not repeat them):
    what the processor saves is what training used.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_size=DEFAULT_IMAGE_SIZE,
        quality_reference_words=12,
        mask_probability=0.15,
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        image_size = tuple(int(side) for side in image_size)
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size must be (height, width) with positive sides, got {image_size}.")
        if not 0.0 < mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be a fraction in (0, 1], got {mask_probability}.")
        if quality_reference_words <= 0:
            raise ValueError(f"quality_reference_words must be positive, got {quality_reference_words}.")
        if max_image_pixels is not None and max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive (or None for no limit), got {max_image_pixels}.")
        if image_processor is None:
            image_processor = default_image_processor(image_size)
        if tokenizer is None:
            tokenizer = default_clip_tokenizer()
        self.image_size = image_size
        self.quality_reference_words = quality_reference_words
        self.mask_probability = float(mask_probability)
        self.max_image_pixels = max_image_pixels
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names))

    def __call__(
        self,
        text=None,
        images=None,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=CLIP_CONTEXT_LENGTH,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise captions and/or preprocess person crops.

        Args:
            text: a caption or a list of captions (non-empty strings).
            images: a person crop or a list of them, in any form ``load_image`` accepts (file path, file
                bytes, PIL image, ``datasets`` Image value, numpy array, torch tensor).
            return_tensors: "pt" (default), "np" or None (lists).
            padding, truncation, max_length: as for the tokenizer; truncation keeps the end-of-text
                token last. Other keyword arguments go to the tokenizer.

        Returns:
            BatchFeature with ``input_ids``, ``attention_mask`` ([batch, length]) and ``caption_quality``
            ([batch], float fraction) when text is given, and ``pixel_values`` ([batch, 3, height, width],
            float32, CLIP-normalised) when images are given.
        """
        if text is None and images is None:
            raise ValueError("DecdProcessor needs `text` (captions), `images` (person crops) or both; got neither.")
        data = {}
        if text is not None:
            texts = self._check_texts(text)
            encoding = self.tokenizer(
                texts,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
                **kwargs,
            )
            data.update(encoding)
            quality = compute_caption_quality(texts, self.quality_reference_words)  # float32 [batch]
            data["caption_quality"] = quality.tolist() if return_tensors is None else quality.numpy()
        if images is not None:
            if _is_single_image(images):
                images = [images]
            images = list(images)
            if not images:
                raise ValueError("`images` is an empty list: pass at least one person crop.")
            # Errors name an image by its file when it has one (a path, a `datasets` value with a path).
            rgb_images = [self.load_image(image, name=f"Image {index}" if _describe_source(image)[1] is None else None)
                          for index, image in enumerate(images)]
            height, width = self.image_size
            pixels = self.image_processor(
                rgb_images,
                do_resize=True,
                size={"height": height, "width": width},
                do_center_crop=False,
                return_tensors="np",
            )["pixel_values"]
            pixels = np.asarray(pixels, dtype=np.float32)
            data["pixel_values"] = list(pixels) if return_tensors is None else pixels
        return BatchFeature(data=data, tensor_type=return_tensors)

    def load_image(self, image, name=None) -> PIL.Image.Image:
        """``load_image`` with this processor's input size and pixel limit: what ``__call__`` does per image."""
        return load_image(image, size=self.image_size, max_pixels=self.max_image_pixels, name=name)

    @staticmethod
    def _check_texts(text) -> list[str]:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)):
            raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        if not texts:
            raise ValueError("`text` is an empty list: pass at least one caption.")
        for index, caption in enumerate(texts):
            if not isinstance(caption, str):
                raise ValueError(
                    f"Caption {index} is a {type(caption).__name__}, not a string: pass each caption as a str."
                )
            if not caption.strip():
                raise ValueError(f"Caption {index} is empty or whitespace only: drop it or give it some words.")
        return list(texts)

    @property
    def mask_token_id(self) -> int:
        mask_token_id = self.tokenizer.mask_token_id
        if mask_token_id is None:
            raise ValueError(
                f"The tokenizer has no mask token: add one with tokenizer.add_special_tokens({{'mask_token': "
                f"'{MASK_TOKEN}'}}) (and resize the model's token embeddings)."
            )
        return mask_token_id

    def mask_captions(self, input_ids, attention_mask=None, generator: torch.Generator | None = None) -> dict:
        """Mask caption tokens for the Masking Caption Modeling loss (BERT-style, see docs/method.md).

        Candidates are attended tokens other than start-of-text, end-of-text/padding and the mask
        token. Each candidate is selected with probability ``mask_probability``; a caption with
        candidates but no selection gets one selected at random. Selected tokens become the mask
        token (80%), a uniformly random ordinary token (10%; ids below every special token), or stay
        unchanged (10%).

        Args:
            input_ids: LongTensor [batch, length]; not modified.
            attention_mask: [batch, length], 1 for real tokens; default: all ones.
            generator: torch.Generator on the device of ``input_ids`` for reproducible masks.

        Returns:
            dict with ``masked_input_ids`` (LongTensor [batch, length]) and ``mcm_labels`` (LongTensor
            [batch, length]: the original id at selected positions, -100 elsewhere).
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
        mask_token_id = self.mask_token_id
        tokenizer = self.tokenizer
        never_masked = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, mask_token_id}
        never_masked = torch.tensor(sorted(i for i in never_masked if i is not None), device=input_ids.device)
        candidates = attention_mask.bool() & ~torch.isin(input_ids, never_masked)
        # Random ordinary tokens come from below the first special id (49406 for CLIP).
        ordinary_vocab_size = min(tokenizer.all_special_ids + [mask_token_id])

        # Every draw happens on every call so the generator advances the same way whatever the data.
        shape, device = input_ids.shape, input_ids.device
        selection_draws = torch.rand(shape, generator=generator, device=device)
        fallback_draws = torch.rand(shape, generator=generator, device=device)
        action_draws = torch.rand(shape, generator=generator, device=device)
        random_tokens = torch.randint(0, ordinary_vocab_size, shape, generator=generator, device=device)

        selected = candidates & (selection_draws < self.mask_probability)
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


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MASK_TOKEN",
    "STOP_WORDS",
    "DecdProcessor",
    "compute_caption_quality",
    "default_clip_tokenizer",
    "default_image_processor",
    "load_image",
]
