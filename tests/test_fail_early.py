"""Fail early, lose nothing: training, data and config checks that act before the first step."""

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decd.data import PersonSearchDataError, load_person_search
from decd.synthetic import generate_synthetic_person_search
from decd.training import DecdTrainer, DecdTrainingArguments, DecdTrainingCollator, NonFiniteLossError
from modeling_decd import DecdModel, ModelLoadError, load_model
from processing_decd import DecdProcessor

from .helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return generate_synthetic_person_search(tmp_path_factory.mktemp("synthetic"), num_train_ids=6, num_val_ids=2,
                                            num_test_ids=3, images_per_id=2, progress=False)


@pytest.fixture
def train_script(monkeypatch):
    """examples/train.py as a module (in-process, like `python examples/train.py`)."""
    spec = importlib.util.spec_from_file_location("decd_train_script_fail_early", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _arguments(data_dir, output_dir, *extra):
    return ["--dataset_name", "synthetic", "--data_dir", str(data_dir), "--output_dir", str(output_dir),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", "--use_cpu", "true",
            "--warmup_steps", "0", *extra]


# ----------------------------------------------------------------------------------------------------
# Settings that cannot work are refused before the first step
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size is 0"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs is 0 and --max_steps is not set"),
    (["--per_device_train_batch_size", "1"], "fewer than 2 pairs per process"),
    (["--max_train_samples", "3"], "the training split has 1 identity"),
])
def test_train_refuses_settings_that_cannot_work_before_training(train_script, tiny_set, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train_script.main(_arguments(tiny_set, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _copy_set(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_bad_test_record_stops_the_run_before_training(train_script, tiny_set, tmp_path, monkeypatch):
    data = _copy_set(tiny_set, tmp_path / "data")
    records = json.loads((data / "reid_raw.json").read_text())
    victim = next(record for record in records if record["split"] == "test")
    _truncated(data / "imgs" / victim["file_path"])
    trained = []
    monkeypatch.setattr(DecdTrainer, "train", lambda self, *a, **k: trained.append(1))
    with pytest.raises(PersonSearchDataError, match=rf"(?s)split 'test'.*{victim['file_path']}.*cannot be read"):
        train_script.main(_arguments(data, tmp_path / "run"))
    assert trained == []  # found while loading, not after the run


def test_the_model_is_saved_even_when_testing_fails(train_script, tiny_set, tmp_path, monkeypatch):
    original = DecdTrainer.evaluate

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if metric_key_prefix == "test":
            raise RuntimeError("the test evaluation broke")
        return original(self, eval_dataset, ignore_keys, metric_key_prefix)

    monkeypatch.setattr(DecdTrainer, "evaluate", evaluate)
    with pytest.raises(RuntimeError, match="the test evaluation broke"):
        train_script.main(_arguments(tiny_set, tmp_path / "run"))
    model, _ = load_model(tmp_path / "run", device="cpu")
    assert model.decoder is None  # the inference model, saved before testing


# ----------------------------------------------------------------------------------------------------
# Training that goes wrong says so
# ----------------------------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_training_naming_the_step_and_the_part(tiny_set, tmp_path):
    train_set = load_person_search("synthetic", tiny_set, split="train")
    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=6, temperature=0.2))
    processor = DecdProcessor(image_size=model.config.image_size)
    trainer = DecdTrainer(
        model=model, train_dataset=train_set, processing_class=processor,
        data_collator=DecdTrainingCollator(processor, augment=False, mask_captions=True),
        args=DecdTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=5,
                                   learning_rate=1e-3, report_to="none", save_strategy="no", eval_strategy="no",
                                   disable_tqdm=True, use_cpu=True, warmup_steps=0),
    )
    with torch.no_grad():  # what a diverged update leaves behind in the decoder
        model.mcm_head.decoder.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 1 \(loss_mcm went non-finite; the weights "
                                                 r"already hold NaN or inf\).*learning rate.*temperature"):
        trainer.train()


def test_a_huge_learning_rate_is_caught_at_the_step_it_diverges(train_script, tiny_set, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"not finite at step \d+ .*learning rate too high for this model "
                                                 r"\(now 10000\)"):
        train_script.main(_arguments(tiny_set, tmp_path / "run", "--learning_rate", "1e4", "--max_steps", "20"))


# ----------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------
def _custom(root: Path, records: list, images: dict) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for name, writer in images.items():
        writer(root / "imgs" / name)
    (root / "annotations.json").write_text(json.dumps(records))
    return root


def _png(path: Path, color=(200, 30, 30)) -> None:
    Image.new("RGB", (16, 32), color).save(path)


def _truncated_file(fmt: str):
    def write(path: Path) -> None:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buffer, format=fmt)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    return write


