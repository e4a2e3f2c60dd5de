"""Opening images (image_loading_decd.load_image): high bit depths and floats scaled by range, alpha onto white;
large images decoded in bounded memory; one message for an image over the pixel limit, PIL's own included."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from image_loading_decd import load_image


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
