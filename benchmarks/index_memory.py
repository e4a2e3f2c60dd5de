"""Peak memory of `GalleryIndex.build` on camera-size photos: memory follows the model's input size.

What it measures
    A gallery of N copies (default 64) of one generated 4000 x 3000 photo, as JPEG and as PNG, is
    indexed with the default batch size (64: the whole gallery is one batch) by a DECD model built in
    code (default: the full-size configuration, `DecdConfig()`, ViT-B/16 at 384 x 128, random weights:
    the weights do not change memory). Each build runs in its own subprocess; the number is that
    process's peak resident memory (VmHWM of /proc/self/status, which counts PIL's pixel buffers, unlike
    tracemalloc), with the peak before the build (Python, torch, the model) given separately. Not
    `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that across exec, so a subprocess of a large
    process (a long pytest session) would report its parent's peak.

    `load_image` decodes a JPEG in draft mode (libjpeg's DCT scaling) and reduces any other format one
    image at a time to no less than twice the model's input size, so a batch holds 64 small images,
    not 64 x 36 MB of decoded pixels. `--full-decode` measures the opposite (the processor asked to
    keep the full size, what happened before the reduction existed) for comparison.

Measured (2 CPU cores, full-size model, 64 photos of 4000 x 3000; results/index_memory_cpu*.json)
    before the build (Python, torch, model): 1199 MiB
    batch 64, JPEG: peak 1947 MiB; PNG: 1945 MiB (decoded at full size: 6453 MiB for either; with the
        reduction by one factor for both axes, before it became per axis: 2597 MiB for JPEG)
    batch 16, JPEG: peak 1510 MiB
    What the build adds at batch 64 (~750 MiB) is the ViT-B forward pass of 64 crops, not the photos: the
    tiny-model test adds ~40-60 MiB for 19 photos. Under 1.5 GB in all takes a batch of 16 or less.

How to run (from the repo root; ~1-3 min on 2 CPU cores)
    .venv/bin/python benchmarks/index_memory.py --output-json benchmarks/results/index_memory_cpu.json
    .venv/bin/python benchmarks/index_memory.py --num 16 --model tiny --formats jpeg
    .venv/bin/python benchmarks/index_memory.py --formats jpeg --batch_size 16 \
        --output-json benchmarks/results/index_memory_cpu_batch16.json   # how much is the forward pass

tests/test_search_build.py runs `measure` on a smaller gallery with a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTO_SIZE = (4000, 3000)  # width, height of a 12 MP camera photo
LIMIT_BYTES = int(1.5 * 1024**3)  # the requirement: under 1.5 GB for 64 such photos


def write_gallery(folder: Path, number: int, image_format: str, size=PHOTO_SIZE) -> Path:
    """`number` copies of one generated photo-like image (smooth colour gradients) in `folder`."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    pixels = np.stack([255 * x * np.ones_like(y), 255 * y * np.ones_like(x), 128 + 100 * np.sin(20 * x + 10 * y)], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    suffix = "jpg" if image_format == "jpeg" else "png"
    first = folder / f"photo_0000.{suffix}"
    if image_format == "jpeg":
        image.save(first, quality=90)
    else:
        image.save(first, compress_level=1)
    data = first.read_bytes()
    for index in range(1, number):
        (folder / f"photo_{index:04d}.{suffix}").write_bytes(data)
    return folder


def _child(arguments) -> None:
    """Build the index in this process and print its memory as JSON (run by `measure`)."""
    sys.path.insert(0, str(REPO))
    import torch

    from configuration_decd import DecdConfig
    from decd.search import GalleryIndex
    from modeling_decd import DecdModel
    from image_loading_decd import load_image
    from processing_decd import DecdProcessor
    from search import peak_rss_mb  # benchmarks/search.py, beside this script

    torch.manual_seed(0)
    if arguments.model == "tiny":
        config = DecdConfig.tiny(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            image_size=(128, 64), projection_dim=16, decoder_layers=1, decoder_hidden_size=32,
            decoder_attention_heads=4, decoder_intermediate_size=64)
    else:
        config = DecdConfig()
    model = DecdModel(config).eval()
    processor = DecdProcessor(image_size=config.image_size)
    if arguments.full_decode:  # no reduction: every image at full size until the batch is processed
        processor.load_image = lambda image, name=None: load_image(image, size=None, max_pixels=None, name=name)
    before = int(peak_rss_mb() * 1024**2)
    index = GalleryIndex.build(model, processor, arguments.gallery, arguments.output, batch_size=arguments.batch_size,
                               show_progress=False)
    peak = int(peak_rss_mb() * 1024**2)
    print(json.dumps(dict(count=len(index), before_build_bytes=before, peak_bytes=peak)))


def measure(gallery: Path, output: Path, model: str = "base", batch_size: int = 64, full_decode: bool = False,
            threads: int = 2, timeout: float = 600) -> dict:
    """Peak RSS of indexing `gallery` into `output` in a fresh subprocess: {count, before_build_bytes, peak_bytes}."""
    command = [sys.executable, __file__, "--child", "--gallery", str(gallery), "--index", str(output),
               "--model", model, "--batch_size", str(batch_size)] + (["--full-decode"] if full_decode else [])
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"the index build failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=64, help="photos in the gallery (default 64)")
    parser.add_argument("--formats", nargs="+", default=["jpeg", "png"], choices=["jpeg", "png"])
    parser.add_argument("--model", choices=["base", "tiny"], default="base")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default 64, as build)")
    parser.add_argument("--full-decode", action="store_true", help="also measure without the reduction")
    parser.add_argument("--output-json", default=None)
    # the child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gallery", help=argparse.SUPPRESS)
    parser.add_argument("--index", dest="output", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        return _child(arguments)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for image_format in arguments.formats:
            gallery = write_gallery(Path(scratch) / image_format, arguments.num, image_format)
            for full_decode in [False] + ([True] if arguments.full_decode else []):
                result = measure(gallery, Path(scratch) / f"index-{image_format}-{full_decode}", arguments.model,
                                 arguments.batch_size, full_decode)
                row = dict(format=image_format, photos=arguments.num, photo_size=list(PHOTO_SIZE),
                           reduced_decoding=not full_decode, **result,
                           peak_gib=round(result["peak_bytes"] / 1024**3, 3),
                           under_limit=result["peak_bytes"] < LIMIT_BYTES)
                rows.append(row)
                print(f"{image_format:>4}  reduced={not full_decode!s:>5}  before build "
                      f"{result['before_build_bytes'] / 1024**2:7.0f} MiB  peak {result['peak_bytes'] / 1024**2:7.0f} MiB")
    report = dict(benchmark="index_memory", model=arguments.model, batch_size=arguments.batch_size,
                  limit_bytes=LIMIT_BYTES, machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                                        python=platform.python_version()), rows=rows)
    if arguments.output_json:
        Path(arguments.output_json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {arguments.output_json}")


if __name__ == "__main__":
    main()
