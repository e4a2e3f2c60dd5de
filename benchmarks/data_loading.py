#!/usr/bin/env python
"""How fast the data side feeds a training step: collated pairs/s per DataLoader worker (a benchmark, not a test).

    python benchmarks/data_loading.py --output_json benchmarks/results/data_loading_cpu.json

Writes `--images` 384 x 128 person crops as JPEG files (quality 90, as the benchmarks ship their images; drawn by
the synthetic renderer), then times `DataLoader(..., batch_size=64, num_workers=W, persistent_workers=True,
pin_memory=True on a GPU machine)` over rows of (image path, caption, identity) with the training collator of a GPU
recipe: `load_image` (decode), resize and normalise, IRRA's augmentation, tokenising padded to the 77-token
context, caption quality and MCM masking. Per worker count: collated pairs/s over `--batches` batches after two
warm-up batches (the workers' start-up is not counted), and pairs/s per worker. A GPU step needs as many pairs/s
as it trains, so the cores a GPU needs are its pairs/s over the per-worker rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_crops(folder: Path, count: int) -> list[dict]:
    from decd.synthetic import describe_identity, render_person, sample_identities

    rows, identities = [], sample_identities(max(1, count // 4), seed=0)
    rng = np.random.default_rng(0)
    for index in range(count):
        attributes = identities[index % len(identities)]
        path = folder / f"{index:05d}.jpg"
        render_person(attributes, rng, image_size=(384, 128)).save(path, quality=90)
        rows.append({"image": str(path), "caption": describe_identity(attributes, rng), "person_id": index % 100})
    return rows


def pairs_per_second(rows: list[dict], collator, workers: int, batches: int, batch_size: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, collate_fn=collator, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=True)
    iterator = iter(loader)
    for _ in range(2):  # warm-up: workers started, first batches in flight
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 0, 1 and every core count up")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    from decd.training import DecdTrainingCollator
    from processing_decd import DecdProcessor

    torch.set_num_threads(1)  # as in a DataLoader worker; the in-process row (0 workers) runs on one thread too
    random.seed(0)
    workers = args.workers or sorted({0, 1, *range(2, (os.cpu_count() or 1) + 1, 2)})
    collator = DecdTrainingCollator(DecdProcessor(image_size=(384, 128)), augment=True, mask_captions=True,
                                    pad_to_context=True)
    with tempfile.TemporaryDirectory(prefix="decd-crops-") as folder:
        rows = write_crops(Path(folder), args.images)
        results = {}
        for count in workers:
            rate = pairs_per_second(rows, collator, count, args.batches, args.batch_size)
            results[count] = {"pairs_per_second": round(rate, 1),
                              "pairs_per_second_per_worker": round(rate / max(count, 1), 1)}
            print(f"workers {count}: {rate:.1f} pairs/s ({rate / max(count, 1):.1f} per worker)", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({
            "benchmark": "data_loading", "images": args.images, "batch_size": args.batch_size,
            "batches": args.batches, "load_average": os.getloadavg(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
