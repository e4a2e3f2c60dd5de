"""Published results have one source (decd/hub/published_results.json): the model card and docs/protocol.md
show exactly its table, and measured results come from a run's all_results.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from decd.hub import build_model_card, published_results, published_table, results_from_training_output
from decd.hub.results import PUBLISHED_RESULTS_FILE

REPO = Path(__file__).resolve().parents[1]


def test_the_published_table_is_the_file_and_docs_protocol_shows_it():
    table = json.loads(PUBLISHED_RESULTS_FILE.read_text())
    assert list(published_results()) == list(table["methods"])
    for method, by_dataset in table["methods"].items():
        assert set(by_dataset) == set(table["datasets"])
        for dataset, values in by_dataset.items():
            assert len(values) == 5 and published_results()[method][dataset] == tuple(values)
    rendered = published_table()
    assert rendered in (REPO / "docs" / "protocol.md").read_text()  # regenerate: python -m decd.hub.results
    assert "| DECD / SCMM paper (R@1 only) | 73.81 | 64.25 | 57.35 |" in rendered
    assert "| RaSa (IJCAI23, cross-encoder re-rank) | 76.51 / 90.29 / 94.25 / 69.38 / - |" in rendered
    printed = subprocess.run([sys.executable, "-m", "decd.hub.results"], capture_output=True, text=True, check=True,
                             cwd=REPO).stdout
    assert printed == rendered


def test_the_model_card_shows_the_same_published_table():
    assert published_table() in str(build_model_card("org/m", []))


def test_measured_results_come_from_the_runs_all_results(tmp_path):
    metrics = {"test_R1": 50.0, "test_R5": 80.0, "test_R10": 90.0, "test_mAP": 45.5, "test_mINP": 30.25,
               "test_selected_on": "val"}
    (tmp_path / "all_results.json").write_text(json.dumps(metrics))
    [result] = results_from_training_output(tmp_path, "cuhk-pedes")
    assert result["dataset_name"] == "CUHK-PEDES" and result["selected_on"] == "val"
    assert result["metrics"] == {"R1": 50.0, "R5": 80.0, "R10": 90.0, "mAP": 45.5, "mINP": 30.25}
    del metrics["test_mINP"]
    (tmp_path / "all_results.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"lacks \['test_mINP'\]"):
        results_from_training_output(tmp_path, "cuhk-pedes")
