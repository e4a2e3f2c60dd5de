"""Opening images (image_loading_decd.load_image): high bit depths and floats scaled by range, alpha onto white."""


import numpy as np
import PIL.Image
import torch




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
