"""Opening images (image_loading_decd.load_image): high bit depths and floats scaled by range, alpha onto white;
large images decoded in bounded memory; one message for an image over the pixel limit, PIL's own included; only
regular files opened, and only pictures whose data decodes every pixel accepted (a gallery skips the rest)."""

import contextlib
import io
import os
import signal
import socket
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch

from image_loading_decd import decode_base64, load_image

from .helpers import tiny_config


@contextlib.contextmanager
def _within(seconds: int):
    """Fail, instead of hanging, when the block runs longer than `seconds` (a blocking open is interrupted too)."""
    def stop(signum, frame):  # pytest's failure, which no `except Exception` in the code under test swallows
        pytest.fail(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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


# ---- memory and limits for any image the limits accept --------------------------------------------------
_PEAK_SCRIPT = r"""
import json, sys
import PIL.Image
from image_loading_decd import load_image


def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


PIL.Image.open(sys.argv[1]).close()  # PIL's plugins imported before the baseline
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the memory in use now
before = status("VmRSS")
image = load_image(sys.argv[1], size=(384, 128))
print(json.dumps({"grown_mib": (status("VmHWM") - before) / 1024, "size": image.size, "mode": image.mode}))
"""


@pytest.mark.parametrize("mode, shape, decoded_bytes_per_pixel", [
    ("I;16", (9999, 10000), 2),   # the 16-bit grayscale PNG under the 100-megapixel limit
    ("RGBA", (6000, 8000), 4),    # 8-bit with alpha
    ("F", (5000, 6000), 4),       # float
])
def test_decoding_a_large_image_costs_the_decoded_image_and_little_more(tmp_path, mode, shape, decoded_bytes_per_pixel):
    """Peak memory while opening an image for a 384 x 128 input: the decoded image (in its own mode) plus at most
    96 MiB, in every mode (before: about 3 GB for the 16-bit 10000 x 9999 PNG, 1.9 GB for an RGBA one)."""
    import json
    import subprocess
    import sys

    path = tmp_path / ("large.tiff" if mode == "F" else "large.png")
    height, width = shape
    if mode == "RGBA":
        array = np.zeros((height, width, 4), np.uint8)
        array[..., 3] = 255
        PIL.Image.fromarray(array, "RGBA").save(path)
    else:
        PIL.Image.fromarray(np.zeros(shape, np.uint16 if mode == "I;16" else np.float32)).save(path)
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    decoded_mib = width * height * decoded_bytes_per_pixel / 2**20
    assert measured["mode"] == "RGB" and measured["size"][0] < width  # decoded reduced
    assert measured["grown_mib"] <= decoded_mib + 96, (measured, decoded_mib)


def test_an_image_over_pils_own_limit_gets_the_same_message_as_under_it(tmp_path):
    over_pil = tmp_path / "over_pil.png"  # 180,000,000 pixels: PIL's open refuses it (more than 2 x 89,478,485)
    PIL.Image.new("L", (15000, 12000)).save(over_pil)
    under_pil = tmp_path / "under_pil.png"
    PIL.Image.new("L", (12000, 10000)).save(under_pil)
    for path, width, height in ((over_pil, 15000, 12000), (under_pil, 12000, 10000)):
        with pytest.raises(ValueError) as error:
            load_image(path)
        assert str(error.value) == (f"{path} has {width}x{height} = {width * height:,} pixels, more than the limit of "
                                    "100,000,000; shrink it first or raise the limit (max_image_pixels).")
    assert PIL.Image.MAX_IMAGE_PIXELS == 89478485  # PIL's own setting is left as it was


# ---- hostile files: anything but a regular file, and data that decodes only part of the picture --------------------
def test_a_path_to_anything_but_a_regular_file_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a socket's path must be short
    os.mkfifo("pipe.jpg")  # opening it would wait for a writer
    os.symlink("/dev/zero", "x.png")  # reading it never ends
    os.symlink(tmp_path / "pipe.jpg", "link-to-pipe.jpg")
    Path("folder.png").mkdir()
    Path("empty.jpg").write_bytes(b"")
    server = socket.socket(socket.AF_UNIX)
    server.bind("socket.png")
    expected = {
        "pipe.jpg": "not an image file but a named pipe (FIFO); only regular files are read.",
        "x.png": "not an image file but a symbolic link to a character device (/dev/zero); only regular files "
                 "are read.",
        "link-to-pipe.jpg": f"not an image file but a symbolic link to a named pipe (FIFO) ({tmp_path / 'pipe.jpg'}); "
                            "only regular files are read.",
        "folder.png": "not an image file but a folder; only regular files are read.",
        "socket.png": "not an image file but a socket; only regular files are read.",
        "empty.jpg": "empty (0 bytes); replace the file.",
        "missing.jpg": "no such image file.",
    }
    try:
        with _within(60):
            for name, reason in expected.items():
                with pytest.raises(ValueError) as error:
                    load_image(name)
                assert str(error.value) == f"{name}: {reason}"
                with pytest.raises(ValueError) as error:  # a `datasets` value names its path
                    load_image({"path": str(tmp_path / name), "bytes": None}, size=(384, 128))
                assert str(error.value) == f"{tmp_path / name}: {reason}"
            with pytest.raises(ValueError, match=r"^image: empty \(0 bytes\); send the image file's contents\.$"):
                load_image(b"")
    finally:
        server.close()


def _noise(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    """An RGB picture that compresses poorly, so that a cut always falls inside pixel data."""
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(image: PIL.Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_rows_missing(image: PIL.Image.Image) -> bytes:
    """A well-formed PNG whose header declares `image`'s size and whose zlib stream ends after half its rows."""
    pixels = np.asarray(image)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels[: len(pixels) // 2])
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _tiff_strips_missing(image: PIL.Image.Image) -> bytes:
    """An uncompressed TIFF of the top half of `image` whose header declares the whole height (fewer strips)."""
    data = bytearray(_encoded(image.crop((0, 0, image.width, image.height // 2)), "TIFF"))
    assert data[:2] == b"II"
    directory = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[directory:directory + 2])[0]):
        at = directory + 2 + 12 * entry
        tag, kind = struct.unpack("<HH", data[at:at + 4])
        if tag == 257:  # ImageLength
            data[at + 8:at + 12] = struct.pack("<HH", image.height, 0) if kind == 3 else struct.pack("<I", image.height)
    return bytes(data)


def _jpeg_interval_cut(data: bytes) -> bytes:
    """A JPEG with restart markers whose middle restart interval lost the second half of its data."""
    restarts = [at for at in range(len(data) - 1) if data[at] == 0xFF and 0xD0 <= data[at + 1] <= 0xD7]
    start, end = restarts[len(restarts) // 2 - 1] + 2, restarts[len(restarts) // 2]
    return data[: (start + end) // 2] + data[end:]


def _damaged_files(picture: PIL.Image.Image) -> dict[str, tuple[bytes, bytes]]:
    """(intact, damaged) file contents for each way a file can hold less data than its header declares."""
    jpeg, progressive = _encoded(picture, "JPEG"), _encoded(picture, "JPEG", progressive=True)
    restarts = _encoded(picture, "JPEG", restart_marker_rows=1)
    files = {
        "cut.jpg": (jpeg, jpeg[: len(jpeg) // 2]),
        "cut-then-end-marker.jpg": (jpeg, jpeg[: len(jpeg) // 2] + b"\xff\xd9"),
        "progressive-cut-then-end-marker.jpg": (progressive, progressive[: len(progressive) * 3 // 4] + b"\xff\xd9"),
        "restart-interval-cut.jpg": (restarts, _jpeg_interval_cut(restarts)),
        "rows-missing.png": (_encoded(picture, "PNG"), _png_rows_missing(picture)),
        "strips-missing.tif": (_encoded(picture, "TIFF"), _tiff_strips_missing(picture)),
    }
    for name, file_format in (("cut.png", "PNG"), ("cut.gif", "GIF"), ("cut.webp", "WEBP"), ("cut.bmp", "BMP"),
                              ("cut.tif", "TIFF")):
        intact = _encoded(picture, file_format)
        files[name] = (intact, intact[: len(intact) // 2])
    return files


def test_a_picture_decoded_from_partial_data_is_refused_in_every_format_and_decoding_path(tmp_path, monkeypatch):
    """Data that ends before the pixels its header declares (cut, cut with an end marker appended, a stream that
    ends early, strips missing, a JPEG restart interval cut short) is refused naming the file, at full size and
    through the reduced (JPEG draft, strip by strip) decoding of a large image, even when the caller's code has
    set PIL's LOAD_TRUNCATED_IMAGES; the intact files load as PIL decodes them."""
    picture = _noise(1400, 1000)  # over a strip of rows, and large enough to be decoded reduced for 64 x 32
    refused = []
    for name, (intact, damaged) in _damaged_files(picture).items():
        (tmp_path / name).write_bytes(damaged)
        expected = np.asarray(PIL.Image.open(io.BytesIO(intact)).convert("RGB"))
        assert np.array_equal(np.asarray(load_image(intact)), expected), name
        for truncated_allowed in (False, True):
            if truncated_allowed and name == "cut.gif":
                continue  # PIL's GIF reader builds its own pixel memory, so only its decoder guards a GIF
            monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", truncated_allowed)
            for size in (None, (64, 32)):
                try:
                    load_image(tmp_path / name, size=size, name=name)
                except ValueError as error:
                    message = str(error)
                    assert message.startswith(f"{name}: ") and "\n" not in message, message
                    assert any(words in message for words in ("truncated", "cannot be decoded", "not a readable image")
                               ), message  # a WebP cut short is refused when opened
                    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is truncated_allowed  # left as the caller set it
                else:
                    refused.append(f"{name} accepted (size {size}, LOAD_TRUNCATED_IMAGES {truncated_allowed})")
    assert not refused, refused


def test_a_gallery_names_and_skips_what_is_not_a_whole_image_and_never_blocks(tmp_path):
    """A gallery folder holding a named pipe, a 0-byte .jpg, truncated JPEG and PNG files, a text file named .png
    and a symbolic link to /dev/zero named x.png: the build finishes, indexes the good images only and lists each
    bad file with its reason (the same in every process: no file object in it); a folder opened as a gallery does
    the same."""
    from decd.search import GalleryIndex, open_gallery
    from modeling_decd import DecdModel
    from processing_decd import DecdProcessor

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for number in range(3):
        _noise(96, 48, seed=number).save(gallery / f"good-{number}.png")
    jpeg, png = _encoded(_noise(96, 48, seed=3), "JPEG"), _encoded(_noise(96, 48, seed=4), "PNG")
    (gallery / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2] + b"\xff\xd9")  # a grey lower half, to the decoder
    (gallery / "cut.png").write_bytes(png[: len(png) // 2])
    (gallery / "empty.jpg").write_bytes(b"")
    (gallery / "notes.png").write_text("not a picture")
    os.mkfifo(gallery / "pipe.jpg")
    os.symlink("/dev/zero", gallery / "x.png")
    torch.manual_seed(0)
    model, processor = DecdModel(tiny_config()).eval(), DecdProcessor(image_size=(128, 64))
    reasons = {
        "cut.jpg": "truncated or damaged: a part of its compressed data ends early (a JPEG decoder shows the rest as "
                   "grey); replace the file.",
        "cut.png": "the image data cannot be decoded (OSError: image file is truncated); replace the file.",
        "empty.jpg": "empty (0 bytes); replace the file.",
        "notes.png": "not a readable image (UnidentifiedImageError: no image format PIL reads).",
        "pipe.jpg": "not an image file but a named pipe (FIFO); only regular files are read.",
        "x.png": "not an image file but a symbolic link to a character device (/dev/zero); only regular files are "
                 "read.",
    }
    with _within(60), pytest.warns(UserWarning, match=r"skipped 6 unreadable image\(s\) of 9"):
        index = GalleryIndex.build(model, processor, gallery, tmp_path / "index", batch_size=4, show_progress=False)
    assert index.paths == ["good-0.png", "good-1.png", "good-2.png"]
    assert {item["path"]: item["error"] for item in index.skipped} == reasons
    with _within(60), pytest.warns(UserWarning, match=r"skipped 6 unreadable image\(s\) of 9"):
        opened = open_gallery(model, processor, str(gallery))
    assert opened.paths == index.paths
    assert {item["path"]: item["error"] for item in opened.skipped} == reasons
    # A Milvus build hashes each file before it is read (a file whose bytes did not change keeps its embedding): the
    # hash opens the file as load_image does, so the pipe and the device are named there, never read.
    from decd.search import MilvusGallery

    with _within(120), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stored = MilvusGallery.build(model, processor, gallery, str(tmp_path / "gallery.db"), batch_size=4,
                                     show_progress=False)
    assert len(stored) == 3
    assert sorted(stored.search_text(model, processor, ["a person"], top_k=3).paths[0]) == index.paths
    assert {item["path"]: item["error"] for item in stored.skipped} == reasons


def test_decode_base64_takes_what_senders_write_and_names_the_rest():
    """An image sent as text, as the handler and the search service receive it: plain base64, a data: URL, line
    breaks as GNU base64 writes them; anything else, or a file over the limit, is a ValueError naming the field."""
    import base64

    data = bytes(range(256)) * 3
    encoded = base64.b64encode(data).decode()
    wrapped = base64.encodebytes(data).decode()
    assert "\n" in wrapped
    for sent in (encoded, wrapped, "data:image/png;base64," + wrapped, encoded + "\n"):
        assert decode_base64(sent, "inputs.image[0]") == data
    assert decode_base64(encoded, "photo", max_bytes=len(data)) == data
    with pytest.raises(ValueError, match=r"^photo is about 768 bytes, more than the limit of 767 \(max_image_bytes\)"):
        decode_base64(encoded, "photo", max_bytes=767, setting="max_image_bytes")
    with pytest.raises(ValueError, match=r"^photo is not valid base64"):
        decode_base64("not base64!", "photo")
    with pytest.raises(ValueError, match=r"^photo is a bytes: send the image as a base64 string"):
        decode_base64(data, "photo")
