"""The Hugging Face Hub: model cards (`card`), publishing a model (`publish`), the demo as a Space (`space`), and
the results a card reports (`results`: measured ones from a run, published ones from `published_results.json`)."""

from .card import build_model_card
from .publish import CODE_FILES, publish
from .results import (METRIC_NAMES, dataset_labels, published_results, published_table,
                      results_from_training_output)
from .space import build_space_readme, publish_space, stage_space

__all__ = [
    "CODE_FILES",
    "METRIC_NAMES",
    "build_model_card",
    "build_space_readme",
    "dataset_labels",
    "publish",
    "publish_space",
    "published_results",
    "published_table",
    "results_from_training_output",
    "stage_space",
]
