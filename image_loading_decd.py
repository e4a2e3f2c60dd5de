"""Opening an image: the one way every DECD entry point turns an image source into RGB pixels.

`load_image` takes a path, file bytes, a PIL image, a `datasets` Image value, a numpy array or a torch
tensor, and applies the same rules to each (EXIF orientation, 16-bit and float scaling, alpha onto
white, a pixel limit, reduced decoding of large files). `DecdProcessor` calls it for every image.
A file is trusted no further than its data: a path that names anything but a regular file (a folder, a named
pipe, a device) is refused before it is opened, and a picture only part of which its data decodes is refused
whatever the format or the decoding path.

This flat module travels to the Hugging Face Hub as remote code (``trust_remote_code=True``), so it
imports only the standard library, numpy, PIL and torch.
"""

import base64
import binascii
import io
import os
import re
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
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
# What a path may name besides a regular file, told apart with os.stat before anything is opened: opening a named
# pipe waits for a writer, and a device (/dev/zero, /dev/urandom) never ends.
_NOT_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
# Two fills for the pixel memory a file is decoded into: a pixel that holds the first after one decoding and the
# second after another was written by neither (see `_decode_completely`), by the mode's pixel type (its numpy
# dtype: 8-bit bands, 16-bit, 32-bit integer, float, bilevel).
_FILLS = {"u1": ((0x5A, 0xC3, 0x3C, 0xA5), (0xA5, 0x3C, 0xC3, 0x5A)), "u2": ((0x5AC3,), (0xA53C,)),
          "i4": ((0x5AC33CA5,), (-0x5AC33CA5,)), "f4": ((-1.2345e-7,), (1.2345e-7,)), "b1": ((1,), (0,))}
# Decoders write whole rows (of the image, of an interlacing pass, of a tile at least 16 wide), so what one leaves
# unwritten holds this many pixels in a row, or the whole row of a narrower image; fewer is the picture's own.
_UNWRITTEN_RUN = 16
# PIL formats whose files are JPEG streams (a camera's MPO starts with one).
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# Bytes put where a JPEG entropy-coded segment ends, for the second decoding `_jpeg_problem` compares: a segment
# decoded to its last block never reads them (libjpeg skips bytes before a marker), one that ends early does.
# No 0xFF, which would begin a marker.
_JPEG_FILLER = bytes((0x5A, 0xA5, 0x3C, 0xC3, 0x69, 0x96, 0x0F, 0xF0)) * 8
_JPEG_MARKER = re.compile(rb"\xff[^\x00]")  # in entropy-coded data 0xFF 0x00 is a data byte; 0xFF 0xFF.. fill
_JPEG_RESTARTS = range(0xD0, 0xD8)
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# (row, column) of each of a block's 64 coefficients in the order a scan lists them (zigzag)
_ZIGZAG = sorted(((row, column) for row in range(8) for column in range(8)),
                 key=lambda at: (sum(at), at[0] if sum(at) % 2 else at[1]))


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


