"""The temperature lives in the weights, as CLIP's `logit_scale` = log(1 / temperature): a buffer when fixed, a
parameter when learnable, initialised from `DecdConfig.temperature`, which a saved config keeps as the initial value.

Covered: the logits and the loss of a fixed temperature (today's arithmetic, bit for bit), save and reload (also
through `AutoModel`, in half precision, frozen or thawed on load), checkpoints written before the temperature lived
in the weights, `from_clip`, a Trainer checkpoint and resume, and examples/train.py continuing from a saved model.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from decd.data import load_person_search
from decd.training import DecdTrainer, DecdTrainingArguments, DecdTrainingCollator
from losses_decd import sew_loss
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import random_batch, tiny_config
from .helpers import tiny_clip as _tiny_clip

REPO = Path(__file__).resolve().parents[1]


def _log_scale(temperature: float) -> torch.Tensor:
    """log(1 / temperature) in float32: what a model built with this temperature holds."""
    return torch.tensor(math.log(1.0 / temperature))


def _trainable(model: DecdModel) -> bool:
    return "logit_scale" in {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _train_temperature(model: DecdModel, value: float) -> None:
    """Stand-in for training a learnable temperature: move it away from the config's value."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / value))


def _saved(folder) -> tuple[float, torch.Tensor | None]:
    """(config.json's temperature, the `logit_scale` the saved weights hold)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return config["temperature"], load_file(str(Path(folder) / "model.safetensors")).get("logit_scale")


def _as_old_checkpoint(folder: Path, learnable: bool) -> float:
    """Rewrite a saved model as the code before this change saved it: no `logit_scale`; a learnable temperature as
    `log_logit_scale`, and config.json stating the temperature in use (for a learnable one, its trained value)."""
    weights = load_file(str(folder / "model.safetensors"))
    scale = weights.pop("logit_scale")
    config = json.loads((folder / "config.json").read_text())
    if learnable:
        weights["log_logit_scale"] = scale
        config["temperature"] = float(torch.exp(-scale))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return config["temperature"]


# ----------------------------------------------------------------------------------------------------
# The model, save and reload
# ----------------------------------------------------------------------------------------------------
def test_a_fixed_temperature_gives_todays_logits_and_loss_bit_for_bit():
    torch.manual_seed(0)
    model = DecdModel(tiny_config(temperature=0.2)).eval()
    assert not _trainable(model) and "logit_scale" in dict(model.named_buffers())
    batch = random_batch(model.config, with_mcm=False)
    with torch.no_grad():
        output = model(**batch)
    # Before the temperature lived in the weights, a fixed one was exp(float32 log(1 / temperature)) from the config.
    scale = _log_scale(0.2).exp()
    assert torch.equal(output.logits_per_text, scale * output.text_embeds @ output.image_embeds.t())
    config = model.config
    expected = sew_loss(output.image_embeds, output.text_embeds, batch["person_ids"], batch["caption_quality"],
                        margin=config.sew_margin, temperature=1.0 / scale, formulation=config.sew_formulation)
    assert torch.equal(output.loss_sew, expected)


def test_a_fixed_temperature_is_saved_with_the_weights_and_reloads_exactly(tmp_path):
    DecdModel(tiny_config(temperature=0.2)).save_pretrained(tmp_path / "fixed")
    stated, held = _saved(tmp_path / "fixed")
    assert stated == 0.2 and torch.equal(held, _log_scale(0.2))
    for loaded in (DecdModel.from_pretrained(tmp_path / "fixed"), AutoModel.from_pretrained(tmp_path / "fixed"),
                   DecdModel.from_pretrained(tmp_path / "fixed", dtype=torch.bfloat16)):
        assert torch.equal(loaded.logit_scale, _log_scale(0.2))  # float32 even in a bfloat16 model
        assert not _trainable(loaded) and loaded.config.temperature == 0.2
    # The config's temperature is only where a model starts: the saved one stays (CLIP's logit_scale_init_value).
    assert torch.equal(DecdModel.from_pretrained(tmp_path / "fixed", temperature=0.05).logit_scale, _log_scale(0.2))


def test_a_trained_temperature_lives_in_the_weights_and_the_config_keeps_its_start(tmp_path):
    model = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True))
    _train_temperature(model, 0.23)
    model.save_pretrained(tmp_path / "learnable")
    stated, held = _saved(tmp_path / "learnable")
    assert stated == 0.2 and model.config.temperature == 0.2
    assert torch.equal(held, model.logit_scale.detach())

    loaded = DecdModel.from_pretrained(tmp_path / "learnable")
    assert _trainable(loaded) and torch.equal(loaded.logit_scale.detach(), held)
    frozen = DecdModel.from_pretrained(tmp_path / "learnable", learnable_temperature=False)
    assert not _trainable(frozen) and torch.equal(frozen.logit_scale, held)  # frozen at its trained value

    DecdModel(tiny_config(temperature=0.2)).save_pretrained(tmp_path / "fixed")
    thawed = DecdModel.from_pretrained(tmp_path / "fixed", learnable_temperature=True)
    assert _trainable(thawed) and torch.equal(thawed.logit_scale.detach(), _log_scale(0.2))


@pytest.mark.parametrize("learnable", [False, True])
def test_a_checkpoint_saved_before_the_temperature_lived_in_the_weights_loads_with_its_temperature(tmp_path,
                                                                                                   learnable):
    model = DecdModel(tiny_config(temperature=0.3, learnable_temperature=learnable))
    if learnable:
        _train_temperature(model, 0.23)
    model.save_pretrained(tmp_path / "old")
    in_use = _as_old_checkpoint(tmp_path / "old", learnable)
    assert in_use == (pytest.approx(0.23, rel=1e-6) if learnable else 0.3)

    loaded, info = DecdModel.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # nothing to warn about
    assert _trainable(loaded) is learnable
    assert float(loaded.temperature) == pytest.approx(in_use, rel=1e-6)
    if not learnable:
        assert torch.equal(loaded.logit_scale, _log_scale(0.3))
    half = DecdModel.from_pretrained(tmp_path / "old", dtype=torch.bfloat16)
    assert half.logit_scale.dtype == torch.float32 and torch.equal(half.logit_scale, loaded.logit_scale)
    loaded.save_pretrained(tmp_path / "resaved")  # and from then on the weights hold it
    assert torch.equal(_saved(tmp_path / "resaved")[1], loaded.logit_scale.detach())


def test_from_clip_starts_from_the_configured_temperature_not_clips_logit_scale(tmp_path):
    clip, folder = _tiny_clip(tmp_path)
    sizes = dict(image_size=(32, 32), decoder_hidden_size=32, decoder_attention_heads=4, decoder_intermediate_size=64)
    for learnable in (False, True):
        model = DecdModel.from_clip(str(folder), temperature=0.05, learnable_temperature=learnable, **sizes)
        assert not torch.equal(clip.logit_scale.detach(), _log_scale(0.05))
        assert torch.equal(model.logit_scale.detach(), _log_scale(0.05)) and _trainable(model) is learnable
        model.save_pretrained(tmp_path / str(learnable))
        assert torch.equal(DecdModel.from_pretrained(tmp_path / str(learnable)).logit_scale.detach(),
                           _log_scale(0.05))


# ----------------------------------------------------------------------------------------------------
# Trainer: checkpoints and resuming
# ----------------------------------------------------------------------------------------------------
def _trainer(output_dir, train_set, model, **overrides):
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, seed=0, new_module_lr_multiplier=1.0, dataloader_num_workers=0, warmup_steps=0,
    )
    settings.update(overrides)
    processor = DecdProcessor(image_size=model.config.image_size)
    collator = DecdTrainingCollator(processor, augment=False, mask_captions=True)
    return DecdTrainer(model=model, args=DecdTrainingArguments(**settings), train_dataset=train_set,
                       data_collator=collator, processing_class=processor)


def test_training_moves_only_a_learnable_temperature_and_resume_restores_it(tmp_path, tiny_set):
    train_set = load_person_search("synthetic", tiny_set, split="train")
    for learnable in (False, True):
        settings = dict(temperature=0.2, learnable_temperature=learnable, num_identities=6, id_weight=0.5)
        torch.manual_seed(0)
        model = DecdModel(tiny_config(**settings))
        output = tmp_path / f"out-{learnable}"
        _trainer(output, train_set, model, save_strategy="steps", save_steps=2).train()
        stated, held = _saved(output / "checkpoint-2")
        assert stated == 0.2 and torch.equal(held, model.logit_scale.detach())
        assert torch.equal(held, _log_scale(0.2)) is not learnable  # trained only when learnable

        torch.manual_seed(0)
        fresh = DecdModel(tiny_config(**settings))
        _trainer(output, train_set, fresh).train(resume_from_checkpoint=str(output / "checkpoint-2"))
        assert torch.equal(fresh.logit_scale.detach(), held)  # already at max_steps: loads and stops


# ----------------------------------------------------------------------------------------------------
# examples/train.py continuing from a saved model
# ----------------------------------------------------------------------------------------------------
def _train_script(monkeypatch):
    """examples/train.py as a module (in-process: no second interpreter start per run)."""
    spec = importlib.util.spec_from_file_location("decd_train_script", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _continue_training(train_script, source, output_dir, data_dir, *extra):
    train_script.main([
        "--model_name_or_path", str(source), "--dataset_name", "synthetic", "--data_dir", str(data_dir),
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--use_cpu", "true", "--dataloader_num_workers", "0", *extra,
    ])
    return output_dir


def test_train_script_continuation_fixed_given_and_learnable(tmp_path, tiny_set, monkeypatch):
    source = tmp_path / "saved"
    torch.manual_seed(0)
    DecdModel(tiny_config(temperature=0.2, num_identities=6, id_weight=0.5)).save_pretrained(source)
    DecdProcessor(image_size=(128, 64)).save_pretrained(source)
    train_script = _train_script(monkeypatch)

    fixed = _continue_training(train_script, source, tmp_path / "fixed", tiny_set)
    stated, held = _saved(fixed)
    assert stated == 0.2 and torch.equal(held, _log_scale(0.2))

    # --temperature on a saved model: this run starts from it (the weights held 0.2), and both files say so.
    given = _continue_training(train_script, source, tmp_path / "given", tiny_set, "--temperature", "0.02")
    stated, held = _saved(given)
    assert stated == 0.02 and torch.equal(held, _log_scale(0.02))

    learnable = _continue_training(train_script, source, tmp_path / "learnable", tiny_set,
                                   "--learnable_temperature", "true")
    stated, held = _saved(learnable)
    assert stated == 0.2 and not torch.equal(held, _log_scale(0.2))
    reloaded = DecdModel.from_pretrained(learnable)
    assert _trainable(reloaded) and torch.equal(reloaded.logit_scale.detach(), held)
