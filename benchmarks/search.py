"""Exact top-k gallery search at 10^5 and 10^6 images: speed against the machine's own matmul bound.

What it measures
    For each gallery size G (default 10^5 and 10^6) of random L2-normalised float32 embeddings of
    dimension D (default 512), a batch of Q (default 64) normalised queries asks for its top-k (10):
      * exact      - `decd.search.exact_top_k`, what `GalleryIndex.search` runs: the gallery is scored
                     `--chunk_size` rows at a time (torch matmul + topk per chunk, merged; ties by lower
                     gallery index), so extra memory is one Q x chunk score block;
      * unchunked  - one `queries @ gallery.T` ([Q, G] scores, 256 MB at 10^6) + one `torch.topk`, the
                     naive reference (its memory grows with G);
      * faiss      - `faiss.IndexFlatIP` (exact inner product), when faiss is installed.
    Per case: queries/s = Q / median seconds of a batch over `--repeats` runs (after one warm-up), and
    peak resident memory (VmHWM of /proc/self/status). Each case runs in its own subprocess, so the
    peaks do not carry over; the gallery is built in place (one copy: G x D x 4 bytes, 2 GB at 10^6;
    faiss is filled chunk by chunk, so it also holds one copy, its own).

    The bound: the same run first measures this machine's float32 matmul throughput (median GFLOP/s of
    an N x N @ N x N torch.matmul, N = `--matmul_size`). Scoring a batch needs 2 * Q * G * D flops, so
    no exact search can take less than 2 * Q * G * D / throughput seconds; "% of bound" is that lower
    bound divided by the measured median (100% = as fast as the machine multiplies). The top-k
    selection and the merge are extra work on top of the matmul. The header also gives the GFLOP/s of
    the multiply at the search's own shape ([chunk, D] @ [D, Q]: a few dozen queries make a thin GEMM
    that BLAS runs well below its square-matrix peak), which separates "thin GEMM" from "our overhead". Each subprocess also checks that its
    top-k indices equal the unchunked reference (same seed, same gallery): column "same top-k".

How to run (from the repo root)
    .venv/bin/python benchmarks/search.py                          # 10^5 and 10^6; ~1-2 min on 2 CPU cores
    .venv/bin/python benchmarks/search.py --sizes 100000 --repeats 3
    .venv/bin/python benchmarks/search.py --threads 1 --output-json search.json

    `pip install faiss-cpu` adds the faiss rows (optional; skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def matmul_gflops(size: int, repeats: int) -> float:
    """Median float32 GFLOP/s of a size x size @ size x size matmul (one warm-up)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator)
    right = torch.randn(size, size, generator=generator)
    torch.matmul(left, right)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(left, right)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def search_gemm_gflops(chunk_size: int, dim: int, num_queries: int, repeats: int) -> float:
    """Median GFLOP/s of the multiply `exact` runs per chunk: [chunk, dim] @ [dim, num_queries]."""
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(chunk_size, dim, generator=generator)
    queries_t = torch.randn(dim, num_queries, generator=generator)
    block @ queries_t
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block @ queries_t
        times.append(time.perf_counter() - start)
    return 2 * chunk_size * dim * num_queries / statistics.median(times) / 1e9


def _random_rows(rows: int, dim: int, generator: torch.Generator, out: torch.Tensor | None = None) -> torch.Tensor:
    block = torch.randn(rows, dim, generator=generator) if out is None else out.normal_(generator=generator)
    return block.div_(block.norm(dim=1, keepdim=True))


