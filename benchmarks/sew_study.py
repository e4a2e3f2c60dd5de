#!/usr/bin/env python
"""Do Sew and MCM help, and which Sew? One resumable study in the paper's regime (a benchmark, not a test).

Stage 1 pretrains a small CLIP (`benchmarks/two_stage.py`'s `stage_one`, cached); stage 2 fine-tunes DECD from it
with `recipes/two-stage.json` (temperature 0.02, MCM, new modules at 5x, warm-up, cosine). Every variant states
its loss settings in full, so a later change of the defaults does not change what it measures. Three phases:

    screening      seeds 1-3, paired: SDM (margin 0), "tighten" (today's Sew) at 0.01, 0.02 and 0.05, and each new
                   reading ("relax", "compress"; docs/method.md, "Sew loss") at two strengths
    confirmation   seeds 4-5 for SDM and the two Sew variants whose mean paired R@1 difference to SDM was highest
    mcm            MCM off (`--mcm_weight 0`) for the best of those three, on seeds 1-5

The results file (default `benchmarks/results/sew_study_cpu.json`, the sweep format: each run's `variant`, `seed`,
`arguments`, `metrics`) is rewritten after every run, with a picture of each variant's R@1 difference to SDM per
seed beside it (the same name, .png). Started again, the study reads it and runs only what is missing (a run that
failed is kept, with its log, and tried again); the file must describe the same setup.

    python benchmarks/sew_study.py                                   # the study (benchmarks/README.md)
    python benchmarks/sew_study.py --report                          # its table (into docs/findings.md) and
                                                                     # picture, nothing trained
    python benchmarks/sew_study.py --json /tmp/smoke.json --output_root /tmp/smoke --screening_seeds 1 \\
        --confirmation_seeds 2 --pretrain_args "--num_images 640 --max_steps 5" -- --max_steps 3 \\
        --eval_strategy no --save_strategy no --load_best_model_at_end false      # a smoke run
    python benchmarks/sew_study.py --json benchmarks/results/sew_study_h100.json --parallel 12 \\
        --threads_per_run 1 -- --dataloader_num_workers 1          # on one GPU (its own file: never mix machines)

Arguments after `--` go to every examples/train.py run (after the recipe's and the variant's).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sew_study_cpu.json"
PAGE = REPO / "docs" / "findings.md"  # shows RESULTS' table between these two markers
TABLE_START, TABLE_END = "<!-- sew-study-table", "<!-- end sew-study-table -->"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sweep import METRICS, Run, differences, environment, run_each, summarise  # noqa: E402
from two_stage import RECIPE, children_cpu_seconds, stage_one  # noqa: E402

REFERENCE = "sdm"


# Variant name -> (formulation, strength); "+no-mcm" after a name: the same with MCM off.
SCREENING = {
    REFERENCE: ("tighten", 0),
    **{f"tighten-{m}": ("tighten", m) for m in (0.01, 0.02, 0.05)},
    **{f"relax-{m}": ("relax", m) for m in (0.05, 0.1)},
    **{f"compress-{m}": ("compress", m) for m in (0.05, 0.1)},
}
NO_MCM = "+no-mcm"


def variant_arguments(variant: str) -> list[str]:
    """A variant's stage-2 loss settings, every one stated (caption quality from density, as the method's)."""
    name, no_mcm, _ = variant.partition(NO_MCM)
    formulation, strength = SCREENING[name]
    return ["--sew_formulation", formulation, "--sew_margin", str(strength), "--caption_quality", "density",
            "--mcm_weight", "0" if no_mcm else "1"]


def mean_difference(runs: list[dict], variant: str, seeds: list[int], reference: str = REFERENCE) -> float | None:
    """Mean over `seeds` of variant's R@1 minus reference's (same seed); None unless both ran on every seed."""
    table = differences([run for run in runs if run["seed"] in seeds], reference)
    per_seed = table.get(variant, {}).get("per_seed", {})
    if variant == reference:
        per_seed = {seed: {"R1": 0.0} for seed in seeds if _finished(runs, reference, seed)}
    if set(per_seed) != set(seeds):
        return None
    return statistics.fmean(per_seed[seed]["R1"] for seed in seeds)


def _finished(runs: list[dict], variant: str, seed: int) -> bool:
    return any(run["variant"] == variant and run["seed"] == seed and run["metrics"] for run in runs)


def best_sew_variants(runs: list[dict], seeds: list[int], count: int = 2) -> list[str]:
    """The `count` Sew variants with the highest mean paired R@1 difference to SDM over `seeds`."""
    scored = [(mean_difference(runs, variant, seeds), variant) for variant in SCREENING if variant != REFERENCE]
    return [variant for _, variant in sorted((s for s in scored if s[0] is not None), key=lambda s: -s[0])[:count]]


def plan(runs: list[dict], screening_seeds: list[int], confirmation_seeds: list[int]) -> tuple[list, dict]:
    """The next runs, in order: [(phase, variant, seed)], and the choices made so far (for the results file).

    A phase's runs are planned once the phases before it have finished; finished runs are never planned again.
    """
    choices = {}
    todo = [("screening", variant, seed) for seed in screening_seeds for variant in SCREENING
            if not _finished(runs, variant, seed)]
    if todo:
        return todo, choices
    confirmed = [REFERENCE, *best_sew_variants(runs, screening_seeds)]
    choices["confirmed"] = confirmed
    todo = [("confirmation", variant, seed) for seed in confirmation_seeds for variant in confirmed
            if not _finished(runs, variant, seed)]
    if todo:
        return todo, choices
    all_seeds = [*screening_seeds, *confirmation_seeds]
    best = max(confirmed, key=lambda variant: mean_difference(runs, variant, all_seeds))
    choices["best"] = best
    todo = [("mcm", best + NO_MCM, seed) for seed in all_seeds if not _finished(runs, best + NO_MCM, seed)]
    return todo, choices


def summary(runs: list[dict], choices: dict, all_seeds: list[int]) -> dict:
    """Per variant: metric means and spreads, R@1 difference to SDM paired by seed; MCM's paired effect."""
    runs = sorted(runs, key=lambda run: run["seed"])  # seeds in order, however the runs finished
    out = {"variants": {}, "differences_to_sdm": differences(runs, REFERENCE), **choices}
    order = list(SCREENING)  # the screening's order, each variant's MCM-off run after it, whatever ran first
    for variant in sorted(dict.fromkeys(run["variant"] for run in runs),
                          key=lambda name: (order.index(name.partition(NO_MCM)[0]), name)):
        done = [run for run in runs if run["variant"] == variant and run["metrics"]]
        if done:
            out["variants"][variant] = {name: summarise([run["metrics"][name] for run in done]) for name in METRICS}
            out["variants"][variant]["seeds"] = [run["seed"] for run in done]
    best = choices.get("best")
    if best and any(run["variant"] == best + NO_MCM for run in runs):
        mcm = differences([run for run in runs if run["variant"] in (best, best + NO_MCM)], best + NO_MCM)
        out["mcm_on_minus_off"] = {"variant": best, **mcm.get(best, {})}
    out["seeds"] = all_seeds
    return out


