"""Recipes are files (decd.training.recipe): each of recipes/*.json parses, and the model, the optimizer's parameter
groups and the Trainer arguments built from it hold the values the file and docs/method.md state."""

import json
import math
from pathlib import Path

import pytest
import torch

from decd.data import load_person_search
from decd.training import DecdTrainer, DecdTrainingCollator
from decd.training.recipe import build_model, parse_arguments, read_recipe, saved_model_type
from modeling_decd import NEW_MODULE_PREFIXES, DecdModel

from .helpers import hub_cache, tiny_clip, tiny_config, use_offline_hub_cache

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
PAPER_RECIPES = ("cuhk-pedes", "icfg-pedes", "rstpreid")


def _built(recipe, tiny_set, tmp_path, *flags):
    """(model, trainer) exactly as examples/train.py builds them from `recipe` (a name in recipes/, or a file) and
    `flags`, on the tiny set."""
    path = RECIPES / f"{recipe}.json" if isinstance(recipe, str) else recipe
    model_args, data_args, training_args = parse_arguments(
        [str(path), "--output_dir", str(tmp_path / "run"), "--report_to", "none",
         "--use_cpu", "true", *flags])
    train_set = load_person_search("synthetic", tiny_set, split="train")
    eval_set = load_person_search("synthetic", tiny_set, split="val")
    model, processor = build_model(model_args, num_identities=6)
    trainer = DecdTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                          processing_class=processor,
                          data_collator=DecdTrainingCollator(processor, augment=training_args.augment))
    return model, trainer, data_args


def _learning_rates(trainer) -> dict[bool, set[float]]:
    """{is a new module: the learning rates of its parameter groups}."""
    optimizer = trainer.create_optimizer()
    new_parameters = {id(p) for name, p in trainer.model.named_parameters() if name.startswith(NEW_MODULE_PREFIXES)}
    rates = {True: set(), False: set()}
    for group in optimizer.param_groups:
        kinds = {id(p) in new_parameters for p in group["params"]}
        assert len(kinds) == 1  # a group never mixes new modules and encoders
        rates[kinds.pop()].add(group["lr"])
    return rates


def test_every_documented_recipe_is_a_file_that_parses():
    assert sorted(path.stem for path in RECIPES.glob("*.json")) == sorted(
        ["synthetic", "two-stage", *PAPER_RECIPES])
    for path in RECIPES.glob("*.json"):
        assert read_recipe(path), path


@pytest.mark.parametrize("dataset", PAPER_RECIPES)
def test_the_papers_recipe_builds_the_method(dataset, tiny_set, tmp_path, monkeypatch):
    # The recipe starts from the Hub's openai/clip-vit-base-patch16: a tiny CLIP stands in for it in an offline
    # Hub cache, so the real loading path runs (patch 16, so that 384 x 128 crops make the 24 x 8 grid).
    _, clip_folder = tiny_clip(tmp_path, image_size=64, patch_size=16)
    use_offline_hub_cache(monkeypatch, hub_cache(tmp_path, clip_folder, "openai/clip-vit-base-patch16"))
    model, trainer, data_args = _built(dataset, tiny_set, tmp_path)
    assert data_args.dataset_name == dataset
    config = model.config
    assert config.base_model == "openai/clip-vit-base-patch16"
    assert config.temperature == 0.02 and not config.learnable_temperature
    assert "logit_scale" in dict(model.named_buffers())  # fixed: a buffer, not trained
    assert tuple(config.image_size) == (384, 128) and model.vision_model.embeddings.grid_size == (24, 8)
    # The paper's recipes train the best setting measured in its regime: Sew's "compress" reading at 0.05 with MCM
    # (docs/findings.md).
    assert (config.sew_formulation, config.sew_margin, config.caption_quality, config.mcm_vocabulary,
            config.mcm_fraction) == ("compress", 0.05, "density", "full", 1.0)
    assert config.similarity_loss.startswith("Sew, reading 'compress'")
    assert (config.sew_weight, config.mcm_weight, config.id_weight) == (1.0, 1.0, 0.0)
    assert (config.decoder_layers, config.decoder_hidden_size, config.decoder_attention_heads) == (4, 512, 8)
    args = trainer.args
    assert args.learning_rate == 1e-5 and args.weight_decay == 4e-5
    assert _learning_rates(trainer) == {False: {1e-5}, True: {5e-5}}  # new modules at 5x the encoders
    assert args.num_train_epochs == 60 and args.per_device_train_batch_size == 64
    assert args.lr_scheduler_type.value == "cosine"
    steps_per_epoch = 1064  # CUHK-PEDES: 68,126 pairs / 64
    assert args.get_warmup_steps(60 * steps_per_epoch) == 5 * steps_per_epoch  # 5 warm-up epochs
    assert args.augment is True and args.metric_for_best_model == "R1"
    # On a GPU: a compiled step (captions padded to the context, MCM on at most 32 positions per caption), bf16,
    # the data workers a GPU needs at that rate (benchmarks/README.md), no per-step host synchronisation.
    assert args.torch_compile is True and args.bf16 is True and config.mcm_max_positions == 32
    assert args.dataloader_num_workers == 8 and args.dataloader_persistent_workers
    assert read_recipe(RECIPES / f"{dataset}.json")["dataloader_pin_memory"] is True  # (turned off here: no GPU)
    assert args.logging_nan_inf_filter is False


