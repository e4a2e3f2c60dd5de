"""The temperature the config states is the temperature the model uses, and it is trained only when learnable.

A fixed temperature is read from the config where it is used (no parameter, nothing stored in the weights); a
learnable one is the parameter `log_logit_scale`, whose trained value the saved config states.

Every way of building a model is covered: `__init__`, `from_pretrained` (with and without overrides, directly and
through `AutoModel`), `from_clip`, `DecdModel(config)` + `load_state_dict` (a converter), a Trainer resume, and a
continuation run of examples/train.py.
"""

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from decd.data import load_person_search
from decd.training import DecdTrainer, DecdTrainingArguments, DecdTrainingCollator
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import tiny_config
from .helpers import tiny_clip as _tiny_clip

REPO = Path(__file__).resolve().parents[1]


def _log_scale(temperature: float) -> torch.Tensor:
    """The float32 log(1 / temperature) a learnable temperature starts from."""
    return torch.tensor(math.log(1.0 / temperature))


def _scale(temperature: float) -> torch.Tensor:
    """The logit scale a model uses with this temperature, fixed or freshly learnable (exp of `_log_scale`)."""
    return _log_scale(temperature).exp()


def _trainable(model: DecdModel) -> bool:
    return "log_logit_scale" in {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _assert_uses_config(model: DecdModel):
    assert float(model.temperature.detach()) == pytest.approx(model.config.temperature, rel=1e-6)
    assert _trainable(model) is model.config.learnable_temperature


def _train_temperature(model: DecdModel, value: float) -> None:
    """Stand-in for training a learnable temperature: move it away from the config's value."""
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1.0 / value))


