"""Stage 1 of the two-stage path (examples/pretrain_clip.py) and stage 2 starting from its CLIP folder."""

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, Trainer

from decd.data import load_person_search, num_identities
from decd.synthetic import (
    generate_synthetic_captioned_images,
    generate_synthetic_person_search,
    person_search_identities,
)
from configuration_decd import DecdConfig
from decd.training import DecdTrainer, DecdTrainingArguments, DecdTrainingCollator
from decd.training.recipe import ModelArguments, build_model, parse_arguments
from modeling_decd import NEW_MODULE_PREFIXES, DecdModel
from tokenization_decd import default_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_DECODER = dict(decoder_layers=1, decoder_hidden_size=64, decoder_attention_heads=2, decoder_intermediate_size=128)


def _script(name, path):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain():
    return _script("decd_pretrain_clip_script", "pretrain_clip.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("decd-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DECD_CACHE", str(root))
        yield root


def _tiny_args(pretrain, output_dir=None, **overrides):
    settings = dict(output_dir=None if output_dir is None else str(output_dir), num_images=32, image_size=64,
                    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    projection_dim=32, max_steps=2, per_device_train_batch_size=8, logging_steps=1)
    settings.update(overrides)
    return pretrain.PretrainArguments(**settings)


@pytest.fixture(scope="module")
def tiny_clip(pretrain, cache):
    return pretrain.pretrain_clip(_tiny_args(pretrain))


def test_tiny_pretraining_writes_a_clip_folder(tiny_clip, cache):
    assert tiny_clip.parent == cache and tiny_clip.name.startswith("clip-pretrained-")
    assert (tiny_clip / "model.safetensors").is_file() and not list(tiny_clip.glob("*.bin"))
    model = CLIPModel.from_pretrained(tiny_clip, use_safetensors=True)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    assert model.config.vision_config.image_size == 64 and model.config.text_config.vocab_size == 49408
    image = Image.new("RGB", (40, 90), (200, 30, 30))
    inputs = processor(text=["a man in a red jacket"], images=[image], return_tensors="pt", padding=True)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 64)  # square, CLIP's shape for the model
    # CLIP's own vocabulary: the same ids as the repository's tokenizer (which only adds the mask token).
    text = "A woman wears a crimson t-shirt and grey shorts, with a backpack."
    assert processor.tokenizer(text)["input_ids"] == default_clip_tokenizer()(text)["input_ids"]
    assert len(processor.tokenizer) == 49408
    with torch.no_grad():
        outputs = model(**inputs, return_loss=True)
    assert torch.isfinite(outputs.loss)
    marker = json.loads((tiny_clip / "pretraining.json").read_text())
    assert marker["steps"] == 2 and all(math.isfinite(loss) for loss in marker["logged_losses"])


