#!/usr/bin/env python
"""Where one training step of the main job goes (a benchmark, not a test).

Builds the model as `examples/train.py recipes/synthetic.json` does (`DecdConfig.tiny()` from random
weights, temperature 0.2, identity loss; each variant sets its MCM options explicitly), takes real
batches of 64 pairs of the synthetic training split through the training collator, and times, per
step: the collator (opening the images, processing, tokenising, masking), the forward pass, the
backward pass and the optimiser step (`torch.optim.AdamW`, fused, as the Trainer's default
`adamw_torch_fused`). Variants:

    batch          the MCM head scores the batch's own words (`mcm_vocabulary="batch"`), every pair
    full           the MCM head scores all 49,409 vocabulary rows (`mcm_vocabulary="full"`, the paper's)
    batch-half     batch, MCM on a random half of each batch's pairs (`mcm_fraction=0.5`)
    batch-quarter  batch, MCM on a random quarter (`mcm_fraction=0.25`, the recipe's default)
    batch-eighth   batch, MCM on a random eighth (`mcm_fraction=0.125`)
    no-mcm         no MCM (`mcm_weight=0`: the masked caption and the decoder never run)

The variants alternate within each round (so a slow spell of a shared machine hits all of them) and
the median over rounds is reported, with the median page faults per step (`ru_minflt`).

Memory: by default freed memory is kept for reuse between steps, as `examples/train.py` does on a CPU
(`decd.training.keep_freed_cpu_memory`); `--memory glibc-defaults` times glibc's own behaviour. The
setting is process-wide, so compare the two with separate runs, alternated.

    python benchmarks/train_step.py                       # 3 rounds x 4 steps per variant
    python benchmarks/train_step.py --rounds 5 --output_json benchmarks/results/train_step_cpu.json
    python benchmarks/train_step.py --memory glibc-defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"batch": {"mcm_vocabulary": "batch", "mcm_fraction": 1.0},
            "full": {"mcm_vocabulary": "full", "mcm_fraction": 1.0},
            "batch-half": {"mcm_vocabulary": "batch", "mcm_fraction": 0.5},
            "batch-quarter": {"mcm_vocabulary": "batch", "mcm_fraction": 0.25},
            "batch-eighth": {"mcm_vocabulary": "batch", "mcm_fraction": 0.125}, "no-mcm": {"mcm_weight": 0.0}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per variant and round (after one warm-up).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--memory", choices=("kept", "glibc-defaults"), default="kept",
                        help="kept: keep_freed_cpu_memory(), as train.py on a CPU; glibc-defaults: malloc as is.")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    from decd.data import load_person_search, num_identities, without_image_decoding
    from decd.synthetic import generate_synthetic_person_search
    from decd.training import DecdTrainingCollator, keep_freed_cpu_memory
    from decd.training.recipe import build_model, parse_arguments

    if args.memory == "kept" and not keep_freed_cpu_memory():
        print("keep_freed_cpu_memory() does not apply on this platform: glibc's defaults are timed.", file=sys.stderr)

    model_args, _, _ = parse_arguments([str(REPO / "recipes" / "synthetic.json")])
    data_dir = generate_synthetic_person_search(progress=False)
    train_set = load_person_search("synthetic", data_dir, split="train")
    rows = without_image_decoding(train_set)  # as DecdTrainer hands them to the collator
    identities = num_identities(train_set)
    setups = {}
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        model, processor = build_model(dataclasses.replace(model_args, **overrides), identities)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        collator = DecdTrainingCollator(processor, augment=False, mask_captions=model.config.mcm_weight > 0)
        setups[name] = (model, optimizer, collator)

    parts = ("collate", "forward", "backward", "optimizer")
    times = {name: {part: [] for part in parts} for name in VARIANTS}
    faults = {name: [] for name in VARIANTS}
    step = 0
    for round_index in range(args.rounds):
        for name, (model, optimizer, collator) in setups.items():
            for repeat in range(args.steps + (1 if round_index == 0 else 0)):
                start = (step * args.batch_size) % (len(rows) - args.batch_size)
                step += 1
                faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                batch = collator([rows[i] for i in range(start, start + args.batch_size)])
                t1 = time.perf_counter()
                loss = model(**batch).loss
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad()
                t4 = time.perf_counter()
                if round_index == 0 and repeat == 0:
                    continue  # warm-up
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
                for part, seconds in zip(times[name], (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times[name][part].append(seconds * 1000)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    result, median_faults = {}, {name: statistics.median(values) for name, values in faults.items()}
    for name, measured in times.items():
        result[name] = {part: statistics.median(values) for part, values in measured.items()}
        result[name]["step"] = sum(result[name].values())
    print(f"\nmemory: {args.memory}")
    print("| variant | collate ms | forward ms | backward ms | optimizer ms | step ms | x batch | page faults |")
    print("|---|---|---|---|---|---|---|---|")
    for name, measured in result.items():
        ratio = measured["step"] / result["batch"]["step"]
        print(f"| {name} | " + " | ".join(f"{measured[part]:.0f}" for part in parts + ("step",))
              + f" | {ratio:.2f} | {median_faults[name]:.0f} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({
            "benchmark": "train_step", "memory": args.memory, "batch_size": args.batch_size, "rounds": args.rounds,
            "steps": args.steps, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "median_ms": result, "median_page_faults_per_step": median_faults}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