def _saved_temperature(folder) -> tuple[float, float | None]:
    """(config.json's temperature, the temperature the saved weights hold: None for a fixed one, which they do not)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    weights = load_file(str(Path(folder) / "model.safetensors"))
    held = weights.get("log_logit_scale")
    return config["temperature"], None if held is None else float(torch.exp(-held))


# ----------------------------------------------------------------------------------------------------
# from_pretrained, save_pretrained
# ----------------------------------------------------------------------------------------------------
def test_fixed_temperature_stays_fixed_after_from_pretrained(tmp_path):
    model = DecdModel(tiny_config(temperature=0.2))
    assert not _trainable(model)
    model.save_pretrained(tmp_path / "fixed")
    assert _saved_temperature(tmp_path / "fixed") == (0.2, None)  # one copy: the config's
    for loaded in (DecdModel.from_pretrained(tmp_path / "fixed"), AutoModel.from_pretrained(tmp_path / "fixed")):
        assert not _trainable(loaded)
        assert "log_logit_scale" not in {name for name, p in loaded.named_parameters() if p.requires_grad}
        assert torch.equal(loaded.logit_scale, _scale(0.2))
        assert loaded.config.temperature == 0.2
        _assert_uses_config(loaded)


def test_learnable_temperature_saves_its_trained_value_and_reloads_it(tmp_path):
    model = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True))
    assert model.log_logit_scale.requires_grad is True
    _train_temperature(model, 0.23)
    model.save_pretrained(tmp_path / "learnable")
    stated, held = _saved_temperature(tmp_path / "learnable")
    assert stated == held == pytest.approx(0.23, rel=1e-6)
    assert model.config.temperature == stated

    loaded = DecdModel.from_pretrained(tmp_path / "learnable")
    assert loaded.config.temperature == stated
    assert torch.equal(loaded.log_logit_scale.detach(), model.log_logit_scale.detach())
    _assert_uses_config(loaded)


def test_explicit_temperature_override_wins_and_is_logged(tmp_path, caplog):
    DecdModel(tiny_config(temperature=0.2)).save_pretrained(tmp_path / "fixed")
    learnable = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True))
    _train_temperature(learnable, 0.25)
    learnable.save_pretrained(tmp_path / "learnable")

    caplog.set_level(logging.INFO, logger="configuration_decd")
    model = DecdModel.from_pretrained(tmp_path / "fixed", temperature=0.02)
    assert model.config.temperature == 0.02
    assert torch.equal(model.logit_scale, _scale(0.02))
    assert not _trainable(model)
    _assert_uses_config(model)
    messages = [record.getMessage() for record in caplog.records if record.name == "configuration_decd"]
    assert any("0.02" in message and "0.2" in message for message in messages), messages

    caplog.clear()
    for model in (DecdModel.from_pretrained(tmp_path / "learnable", temperature=0.05),
                  AutoModel.from_pretrained(tmp_path / "learnable", temperature=0.05)):
        assert model.config.temperature == 0.05
        assert torch.equal(model.log_logit_scale.detach(), _log_scale(0.05))
        assert model.log_logit_scale.requires_grad is True
        _assert_uses_config(model)
    messages = [record.getMessage() for record in caplog.records if record.name == "configuration_decd"]
    assert sum("0.05" in message and "0.25" in message for message in messages) == 2, messages


def test_the_logits_use_the_overridden_temperature(tmp_path):
    from .helpers import random_batch

    DecdModel(tiny_config(temperature=0.2)).save_pretrained(tmp_path / "fixed")
    model = DecdModel.from_pretrained(tmp_path / "fixed", temperature=0.02).eval()
    batch = random_batch(model.config, with_mcm=False)
    with torch.no_grad():
        output = model(**batch)
    cosine = output.text_embeds @ output.image_embeds.t()
    assert torch.allclose(output.logits_per_text, cosine / 0.02, atol=1e-4)


def test_half_precision_load_keeps_the_config_and_warns_about_nothing(tmp_path, caplog):
    DecdModel(tiny_config(temperature=0.2)).save_pretrained(tmp_path / "fixed")
    caplog.set_level(logging.INFO, logger="modeling_decd")
    caplog.set_level(logging.INFO, logger="configuration_decd")
    for learnable in (False, True):
        model = DecdModel.from_pretrained(tmp_path / "fixed", dtype=torch.bfloat16, learnable_temperature=learnable)
        assert model.text_projection.weight.dtype == torch.bfloat16
        if learnable:
            assert model.log_logit_scale.dtype == torch.bfloat16
        assert model.config.temperature == 0.2  # not the bfloat16-rounded 0.2002
        assert _trainable(model) is learnable
        assert float(model.temperature.detach()) == pytest.approx(0.2, rel=1e-2)
    assert not [record for record in caplog.records if record.name in ("modeling_decd", "configuration_decd")]


def test_learnable_flag_given_on_load_decides_trainability(tmp_path):
    DecdModel(tiny_config(temperature=0.2)).save_pretrained(tmp_path / "fixed")
    learnable = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True))
    _train_temperature(learnable, 0.25)
    learnable.save_pretrained(tmp_path / "learnable")

    thawed = DecdModel.from_pretrained(tmp_path / "fixed", learnable_temperature=True)
    assert thawed.log_logit_scale.requires_grad is True
    assert thawed.config.temperature == 0.2
    _assert_uses_config(thawed)

    frozen = DecdModel.from_pretrained(tmp_path / "learnable", learnable_temperature=False)
    assert not _trainable(frozen)
    assert frozen.config.temperature == pytest.approx(0.25, rel=1e-6)  # frozen at its trained value
    _assert_uses_config(frozen)


# ----------------------------------------------------------------------------------------------------
# load_state_dict (converters), from_clip
# ----------------------------------------------------------------------------------------------------
def test_load_state_dict_into_a_new_model_follows_its_config(caplog):
    trained = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True))
    _train_temperature(trained, 0.3)
    state = trained.state_dict()

    learnable = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True))
    learnable.load_state_dict(state)
    assert learnable.config.temperature == pytest.approx(0.3, rel=1e-6)  # the config states the trained value
    _assert_uses_config(learnable)

    caplog.set_level(logging.WARNING, logger="modeling_decd")
    fixed = DecdModel(tiny_config(temperature=0.1))
    fixed.load_state_dict(state)
    assert torch.equal(fixed.logit_scale, _scale(0.1))  # fixed means the config's value
    assert fixed.config.temperature == 0.1
    _assert_uses_config(fixed)
    messages = [record.getMessage() for record in caplog.records if record.name == "modeling_decd"]
    assert any("0.1" in message and "0.3" in message for message in messages), messages


def test_from_clip_then_reload_keeps_the_configured_temperature(tmp_path):
    _, folder = _tiny_clip(tmp_path)
    sizes = dict(image_size=(32, 32), decoder_hidden_size=32, decoder_attention_heads=4, decoder_intermediate_size=64)
    fixed = DecdModel.from_clip(str(folder), temperature=0.05, **sizes)
    learnable = DecdModel.from_clip(str(folder), temperature=0.05, learnable_temperature=True, **sizes)
    for model, name in ((fixed, "fixed"), (learnable, "learnable")):
        assert torch.equal(model.logit_scale.detach(), _scale(0.05))
        _assert_uses_config(model)
        model.save_pretrained(tmp_path / name)
        reloaded = DecdModel.from_pretrained(tmp_path / name)
        assert torch.equal(reloaded.logit_scale.detach(), _scale(0.05))
        assert reloaded.config.temperature == 0.05
        assert _trainable(reloaded) is (name == "learnable")
        _assert_uses_config(reloaded)


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


def test_trainer_checkpoint_states_the_trained_temperature_and_resume_restores_it(tmp_path, tiny_set):
    train_set = load_person_search("synthetic", tiny_set, split="train")
    torch.manual_seed(0)
    model = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True, num_identities=6, id_weight=0.5))
    _trainer(tmp_path / "out", train_set, model, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    stated, held = _saved_temperature(checkpoint)
    assert held != pytest.approx(0.2, rel=1e-4)  # it was trained
    assert stated == pytest.approx(held, rel=1e-6)

    torch.manual_seed(0)
    fresh = DecdModel(tiny_config(temperature=0.2, learnable_temperature=True, num_identities=6, id_weight=0.5))
    resumed = _trainer(tmp_path / "out", train_set, fresh, max_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # already at max_steps: loads and stops
    assert fresh.config.temperature == pytest.approx(held, rel=1e-6)
    _assert_uses_config(fresh)


def test_trainer_never_moves_a_fixed_temperature_and_resume_keeps_the_configured_one(tmp_path, tiny_set):
    train_set = load_person_search("synthetic", tiny_set, split="train")
    folder = tmp_path / "saved"
    DecdModel(tiny_config(temperature=0.2, num_identities=6, id_weight=0.5)).save_pretrained(folder)

    model = DecdModel.from_pretrained(folder)  # a continuation: the old code made it trainable here
    _trainer(tmp_path / "out", train_set, model, save_strategy="steps", save_steps=2).train()
    assert torch.equal(model.logit_scale, _scale(0.2))
    stated, held = _saved_temperature(tmp_path / "out" / "checkpoint-2")
    assert stated == 0.2 and held is None  # the checkpoint's config is the one copy

    other = DecdModel(tiny_config(temperature=0.1, num_identities=6, id_weight=0.5))
    _trainer(tmp_path / "out", train_set, other, max_steps=2).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert torch.equal(other.logit_scale, _scale(0.1))
    _assert_uses_config(other)


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


def test_train_script_continuation_fixed_override_and_learnable(tmp_path, tiny_set, caplog, monkeypatch):
    source = tmp_path / "saved"
    torch.manual_seed(0)
    DecdModel(tiny_config(temperature=0.2, num_identities=6, id_weight=0.5)).save_pretrained(source)
    DecdProcessor(image_size=(128, 64)).save_pretrained(source)
    train_script = _train_script(monkeypatch)

    # Fixed: stays exactly 0.2.
    fixed = _continue_training(train_script, source, tmp_path / "fixed", tiny_set)
    assert _saved_temperature(fixed) == (0.2, None)
    reloaded = DecdModel.from_pretrained(fixed)
    assert torch.equal(reloaded.logit_scale, _scale(0.2))
    _assert_uses_config(reloaded)

    # --temperature 0.02 on a saved model: really used, and the saved config says so.
    caplog.set_level(logging.INFO, logger="configuration_decd")
    overridden = _continue_training(train_script, source, tmp_path / "override", tiny_set, "--temperature", "0.02")
    assert any("0.02" in r.getMessage() and "0.2" in r.getMessage() for r in caplog.records
               if r.name == "configuration_decd")
    assert _saved_temperature(overridden) == (0.02, None)
    reloaded = DecdModel.from_pretrained(overridden)
    assert float(reloaded.temperature) == pytest.approx(0.02, rel=1e-6)
    _assert_uses_config(reloaded)

    # Learnable: it moves, the saved config states the trained value, a reload reproduces it.
    learnable = _continue_training(train_script, source, tmp_path / "learnable", tiny_set,
                                   "--learnable_temperature", "true")
    stated, held = _saved_temperature(learnable)
    assert held != pytest.approx(0.2, rel=1e-4)
    assert stated == pytest.approx(held, rel=1e-6)
    reloaded = DecdModel.from_pretrained(learnable)
    assert reloaded.config.temperature == stated
    assert reloaded.log_logit_scale.requires_grad is True
    saved_scale = load_file(str(learnable / "model.safetensors"))["log_logit_scale"]
    assert torch.equal(reloaded.log_logit_scale.detach(), saved_scale)
    _assert_uses_config(reloaded)