def test_second_pretraining_with_the_same_settings_reuses_the_folder(pretrain, tiny_clip, monkeypatch):
    before = (tiny_clip / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reusing the cache")

    monkeypatch.setattr(Trainer, "train", no_training)
    assert pretrain.pretrain_clip(_tiny_args(pretrain)) == tiny_clip
    assert (tiny_clip / "model.safetensors").stat().st_mtime_ns == before
    # Other settings are another model (and do train).
    assert pretrain.default_output_dir(_tiny_args(pretrain, seed=1)) != tiny_clip


def test_captioned_corpus_is_disjoint_from_every_person_search_identity(tmp_path):
    # A person-search set with identities drawn after test (600 > 500 train identities).
    sizes = dict(num_train_ids=600, num_val_ids=20, num_test_ids=30, seed=0)
    person_root = generate_synthetic_person_search(tmp_path / "ps", images_per_id=1, progress=False, **sizes)
    meta = json.loads((person_root / "meta.json").read_text())
    worn = {(a["upper_color"], a["upper_type"], a["lower_color"], a["lower_type"])
            for a in meta["identities"].values()}
    assert len(meta["identities"]) == 650

    root = generate_synthetic_captioned_images(tmp_path / "corpus", num_images=400, image_size=48, seed=0,
                                               person_search=sizes, progress=False)
    records = json.loads((root / "captions.json").read_text())
    assert len(records) == 400
    assert all(isinstance(r["caption"], str) and r["caption"] for r in records)  # one caption per image
    assert len({r["file_path"] for r in records}) == 400
    assert not {tuple(r["clothing"]) for r in records} & worn
    with Image.open(root / records[0]["file_path"]) as image:
        assert image.size == (48, 48)
    # The default corpus reserves the default person-search set (1,000 train incl. those after test, val, test).
    default = generate_synthetic_captioned_images(tmp_path / "default", num_images=300, image_size=32,
                                                  progress=False)
    reserved = {attributes.clothing_key for attributes, _ in person_search_identities()}
    assert not {tuple(r["clothing"]) for r in json.loads((default / "captions.json").read_text())} & reserved
    # Cache hit: nothing is rewritten.
    before = (default / "captions.json").stat().st_mtime_ns
    assert generate_synthetic_captioned_images(tmp_path / "default", num_images=300, image_size=32,
                                               progress=False) == default
    assert (default / "captions.json").stat().st_mtime_ns == before


def test_from_clip_on_the_pretrained_folder_resizes_to_the_crop_grid(tiny_clip):
    clip = CLIPModel.from_pretrained(tiny_clip, use_safetensors=True)
    model = DecdModel.from_clip(str(tiny_clip), image_size=(128, 64), num_identities=4)
    assert tuple(model.config.image_size) == (128, 64)
    positions = model.vision_model.embeddings.position_embedding.weight
    assert positions.shape[0] == (128 // 16) * (64 // 16) + 1  # 8 x 4 crop grid + CLS (pretrained: 4 x 4 + 1)
    assert clip.vision_model.embeddings.position_embedding.weight.shape[0] == 17
    assert torch.equal(positions[0], clip.vision_model.embeddings.position_embedding.weight[0])  # CLS kept
    tokens = model.text_model.embeddings.token_embedding.weight
    assert tokens.shape[0] == 49408 + 1 and model.config.mask_token_id == 49408
    assert torch.equal(tokens[:49408], clip.text_model.embeddings.token_embedding.weight)
    assert model.temperature.item() == pytest.approx(0.02)
    assert "logit_scale" in dict(model.named_buffers())  # fixed: a buffer, no parameter to train




def test_fine_tuning_from_the_pretrained_clip_lowers_the_loss_at_temperature_002(tiny_clip, tiny_set, tmp_path):
    train_set = load_person_search("synthetic", tiny_set, split="train").select(range(8))
    torch.manual_seed(0)
    model, processor = build_model(
        ModelArguments(model_name_or_path=str(tiny_clip), image_size=[128, 64], **TINY_DECODER),
        num_identities(train_set),
    )
    assert model.config.decoder_layers == 1 and model.config.decoder_hidden_size == 64
    assert tuple(processor.image_size) == (128, 64) == tuple(model.config.image_size)
    # The DECD processor normalises like the pretrained CLIP's own processor (same mean and std).
    clip_processor = CLIPProcessor.from_pretrained(tiny_clip)
    assert list(processor.image_processor.image_mean) == list(clip_processor.image_processor.image_mean)
    assert list(processor.image_processor.image_std) == list(clip_processor.image_processor.image_std)
    assert model.config.temperature == pytest.approx(0.02) and model.config.id_weight == 0
    # The best the paper's regime measured: Sew's "compress" reading at 0.05 with MCM (docs/findings.md).
    assert (model.config.sew_formulation, model.config.sew_margin) == ("compress", 0.05)
    assert model.config.caption_quality == "density" and model.config.mcm_weight > 0
    assert model.config.mcm_vocabulary == "full"  # from a CLIP: the paper's whole-vocabulary MCM
    assert model.config.mcm_fraction == 1.0  # and MCM on every pair
    args = DecdTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-3,
        new_module_lr_multiplier=5.0, warmup_steps=1, lr_scheduler_type="cosine", max_steps=6, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )
    collator = DecdTrainingCollator(processor, augment=False, mask_captions=True)
    trainer = DecdTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                          processing_class=processor)
    # One fixed batch (masking drawn once) to compare before and after.
    np.random.seed(0)
    torch.manual_seed(0)
    fixed = collator([{**train_set[i], "image": train_set[i]["image"]} for i in range(8)])

    def loss_on_fixed_batch():
        model.eval()
        with torch.no_grad():
            return float(model(**fixed).loss)

    before = loss_on_fixed_batch()
    trainer.create_optimizer()
    groups = trainer.optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        new = {names[id(p)].startswith(NEW_MODULE_PREFIXES) for p in group["params"]}
        assert len(new) == 1
        assert group["lr"] == pytest.approx(5e-3 if new.pop() else 1e-3)
    assert any(names[id(p)].startswith("decoder.") for g in groups for p in g["params"])
    trainer.train()
    after = loss_on_fixed_batch()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert all(math.isfinite(entry["loss_sew"]) for entry in trainer.state.log_history if "loss_sew" in entry)
    assert model.temperature.item() == pytest.approx(0.02)  # fixed: never trained
    assert after < before, (before, after, losses)


