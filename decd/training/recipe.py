"""A training recipe: a JSON file (`recipes/*.json`) of the arguments it changes, read by `examples/train.py`.

    python examples/train.py recipes/cuhk-pedes.json --data_dir /data/CUHK-PEDES   # flags override the file

A recipe holds keys of three argument groups: `ModelArguments` (what to start from, the loss settings,
the decoder's size), `DataArguments` (which dataset) and `DecdTrainingArguments` (optimisation and run
management; transformers' `TrainingArguments` plus DECD's knobs). Every default is the method's
(docs/method.md); a recipe states every value it changes, and nothing in the code changes one behind it.
`build_model` turns the model arguments into a model: from a CLIP checkpoint (the method's start), a saved
DECD model (continued training), or random weights of a size preset.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import HfArgumentParser

from configuration_decd import CAPTION_QUALITY_MODES, MCM_VOCABULARIES, SEW_FORMULATIONS, DecdConfig
from inference_decd import load_model
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .trainer import DecdTrainingArguments

PRESETS = {"tiny": DecdConfig.tiny, "base": DecdConfig.vit_base_patch16}


class RecipeError(ValueError):
    """A recipe file or an argument combination that cannot train; the message names the file or argument."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default="openai/clip-vit-base-patch16",
        metadata={"help": "A CLIP checkpoint to start from (the method's: openai/clip-vit-base-patch16), or a saved "
                          "DECD model to continue from. null (in a recipe) with --config_preset: random weights."},
    )
    config_preset: str | None = field(
        default=None,
        metadata={"help": "Train from random weights with this size preset instead (tiny or base); needs "
                          "model_name_or_path null.", "choices": list(PRESETS)},
    )
    image_size: list[int] | None = field(
        default=None, metadata={"help": "Crop height and width, e.g. --image_size 384 128 (default: the model's)."}
    )
    sew_margin: float | None = field(default=None, metadata={"help": "Sew strength m (0 = SDM)."})
    sew_formulation: str | None = field(
        default=None,
        metadata={"help": "Reading of the Sew loss: tighten, relax or compress (docs/method.md).",
                  "choices": list(SEW_FORMULATIONS)},
    )
    learnable_temperature: bool | None = field(
        default=None, metadata={"help": "Train the temperature, starting from --temperature (default: fixed)."}
    )
    caption_quality: str | None = field(
        default=None,
        metadata={"help": "Margin per caption: density, uniform or none.", "choices": list(CAPTION_QUALITY_MODES)},
    )
    temperature: float | None = field(default=None, metadata={"help": "Softmax temperature (method: 0.02)."})
    mcm_weight: float | None = field(default=None, metadata={"help": "Weight of the MCM loss (0 disables MCM)."})
    mcm_vocabulary: str | None = field(
        default=None,
        metadata={"help": "Vocabulary rows the MCM head scores: full (the method's) or batch (the batch's own words).",
                  "choices": list(MCM_VOCABULARIES)},
    )
    mcm_fraction: float | None = field(
        default=None,
        metadata={"help": "Share of each batch's pairs that go through MCM, a random subset drawn each step "
                          "(method: 1, every pair)."},
    )
    mcm_max_positions: int | None = field(
        default=None,
        metadata={"help": "Masked positions MCM scores per caption, at most (method: all; a compiled step scores a "
                          "fixed number, so a cap keeps its whole-vocabulary head small)."},
    )
    id_weight: float | None = field(default=None, metadata={"help": "Weight of the identity loss (method: 0)."})
    # The detachable decoder's size (default: the model's; 4 x 512 wide with 8 heads for the method's model).
    decoder_layers: int | None = field(default=None, metadata={"help": "Decoder layers."})
    decoder_hidden_size: int | None = field(default=None, metadata={"help": "Decoder width."})
    decoder_attention_heads: int | None = field(default=None, metadata={"help": "Decoder attention heads."})
    decoder_intermediate_size: int | None = field(default=None, metadata={"help": "Decoder MLP width."})
    keep_decoder: bool = field(
        default=False,
        metadata={"help": "Save the final model with its decoder (a training checkpoint) instead of the detached "
                          "inference model. Checkpoints under output_dir always keep it."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "cuhk-pedes, icfg-pedes, rstpreid, synthetic or custom."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder (annotation JSON + imgs/)."})
    annotation_file: str | None = field(default=None, metadata={"help": "Annotation JSON for dataset 'custom'."})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip (and list) bad records instead of stopping at them."}
    )
    eval_split: str = field(
        default="val", metadata={"help": "Split used for model selection (falls back to test when there is no val)."}
    )
    test_split: str = field(default="test", metadata={"help": "Split evaluated with the best model at the end."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    synthetic_train_ids: int | None = field(
        default=None,
        metadata={"help": "Synthetic set: training identities (default 1000; from 500 up, val and test stay put)."},
    )
    synthetic_eval_ids: int | None = field(
        default=None, metadata={"help": "Synthetic set: identities in each of val and test."}
    )
    synthetic_images_per_id: int | None = field(default=None, metadata={"help": "Synthetic set: images per identity."})


ARGUMENT_GROUPS = (ModelArguments, DataArguments, DecdTrainingArguments)
# ModelArguments that are DecdConfig fields of the same name: the loss settings, then the decoder's size.
LOSS_SETTINGS = ("sew_margin", "sew_formulation", "caption_quality", "temperature", "learnable_temperature",
                 "mcm_weight", "mcm_vocabulary", "mcm_fraction", "mcm_max_positions", "id_weight")
DECODER_SETTINGS = ("decoder_layers", "decoder_hidden_size", "decoder_attention_heads", "decoder_intermediate_size")


# ----------------------------------------------------------------------------------------------------
# Reading a recipe
# ----------------------------------------------------------------------------------------------------
def _fits(annotation, value) -> bool:
    """Whether a JSON value fits an argument's type (None for an optional one, an int for a float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(option, value) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if annotation in (int, float):
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, list) and all(_fits(typing.get_args(annotation)[0], item) for item in value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {member.value for member in annotation}
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return True  # anything else is checked by the argument class itself


def read_recipe(path: str | os.PathLike) -> dict:
    """The arguments of a recipe file, checked: a JSON object whose keys are argument names and whose values fit.

    Raises RecipeError naming the file and every unknown key (with the closest known name) or bad value.
    """
    path = Path(path)
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist; the project's recipes are in recipes/") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError(f"recipe {path} is not valid UTF-8 JSON: {error}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {path} must be a JSON object of argument names and values, got a "
                          f"{type(recipe).__name__}")
    known = {item.name: typing.get_type_hints(group)[item.name]
             for group in ARGUMENT_GROUPS for item in fields(group) if item.init}
    problems = []
    for key, value in recipe.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            problems.append(f"unknown argument {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif not _fits(known[key], value):
            problems.append(f"{key!r} cannot be {value!r} ({type(value).__name__}); expected {known[key]}")
    if problems:
        raise RecipeError(f"recipe {path}: " + "; ".join(problems))
    return recipe


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, DecdTrainingArguments]:
    """`[RECIPE.json] [--flag value ...]`: the recipe's values over the defaults, the flags over both."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_GROUPS)
    if argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        parser.set_defaults(**read_recipe(argv.pop(0)))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_model_arguments(model_args)
    if data_args.dataset_name is None:
        raise RecipeError("no dataset: give a recipe (e.g. recipes/synthetic.json, the main job) or --dataset_name")
    return model_args, data_args, training_args


def check_model_arguments(model_args: ModelArguments) -> None:
    """Refuse, before any data is loaded, a start that is not one, and a bad loss setting (e.g. --mcm_fraction 0)
    by DecdConfig's own checks."""
    if model_args.config_preset is not None and model_args.model_name_or_path is not None:
        raise RecipeError(f"--config_preset {model_args.config_preset} trains from random weights, but "
                          f"--model_name_or_path {model_args.model_name_or_path} is given too: set one of them "
                          "(model_name_or_path null in the recipe to train from random weights)")
    if model_args.config_preset is None and not model_args.model_name_or_path:
        raise RecipeError("nothing to start from: pass --model_name_or_path (a CLIP checkpoint or a saved DECD "
                          "model) or --config_preset (random weights)")
    DecdConfig(**_given(model_args, LOSS_SETTINGS))  # ValueError naming the field


# ----------------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------------
def _given(model_args: ModelArguments, names: tuple[str, ...]) -> dict:
    return {name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None}


def saved_model_type(folder: str | os.PathLike) -> str | None:
    """The `model_type` in `folder/config.json` (e.g. "decd", "clip"), or None when `folder` has no config.json.

    Tells a saved DECD model from a CLIP checkpoint or a Hub id before loading anything. Raises ValueError
    naming the file when config.json cannot be read or is not a JSON object.
    """
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {config_file}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    return config.get("model_type")


def build_model(model_args: ModelArguments, num_identities: int) -> tuple[DecdModel, DecdProcessor]:
    """(model, processor) to train: random weights of `config_preset`, a saved DECD model (its decoder and heads
    come back, fresh if it was detached), or `DecdModel.from_clip`. Given arguments override the model's values;
    nothing else does."""
    overrides = _given(model_args, LOSS_SETTINGS + DECODER_SETTINGS)
    if model_args.image_size is not None:
        overrides["image_size"] = tuple(model_args.image_size)
    if model_args.config_preset is not None:
        model = DecdModel(PRESETS[model_args.config_preset](num_identities=num_identities, **overrides))
        return model, DecdProcessor(image_size=model.config.image_size)
    source = model_args.model_name_or_path
    if saved_model_type(source) == "decd":
        model, processor = load_model(source, device="cpu", num_identities=num_identities, use_decoder=True,
                                      **overrides)
        if "temperature" in overrides:  # a saved model's weights hold its temperature: start from the given one
            with torch.no_grad():
                model.logit_scale.fill_(math.log(1.0 / model.config.temperature))
        return model, processor
    model = DecdModel.from_clip(source, num_identities=num_identities, **overrides)
    return model, DecdProcessor(image_size=model.config.image_size)


__all__ = [
    "ARGUMENT_GROUPS",
    "DataArguments",
    "ModelArguments",
    "RecipeError",
    "build_model",
    "check_model_arguments",
    "parse_arguments",
    "read_recipe",
    "saved_model_type",
]
