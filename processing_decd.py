"""Processor for DECD: person crops and captions in, CLIP-style model inputs out.

`DecdProcessor` joins a CLIP image processor and CLIP's tokenizer with a mask token. What it adds to a
plain CLIP processor:

- person crops are opened by `image_loading_decd.load_image` and resized to exactly ``image_size``
  (384 x 128 by default), never centre-cropped;
- the tokenizer carries a mask token (``<|mask|>``, the id after CLIP's vocabulary; `tokenization_decd`);
- ``caption_quality`` for each caption and ``mask_captions`` for the MCM loss (`captions_decd`).

This flat module travels to the Hugging Face Hub as remote code (``trust_remote_code=True``), with its
sibling modules, so it imports only numpy, PIL, torch and transformers besides them.
"""

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import is_torchvision_available

try:  # relative imports when loaded as Hub remote code (transformers copies the siblings)
    from .captions_decd import caption_problem, compute_caption_quality, mask_caption_tokens
    from .configuration_decd import CLIP_CONTEXT_LENGTH
    from .image_loading_decd import DEFAULT_MAX_IMAGE_PIXELS, describe_image_source, is_single_image, load_image
    from .tokenization_decd import MASK_TOKEN, default_clip_tokenizer
except ImportError:  # installed as top-level modules
    from captions_decd import caption_problem, compute_caption_quality, mask_caption_tokens
    from configuration_decd import CLIP_CONTEXT_LENGTH
    from image_loading_decd import DEFAULT_MAX_IMAGE_PIXELS, describe_image_source, is_single_image, load_image
    from tokenization_decd import MASK_TOKEN, default_clip_tokenizer

# OpenAI CLIP normalisation, per RGB channel, for pixel values in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = (384, 128)  # (height, width) of a person crop


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
            if is_single_image(images):
                images = [images]
            images = list(images)
            if not images:
                raise ValueError("`images` is an empty list: pass at least one person crop.")
            # Errors name an image by its file when it has one (a path, a `datasets` value with a path).
            rgb_images = [self.load_image(image, name=f"Image {index}" if describe_image_source(image)[1] is None else None)
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
            problem = caption_problem(caption)
            if problem is not None:
                raise ValueError(f"Caption {index} is {problem}: drop it or give it some words.")
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
        """``masked_input_ids`` and ``mcm_labels`` for the MCM loss: `captions_decd.mask_caption_tokens` with
        this processor's ``mask_probability`` and its tokenizer's special tokens (never masked) and mask token.

        Args:
            input_ids, attention_mask: [batch, length] from this processor.
            generator: torch.Generator on the device of ``input_ids`` for reproducible masks.
        """
        mask_token_id = self.mask_token_id
        tokenizer = self.tokenizer
        never_masked = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, mask_token_id}
        return mask_caption_tokens(
            input_ids, attention_mask, mask_token_id=mask_token_id,
            never_masked=[token for token in never_masked if token is not None],
            # Random ordinary tokens come from below the first special id (49406 for CLIP).
            ordinary_vocab_size=min(tokenizer.all_special_ids + [mask_token_id]),
            mask_probability=self.mask_probability, generator=generator,
        )


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_IMAGE_SIZE",
    "DecdProcessor",
    "default_image_processor",
]