def test_the_main_jobs_recipe_builds_the_tiny_model_from_random_weights(tiny_set, tmp_path):
    recipe = json.loads((RECIPES / "synthetic.json").read_text())
    torch.manual_seed(0)
    model, trainer, data_args = _built("synthetic", tiny_set, tmp_path)
    config = model.config
    assert getattr(config, "base_model", None) is None  # random weights
    assert tuple(config.image_size) == (128, 64) and config.text_config.hidden_size == 128  # the tiny preset
    for name in ("temperature", "sew_margin", "sew_formulation", "id_weight", "mcm_vocabulary", "mcm_fraction"):
        assert getattr(config, name) == recipe[name], name
    # From scratch at temperature 0.2, Sew's margin of 0.1 beat SDM (docs/findings.md): the recipe keeps it.
    assert config.similarity_loss.startswith("Sew, reading 'tighten'") and recipe["sew_margin"] == 0.1
    assert _learning_rates(trainer) == {False: {recipe["learning_rate"]}, True: {recipe["learning_rate"]}}
    args = trainer.args
    assert args.num_train_epochs == recipe["num_train_epochs"] and args.warmup_steps == recipe["warmup_steps"]
    assert args.augment is False and args.output_dir == str(tmp_path / "run")  # the flag overrides the file
    assert data_args.dataset_name == "synthetic"


def test_the_two_stage_recipe_fine_tunes_a_given_clip_with_the_tiny_decoder(tiny_set, tmp_path):
    recipe = json.loads((RECIPES / "two-stage.json").read_text())
    _, clip_folder = tiny_clip(tmp_path, image_size=64, patch_size=16)
    model, trainer, _ = _built("two-stage", tiny_set, tmp_path, "--model_name_or_path", str(clip_folder))
    config = model.config
    assert config.base_model == str(clip_folder) and tuple(config.image_size) == tuple(recipe["image_size"])
    assert (config.decoder_layers, config.decoder_hidden_size, config.decoder_attention_heads,
            config.decoder_intermediate_size) == (2, 128, 4, 512)
    assert config.temperature == 0.02 and config.id_weight == 0.0  # the method's
    assert _learning_rates(trainer) == {False: {2e-4}, True: {1e-3}}


def test_flags_override_the_recipe_and_unset_values_keep_the_model_s_own(tiny_set, tmp_path):
    model, trainer, _ = _built("synthetic", tiny_set, tmp_path, "--learning_rate", "3e-3", "--temperature", "0.3",
                               "--new_module_lr_multiplier", "2")
    assert model.config.temperature == 0.3 and model.config.mcm_fraction == 0.25
    assert _learning_rates(trainer) == {False: {3e-3}, True: {6e-3}}


def test_a_saved_decd_model_continues_with_its_own_settings(tiny_set, tmp_path):
    DecdModel(tiny_config(temperature=0.3, mcm_fraction=0.5)).save_pretrained(tmp_path / "saved")
    assert saved_model_type(tmp_path / "saved") == "decd"
    recipe = tmp_path / "continue.json"
    recipe.write_text(json.dumps({"dataset_name": "synthetic", "model_name_or_path": str(tmp_path / "saved")}))
    model, _, _ = _built(recipe, tiny_set, tmp_path)
    assert model.config.temperature == 0.3 and model.config.mcm_fraction == 0.5
    assert math.isclose(float(model.temperature), 0.3, rel_tol=1e-6)
