"""The benchmark drivers' own logic (argument parsing and summaries); the training they drive is tested elsewhere."""

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sweep  # noqa: E402


def test_parse_variant_splits_arguments_like_a_shell():
    assert sweep.parse_variant('pk4=--samples_per_identity 4 --run_name "a b"') == (
        "pk4", ["--samples_per_identity", "4", "--run_name", "a b"])
    assert sweep.parse_variant("base=") == ("base", [])
    assert sweep.parse_variant("base") == ("base", [])
    for bad in ("=--seed 1", "a/b=--seed 1", "two words="):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=ARGS"):
            sweep.parse_variant(bad)


def _run(variant, seed, r1=None, minutes=1.0, error=None):
    run = sweep.Run(variant, seed, [], Path("unused"), Path("unused.log"), minutes=minutes, error=error)
    if r1 is not None:
        run.metrics = {name: r1 + offset for offset, name in enumerate(sweep.METRICS)}
    return run


def test_report_summarises_finished_runs_per_variant_and_leaves_out_failures(tmp_path, capsys):
    runs = [_run("a", 1, 40.0, 2.0), _run("b", 1, 50.0), _run("a", 2, 46.0, 4.0), _run("b", 2, error="exit status 1"),
            _run("a", 3, 49.0, 3.0)]
    summary = sweep.report(runs)
    assert summary["a"]["R1"] == pytest.approx(
        {"mean": 45.0, "std": statistics.stdev([40.0, 46.0, 49.0]), "min": 40.0, "max": 49.0, "n": 3})
    assert summary["a"]["R5"]["mean"] == pytest.approx(46.0)
    assert summary["a"]["minutes"] == pytest.approx(3.0)
    assert summary["a"]["seeds"] == [1, 2, 3]
    assert summary["b"]["R1"] == {"mean": 50.0, "std": 0.0, "min": 50.0, "max": 50.0, "n": 1}

    sweep.write_json(tmp_path / "sweep.json", runs, {"passthrough": ["--max_steps", "2"]})
    payload = json.loads((tmp_path / "sweep.json").read_text())
    assert payload["passthrough"] == ["--max_steps", "2"]
    assert {"device", "torch", "transformers"} <= set(payload["environment"])
    assert [(row["variant"], row["seed"], row["error"]) for row in payload["runs"]] == [
        ("a", 1, None), ("b", 1, None), ("a", 2, None), ("b", 2, "exit status 1"), ("a", 3, None)]

    sweep.print_table(runs)
    table = capsys.readouterr().out
    assert "| a | 3 | 45.00 ± 4.58 | 40.00-49.00 |" in table
    assert "FAILED: b seed 2: exit status 1" in table