def test_train_script_runs_from_the_pretrained_clip_folder(tiny_clip, tiny_set, tmp_path):
    train_script = _script("decd_train_script_two_stage_main", "train.py")
    metrics = train_script.main([
        "--model_name_or_path", str(tiny_clip), "--image_size", "128", "64", "--dataset_name", "synthetic",
        "--data_dir", str(tiny_set), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-4", "--new_module_lr_multiplier", "5",
        "--temperature", "0.02", "--warmup_steps", "0.5", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--use_cpu", "true", "--dataloader_num_workers", "0",
        *[f"--{name}={value}" for name, value in TINY_DECODER.items()],
    ])
    assert math.isfinite(metrics["test_R1"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_type"] == "decd" and saved["temperature"] == pytest.approx(0.02)
    assert saved["image_size"] == [128, 64]


def test_two_stage_benchmark_reports_per_seed_differences_to_the_full_model():
    spec = importlib.util.spec_from_file_location("decd_two_stage_benchmark", REPO / "benchmarks" / "two_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Every variant states the Sew reading and margin it trains (the default is another reading).
    first_reading = ["--sew_formulation", "tighten", "--sew_margin", "0.1"]
    assert module.VARIANTS["full"] == first_reading and module.VARIANTS["sdm"] == ["--sew_margin", "0"]
    assert module.VARIANTS["no-mcm"] == [*first_reading, "--mcm_weight", "0"]
    assert module.VARIANTS["uniform"] == [*first_reading, "--caption_quality", "uniform"]
    model_args, _, training_args = parse_arguments([str(module.RECIPE), "--model_name_or_path", "clip-folder"])
    assert model_args.temperature is None and DecdConfig().temperature == 0.02  # the method's, not overridden
    assert training_args.new_module_lr_multiplier == 5 and training_args.lr_scheduler_type.value == "cosine"
    assert model_args.image_size == [128, 64]

    def run(variant, seed, r1):
        return {"variant": variant, "seed": seed, "metrics": dict.fromkeys(module.METRICS, r1), "cpu_seconds": 10.0,
                "wall_seconds": 6.0}

    runs = [run("full", 1, 50.0), run("sdm", 1, 47.0), run("full", 2, 60.0), run("sdm", 2, 61.0)]
    differences = module.differences(runs, "full")
    assert differences["sdm"]["per_seed"] == {1: dict.fromkeys(module.METRICS, -3.0),
                                              2: dict.fromkeys(module.METRICS, 1.0)}
    assert differences["sdm"]["R1"]["mean"] == pytest.approx(-1.0)
    summary = module.summary(runs)
    assert summary["full"]["R1"]["mean"] == pytest.approx(55.0) and summary["full"]["cpu_seconds_total"] == 20.0


def test_from_scratch_recipe_is_batch_words_quarter_mcm_ten_epochs_unless_told_otherwise():
    train_script = _script("decd_train_script_recipe", "train.py")
    model_args, _, training_args = parse_arguments([str(REPO / "recipes" / "synthetic.json")])
    model, _ = build_model(model_args, 4)
    assert model.config.mcm_vocabulary == "batch" and model.config.temperature == pytest.approx(0.2)
    assert model.config.mcm_fraction == 0.25 and training_args.num_train_epochs == 10
    model, _ = build_model(dataclasses.replace(model_args, mcm_vocabulary="full", mcm_fraction=1.0), 4)
    assert model.config.mcm_vocabulary == "full" and model.config.mcm_fraction == 1.0
    for flag, bad in (("--mcm_vocabulary", "sampled"), ("--caption_quality", "dense")):
        with pytest.raises(SystemExit):  # refused by the argument parser, before any data is loaded
            train_script.main([flag, bad])
    # Refused by DecdConfig's own check, before any data is loaded (the dataset folder does not exist).
    with pytest.raises(SystemExit, match=r"mcm_fraction must be a number in \(0, 1\], got 0.0"):
        train_script.main(["--mcm_fraction", "0", "--dataset_name", "custom", "--data_dir", "/nonexistent"])
