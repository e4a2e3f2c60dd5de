"""Time `decd.metrics.retrieval_metrics` at ICFG-PEDES scale and report its peak memory.

ICFG-PEDES test: 19,848 captions (queries) against 19,848 images (gallery) of about 1,000
identities, so each query has ~20 relevant gallery items. The similarity is random, which is the
slow case for the metric (relevant items are spread over all ranks).

Peak memory is the increase of the process's peak resident set (VmHWM in /proc/self/status, reset
before each case through /proc/self/clear_refs) over the resident set just before the call, so it
counts torch and numpy allocations alike and excludes the similarity matrix itself.

    python benchmarks/metrics_scale.py                     # ICFG-PEDES scale
    python benchmarks/metrics_scale.py --num-queries 2000  # quicker
"""

import argparse
import time

import numpy as np
import torch

from decd.metrics import retrieval_metrics


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def run_case(name, similarity, query_ids, gallery_ids, chunk_size=None):
    peak_was_reset = _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    results = retrieval_metrics(similarity, query_ids, gallery_ids, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    peak_increase_mib = (_status_kib("VmHWM") - rss_before) / 1024 if peak_was_reset else float("nan")
    return name, seconds, peak_increase_mib, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-queries", type=int, default=19_848)
    parser.add_argument("--num-gallery", type=int, default=19_848)
    parser.add_argument("--num-identities", type=int, default=1_000)
    parser.add_argument(
        "--many-relevant-identities",
        type=int,
        default=100,
        help="identities of the case with ~200 relevant items per query (the chunk-sorting path)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    similarity = torch.rand(args.num_queries, args.num_gallery, generator=generator) * 2 - 1
    gallery_ids = torch.randint(0, args.num_identities, (args.num_gallery,), generator=generator)
    query_ids = torch.randint(0, args.num_identities, (args.num_queries,), generator=generator)
    few_ids = args.many_relevant_identities
    print(
        f"similarity {args.num_queries} x {args.num_gallery} float32 ({similarity.numel() * 4 / 2**30:.2f} GiB), "
        f"{args.num_identities} identities, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    cases = [
        ("torch float32", similarity, query_ids, gallery_ids),
        ("numpy float32", similarity.numpy(), query_ids.numpy(), gallery_ids.numpy()),
        (
            f"torch float32, {few_ids} ids (sort path)",
            similarity,
            query_ids % few_ids,
            gallery_ids % few_ids,
        ),
    ]
    rows = [run_case(*case) for case in cases]

    print("\n| case | relevant/query | wall s | peak RSS increase MiB | R1 | mAP | mINP |")
    print("|---|---|---|---|---|---|---|")
    for (name, seconds, peak_mib, results), case in zip(rows, cases):
        case_query_ids, case_gallery_ids = np.asarray(case[2]), np.asarray(case[3])
        minlength = int(max(case_query_ids.max(), case_gallery_ids.max())) + 1
        relevant = np.bincount(case_gallery_ids, minlength=minlength)[case_query_ids].mean()
        print(
            f"| {name} | {relevant:.1f} | {seconds:.1f} | {peak_mib:.0f} | {results['R1']:.3f} | "
            f"{results['mAP']:.3f} | {results['mINP']:.3f} |"
        )


if __name__ == "__main__":
    main()
