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


# ---- benchmarks/sew_study.py: which runs come next, what they train, resuming ------------------------------
import sew_study  # noqa: E402


def _study_run(variant, seed, r1, error=None):
    metrics = {} if error else {name: r1 + offset for offset, name in enumerate(sweep.METRICS)}
    return {"variant": variant, "seed": seed, "metrics": metrics, "error": error}


def test_every_study_variant_states_its_loss_settings_in_full():
    assert sew_study.variant_arguments("sdm") == ["--sew_formulation", "tighten", "--sew_margin", "0",
                                                  "--caption_quality", "density", "--mcm_weight", "1"]
    assert sew_study.variant_arguments("relax-0.1+no-mcm") == ["--sew_formulation", "relax", "--sew_margin", "0.1",
                                                               "--caption_quality", "density", "--mcm_weight", "0"]
    # Screening: SDM, today's Sew at 0.01/0.02/0.05, each new reading at two strengths.
    formulations = [sew_study.SCREENING[name] for name in sew_study.SCREENING]
    assert formulations[0] == ("tighten", 0)
    assert {m for f, m in formulations if f == "tighten" and m} == {0.01, 0.02, 0.05}
    assert all(len({m for f, m in formulations if f == new}) == 2 for new in ("relax", "compress"))


def test_the_study_screens_then_confirms_the_two_best_then_tests_mcm_on_the_best():
    screening, confirmation = [1, 2, 3], [4, 5]
    todo, choices = sew_study.plan([], screening, confirmation)
    assert todo[: len(sew_study.SCREENING)] == [("screening", name, 1) for name in sew_study.SCREENING]
    assert len(todo) == 3 * len(sew_study.SCREENING) and choices == {}

    # R@1 per variant: SDM 60; relax-0.1 +1 on every seed, compress-0.05 +0.5; others below SDM.
    offsets = {"sdm": 0.0, "relax-0.1": 1.0, "compress-0.05": 0.5}
    runs = [_study_run(name, seed, 60.0 + offsets.get(name, -2.0)) for seed in screening for name in sew_study.SCREENING]
    runs[-1] = _study_run(runs[-1]["variant"], 3, None, error="exit status 1")  # a failure is run again
    todo, _ = sew_study.plan(runs, screening, confirmation)
    assert todo == [("screening", runs[-1]["variant"], 3)]

    runs.append(_study_run(runs[-1]["variant"], 3, 58.0))
    todo, choices = sew_study.plan(runs, screening, confirmation)
    assert choices == {"confirmed": ["sdm", "relax-0.1", "compress-0.05"]}
    assert todo == [("confirmation", name, seed) for seed in confirmation for name in choices["confirmed"]]

    # On seeds 4-5 compress-0.05 overtakes relax-0.1 on average over all five seeds: it gets the MCM test.
    confirmed = {"sdm": 60.0, "relax-0.1": 59.0, "compress-0.05": 63.0}
    runs += [_study_run(name, seed, r1) for seed in confirmation for name, r1 in confirmed.items()]
    todo, choices = sew_study.plan(runs, screening, confirmation)
    assert choices["best"] == "compress-0.05"
    assert todo == [("mcm", "compress-0.05+no-mcm", seed) for seed in [1, 2, 3, 4, 5]]

    runs += [_study_run("compress-0.05+no-mcm", seed, 60.0) for seed in [1, 2, 3, 4, 5]]
    todo, choices = sew_study.plan(runs, screening, confirmation)
    assert todo == []
    result = sew_study.summary(runs, choices, [1, 2, 3, 4, 5])
    assert result["differences_to_sdm"]["relax-0.1"]["R1"]["mean"] == pytest.approx((3 * 1.0 - 2 * 1.0) / 5)
    assert result["mcm_on_minus_off"]["variant"] == "compress-0.05"
    # compress-0.05 with MCM: 60.5 on seeds 1-3, 63 on 4-5; without: 60.
    assert result["mcm_on_minus_off"]["R1"]["mean"] == pytest.approx((3 * 0.5 + 2 * 3.0) / 5)
    # Runs that ran side by side (--parallel) finish in any order; the table keeps the screening's.
    shuffled = sew_study.summary(runs[::-1], choices, [1, 2, 3, 4, 5])
    assert shuffled["variants"]["sdm"]["seeds"] == [1, 2, 3, 4, 5]
    assert list(shuffled["differences_to_sdm"]["relax-0.1"]["per_seed"]) == [1, 2, 3, 4, 5]
    assert list(shuffled["variants"]) == list(result["variants"]) == [
        "sdm", "tighten-0.01", "tighten-0.02", "tighten-0.05", "relax-0.05", "relax-0.1", "compress-0.05",
        "compress-0.05+no-mcm", "compress-0.1"]


def test_the_study_continues_its_own_results_file_and_refuses_another_setup(tmp_path):
    path = tmp_path / "study.json"
    setup = {"recipe": {"seed": 42}, "passthrough": [], "pretrain_args": "", "screening_seeds": [1],
             "confirmation_seeds": [2]}
    assert sew_study.read_results(path, setup) == {"setup": setup, "runs": []}
    path.write_text(json.dumps({"setup": setup, "runs": [_study_run("sdm", 1, 60.0)]}))
    assert sew_study.read_results(path, setup)["runs"][0]["variant"] == "sdm"
    with pytest.raises(SystemExit, match="another setup"):
        sew_study.read_results(path, dict(setup, passthrough=["--max_steps", "3"]))