def plot(result: dict, path: Path) -> None:
    """Each variant's R@1 minus SDM's, one dot per seed and a bar at the mean, into the PNG `path`; below a line,
    MCM's effect (R@1 with MCM minus without, the same seed) once measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diffs = result["differences_to_sdm"]
    mcm = result.get("mcm_on_minus_off")
    rows = [(variant, diffs[variant]["per_seed"]) for variant in diffs]
    if mcm:
        rows.append((f"{mcm['variant']}: MCM on - off", mcm["per_seed"]))
    if not rows:
        return
    figure, axes = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for row, (label, per_seed) in enumerate(rows):
        values = [difference["R1"] for difference in per_seed.values()]
        axes.scatter(values, [row] * len(values), s=18, color="tab:blue", zorder=3)
        mean = statistics.fmean(values)
        axes.plot([mean, mean], [row - 0.3, row + 0.3], color="tab:red", linewidth=2, zorder=4)
    axes.axvline(0, color="grey", linewidth=1)
    if mcm:
        axes.axhline(len(rows) - 1.5, color="grey", linewidth=1, linestyle="--")
    axes.set_yticks(range(len(rows)), [f"{label} (n={len(per_seed)})" for label, per_seed in rows])
    axes.invert_yaxis()
    axes.set_xlabel("test R@1 difference, same seed (points; red: mean)")
    axes.set_title("Each variant minus SDM, paired by seed" + ("\n(below the line: MCM on minus off)" if mcm else ""),
                   fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def read_results(path: Path, setup: dict) -> dict:
    """The results file to continue, or a new one; a file of another setup is refused (nothing overwritten)."""
    if not path.is_file():
        return {"setup": setup, "runs": []}
    payload = json.loads(path.read_text())
    if payload.get("setup") != setup:
        raise SystemExit(f"error: {path} holds a study of another setup (recipe, arguments or stage 1); continue "
                         "it with the same arguments, or pass --json for a new results file.")
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screening_seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--confirmation_seeds", nargs="+", type=int, default=[4, 5])
    parser.add_argument("--pretrain_args", default="", help="Arguments for examples/pretrain_clip.py (one string).")
    parser.add_argument("--output_root", default="outputs/sew_study")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs of a phase at once (a GPU: e.g. 12 with --threads_per_run 1; CPU time is then "
                             "not recorded per run)")
    parser.add_argument("--threads_per_run", type=int, default=None, help="OMP/MKL threads of each run")
    parser.add_argument("--json", default=str(RESULTS))
    parser.add_argument("--report", action="store_true",
                        help="draw the picture of the results file and print its table (the default file's "
                             "also into docs/findings.md); train nothing")
    args, passthrough = parser.parse_known_args(argv)
    if passthrough[:1] == ["--"]:
        passthrough = passthrough[1:]
    json_path = Path(args.json)
    if args.report:
        payload = json.loads(json_path.read_text())
        plot(payload["summary"], json_path.with_suffix(".png"))
        print_table(payload["summary"])
        print(f"\nDrawn: {json_path.with_suffix('.png')}")
        if json_path.resolve() == RESULTS.resolve():  # the page shows this file's table, no other's
            PAGE.write_text(with_table(PAGE.read_text(), table(payload["summary"])))
            print(f"Table written into {PAGE.relative_to(REPO)}")
        return 0

    stage1 = stage_one(shlex.split(args.pretrain_args))
    clip_folder = stage1["folder"]
    setup = {"recipe": json.loads(RECIPE.read_text()), "passthrough": passthrough,
             "pretrain_args": args.pretrain_args, "screening_seeds": args.screening_seeds,
             "confirmation_seeds": args.confirmation_seeds}
    output_root = Path(args.output_root)
    payload = read_results(json_path, setup)
    payload.setdefault("stage1", stage1)
    payload["environment"] = environment()
    all_seeds = [*args.screening_seeds, *args.confirmation_seeds]

    def write(choices: dict) -> None:
        payload["summary"] = summary(payload["runs"], choices, all_seeds)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2))
        plot(payload["summary"], json_path.with_suffix(".png"))

    failed_now: set = set()  # tried again in the next invocation, not in a loop in this one
    while True:
        todo, choices = plan(payload["runs"], args.screening_seeds, args.confirmation_seeds)
        write(choices)
        todo = [item for item in todo if item[1:] not in failed_now]
        if not todo:
            break
        done = sum(1 for run in payload["runs"] if run["metrics"])
        print(f"[{todo[0][0]}] {len(todo)} runs, {args.parallel} at a time ({done} runs finished before)", flush=True)
        phase_of = {(variant, seed): phase for phase, variant, seed in todo}
        runs = [Run(variant, seed, ["--model_name_or_path", clip_folder, *variant_arguments(variant)],
                    output_root / variant / f"seed-{seed}", output_root / variant / f"seed-{seed}.log")
                for _, variant, seed in todo]
        recorded: set = set()
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        cpu_before = children_cpu_seconds()

        def record(runs: list[Run]) -> None:
            nonlocal cpu_before
            for run in runs:
                if (run.metrics or run.error) and (run.variant, run.seed) not in recorded:
                    recorded.add((run.variant, run.seed))
                    cpu_now = children_cpu_seconds()  # one run's own only when runs take turns
                    payload["runs"].append({
                        "phase": phase_of[run.variant, run.seed], "variant": run.variant, "seed": run.seed,
                        "arguments": run.arguments, "metrics": run.metrics, "error": run.error,
                        "cpu_seconds": round(cpu_now - cpu_before, 1) if args.parallel == 1 else None,
                        "wall_seconds": round(run.minutes * 60, 1), "commit": commit,
                    })
                    cpu_before = cpu_now
                    if run.error:
                        failed_now.add((run.variant, run.seed))
                    write(choices)

        run_each(runs, passthrough, args.parallel, args.threads_per_run, on_finish=record, recipe=RECIPE)

    print_table(payload["summary"])
    print(f"\nWritten: {json_path}")
    return 1 if failed_now else 0


def _table_parts(page: str) -> tuple[str, str, str]:
    """(the page up to its opening marker's end, the table between the markers, the page from the closing marker)."""
    if TABLE_START not in page or TABLE_END not in page:
        raise ValueError(f"The page has no {TABLE_START} ... {TABLE_END} markers to hold the study's table.")
    head, rest = page.split(TABLE_START, 1)
    marker, rest = rest.split("-->", 1)
    shown, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}{marker}-->", shown.strip(), TABLE_END + tail