def test_truncated_jpeg_and_bmp_are_named_and_skippable(tmp_path):
    records = [dict(id=i, file_path=name, captions=[f"person {i}"], split="train")
               for i, name in enumerate(["good.png", "cut.jpg", "cut.bmp", "also_good.png"])]
    root = _custom(tmp_path, records, {"good.png": _png, "also_good.png": _png, "cut.jpg": _truncated_file("JPEG"),
                                       "cut.bmp": _truncated_file("BMP")})
    with pytest.raises(PersonSearchDataError) as error:
        load_person_search("custom", root, split="train")
    message = str(error.value)
    assert "2 problem(s)" in message and "cut.jpg" in message and "cut.bmp" in message
    dataset, report = load_person_search("custom", root, split="train", skip_bad_records=True, return_report=True)
    assert len(dataset) == 2 and report.skipped_record_indices == [1, 2]
    assert all("cannot be read" in item.reason for item in report.skipped)


def test_an_error_inside_a_batch_names_the_file(tmp_path):
    records = [dict(id=i, file_path=f"{i}.png", captions=[f"person {i}"], split="train") for i in range(3)]
    root = _custom(tmp_path, records, {f"{i}.png": _png for i in range(3)})
    train_set = load_person_search("custom", root, split="train")
    (root / "imgs" / "2.png").write_bytes(b"damaged after loading")
    collator = DecdTrainingCollator(DecdProcessor(image_size=(128, 64)), augment=False, mask_captions=False)
    from decd.data import without_image_decoding

    rows = list(without_image_decoding(train_set))
    with pytest.raises(ValueError, match=r"imgs/2\.png: not a readable image"):
        collator(rows)


def test_symlinks_leaving_the_image_folder_are_caught(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _png(outside / "secret.png")
    records = [dict(id=1, file_path="inside.png", captions=["a"], split="train"),
               dict(id=2, file_path="link.png", captions=["b"], split="train"),
               dict(id=3, file_path="folder/secret.png", captions=["c"], split="train")]
    root = _custom(tmp_path / "data", records, {"inside.png": _png})
    (root / "imgs" / "link.png").symlink_to(outside / "secret.png")
    (root / "imgs" / "folder").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PersonSearchDataError) as error:
        load_person_search("custom", root, split="train")
    assert "link.png" in str(error.value) and "folder/secret.png" in str(error.value)
    assert "leaves the image folder" in str(error.value)


def test_identity_ids_from_json_are_mapped_or_refused_by_record(tmp_path):
    good = [("0042", 42), ("-5", -5), (7, 7), ("+8", 8), (2**63 - 1, 2**63 - 1)]
    records = [dict(id=raw, file_path=f"{i}.png", captions=[f"person {i}"], split="train")
               for i, (raw, _) in enumerate(good)]
    root = _custom(tmp_path / "good", records, {f"{i}.png": _png for i in range(len(good))})
    dataset = load_person_search("custom", root, split="train")
    assert sorted(set(dataset["raw_person_id"])) == sorted(value for _, value in good)
    assert sorted(set(dataset["person_id"])) == list(range(len(good)))  # contiguous
    bad = [2**70, "²", "4 2", 3.0, True, None, "", "1_000", [1]]
    records = [dict(id=raw, file_path="0.png", captions=["a"], split="train") for raw in bad]
    root = _custom(tmp_path / "bad", records, {"0.png": _png})
    with pytest.raises(PersonSearchDataError) as error:
        load_person_search("custom", root, split="train")
    message = str(error.value)
    assert f"{len(bad)} problem(s)" in message and "annotations.json" in message
    assert "does not fit in 64 bits" in message and "record 0" in message and f"record {len(bad) - 1}" in message


# ----------------------------------------------------------------------------------------------------
# config.json of the wrong types
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, expected", [
    ("image_size", "384x128", r"DecdConfig\.image_size must be \[height, width\]"),
    ("projection_dim", -5, r"DecdConfig\.projection_dim must be a positive integer, got -5"),
    ("temperature", None, r"DecdConfig\.temperature must be a positive number, got None"),
    ("learnable_temperature", "no", r"DecdConfig\.learnable_temperature must be true or false"),
    ("sew_margin", "0.1", r"DecdConfig\.sew_margin must be a number >= 0"),
])
def test_config_json_values_of_the_wrong_type_name_the_field(tmp_path, field, value, expected):
    DecdModel(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=expected):
        load_model(tmp_path, device="cpu")
