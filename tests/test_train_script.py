"""examples/train.py: recipes and flags in, checks before the first step, nothing trained lost on the way out."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from decd.training import DecdTrainer, NonFiniteLossError
from inference_decd import load_model


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def train_script(monkeypatch):
    """examples/train.py as a module (in-process, like `python examples/train.py`)."""
    spec = importlib.util.spec_from_file_location("decd_train_script_fail_early", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _arguments(data_dir, output_dir, *extra):
    """The main job's recipe, shrunk to two steps on `data_dir`."""
    return [str(REPO / "recipes" / "synthetic.json"), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
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


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_bad_record_in_any_split_stops_the_run_before_training(train_script, tiny_set, tmp_path, monkeypatch, split):
    """The run stops with the loader's message (the annotation file, the split, the record and its image) as the
    script's error, not a traceback, whichever split holds the bad record."""
    data = _copy_set(tiny_set, tmp_path / "data")
    records = json.loads((data / "reid_raw.json").read_text())
    number, victim = next((number, record) for number, record in enumerate(records) if record["split"] == split)
    _truncated(data / "imgs" / victim["file_path"])
    trained = []
    monkeypatch.setattr(DecdTrainer, "train", lambda self, *a, **k: trained.append(1))
    with pytest.raises(SystemExit) as stopped:
        train_script.main(_arguments(data, tmp_path / "run"))
    message = str(stopped.value.code)
    assert message.startswith(f"error: {data / 'reid_raw.json'}: 1 problem(s) in split {split!r}"), message
    assert f"record {number} (id {victim['id']}, {victim['file_path']!r}): image " in message, message
    assert f"{data / 'imgs' / victim['file_path']} cannot be read" in message, message
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


def test_a_huge_learning_rate_is_caught_at_the_step_it_diverges(train_script, tiny_set, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"not finite at step \d+ .*learning rate too high for this model "
                                                 r"\(now 10000\)"):
        train_script.main(_arguments(tiny_set, tmp_path / "run", "--learning_rate", "1e4", "--max_steps", "20"))


# ----------------------------------------------------------------------------------------------------
# Recipes and flags
# ----------------------------------------------------------------------------------------------------
def test_a_run_needs_a_recipe_or_a_dataset_and_a_start(train_script, tmp_path):
    with pytest.raises(SystemExit, match=r"no dataset: give a recipe \(e\.g\. recipes/synthetic\.json"):
        train_script.main([])
    with pytest.raises(SystemExit, match=r"--config_preset tiny trains from random weights, but --model_name_or_path"):
        train_script.main([str(REPO / "recipes" / "synthetic.json"), "--model_name_or_path", "openai/clip-vit-base-patch16"])
    with pytest.raises(SystemExit, match=r"nothing to start from"):
        train_script.main([str(REPO / "recipes" / "two-stage.json")])
    with pytest.raises(SystemExit, match=r"DecdConfig\.mcm_fraction must be a number in \(0, 1\]"):
        train_script.main([str(REPO / "recipes" / "synthetic.json"), "--mcm_fraction", "0"])


def test_a_bad_recipe_file_is_refused_naming_the_file_and_every_bad_key(train_script, tmp_path):
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"dataset_name": "synthetic", "learning_rat": 1e-3, "augment": "no"}))
    with pytest.raises(SystemExit) as error:
        train_script.main([str(recipe)])
    message = str(error.value)
    assert str(recipe) in message and "'learning_rat' (did you mean 'learning_rate'?)" in message
    assert "'augment' cannot be 'no'" in message
    recipe.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="must be a JSON object"):
        train_script.main([str(recipe)])
    with pytest.raises(SystemExit, match="does not exist"):
        train_script.main([str(tmp_path / "missing.json")])


@pytest.mark.parametrize("keep", [True, False])
def test_train_script_on_cpu_keeps_freed_memory_unless_told_not_to(train_script, tiny_set, tmp_path, monkeypatch,
                                                                   keep):
    calls = []
    monkeypatch.setattr(train_script, "keep_freed_cpu_memory", lambda: calls.append("called") or True)
    monkeypatch.setattr(DecdTrainer, "train", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        train_script.main(_arguments(tiny_set, tmp_path / "run", "--keep_freed_cpu_memory", str(keep).lower()))
    assert calls == (["called"] if keep else [])


# ----------------------------------------------------------------------------------------------------
# A finished run is never destroyed; a checkpoint is complete or refused
# ----------------------------------------------------------------------------------------------------
def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(train_script, tiny_set, tmp_path):
    run = tmp_path / "run"
    train_script.main(_arguments(tiny_set, run, "--save_strategy", "steps", "--save_steps", "2"))
    (run / "eval-synthetic-test").mkdir()  # what examples/evaluate.py leaves beside the model
    (run / "my-notes.txt").write_text("mine")
    before = {path.name: path.stat().st_mtime_ns for path in run.iterdir() if path.is_file()}
    with pytest.raises(SystemExit, match=r"holds another run; training here would delete or overwrite .*all_results"
                                         r"\.json.*checkpoint-2.*eval-synthetic-test.*model\.safetensors"):
        train_script.main(_arguments(tiny_set, run))
    assert {path.name: path.stat().st_mtime_ns for path in run.iterdir() if path.is_file()} == before  # untouched
    # Continuing that run is allowed ...
    train_script.main(_arguments(tiny_set, run, "--resume_from_checkpoint", str(run / "checkpoint-2"),
                                 "--max_steps", "3"))
    # ... and so is starting over when asked: the earlier run's files go first, the user's stay.
    train_script.main(_arguments(tiny_set, run, "--overwrite_output_dir", "true"))
    assert not (run / "eval-synthetic-test").exists() and not (run / "checkpoint-2").exists()
    assert (run / "my-notes.txt").read_text() == "mine" and (run / "model.safetensors").is_file()


@pytest.mark.parametrize("damage, problem", [
    ("missing trainer_state.json", r"trainer_state\.json is missing"),
    ("truncated optimizer.pt", r"optimizer\.pt has [\d,]+ bytes, not the [\d,]+ written"),
    ("no manifest", r"it has no checkpoint\.json, which is written last"),
])
def test_resuming_from_a_half_written_checkpoint_names_the_file_and_the_last_complete_one(
        train_script, tiny_set, tmp_path, damage, problem):
    run = tmp_path / "run"
    train_script.main(_arguments(tiny_set, run, "--save_strategy", "steps", "--save_steps", "1"))
    last = run / "checkpoint-2"
    if damage == "missing trainer_state.json":
        (last / "trainer_state.json").unlink()
    elif damage == "truncated optimizer.pt":
        data = (last / "optimizer.pt").read_bytes()
        (last / "optimizer.pt").write_bytes(data[: len(data) // 2])
    else:
        (last / "checkpoint.json").unlink()
    for resume in (str(last), "true"):
        with pytest.raises(SystemExit, match=rf"cannot resume from .*checkpoint-2: {problem}.*; the last complete "
                                             rf"checkpoint there is .*checkpoint-1"):
            train_script.main(_arguments(tiny_set, run, "--resume_from_checkpoint", resume, "--max_steps", "3"))
