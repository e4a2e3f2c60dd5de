#!/usr/bin/env python
"""The paper's regime end to end on the embedded data (a benchmark, not a test): pretrain a small CLIP, then
fine-tune DECD from it.

    stage 1     examples/pretrain_clip.py (cached: a second run with the same settings trains nothing)
    zero-shot   the pretrained CLIP on the synthetic test split, untrained: `DecdModel.from_clip` at the crop
                size (position table resized once), `decd.retrieval.evaluate_retrieval`
    stage 2     examples/train.py --model_name_or_path <the CLIP folder> at the method's settings (temperature
                0.02 fixed, Sew with density margins, MCM, new modules at 5x the learning rate, warm-up,
                cosine), the ablation's variants (benchmarks/ablation.py) over seeds:
                    full      DECD with the Sew loss as first read (--sew_formulation tighten --sew_margin 0.1)
                    sdm       --sew_margin 0 (IRRA's SDM)
                    uniform   the same with --caption_quality uniform (same margin for every caption)
                    no-mcm    the same with --mcm_weight 0
                with each variant's per-seed difference to `full`.

Every path records its CPU time (user + system of the processes it ran) and wall time. Results: a table on
stdout and `--json` (default `benchmarks/results/two_stage_cpu.json`), rewritten after each run.

    python benchmarks/two_stage.py                                  # the full measurement (benchmarks/README.md)
    python benchmarks/two_stage.py --seeds 1 --variants full --pretrain_args "--num_images 640 --max_steps 5" \\
        --json /tmp/two_stage_smoke.json -- --max_steps 3 --eval_strategy no --save_strategy no \\
        --load_best_model_at_end false                              # a smoke run (about 2 minutes)

Arguments after `--` go to every examples/train.py run (after the recipe's, so they override it). One run at a
time: the CPU times are per run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sweep import METRICS, differences, environment, run_all, summarise  # noqa: E402

FIRST_SEW = ["--sew_formulation", "tighten", "--sew_margin", "0.1"]  # the paper's Sew as first read, margin 0.1
VARIANTS = {
    "full": FIRST_SEW,
    "sdm": ["--sew_margin", "0"],
    "uniform": [*FIRST_SEW, "--caption_quality", "uniform"],
    "no-mcm": [*FIRST_SEW, "--mcm_weight", "0"],
}
# Stage 2's recipe: the method's settings, the tiny preset's decoder (the CLIP is tiny-sized too) and a learning
# rate guessed for a small, briefly pretrained CLIP (the paper's 1e-5 is for ViT-B/16).
RECIPE = REPO / "recipes" / "two-stage.json"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_one(pretrain_args: list[str]) -> dict:
    before, started, now = children_cpu_seconds(), time.perf_counter(), time.time()
    command = [sys.executable, str(REPO / "examples" / "pretrain_clip.py"), "--print_path_only", "true",
               *pretrain_args]
    print(f"[stage 1] {shlex.join(command)}", flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    folder = Path(result.stdout.strip().splitlines()[-1])
    marker = json.loads((folder / "pretraining.json").read_text())
    cpu, wall = children_cpu_seconds() - before, time.perf_counter() - started
    # A cache hit trains nothing (the marker predates this run): its cost is the one recorded when it was trained.
    cached = (folder / "pretraining.json").stat().st_mtime < now
    losses = marker["logged_losses"]  # none when the run was shorter than one logging interval
    trend = f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    print(f"[stage 1] {folder} ({'cached' if cached else 'trained'}, {marker['steps']} steps{trend})", flush=True)
    return {"folder": str(folder), "arguments": pretrain_args, "cached": cached, "cpu_seconds": round(cpu, 1),
            "wall_seconds": round(wall, 1), "pretraining": marker}


def zero_shot(clip_folder: str, data_dir: str) -> dict:
    """The pretrained CLIP, untrained for person search, on the synthetic test split (in this process)."""
    import torch

    from decd.data import load_person_search
    from decd.retrieval import evaluate_retrieval
    from modeling_decd import DecdModel
    from processing_decd import DecdProcessor

    cpu, started = time.process_time(), time.perf_counter()
    image_size = tuple(json.loads(RECIPE.read_text())["image_size"])  # stage 2's crops
    model = DecdModel.from_clip(clip_folder, image_size=image_size).detach_decoder().eval()
    processor = DecdProcessor(image_size=image_size)
    results = {}
    for split in ("val", "test"):
        data = load_person_search("synthetic", data_dir, split=split)
        with torch.no_grad():
            metrics = evaluate_retrieval(model, processor, data["gallery"], data["queries"], show_progress=False)
        results[split] = {name: float(metrics[name]) for name in METRICS}
    results.update(cpu_seconds=round(time.process_time() - cpu, 1),
                   wall_seconds=round(time.perf_counter() - started, 1))
    print(f"[zero-shot] test R@1 {results['test']['R1']:.2f}  mAP {results['test']['mAP']:.2f}", flush=True)
    return results


def summary(runs: list[dict]) -> dict:
    out = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        done = [run for run in runs if run["variant"] == variant and run["metrics"]]
        if done:
            out[variant] = {name: summarise([run["metrics"][name] for run in done]) for name in METRICS}
            out[variant]["cpu_seconds_total"] = round(sum(run["cpu_seconds"] for run in done), 1)
            out[variant]["wall_seconds_total"] = round(sum(run["wall_seconds"] for run in done), 1)
            out[variant]["seeds"] = [run["seed"] for run in done]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrain_args", default="", help="Arguments for examples/pretrain_clip.py (one string).")
    parser.add_argument("--output_root", default="outputs/two_stage")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "two_stage_cpu.json"))
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of each run (default: inherit).")
    args, passthrough = parser.parse_known_args(argv)
    if passthrough[:1] == ["--"]:
        passthrough = passthrough[1:]
    if "full" not in args.variants:
        args.variants.insert(0, "full")  # the differences are to the full model
    if args.threads:
        import os

        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        import torch

        torch.set_num_threads(args.threads)

    from decd.synthetic import generate_synthetic_person_search

    data_dir = str(generate_synthetic_person_search(progress=False))  # the default set, cached (train.py's too)
    output_root, json_path = Path(args.output_root), Path(args.json)
    payload = {"command": shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               "recipe": str(RECIPE), "passthrough": passthrough, "environment": environment(), "runs": []}

    def write() -> None:
        payload["summary"] = summary(payload["runs"])
        payload["differences_to_full"] = differences(payload["runs"], "full")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2))

    payload["stage1"] = stage_one(shlex.split(args.pretrain_args))
    clip_folder = payload["stage1"]["folder"]
    write()
    payload["zero_shot"] = zero_shot(clip_folder, data_dir)
    write()

    failed = False
    for seed in args.seeds:  # seed-major: a measurement cut short has every variant on its first seeds
        for variant in args.variants:
            arguments = ["--model_name_or_path", clip_folder, *VARIANTS[variant]]
            before, started = children_cpu_seconds(), time.perf_counter()
            (run,) = run_all({variant: arguments}, [seed], output_root, passthrough, recipe=RECIPE)
            payload["runs"].append({
                "variant": variant, "seed": seed, "arguments": arguments, "metrics": run.metrics, "error": run.error,
                "cpu_seconds": round(children_cpu_seconds() - before, 1),
                "wall_seconds": round(time.perf_counter() - started, 1),
            })
            failed |= run.error is not None
            write()

    print(f"\nStage 1: {payload['stage1']['folder']} ({payload['stage1']['pretraining']['train_cpu_seconds']} CPU s "
          f"to train{', cached here' if payload['stage1']['cached'] else ''})")
    zs = payload["zero_shot"]
    print(f"Zero-shot: test R@1 {zs['test']['R1']:.2f}, mAP {zs['test']['mAP']:.2f} ({zs['cpu_seconds']} CPU s)")
    print("\n| variant | seeds | R@1 mean ± std | mAP mean ± std | R@1 - full (per seed) | CPU s total |")
    print("|---|---|---|---|---|---|")
    diffs = payload["differences_to_full"]
    for variant, row in payload["summary"].items():
        delta = ", ".join(f"{d['R1']:+.2f}" for d in diffs[variant]["per_seed"].values()) if variant in diffs else ""
        print(f"| {variant} | {len(row['seeds'])} | {row['R1']['mean']:.2f} ± {row['R1']['std']:.2f} | "
              f"{row['mAP']['mean']:.2f} ± {row['mAP']['std']:.2f} | {delta} | {row['cpu_seconds_total']} |")
    print(f"\nWritten: {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
