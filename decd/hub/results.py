"""Retrieval results for model cards: the measured ones a training run wrote, and the published ones of the
literature (`published_results.json`, the one source of those numbers; docs/protocol.md's table is rendered
from it by `published_table()`, and `python -m decd.hub.results` prints that table)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from huggingface_hub import EvalResult

TASK_TYPE = "zero-shot-image-classification"
TASK_NAME = "Text-based person retrieval (text -> image)"
METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")
# Metric ids in model-index and display names (all values in percent).
METRIC_TYPES = {"R1": "recall@1", "R5": "recall@5", "R10": "recall@10", "mAP": "mAP", "mINP": "mINP"}
METRIC_DISPLAY = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "mAP": "mAP", "mINP": "mINP"}
PUBLISHED_RESULTS_FILE = Path(__file__).with_name("published_results.json")

# Dataset names as accepted by `decd.data.load_person_search` -> (display name, model-index dataset type).
DATASETS = {
    "cuhk-pedes": ("CUHK-PEDES", "cuhk-pedes"),
    "icfg-pedes": ("ICFG-PEDES", "icfg-pedes"),
    "rstpreid": ("RSTPReid", "rstpreid"),
    "synthetic": ("DECD synthetic person search (generated)", "decd-synthetic"),
}

# Published numbers (percent), copied from the project's protocol notes; NOT measured by this code.


@lru_cache(maxsize=1)
def published_results() -> dict[str, dict[str, tuple]]:
    """{method: {dataset: (R@1, R@5, R@10, mAP, mINP)}} in percent (None: not reported), from the papers."""
    table = json.loads(PUBLISHED_RESULTS_FILE.read_text(encoding="utf-8"))
    return {method: {dataset: tuple(values) for dataset, values in by_dataset.items()}
            for method, by_dataset in table["methods"].items()}


def published_datasets() -> tuple[str, ...]:
    return tuple(json.loads(PUBLISHED_RESULTS_FILE.read_text(encoding="utf-8"))["datasets"])


def dataset_labels(dataset_name: str) -> tuple[str, str]:
    """(display name, model-index dataset type) of a dataset name such as "cuhk-pedes" or "synthetic"."""
    key = dataset_name.lower()
    return DATASETS.get(key, (dataset_name, key))


def results_from_training_output(folder: str | os.PathLike, dataset_name: str, split: str = "test") -> list[dict]:
    """Read `all_results.json` written by `examples/train.py` into the `results` list of `build_model_card`.

    Uses the keys `{split}_R1`, `{split}_R5`, `{split}_R10`, `{split}_mAP`, `{split}_mINP` (percent) and
    `{split}_selected_on` (the model-selection split). Raises `FileNotFoundError` / `ValueError` when the
    file or a metric is missing.
    """
    path = Path(folder) / "all_results.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    missing = [f"{split}_{name}" for name in METRIC_NAMES if f"{split}_{name}" not in metrics]
    if missing:
        raise ValueError(f"{path} lacks {missing}: was the model evaluated on the {split} split?")
    display_name, dataset_type = dataset_labels(dataset_name)
    return [{
        "dataset_name": display_name,
        "dataset_type": dataset_type,
        "split": split,
        "metrics": {name: float(metrics[f"{split}_{name}"]) for name in METRIC_NAMES},
        "selected_on": metrics.get(f"{split}_selected_on"),
    }]


def check_results(results: Sequence[Mapping]) -> list[dict]:
    checked = []
    for index, result in enumerate(results or []):
        for key in ("dataset_name", "dataset_type", "split", "metrics"):
            if key not in result:
                raise ValueError(f"results[{index}] lacks {key!r}: expected dataset_name, dataset_type, split, "
                                 "metrics (and optionally selected_on).")
        unknown = set(result["metrics"]) - set(METRIC_NAMES)
        if unknown:
            raise ValueError(f"results[{index}] has unknown metrics {sorted(unknown)}; known: {list(METRIC_NAMES)}.")
        checked.append(dict(result))
    return checked


def eval_results(results: list[dict]) -> list[EvalResult]:
    evals = []
    for result in results:
        dataset_args = {"model_selection_split": result["selected_on"]} if result.get("selected_on") else None
        for name, value in result["metrics"].items():
            evals.append(EvalResult(
                task_type=TASK_TYPE,
                task_name=TASK_NAME,
                dataset_type=result["dataset_type"],
                dataset_name=result["dataset_name"],
                dataset_split=result["split"],
                dataset_args=dataset_args,
                metric_type=METRIC_TYPES[name],
                metric_name=f"{METRIC_DISPLAY[name]} (%)",
                metric_value=float(value),
            ))
    return evals


def format_value(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def published_table() -> str:
    """The published numbers as a markdown table (one cell per dataset: R@1 / R@5 / R@10 / mAP / mINP, or R@1 alone
    where a paper reports only that)."""
    datasets = published_datasets()
    lines = ["| method | " + " | ".join(datasets) + " |", "|" + "---|" * (len(datasets) + 1)]
    for method, by_dataset in published_results().items():
        cells = []
        for dataset in datasets:
            values = by_dataset[dataset]
            shown = [v for v in values if v is not None]
            cells.append(" / ".join(format_value(v) for v in values) if len(shown) > 1 else format_value(values[0]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(published_table(), end="")