# ---- files: only regular ones are opened, and every pixel must come from the file's data --------------------------
def open_image_file(path, name: str):
    """`path` opened for binary reading, once os.stat (which follows symbolic links) shows a non-empty regular file;
    else a ValueError naming `name` and what the path is (a named pipe, a device, ...: never opened, so never
    waited on). Everything that reads a gallery file's bytes opens it here."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such image file.") from None
    except OSError as error:  # a symbolic-link loop, a folder without permission, a name too long
        raise ValueError(f"{name}: cannot be read ({error.strerror or error}).") from None
    kind = next((kind for is_kind, kind in _NOT_FILES if is_kind(status.st_mode)), None)
    if kind is None and not stat.S_ISREG(status.st_mode):
        kind = "not a regular file"
    if kind is not None:
        if os.path.islink(path):
            kind = f"a symbolic link to {kind} ({os.path.realpath(path)})"
        raise ValueError(f"{name}: not an image file but {kind}; only regular files are read.")
    if status.st_size == 0:
        raise ValueError(f"{name}: empty (0 bytes); replace the file.")
    try:  # O_NONBLOCK: should the name have become a named pipe since the check, opening it does not wait
        file = os.fdopen(os.open(path, _OPEN_FLAGS), "rb")
    except OSError as error:
        raise ValueError(f"{name}: cannot be read ({error.strerror or error}).") from None
    opened = os.fstat(file.fileno())
    if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino) or not stat.S_ISREG(opened.st_mode):
        file.close()
        raise ValueError(f"{name}: replaced while being opened; open it again.")
    return file


def _fill_for(mode: str, which: int):
    """The fill value `which` (0 or 1) of `_FILLS` for a PIL mode, as `PIL.Image.new` takes it; None for a mode
    without one."""
    try:
        values = _FILLS[np.asarray(PIL.Image.new(mode, (1, 1))).dtype.str[1:]][which]
    except (KeyError, ValueError, TypeError, OSError):  # a mode numpy or PIL.Image.new does not take as such
        return None
    bands = PIL.Image.getmodebands(mode)
    return values[0] if bands == 1 else tuple(values[index % len(values)] for index in range(bands))


def _as_stored(mode: str, fill) -> np.ndarray:
    """A pixel of `fill` as numpy reads the mode (bands last), to compare decoded pixels with."""
    return np.asarray(PIL.Image.new(mode, (1, 1), fill))[0, 0]


def _row_strips(image: PIL.Image.Image, box: tuple[int, int, int, int]):
    """The boxes of `box` in strips of whole rows of about `_STRIP_PIXELS` pixels (numpy copies stay small)."""
    left, top, right, bottom = box
    rows = max(1, _STRIP_PIXELS // max(1, right - left))
    for start in range(top, bottom, rows):
        yield left, start, right, min(bottom, start + rows)


def _is_fill(array: np.ndarray, pixel: np.ndarray) -> np.ndarray:
    """HxW: where every band of `array` (HxW or HxWxC) equals `pixel` (band by band: a reduction over a last axis
    of 3 or 4 is slow in numpy)."""
    if array.ndim == 2:
        return array == pixel
    same = array[..., 0] == pixel[0]
    for band in range(1, array.shape[-1]):
        same &= array[..., band] == pixel[band]
    return same


def _has_run(mask: np.ndarray, length: int) -> bool:
    """Whether a row of the HxW boolean `mask` holds `length` True values in a row."""
    if not mask.any():
        return False
    counts = np.pad(np.cumsum(mask, axis=1, dtype=np.int32), ((0, 0), (1, 0)))
    return bool((counts[:, length:] - counts[:, :-length] == length).any())


def _prefill(image: PIL.Image.Image, which: int):
    """Give a file not yet decoded pixel memory holding fill `which`, which its decoder writes into; the fill, or
    None when the image takes none: already decoded; a GIF, whose first frame makes its own memory (filled with
    its background) and whose decoder refuses data that ends early; a JPEG, whose decoder writes every pixel
    (`_jpeg_problem` tells the ones it made up)."""
    if (not isinstance(image, PIL.ImageFile.ImageFile) or not image.tile or image.format == "GIF"
            or image.format in _JPEG_FORMATS):
        return None
    fill = _fill_for(image.mode, which)
    if fill is not None:
        image.im = PIL.Image.new(image.mode, image.size, fill).im
    return fill


def _decode_completely(image: PIL.Image.Image, reopen) -> str | None:
    """Decode `image` (a file just opened, reduced decoding already chosen); None when every pixel came from the
    file's data, else what is wrong.

    PIL refuses data that ends mid-stream, but a decoder that meets the end of its data early can still report
    success: zlib's end-of-stream before the last PNG row, a TIFF with fewer strips than rows, any file when
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is set; the pixels it never reached keep what the memory held. So the
    image is decoded into memory holding one fill; if some pixels hold it afterwards (`_UNWRITTEN_RUN` in a row, as
    what a decoder leaves is), the file is decoded once more (`reopen()`, same settings) into the other fill, and a
    pixel holding each fill in turn was never written.
    """
    mode, size = image.mode, image.size
    first = _prefill(image, 0)
    image.load()
    if first is None or (image.mode, image.size) != (mode, size):
        return None
    pixel, whole = _as_stored(mode, first), (0, 0) + size
    run = min(_UNWRITTEN_RUN, size[0])
    if not any(_has_run(_is_fill(np.asarray(image.crop(box)), pixel), run) for box in _row_strips(image, whole)):
        return None
    with reopen() as again:
        second = _prefill(again, 1)
        again.load()
        if second is None or (again.mode, again.size) != (mode, size):
            return None
        other = _as_stored(mode, second)
        missing = sum(int((_is_fill(np.asarray(image.crop(box)), pixel)
                           & _is_fill(np.asarray(again.crop(box)), other)).sum()) for box in _row_strips(image, whole))
    if missing:
        return (f"truncated: its data ends before the {size[0]}x{size[1]} pixels its header declares are all decoded "
                f"({missing:,} missing)")
    return None


# ---- JPEG: libjpeg fills what a segment lacks with grey (and PIL drops its warning), told apart here -----------
def _jpeg_layout(data: bytes) -> dict | None:
    """What `_jpeg_problem` needs from a JPEG stream's markers: the frame (SOF marker, width, height, each
    component's sampling factors), the restart interval, each scan's (number of components, first and last
    coefficient in zigzag order), where each
    entropy-coded segment ends (before a restart marker or the marker after the scan), and whether the stream
    reaches its end marker (EOI) before the data runs out. None for a stream it cannot follow (libjpeg is more
    lenient)."""
    layout = dict(frame=None, restart=0, scans=[], ends=[], ended=False)
    position = 2  # after SOI
    while True:
        position = data.find(b"\xff", position)
        while 0 <= position < len(data) and data[position] == 0xFF:  # fill bytes before a marker
            position += 1
        if not 0 <= position < len(data):
            return layout  # the data runs out before EOI
        marker = data[position]
        position += 1
        if marker == 0xD9:  # EOI
            return dict(layout, ended=True) if layout["frame"] is not None and layout["scans"] else None
        if marker in _JPEG_RESTARTS or marker in (0x01, 0xD8):  # markers without a length
            continue
        length = int.from_bytes(data[position:position + 2], "big")
        segment = data[position + 2:position + length]
        position += length
        if len(segment) != length - 2:
            return layout if length >= 2 else None
        if marker in _JPEG_SOF and len(segment) >= 6:
            count = segment[5]
            factors = [(byte >> 4, byte & 15) for byte in segment[7:6 + 3 * count:3]]
            if len(factors) != count or count == 0 or 0 in (value for pair in factors for value in pair):
                return None
            layout["frame"] = dict(marker=marker, height=int.from_bytes(segment[1:3], "big"),
                                   width=int.from_bytes(segment[3:5], "big"), factors=factors)
        elif marker == 0xDD and len(segment) >= 2:  # DRI
            layout["restart"] = int.from_bytes(segment[:2], "big")
        elif marker == 0xDA and segment and len(segment) >= 3 + 2 * segment[0]:  # SOS: entropy-coded data follows
            count = segment[0]
            layout["scans"].append((count, segment[1 + 2 * count], segment[2 + 2 * count]))
            while True:
                found = _JPEG_MARKER.search(data, position)
                if found is None:
                    return layout
                layout["ends"].append(found.start())  # before any fill bytes: the filler must not follow an 0xFF
                position = found.start()
                while position < len(data) and data[position] == 0xFF:
                    position += 1
                if position >= len(data) or data[position] not in _JPEG_RESTARTS:
                    position = found.start()
                    break
                position += 1


def _last_blocks_decoded(image: PIL.Image.Image, layout: dict, scale: int) -> bool:
    """For a baseline JPEG of one scan: whether the last block group (MCU) of every entropy-coded segment was
    visibly decoded from data. libjpeg decodes a segment whose data ends early by leaving every block after that
    point all zero, which is mid-grey (128 in every component); so when the middle pixel of each segment's last
    MCU is not 128 +- 1 in some band, no segment ended before its last MCU. Anything else: False (decode again)."""
    frame = layout["frame"]
    if (frame["marker"] not in (0xC0, 0xC1) or [count for count, _, _ in layout["scans"]] != [len(frame["factors"])]
            or 0 in (frame["width"], frame["height"])):
        return False
    factors = frame["factors"] if len(frame["factors"]) > 1 else [(1, 1)]  # one component: an MCU is one block
    mcu_width, mcu_height = 8 * max(h for h, _ in factors), 8 * max(v for _, v in factors)
    columns, rows = -(-frame["width"] // mcu_width), -(-frame["height"] // mcu_height)
    total = columns * rows
    interval = layout["restart"] or total
    last = sorted(set(range(interval - 1, total, interval)) | {total - 1})
    if len(layout["ends"]) != len(last):
        return False
    middle = {}
    for mcu in last:
        row, column = divmod(mcu, columns)
        x = min(frame["width"] - 1, column * mcu_width + mcu_width // 2) // scale
        y = min(frame["height"] - 1, row * mcu_height + mcu_height // 2) // scale
        middle.setdefault(min(y, image.height - 1), []).append(min(x, image.width - 1))
    for y, xs in middle.items():
        pixels = np.asarray(image.crop((0, y, image.width, y + 1)))[0][xs].astype(np.int16)
        grey = np.abs(pixels - 128) <= 1
        if (grey.all(axis=-1) if grey.ndim == 2 else grey).any():
            return False
    return True


def _coarsest_full_view(layout: dict) -> int:
    """The largest reduction (8, 4, 2 or 1) at which libjpeg's output still depends on every scan's coefficients.
    Decoded reduced by r, a block shows only the coefficients of its top-left 8/r x 8/r corner, so a progressive
    scan of higher frequencies alone (AC 6-63, say) that ends early changes nothing at 1/8 scale."""
    for reduction in (8, 4, 2):
        shown = 8 // reduction
        if all(any(max(_ZIGZAG[index]) < shown for index in range(first, min(last, 63) + 1))
               for _, first, last in layout["scans"]):
            return reduction
    return 1


def _decoded(data: bytes, prepare) -> PIL.Image.Image:
    """JPEG `data` opened, `prepare`d (a reduced decoding) and decoded; the caller closes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # a size already accepted
        image = PIL.Image.open(io.BytesIO(data))
    prepare(image)
    image.load()
    return image


