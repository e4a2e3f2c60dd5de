#!/usr/bin/env python
"""Ablation of DECD's losses on the embedded synthetic benchmark (a benchmark, not a test).

Trains the tiny DECD with the same seeds, data and budget, changing one thing per variant:

    full      DECD as defined (Sew with density-adaptive margins + MCM)
    sdm       Sew margin 0 (IRRA's SDM loss) + MCM
    no-mcm    Sew + no MCM (the decoder never runs)
    uniform   Sew with the same margin for every caption (q = 1) + MCM

and reports test R@1 / mAP (best checkpoint selected on val) for each, as mean ± std over seeds, with each
seed's difference to the full model.

    python benchmarks/ablation.py                          # the default budget, seed 42
    python benchmarks/ablation.py --seeds 1 2 3 --parallel 2 --threads_per_run 1   # benchmarks/README.md's ablation table

Extra arguments are passed to examples/train.py unchanged. Runs go through `benchmarks/sweep.py`
(same options); results: a table on stdout and `<output_root>/ablation.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import add_run_arguments, run_and_report  # noqa: E402

VARIANTS = {
    "full": [],
    "sdm": ["--sew_margin", "0"],
    "no-mcm": ["--mcm_weight", "0"],
    "uniform": ["--caption_quality", "uniform"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, output_root="outputs/ablation", seeds=[42])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args, passthrough = parser.parse_known_args(argv)
    return run_and_report({name: VARIANTS[name] for name in args.variants}, args, passthrough, "ablation.json")


if __name__ == "__main__":
    sys.exit(main())
