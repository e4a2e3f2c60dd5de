"""Opening an image: the one way every DECD entry point turns an image source into RGB pixels.

`load_image` takes a path, file bytes, a PIL image, a `datasets` Image value, a numpy array or a torch
tensor, and applies the same rules to each (EXIF orientation, 16-bit and float scaling, alpha onto
white, a pixel limit, reduced decoding of large files). `DecdProcessor` calls it for every image.

This flat module travels to the Hugging Face Hub as remote code (``trust_remote_code=True``), so it
imports only the standard library, numpy, PIL and torch.
"""

import io
import threading
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

# PIL modes that convert to RGB as they are; modes with alpha are composited onto white first, and
# high-bit-depth / float modes are scaled by their value range (see `load_image`).
_DIRECT_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # 100 megapixels: larger files are refused, not decoded
# A large image is converted to RGB and reduced this many pixels at a time (a strip of whole rows), so that
# memory stays at the decoded image plus one strip, whatever its mode (16-bit, float, alpha, palette).
_STRIP_PIXELS = 1 << 20
_PIL_LIMIT_LOCK = threading.Lock()


def _value_range(array: np.ndarray, name: str) -> tuple[float, float]:
    """(minimum, maximum) of an image's values; NaN or infinite values are refused (min/max carry them along)."""
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{name}: the image holds NaN or infinite values; replace them before loading it.")
    return low, high


def _scale_to_uint8(array: np.ndarray, name: str, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 values of an integer or float image, scaled by its value range (never clipped).

    uint8 stays as it is; 16-bit data (and other integers within [0, 65535] that exceed 255) is
    scaled by 255 / 65535; other integers within [0, 255] are taken as 8-bit; floats within [0, 1]
    are scaled by 255; anything else is stretched from its own minimum..maximum to 0..255.
    `value_range`: the whole image's (min, max) when `array` is a strip of it.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name}: pixel type {array.dtype} is not an image; pass integers or floats.")
    low, high = _value_range(array, name) if value_range is None else value_range
    values = array.astype(np.float64)
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


def _array_to_image(array: np.ndarray, name: str, value_range=None) -> PIL.Image.Image:
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
    return PIL.Image.fromarray(np.ascontiguousarray(_scale_to_uint8(array, name, value_range)), mode=mode)


def _to_rgb(image: PIL.Image.Image, name: str, value_range=None) -> PIL.Image.Image:
    """RGB by one rule for every mode: alpha composited onto white, high bit depths scaled by range
    (`value_range`: the whole image's, when `image` is a strip of it)."""
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in _HIGH_BIT_DEPTH_MODES:
        image = _array_to_image(np.asarray(image), name, value_range)
        mode = image.mode
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in _DIRECT_RGB_MODES:
        return image if mode == "RGB" else image.convert("RGB")
    raise ValueError(f"{name} has PIL mode {mode!r}, which has no RGB conversion here: convert it to RGB first.")


def _reduction(image: PIL.Image.Image, size) -> tuple[int, int]:
    """Integer factors (x, y) that shrink `image` while it stays at least twice `size` (height, width) per axis.

    The factors are per axis: crops are resized to exactly `size` (no aspect-preserving crop), so a
    landscape photo going into a portrait input keeps 2x the needed resolution on both axes and no more
    (a 2000 x 1500 draft-decoded JPEG for 384 x 128 becomes 285 x 1500, 1.3 MB instead of 9 MB)."""
    if size is None:
        return 1, 1
    height, width = size
    return max(1, int(image.width / width // 2)), max(1, int(image.height / height // 2))


def _reduce_for(image: PIL.Image.Image, size) -> PIL.Image.Image:
    """`image` shrunk by `_reduction`'s factors (box filter)."""
    factors = _reduction(image, size)
    return image.reduce(factors) if max(factors) >= 2 else image


def _rgb_reduced(image: PIL.Image.Image, size, name: str) -> PIL.Image.Image:
    """`_reduce_for(_to_rgb(image))`, computed strip by strip for a large image: strips of whole rows (a multiple
    of the vertical factor, so the box filter sees the same blocks) are converted, reduced and pasted, and memory
    stays at the decoded image plus one strip in every mode (a 16-bit or float image is scaled by the whole
    image's value range, read first)."""
    factor_x, factor_y = _reduction(image, size)
    width, height = image.size
    rows = factor_y * max(1, _STRIP_PIXELS // (width * factor_y))
    if max(factor_x, factor_y) < 2 or rows >= height:
        return _reduce_for(_to_rgb(image, name), size)
    value_range = None
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        ranges = [_value_range(np.asarray(image.crop((0, top, width, min(height, top + rows)))), name)
                  for top in range(0, height, rows)]
        value_range = (min(low for low, _ in ranges), max(high for _, high in ranges))
    canvas = PIL.Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
    for top in range(0, height, rows):
        strip = _to_rgb(image.crop((0, top, width, min(height, top + rows))), name, value_range)
        canvas.paste(strip.reduce((factor_x, factor_y)), (0, top // factor_y))
    return canvas


def describe_image_source(image) -> tuple[object, str | None]:
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
    source, path = describe_image_source(image)
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
    except PIL.Image.DecompressionBombError:  # PIL's own limit (2x PIL.Image.MAX_IMAGE_PIXELS): the same words
        raise ValueError(_too_many_pixels(name, _stored_size(source), max_pixels)) from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image I can read"
        raise ValueError(f"{name}: not a readable image ({type(error).__name__}: {error}).") from None
    try:
        return _finish(opened, size, max_pixels, name, from_file=True)
    finally:
        opened.close()


def _too_many_pixels(name: str, stored: tuple[int, int], max_pixels) -> str:
    width, height = stored
    limit = f"the limit of {max_pixels:,}" if max_pixels is not None else "PIL's limit (PIL.Image.MAX_IMAGE_PIXELS)"
    return (f"{name} has {width}x{height} = {width * height:,} pixels, more than {limit}; shrink it first or raise "
            "the limit (max_image_pixels).")


def _stored_size(source) -> tuple[int, int]:
    """(width, height) from an image file's header, past PIL's decompression-bomb limit (nothing is decoded)."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
    with _PIL_LIMIT_LOCK:
        limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                with PIL.Image.open(source) as image:
                    return image.size
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = limit


def _finish(image: PIL.Image.Image, size, max_pixels, name: str, from_file: bool = False) -> PIL.Image.Image:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{name} is empty ({width}x{height}): pass a crop with non-zero size.")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(_too_many_pixels(name, (width, height), max_pixels))
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
    stored_size = size  # the reduction works on the stored image: its axes are the transposed ones
    if size is not None and orientation in _SWAPS_AXES:
        stored_size = (size[1], size[0])
    result = _rgb_reduced(image, stored_size, name)
    if orientation != 1:  # applied once, to the small RGB image; the result carries no orientation tag
        if result is not image:
            result.info = dict(image.info)
        result = PIL.ImageOps.exif_transpose(result)
    return result.copy() if from_file and result is opened else result  # the caller closes the file


def is_single_image(images) -> bool:
    if hasattr(images, "__fspath__") or isinstance(
            images, (PIL.Image.Image, str, Path, bytes, bytearray, memoryview, dict)):
        return True
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim <= 3
    return False



__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "describe_image_source", "is_single_image", "load_image"]
