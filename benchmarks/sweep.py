#!/usr/bin/env python
"""Train the main job over several seeds (and variants) and report the spread (a benchmark, not a test).

One training run of the tiny DECD on the synthetic set moves by several points of R@1 with the
seed, so a single number says little. This runs `examples/train.py RECIPE` (default: the main job's,
recipes/synthetic.json) once per (variant, seed),
several at a time if asked, and reports mean, standard deviation, min and max of the test metrics
(best checkpoint selected on val, as train.py does).

    python benchmarks/sweep.py --seeds 42 7 1                       # the default recipe, three seeds
    python benchmarks/sweep.py --seeds 1 2 3 \\
        --variant base= --variant pk4="--samples_per_identity 4"      # compare two recipes
    python benchmarks/sweep.py --parallel 4 --threads_per_run 1 --seeds 1 2 3 4 -- --num_train_epochs 2

`--variant NAME=ARGS` adds train.py arguments for that variant (ARGS split like a shell line);
arguments after `--` go to every run. Each run writes `<output_root>/<variant>/seed-<S>/` and its
log `<output_root>/<variant>/seed-<S>.log`; results go to `<output_root>/sweep.json` (rewritten
as each run finishes, so an interrupted sweep keeps what it finished) and a table on stdout.
Runs that fail are listed with their log and make the exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
DEFAULT_RECIPE = REPO / "recipes" / "synthetic.json"  # the main job


@dataclass
class Run:
    variant: str
    seed: int
    arguments: list[str]
    output_dir: Path
    log: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    minutes: float = 0.0
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name=--flag value ...' -> (name, ['--flag', 'value', ...]); 'name=' or 'name' has no extra arguments."""
    name, _, arguments = text.partition("=")
    if not name or any(c in name for c in "/\\ "):
        raise argparse.ArgumentTypeError(f"--variant wants NAME=ARGS with a plain NAME, got {text!r}")
    return name, shlex.split(arguments)


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def run_all(variants: dict[str, list[str]], seeds: list[int], output_root: Path, passthrough: list[str],
            parallel: int = 1, threads_per_run: int | None = None, on_finish=None,
            recipe: str | Path = DEFAULT_RECIPE) -> list[Run]:
    """Train every (variant, seed) with `examples/train.py RECIPE`, `parallel` at a time; returns the runs in order.

    Seed-major order, so a sweep cut short still has every variant on its first seeds.
    """
    runs = [Run(name, seed, arguments, output_root / name / f"seed-{seed}", output_root / name / f"seed-{seed}.log")
            for seed in seeds for name, arguments in variants.items()]
    return run_each(runs, passthrough, parallel, threads_per_run, on_finish, recipe)


def run_each(runs: list[Run], passthrough: list[str], parallel: int = 1, threads_per_run: int | None = None,
             on_finish=None, recipe: str | Path = DEFAULT_RECIPE) -> list[Run]:
    """Train the given runs with `examples/train.py RECIPE`, in their order, `parallel` at a time; `on_finish(runs)`
    after each one ends (its `metrics`, or its `error` naming its log)."""
    environment = dict(os.environ)
    if threads_per_run:
        environment.update(OMP_NUM_THREADS=str(threads_per_run), MKL_NUM_THREADS=str(threads_per_run))
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < max(1, parallel):
            run = pending.pop(0)
            if run.output_dir.exists():  # a fresh run each time: no stale checkpoint is resumed or compared
                shutil.rmtree(run.output_dir)
            run.log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(REPO / "examples" / "train.py"), str(recipe), "--output_dir",
                       str(run.output_dir),
                       "--seed", str(run.seed), "--disable_tqdm", "true", "--report_to", "none",
                       *run.arguments, *passthrough]
            print(f"[{run.variant} seed {run.seed}] {shlex.join(command)}", flush=True)
            with open(run.log, "w") as log:
                run.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            run.started = time.perf_counter()
            active.append(run)
        time.sleep(1.0)
        for run in [run for run in active if run.process.poll() is not None]:
            active.remove(run)
            run.minutes = (time.perf_counter() - run.started) / 60
            results = run.output_dir / "all_results.json"
            if run.process.returncode == 0 and results.is_file():
                metrics = json.loads(results.read_text())
                run.metrics = {name: metrics[f"test_{name}"] for name in METRICS}
                print(f"[{run.variant} seed {run.seed}] test R@1 {run.metrics['R1']:.2f}  mAP "
                      f"{run.metrics['mAP']:.2f}  ({run.minutes:.1f} min)", flush=True)
            else:
                run.error = f"exit status {run.process.returncode}; see {run.log}"
                print(f"[{run.variant} seed {run.seed}] FAILED: {run.error}", flush=True)
            if on_finish is not None:
                on_finish(runs)
    return runs


def report(runs: list[Run]) -> dict:
    """Per-variant summary of the finished runs: {variant: {metric: {mean, std, min, max, n}, 'minutes': ..}}."""
    summary = {}
    for variant in dict.fromkeys(run.variant for run in runs):
        done = [run for run in runs if run.variant == variant and run.metrics]
        if done:
            summary[variant] = {name: summarise([run.metrics[name] for run in done]) for name in METRICS}
            summary[variant]["minutes"] = statistics.fmean(run.minutes for run in done)
            summary[variant]["seeds"] = [run.seed for run in done]
    return summary


