#!/usr/bin/env python
"""Evaluate a saved DECD model on a text-based person search split and draw some retrievals.

    python examples/evaluate.py MODEL_DIR --dataset_name synthetic --split test

Prints R@1 / R@5 / R@10 / mAP / mINP (percent) and the query / gallery counts, and writes to
`--output_dir` (default `MODEL_DIR/eval-<dataset>-<split>`):

- `metrics.json`: the metrics plus the model path, dataset, data folder and split;
- `retrieval_grid.png`: the top-10 results of `--num_grid_queries` queries (picked with `--seed`),
  framed green when the result shows the query's identity and red otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

logger = logging.getLogger("evaluate")

DATASET_NAMES = ("cuhk-pedes", "icfg-pedes", "rstpreid", "synthetic", "custom")
METRIC_COLUMNS = (("R@1", "R1"), ("R@5", "R5"), ("R@10", "R10"), ("mAP", "mAP"), ("mINP", "mINP"))
GRID_TOP_K = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate a saved DECD model on text-to-image person retrieval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_dir", help="folder written by DecdModel.save_pretrained (with the processor files)")
    parser.add_argument("--dataset_name", required=True,
                        help=f"one of {', '.join(DATASET_NAMES)} (aliases such as 'cuhk' are accepted)")
    parser.add_argument("--data_dir", default=None,
                        help="folder with the annotation JSON and imgs/ (optional for 'synthetic': the cached "
                             "default benchmark is generated)")
    parser.add_argument("--annotation_file", default=None, help="annotation JSON overriding the dataset's default")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="evaluation split")
    parser.add_argument("--batch_size", type=int, default=64, help="images / captions encoded per batch")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for encoding")
    parser.add_argument("--output_dir", default=None, help="default: MODEL_DIR/eval-<dataset>-<split>")
    parser.add_argument("--num_grid_queries", type=int, default=8,
                        help="queries drawn in retrieval_grid.png (0 to skip the picture)")
    parser.add_argument("--seed", type=int, default=0, help="seed for picking the grid queries")
    parser.add_argument("--skip_bad_records", action="store_true",
                        help="skip malformed annotation records instead of failing")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_grid_queries < 0:
        parser.error(f"--num_grid_queries must be >= 0, got {args.num_grid_queries}")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {args.num_workers}")
    return args


def pick_queries(num_queries: int, count: int, seed: int) -> list[int]:
    """`count` distinct query indices, deterministic for a seed, in increasing order."""
    import numpy as np

    count = min(count, num_queries)
    rng = np.random.default_rng(seed)
    return sorted(int(index) for index in rng.choice(num_queries, size=count, replace=False))


def format_table(metrics: dict) -> str:
    header = " | ".join(f"{name:>7}" for name, _ in METRIC_COLUMNS)
    values = " | ".join(f"{metrics[key]:7.2f}" for _, key in METRIC_COLUMNS)
    rule = "-" * len(header)
    lines = [header, rule, values, rule,
             f"queries: {metrics['num_queries']} evaluated"
             + (f", {metrics['num_queries_without_match']} without a gallery match (left out)"
                if metrics.get("num_queries_without_match") else "")
             + f" | gallery: {metrics['num_gallery']} images"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_dir = Path(args.model_dir).expanduser().resolve()
    if not model_dir.is_dir():  # before the heavy imports, so that a wrong path fails at once
        raise SystemExit(f"error: model folder {model_dir} does not exist (pass the folder written by "
                         "save_pretrained)")
    from inference_decd import ModelLoadError, load_model

    try:  # the one loader: it refuses another model type or a folder without config.json, naming why
        model, processor = load_model(model_dir, args.device)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None

    from decd.data import PersonSearchDataError, load_person_search
    from decd.retrieval import evaluate_retrieval
    from decd.visualize import retrieval_grid_from_similarity

    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir() and args.dataset_name != "synthetic":
        raise SystemExit(f"error: --data_dir {args.data_dir} is not a folder")

    try:
        dataset = load_person_search(
            args.dataset_name, data_dir=args.data_dir, split=args.split, skip_bad_records=args.skip_bad_records,
            annotation_file=args.annotation_file,
        )
    except PersonSearchDataError as error:
        raise SystemExit(f"error: cannot load {args.dataset_name!r} split {args.split!r}: {error}") from None
    gallery, queries = dataset["gallery"], dataset["queries"]

    logger.info("evaluating %s on %s/%s: %d queries, %d gallery images (device %s)",
                model_dir, args.dataset_name, args.split, len(queries), len(gallery), model.device)

    metrics, similarity = evaluate_retrieval(
        model, processor, gallery, queries, batch_size=args.batch_size, num_workers=args.num_workers,
        show_progress=True, return_similarity=True,
    )

    output_dir = Path(args.output_dir) if args.output_dir else model_dir / f"eval-{args.dataset_name}-{args.split}"
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"\n{args.dataset_name} / {args.split}  ({model_dir})")
    print(format_table(metrics))

    record = {
        **{key: (float(value) if isinstance(value, float) else value) for key, value in metrics.items()},
        "model_path": str(model_dir),
        "dataset_name": args.dataset_name,
        "data_dir": None if args.data_dir is None else str(Path(args.data_dir).expanduser().resolve()),
        "split": args.split,
    }
    metrics_path = output_dir / "metrics.json"
    metrics_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {metrics_path}")

    if args.num_grid_queries > 0:
        indices = pick_queries(similarity.shape[0], args.num_grid_queries, args.seed)
        grid_path = retrieval_grid_from_similarity(
            similarity, queries, gallery, indices, output_dir / "retrieval_grid.png", top_k=GRID_TOP_K,
            title=f"{model_dir.name} on {args.dataset_name}/{args.split}: R@1 {metrics['R1']:.1f}, "
                  f"mAP {metrics['mAP']:.1f}",
        )
        print(f"wrote {grid_path}")
    return record


if __name__ == "__main__":
    main()