def run_case(backend: str, gallery_size: int, dim: int, num_queries: int, top_k: int, repeats: int,
             chunk_size: int) -> dict:
    """One (backend, gallery size) measurement in this process."""
    from decd.search import exact_top_k

    generator = torch.Generator().manual_seed(1234)
    queries = _random_rows(num_queries, dim, torch.Generator().manual_seed(99))
    build = 100_000  # rows generated at a time
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(dim)
        for start in range(0, gallery_size, build):
            index.add(_random_rows(min(build, gallery_size - start), dim, generator).numpy())

        def search():
            return torch.from_numpy(index.search(queries.numpy(), top_k)[1])
    else:
        gallery = torch.empty(gallery_size, dim)
        for start in range(0, gallery_size, build):
            _random_rows(0, dim, generator, out=gallery[start:start + build])
        if backend == "exact":
            def search():
                return exact_top_k(queries, gallery, top_k, chunk_size)[1]
        else:
            def search():
                return torch.topk(queries @ gallery.T, top_k, dim=1).indices

    indices = search()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        indices = search()
        times.append(time.perf_counter() - start)
    # Order-free fingerprint of the top-k sets (faiss and torch.topk may order exact ties differently).
    fingerprint = hashlib.sha256(torch.sort(indices.long(), dim=1).values.numpy().tobytes()).hexdigest()[:16]
    return dict(backend=backend, gallery_size=gallery_size, median_s=statistics.median(times), min_s=min(times),
                peak_rss_mb=peak_rss_mb(), topk_fingerprint=fingerprint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk_size", type=int, default=None, help="default: decd.search.DEFAULT_CHUNK_SIZE")
    parser.add_argument("--matmul_size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all cores)")
    parser.add_argument("--backends", nargs="+", default=["exact", "unchunked", "faiss"])
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # "backend,gallery_size" (subprocess)
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    from decd.search import DEFAULT_CHUNK_SIZE

    chunk_size = arguments.chunk_size or DEFAULT_CHUNK_SIZE

    if arguments.case:
        backend, size = arguments.case.split(",")
        result = run_case(backend, int(size), arguments.dim, arguments.queries, arguments.top_k, arguments.repeats,
                          chunk_size)
        print(json.dumps(result))
        return

    backends = list(arguments.backends)
    if "faiss" in backends:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss not installed (pip install faiss-cpu): skipping the faiss rows")
            backends.remove("faiss")
    gflops = matmul_gflops(arguments.matmul_size, repeats=3)
    shape_gflops = search_gemm_gflops(chunk_size, arguments.dim, arguments.queries, repeats=5)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32 matmul {arguments.matmul_size}^3: {gflops:.1f} GFLOP/s "
          f"(the bound); at the search's shape [{chunk_size}, {arguments.dim}] @ [{arguments.dim}, "
          f"{arguments.queries}]: {shape_gflops:.1f} GFLOP/s")
    print(f"Q={arguments.queries} queries per batch, D={arguments.dim}, top-{arguments.top_k}, "
          f"chunk_size={chunk_size}, median of {arguments.repeats}")

    rows = []
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if arguments.threads:
        environment["OMP_NUM_THREADS"] = str(arguments.threads)
    for size in arguments.sizes:
        reference = None
        for backend in ["unchunked"] + [name for name in backends if name != "unchunked"]:
            command = [sys.executable, __file__, "--case", f"{backend},{size}", "--dim", str(arguments.dim),
                       "--queries", str(arguments.queries), "--top_k", str(arguments.top_k),
                       "--repeats", str(arguments.repeats), "--chunk_size", str(chunk_size)]
            if arguments.threads:
                command += ["--threads", str(arguments.threads)]
            completed = subprocess.run(command, capture_output=True, text=True, env=environment)
            if completed.returncode != 0:
                print(f"{backend} at {size}: failed\n{completed.stderr[-2000:]}")
                continue
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            if backend == "unchunked":
                reference = result["topk_fingerprint"]
            bound = 2 * arguments.queries * size * arguments.dim / (gflops * 1e9)
            result.update(queries_per_s=arguments.queries / result["median_s"], bound_s=bound,
                          fraction_of_bound=bound / result["median_s"],
                          same_topk=result["topk_fingerprint"] == reference)
            if backend in backends:
                rows.append(result)

    header = (f"{'gallery':>9}  {'backend':<9}  {'ms/batch':>9}  {'queries/s':>10}  {'bound ms':>8}  "
              f"{'% of bound':>10}  {'peak RSS MiB':>12}  {'same top-k':>10}")
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['gallery_size']:>9,}  {row['backend']:<9}  {row['median_s'] * 1e3:>9.1f}  "
              f"{row['queries_per_s']:>10.1f}  {row['bound_s'] * 1e3:>8.1f}  {100 * row['fraction_of_bound']:>9.0f}%  "
              f"{row['peak_rss_mb']:>12.0f}  {'yes' if row['same_topk'] else 'NO':>10}")
    if arguments.output_json:
        Path(arguments.output_json).write_text(
            json.dumps(dict(matmul_gflops=gflops, search_shape_gflops=shape_gflops, rows=rows), indent=1)
        )


if __name__ == "__main__":
    main()