def _jpeg_problem(image: PIL.Image.Image, data: bytes, scale: int, prepare) -> str | None:
    """None when every entropy-coded segment of a decoded JPEG held all its blocks, else what is wrong.

    libjpeg decodes a segment that stops early (data cut and an end marker appended, a marker inside the data)
    by filling the rest with grey, with a warning PIL does not pass on. A second decoding with `_JPEG_FILLER` put
    where each segment ends gives the same pixels when no segment reads past its end, and others when one does;
    both decodings are reduced no more than every scan still shows (`_coarsest_full_view`). A baseline JPEG
    whose segments' last blocks are visibly decoded skips it (`_last_blocks_decoded`).
    `scale`: the reduction `image` was decoded with (1, 2, 4 or 8); `prepare`: what was done to it before loading.
    """
    layout = _jpeg_layout(data)
    if layout is not None and not layout["ended"]:  # decoded all the same when PIL.ImageFile.LOAD_TRUNCATED_IMAGES
        return "truncated: the file ends before the JPEG data does (no end marker)"
    if layout is None or _last_blocks_decoded(image, layout, scale):
        return None
    pieces, start = [], 0
    for end in layout["ends"]:
        pieces += [data[start:end], _JPEG_FILLER]
        start = end
    check = _coarsest_full_view(layout)
    reference = image
    if check < scale:
        def prepare(decoded: PIL.Image.Image):  # reduced by `check` at most
            decoded.draft(decoded.mode, (-(-decoded.width // check), -(-decoded.height // check)))

        reference = _decoded(data, prepare)
    try:
        with _decoded(b"".join(pieces) + data[start:], prepare) as again:
            same = (again.mode, again.size) == (reference.mode, reference.size) and all(
                reference.crop(box).tobytes() == again.crop(box).tobytes()
                for box in _row_strips(reference, (0, 0) + reference.size))
    finally:
        if reference is not image:
            reference.close()
    if same:
        return None
    return "truncated or damaged: a part of its compressed data ends early (a JPEG decoder shows the rest as grey)"


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
        ValueError naming the image: a missing file, a path to anything but a regular file (checked before
        opening: a named pipe would block, a device never ends), an empty (0-byte) file, unreadable data, data
        that ends before every pixel its header declares is decoded, too many pixels, an empty image, NaN
        values, or a shape or type that is not an image.
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
        if len(source) == 0:
            raise ValueError(f"{name}: empty (0 bytes); send the image file's contents.")
        file = io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)) or hasattr(source, "__fspath__"):
        file = open_image_file(source, name)
    else:
        raise ValueError(
            f"{name} is a {type(image).__name__}: pass a file path, file bytes, a PIL image, a numpy array or a "
            "torch tensor."
        )
    with file:
        opened = _open_file(file, name, max_pixels)
        try:
            return _finish(opened, size, max_pixels, name, file=file)
        finally:
            opened.close()


def _open_file(file, name: str, max_pixels) -> PIL.Image.Image:
    """`PIL.Image.open` on an open binary file (from its start), its refusals worded as `load_image`'s errors."""
    file.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # `max_pixels` decides
            return PIL.Image.open(file)
    except PIL.Image.DecompressionBombError:  # PIL's own limit (2x PIL.Image.MAX_IMAGE_PIXELS): the same words
        raise ValueError(_too_many_pixels(name, _stored_size(file), max_pixels)) from None
    except PIL.UnidentifiedImageError:  # its message names the file object, which the caller's name replaces
        raise ValueError(f"{name}: not a readable image (UnidentifiedImageError: no image format PIL reads)."
                         ) from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image I can read"
        raise ValueError(f"{name}: not a readable image ({type(error).__name__}: {error}).") from None


def _too_many_pixels(name: str, stored: tuple[int, int], max_pixels) -> str:
    width, height = stored
    limit = f"the limit of {max_pixels:,}" if max_pixels is not None else "PIL's limit (PIL.Image.MAX_IMAGE_PIXELS)"
    return (f"{name} has {width}x{height} = {width * height:,} pixels, more than {limit}; shrink it first or raise "
            "the limit (max_image_pixels).")


def _stored_size(file) -> tuple[int, int]:
    """(width, height) from an open image file's header, past PIL's decompression-bomb limit (nothing is decoded)."""
    file.seek(0)
    with _PIL_LIMIT_LOCK:
        limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                with PIL.Image.open(file) as image:
                    return image.size
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = limit


def _finish(image: PIL.Image.Image, size, max_pixels, name: str, file=None) -> PIL.Image.Image:
    """The RGB result for an opened image; `file`: the open file it was read from, for a file the caller opened
    (decoded reduced when it is a JPEG and `size` is known, and checked to have filled every pixel)."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{name} is empty ({width}x{height}): pass a crop with non-zero size.")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(_too_many_pixels(name, (width, height), max_pixels))
    opened, problem = image, None
    try:
        wanted = orientation = None
        if file is not None and size is not None and image.format in _JPEG_FORMATS:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)  # a JPEG's is read with its header
            height_wanted, width_wanted = (2 * side for side in size)
            if orientation in _SWAPS_AXES:
                height_wanted, width_wanted = width_wanted, height_wanted
            wanted = (width_wanted, height_wanted)

        def prepare(decoded: PIL.Image.Image):  # the same reduced decoding for every decoding of the file
            return decoded.draft(decoded.mode, wanted) if wanted is not None else None

        if file is None:  # a PIL image from the caller: decoded as given
            image.load()
        else:
            drafted = prepare(image)
            scale = round(width / drafted[1][2]) if drafted else 1

            def reopen() -> PIL.Image.Image:
                again = _open_file(file, name, max_pixels)
                prepare(again)
                return again

            problem = _decode_completely(image, reopen)
            if problem is None and image.format in _JPEG_FORMATS:
                file.seek(0)
                problem = _jpeg_problem(image, file.read(), scale, prepare)
        if orientation is None:  # after decoding: a PNG's getexif decodes the image to find it
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise ValueError(f"{name}: the image data cannot be decoded ({type(error).__name__}: {error}); "
                         "replace the file.") from None
    if problem is not None:
        raise ValueError(f"{name}: {problem}; replace the file.")
    stored_size = size  # the reduction works on the stored image: its axes are the transposed ones
    if size is not None and orientation in _SWAPS_AXES:
        stored_size = (size[1], size[0])
    result = _rgb_reduced(image, stored_size, name)
    if orientation != 1:  # applied once, to the small RGB image; the result carries no orientation tag
        if result is not image:
            result.info = dict(image.info)
        result = PIL.ImageOps.exif_transpose(result)
    return result.copy() if file is not None and result is opened else result  # the caller closes the file


def decode_base64(data, name: str, max_bytes: int | None = None, setting: str = "max_bytes") -> bytes:
    """The file bytes of an image sent as text: base64, or a ``data:image/...;base64,`` URL, line breaks allowed
    (GNU base64 and ``base64.encodebytes`` write them). A `ValueError` naming `name` for anything else, and, with
    `max_bytes`, for a file larger than that, told from the text's length before anything is decoded (the message
    names the limit's `setting`)."""
    if not isinstance(data, str):
        raise ValueError(f"{name} is a {type(data).__name__}: send the image as a base64 string.")
    data = data.split(",", 1)[1] if data.startswith("data:") else data
    data = "".join(data.split())
    size = len(data) // 4 * 3
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{name} is about {size:,} bytes, more than the limit of {max_bytes:,} ({setting}): send a "
                         f"smaller (e.g. JPEG or resized) image.")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{name} is not valid base64 ({error}).") from None


def is_single_image(images) -> bool:
    if hasattr(images, "__fspath__") or isinstance(
            images, (PIL.Image.Image, str, Path, bytes, bytearray, memoryview, dict)):
        return True
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim <= 3
    return False



__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "decode_base64", "describe_image_source", "is_single_image", "load_image",
           "open_image_file"]