def shown_table(page: str) -> str:
    """The table a page shows between the study's markers."""
    return _table_parts(page)[1]


def with_table(page: str, rendered: str) -> str:
    """The page with the table between the study's markers replaced by `rendered` (the rest kept as it is)."""
    opening, _, closing = _table_parts(page)
    return f"{opening}\n{rendered}\n{closing}"


def table(result: dict) -> str:
    """The study's table in Markdown (what docs/findings.md shows): per variant its seeds, R@1 and mAP, and R@1
    minus SDM's paired by seed; then MCM's paired effect on the best variant, once measured."""
    diffs = result["differences_to_sdm"]
    lines = ["| variant | seeds | R@1 mean ± std | mAP mean ± std | R@1 - SDM, per seed | R@1 - SDM, mean ± std |",
             "|---|---|---|---|---|---|"]
    for variant, row in result["variants"].items():
        paired = diffs.get(variant)
        per_seed = ", ".join(f"{d['R1']:+.2f}" for d in paired["per_seed"].values()) if paired else ""
        mean = f"{paired['R1']['mean']:+.2f} ± {paired['R1']['std']:.2f}" if paired else ""
        lines.append(f"| {variant} | {', '.join(map(str, row['seeds']))} | {row['R1']['mean']:.2f} ± "
                     f"{row['R1']['std']:.2f} | {row['mAP']['mean']:.2f} ± {row['mAP']['std']:.2f} | {per_seed} | "
                     f"{mean} |")
    if result.get("mcm_on_minus_off", {}).get("per_seed"):
        mcm = result["mcm_on_minus_off"]
        lines += ["", f"MCM on minus off ({mcm['variant']}, paired by seed): R@1 "
                      + ", ".join(f"{d['R1']:+.2f}" for d in mcm["per_seed"].values())
                      + f" (mean {mcm['R1']['mean']:+.2f} ± {mcm['R1']['std']:.2f})"]
    return "\n".join(lines)


def print_table(result: dict) -> None:
    print("\n" + table(result))


if __name__ == "__main__":
    sys.exit(main())