@functools.cache
def environment() -> dict:
    """Where the runs ran (train.py uses the first CUDA device when there is one)."""
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def differences(runs: list[dict], reference: str) -> dict:
    """Per-seed differences of each variant to `reference` (variant - reference, same seed) and their summary.

    `runs` are dicts with `variant`, `seed` and `metrics` (as written to the JSON).
    """
    base = {run["seed"]: run["metrics"] for run in runs if run["variant"] == reference and run["metrics"]}
    table = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        if variant == reference:
            continue
        per_seed = {run["seed"]: {name: run["metrics"][name] - base[run["seed"]][name] for name in METRICS}
                    for run in runs if run["variant"] == variant and run["metrics"] and run["seed"] in base}
        if per_seed:
            table[variant] = {"per_seed": per_seed,
                              **{name: summarise([d[name] for d in per_seed.values()]) for name in METRICS}}
    return table


def as_dicts(runs: list[Run]) -> list[dict]:
    return [{"variant": run.variant, "seed": run.seed, "arguments": run.arguments, "metrics": run.metrics,
             "minutes": round(run.minutes, 2), "error": run.error}
            for run in runs if run.metrics or run.error]


def write_json(path: Path, runs: list[Run], extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    finished = as_dicts(runs)
    reference = runs[0].variant if runs else None
    payload = dict(extra, environment=environment(), runs=finished, summary=report(runs), reference=reference,
                   differences_to_reference=differences(finished, reference))
    path.write_text(json.dumps(payload, indent=2))


def print_table(runs: list[Run]) -> None:
    """Mean ± std per variant, and each seed's R@1 difference to the first variant (same seed)."""
    reference = runs[0].variant if runs else ""
    diffs = differences(as_dicts(runs), reference)
    print(f"\n| variant | seeds | R@1 mean ± std | R@1 min-max | mAP mean ± std | R@1 - {reference} per seed "
          "(mean) | minutes/run |")
    print("|---|---|---|---|---|---|---|")
    for variant, row in report(runs).items():
        r1, ap = row["R1"], row["mAP"]
        delta = ""
        if variant in diffs:
            per_seed = ", ".join(f"{seed}: {d['R1']:+.2f}" for seed, d in diffs[variant]["per_seed"].items())
            delta = f"{per_seed} ({diffs[variant]['R1']['mean']:+.2f})"
        print(f"| {variant} | {row['R1']['n']} | {r1['mean']:.2f} ± {r1['std']:.2f} | {r1['min']:.2f}-{r1['max']:.2f} "
              f"| {ap['mean']:.2f} ± {ap['std']:.2f} | {delta} | {row['minutes']:.1f} |")
    for run in runs:
        if run.error:
            print(f"FAILED: {run.variant} seed {run.seed}: {run.error}")


def add_run_arguments(parser: argparse.ArgumentParser, output_root: str, seeds: list[int]) -> None:
    """The options every sweep-style benchmark shares (this one and `ablation.py`)."""
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE),
                        help="the recipe every run trains, before its variant's flags (default: the main job's)")
    parser.add_argument("--output_root", default=output_root)
    parser.add_argument("--seeds", nargs="+", type=int, default=seeds)
    parser.add_argument("--parallel", type=int, default=1, help="Runs at a time (default 1).")
    parser.add_argument("--threads_per_run", type=int, default=None,
                        help="OMP/MKL threads per run (default: inherit). With --parallel on a CPU, cores / parallel.")


def run_and_report(variants: dict[str, list[str]], args: argparse.Namespace, passthrough: list[str],
                   json_name: str) -> int:
    """Run every (variant, seed), keep `<output_root>/<json_name>` current, print the table; exit status."""
    if passthrough[:1] == ["--"]:
        passthrough = passthrough[1:]
    output_root = Path(args.output_root)
    extra = {"recipe": args.recipe, "passthrough": passthrough, "parallel": args.parallel,
             "threads_per_run": args.threads_per_run}
    runs = run_all(variants, args.seeds, output_root, passthrough, args.parallel, args.threads_per_run,
                   on_finish=lambda runs: write_json(output_root / json_name, runs, extra), recipe=args.recipe)
    write_json(output_root / json_name, runs, extra)
    print_table(runs)
    return 1 if any(run.error for run in runs) else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, output_root="outputs/sweep", seeds=[42, 7, 1])
    parser.add_argument("--variant", action="append", type=parse_variant, default=None, metavar="NAME=ARGS",
                        help="A recipe to train (repeatable); default: one variant 'default' with no extra arguments.")
    args, passthrough = parser.parse_known_args(argv)
    variants = dict(args.variant or [("default", [])])
    if len(variants) != len(args.variant or [None]):
        parser.error("each --variant needs its own NAME")
    return run_and_report(variants, args, passthrough, "sweep.json")


if __name__ == "__main__":
    sys.exit(main())
