#!/usr/bin/env python
"""Ablation of DECD's losses on the embedded synthetic benchmark (a benchmark, not a test).

Trains the tiny DECD four times with the same seed, data and budget, changing one thing each time:

    full      DECD as defined (Sew with density-adaptive margins + MCM)
    sdm       Sew margin 0 (IRRA's SDM loss) + MCM
    no-mcm    Sew + no MCM (the decoder never runs)
    uniform   Sew with the same margin for every caption (q = 1) + MCM

and reports test R@1 / mAP (best checkpoint selected on val) for each.

    python benchmarks/ablation.py                       # the README's numbers (default budget)
    python benchmarks/ablation.py --num_train_epochs 2  # a quick look

Extra arguments are passed to examples/train.py unchanged. Results: a table on stdout and
`<output_root>/ablation.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": [],
    "sdm": ["--sew_margin", "0"],
    "no-mcm": ["--mcm_weight", "0"],
    "uniform": ["--caption_quality", "uniform"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_root", default="outputs/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args, passthrough = parser.parse_known_args()
    root = Path(args.output_root)
    results = {}
    for name in args.variants:
        output_dir = root / name
        if output_dir.exists():  # a fresh run each time: no stale checkpoint is resumed or compared
            shutil.rmtree(output_dir)
        command = [sys.executable, str(REPO / "examples" / "train.py"), "--output_dir", str(output_dir),
                   "--disable_tqdm", "true", *VARIANTS[name], *passthrough]
        print(f"[{name}] {' '.join(command)}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        minutes = (time.perf_counter() - start) / 60
        metrics = json.loads((output_dir / "all_results.json").read_text())
        results[name] = {"R1": metrics["test_R1"], "R5": metrics["test_R5"], "R10": metrics["test_R10"],
                         "mAP": metrics["test_mAP"], "mINP": metrics["test_mINP"], "minutes": round(minutes, 1)}
        print(f"[{name}] test R@1 {metrics['test_R1']:.2f}  mAP {metrics['test_mAP']:.2f}  ({minutes:.1f} min)",
              flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablation.json").write_text(json.dumps({"passthrough": passthrough, "results": results}, indent=2))
    print("\n| variant | R@1 | R@5 | R@10 | mAP | mINP | minutes |\n|---|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['R1']:.2f} | {row['R5']:.2f} | {row['R10']:.2f} | {row['mAP']:.2f} | "
              f"{row['mINP']:.2f} | {row['minutes']} |")


if __name__ == "__main__":
    main()
