"""examples/evaluate.py: refusals of bad model folders, and a whole evaluation with its metrics and picture."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from decd.visualize import (
    grid_layout,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EVALUATE_SCRIPT = REPO_ROOT / "examples" / "evaluate.py"


def _load_evaluate_module():
    spec = importlib.util.spec_from_file_location("decd_example_evaluate", EVALUATE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_rejects_bad_model_dirs(tmp_path):
    evaluate = _load_evaluate_module()
    arguments = ["--dataset_name", "synthetic"]
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main([str(tmp_path / "missing"), *arguments])
    with pytest.raises(SystemExit, match="no config.json"):
        evaluate.main([str(tmp_path), *arguments])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(SystemExit, match="not a DECD one"):
        evaluate.main([str(tmp_path), *arguments])
    assert evaluate.pick_queries(10, 4, seed=3) == evaluate.pick_queries(10, 4, seed=3)
    assert len(set(evaluate.pick_queries(10, 40, seed=0))) == 10


def test_evaluate_script_end_to_end(tmp_path):
    from decd.synthetic import generate_synthetic_person_search
    from modeling_decd import DecdModel
    from processing_decd import DecdProcessor
    from tests.helpers import tiny_config

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    DecdModel(tiny_config()).save_pretrained(model_dir)
    DecdProcessor(image_size=(128, 64)).save_pretrained(model_dir)
    data_dir = generate_synthetic_person_search(root=tmp_path / "data", num_train_ids=4, num_val_ids=2,
                                                num_test_ids=3, images_per_id=2, seed=0)
    output_dir = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    command = [sys.executable, str(EVALUATE_SCRIPT), str(model_dir), "--dataset_name", "synthetic",
               "--data_dir", str(data_dir), "--split", "test", "--batch_size", "4", "--output_dir", str(output_dir),
               "--num_grid_queries", "3", "--seed", "1", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "R@1" in result.stdout and "mINP" in result.stdout

    metrics = json.loads((output_dir / "metrics.json").read_text())
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert 0.0 <= metrics[key] <= 100.0, (key, metrics[key])
    assert metrics["num_gallery"] == 6 and metrics["num_queries"] == 12
    assert metrics["dataset_name"] == "synthetic" and metrics["split"] == "test"
    assert Path(metrics["model_path"]) == model_dir.resolve()

    with Image.open(output_dir / "retrieval_grid.png") as grid:
        layout = grid_layout(3, 6)  # 3 queries; the gallery has only 6 images, fewer than top-10
        assert grid.size == (layout.width, layout.height)

    # A folder that is not a model fails with a readable message, before any loading.
    bad = subprocess.run([sys.executable, str(EVALUATE_SCRIPT), str(tmp_path / "nope"), "--dataset_name", "synthetic"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
