"""Exact top-k gallery search at 10^5 and 10^6 images: speed against the machine's own matmul bound.

What it measures
    For each gallery size G (default 10^5 and 10^6) of random L2-normalised float32 embeddings of
    dimension D (default 512), a batch of Q (default 64) normalised queries asks for its top-k (10):
      * exact      - `decd.search.backends.exact_top_k`, what `GalleryIndex.search` runs: the gallery is scored
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

Approximate backends (FAISS index-factory strings, what `decd-search index --backend SPEC` builds)
    `--backends exact HNSW32 IVF4096,Flat IVF4096,PQ64` adds one case per string: the index is built
    with `decd.search.backends.build_ann_index` (the code `GalleryIndex.build` runs: trained on a sample where
    it needs training, inner product), then searched at each `--nprobe` (IVF) / `--ef_search` (HNSW)
    value. recall@10 = mean |ANN top-10 ∩ exact top-10| / 10 over `--recall_queries` queries, against
    `exact_top_k` on the same gallery (`decd.search.backends.recall_at_k`). Reported per row: build seconds,
    queries/s (batches of Q), recall@10, peak RSS after the build (the process holds the generated
    gallery too, G x D x 4 bytes, and the training sample) and the FAISS index's size on disk, from which bytes/vector and the memory per 10^8
    crops are computed (index size / G x 10^8; the exact backend: D x 4 bytes per crop).
    `--rerank N ...` adds rows where the best N candidates are re-scored exactly against the gallery
    (`decd.search.backends.rerank_exact`, what `decd-search query --rerank N` does with embeddings.npy).
    `--data clustered` (default) draws the gallery and the queries from a mixture of `--clusters`
    Gaussians around random unit centres (then L2-normalised), so that neighbours are meaningful; with
    uniformly random unit vectors (`--data uniform`) every ANN index degrades to a near-full scan.

Milvus (`--milvus lite server`, rows beside the local ones in the same run)
    For each engine (Milvus Lite in this process; a standalone server started per case from the PyPI
    `milvus` package, `decd.search.milvus.LocalMilvusServer`, in a temporary folder) and each `--milvus_indexes`
    type (FLAT, HNSW, IVF_FLAT: `decd.search.milvus.store.milvus_index`), the same clustered gallery is written
    into a collection of `decd-search index --store`'s schema with
    `decd.search.milvus.store.MilvusCollection.insert_rows` (insert throughput: rows/s), then flushed and
    indexed as a build finishes it (index seconds: until every row is
    indexed), and searched through `MilvusGallery.search` (what `decd-search query` runs; Strong consistency,
    and Bounded for comparison) at each `--nprobe` / `--ef_search`. recall@10 against the exact top-10, peak
    RSS of the benchmark process (the client; with Lite, the engine too; it holds the generated gallery) and
    of the server process. Milvus Lite runs at sizes up to `--lite_max_size` (it scans in Python).

How to run (from the repo root)
    .venv/bin/python benchmarks/search.py                          # 10^5 and 10^6; ~1-2 min on 2 CPU cores
    .venv/bin/python benchmarks/search.py --sizes 100000 --repeats 3
    .venv/bin/python benchmarks/search.py --threads 1 --output-json search.json
    nice -n 10 .venv/bin/python benchmarks/search.py --sizes 1000000 --repeats 3 \
        --backends exact HNSW32 IVF4096,Flat IVF4096,PQ64 --output-json benchmarks/results/search_ann_cpu.json

    nice -n 10 .venv/bin/python benchmarks/search.py --sizes 100000 --repeats 3 --backends exact \
        --milvus lite server --nprobe 16 32 64 --ef_search 64 256 \
        --output-json benchmarks/results/search_milvus_cpu.json

    `pip install faiss-cpu` adds the faiss rows (optional; skipped with a note otherwise);
    `pip install 'decd[milvus]'` the Milvus rows.
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


def _random_rows(rows: int, dim: int, generator: torch.Generator, out: torch.Tensor | None = None,
                 centres: torch.Tensor | None = None, spread: float = 0.5) -> torch.Tensor:
    """L2-normalised rows: uniform on the sphere, or (with `centres`) a random centre + Gaussian noise of
    norm about `spread`."""
    block = torch.randn(rows, dim, generator=generator) if out is None else out.normal_(generator=generator)
    if centres is not None:
        pick = torch.randint(0, centres.shape[0], (block.shape[0],), generator=generator)
        block.mul_(spread / dim ** 0.5).add_(centres[pick])
    return block.div_(block.norm(dim=1, keepdim=True))


def _centres(data: str, clusters: int, dim: int) -> torch.Tensor | None:
    if data == "uniform":
        return None
    return _random_rows(clusters, dim, torch.Generator().manual_seed(7))


def run_case(backend: str, gallery_size: int, dim: int, num_queries: int, top_k: int, repeats: int,
             chunk_size: int, data: str = "uniform", clusters: int = 10000, recall_queries: int = 0,
             truth_file: str | None = None, nprobes: tuple = (), ef_searches: tuple = (),
             train_size: int | None = None, reranks: tuple = ()) -> dict | list:
    """One (backend, gallery size) measurement in this process (a list of rows for an ANN backend)."""
    import numpy as np

    from decd.search.backends import exact_top_k

    centres = _centres(data, clusters, dim)
    generator = torch.Generator().manual_seed(1234)
    query_generator = torch.Generator().manual_seed(99)
    queries = _random_rows(num_queries, dim, query_generator, centres=centres)
    many = _random_rows(recall_queries, dim, query_generator, centres=centres) if recall_queries else None
    build = 100_000  # rows generated at a time
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(dim)
        for start in range(0, gallery_size, build):
            index.add(_random_rows(min(build, gallery_size - start), dim, generator, centres=centres).numpy())

        def search():
            return torch.from_numpy(index.search(queries.numpy(), top_k)[1])
    else:
        gallery = torch.empty(gallery_size, dim)
        for start in range(0, gallery_size, build):
            _random_rows(0, dim, generator, out=gallery[start:start + build], centres=centres)
        if backend == "exact":
            def search():
                return exact_top_k(queries, gallery, top_k, chunk_size)[1]
        elif backend == "unchunked":
            def search():
                return torch.topk(queries @ gallery.T, top_k, dim=1).indices
        else:  # a FAISS index-factory string
            return _run_ann_case(backend, gallery.numpy(), queries.numpy(), many, top_k, repeats, truth_file,
                                 nprobes, ef_searches, train_size, reranks)

    indices = search()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        indices = search()
        times.append(time.perf_counter() - start)
    # Order-free fingerprint of the top-k sets (faiss and torch.topk may order exact ties differently).
    fingerprint = hashlib.sha256(torch.sort(indices.long(), dim=1).values.numpy().tobytes()).hexdigest()[:16]
    row = dict(backend=backend, gallery_size=gallery_size, median_s=statistics.median(times), min_s=min(times),
               peak_rss_mb=peak_rss_mb(), topk_fingerprint=fingerprint, index_bytes=gallery_size * dim * 4)
    if many is not None and backend == "exact":  # the ground truth of the ANN rows
        truth = exact_top_k(many, gallery, top_k, chunk_size)[1].numpy()
        if truth_file:
            np.save(truth_file, truth)
        row["recall_at_k"] = 1.0
    return row


def _run_ann_case(spec, gallery, queries, many, top_k, repeats, truth_file, nprobes, ef_searches, train_size,
                  reranks=()):
    import numpy as np
    import faiss

    from decd.search.backends import ann_num_lists, ann_search, build_ann_index, recall_at_k, rerank_exact

    start = time.perf_counter()
    index = build_ann_index(gallery, spec, train_size=train_size)
    build_s = time.perf_counter() - start
    peak_after_build = peak_rss_mb()
    # The index's size on disk (what `decd-search index` writes as ann.faiss), written to a file rather than
    # serialised in memory, which would add two copies of the index to the peak.
    scratch = (truth_file or "ann") + f".{os.getpid()}.faiss"
    faiss.write_index(index, scratch)
    index_bytes = os.path.getsize(scratch)
    os.remove(scratch)
    truth = np.load(truth_file) if truth_file and os.path.exists(truth_file) else None
    settings = [dict(nprobe=value) for value in nprobes] if ann_num_lists(index) is not None else []
    if "HNSW" in spec:
        settings = [dict(ef_search=value) for value in ef_searches] if not settings else \
            [dict(setting, ef_search=value) for setting in settings for value in ef_searches]
    settings = [dict(setting, rerank=value) if value else setting
                for setting in settings or [{}] for value in (reranks or (0,))]
    rows = []

    def search(batch, setting):
        setting = dict(setting)
        fetch = max(setting.pop("rerank", 0), top_k)
        scores, found = ann_search(index, batch, fetch, **setting)
        return rerank_exact(gallery, batch, found, top_k) if fetch > top_k else (scores, found)

    for setting in settings:
        search(queries, setting)  # warm-up
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            search(queries, setting)
            times.append(time.perf_counter() - begin)
        recall = None
        if truth is not None and many is not None:
            recall = recall_at_k(search(many.numpy(), setting)[1], truth)
        rows.append(dict(backend=spec, setting=setting, gallery_size=gallery.shape[0], build_s=build_s,
                         median_s=statistics.median(times), min_s=min(times), recall_at_k=recall,
                         index_bytes=index_bytes, peak_rss_mb=peak_after_build))
    return rows


def _process_peak_mb(pid: int | None) -> float | None:
    """Peak resident set size (VmHWM) of another process, in MiB."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def run_milvus_case(engine: str, kind: str, gallery_size: int, dim: int, num_queries: int, top_k: int, repeats: int,
                    data: str, clusters: int, recall_queries: int, truth_file: str | None, nprobes: tuple,
                    ef_searches: tuple, scratch: str) -> list:
    """One (engine, index type, gallery size) Milvus measurement in this process: insert, index, search."""
    import numpy as np

    from decd.search import MilvusGallery
    from decd.search.backends import recall_at_k
    from decd.search.milvus import LocalMilvusServer
    from decd.search.milvus.build import finish_build
    from decd.search.milvus.store import (MILVUS_FORMAT, MILVUS_FORMAT_VERSION, MilvusCollection, MilvusLocation,
                                          connect, gallery_row, milvus_index)

    centres = _centres(data, clusters, dim)
    generator, query_generator = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(99)
    queries = _random_rows(num_queries, dim, query_generator, centres=centres).numpy()
    many = _random_rows(recall_queries, dim, query_generator, centres=centres).numpy() if recall_queries else None
    gallery = torch.empty(gallery_size, dim)
    for start in range(0, gallery_size, 100_000):
        _random_rows(0, dim, generator, out=gallery[start:start + 100_000], centres=centres)
    gallery = gallery.numpy()
    server = None
    if engine == "server":
        server = LocalMilvusServer(Path(scratch) / "server").start()
        location = MilvusLocation(server.uri, "bench")
    else:
        location = MilvusLocation(os.path.join(scratch, "bench.db"), "bench")
    try:
        client = connect(location, server.token if server is not None else None, create=True)  # the server's password
        bench = MilvusCollection(client, location, "bench")
        index_type, params = milvus_index(kind, lite=engine == "lite")
        meta = dict(format=MILVUS_FORMAT, format_version=MILVUS_FORMAT_VERSION, model_checksum="benchmark",
                    model_id="benchmark", embedding_dim=dim, gallery_dir=None, updated=None, num_files=gallery_size)
        bench.create_gallery(dim, {}, index_type, params, meta)
        begin = time.perf_counter()
        for start in tqdm_range(gallery_size, 10_000, f"{engine} {kind}: inserting"):
            # a gallery records image file names (path_problem)
            bench.insert_rows([gallery_row(gallery[row], f"{row}.png", "", "", {})
                               for row in range(start, min(start + 10_000, gallery_size))])
        insert_s = time.perf_counter() - begin
        begin = time.perf_counter()
        finish_build(bench, meta, (index_type, params), True, show_progress=False)
        deadline = time.monotonic() + 3600
        while index_type != "FLAT" and time.monotonic() < deadline:  # every sealed row indexed
            info = bench.index_info()
            if int(info.get("indexed_rows") or 0) >= int(info.get("total_rows") or 0) > 0 \
                    and not int(info.get("pending_index_rows") or 0) or str(info.get("state")) == "Failed":
                break
            time.sleep(2)
        index_s = time.perf_counter() - begin
        collection = MilvusGallery(bench, dict(meta, backend=index_type, index_params=params), {})
        settings = ([dict(nprobe=value) for value in nprobes] if index_type.startswith("IVF") else
                    [dict(ef_search=value) for value in ef_searches] if index_type.startswith("HNSW") else [{}])
        truth = np.load(truth_file) if truth_file and os.path.exists(truth_file) else None
        rows = []
        for setting in settings:
            timings = {}
            for consistency in ("Strong", "Bounded"):
                collection.consistency = consistency
                collection.search(queries, top_k=top_k, **setting)  # warm-up
                times = []
                for _ in range(repeats):
                    begin = time.perf_counter()
                    collection.search(queries, top_k=top_k, **setting)
                    times.append(time.perf_counter() - begin)
                timings[consistency] = times
            collection.consistency = "Strong"
            recall = None
            if truth is not None and many is not None:
                found = []
                for start in range(0, len(many), 256):
                    result = collection.search(many[start:start + 256], top_k=top_k, **setting)
                    found += [[int(path.removesuffix(".png")) if path is not None else -1 for path in row]
                              for row in result.paths]
                recall = recall_at_k(np.array(found), truth)
            rows.append(dict(backend=f"milvus-{engine}", index=index_type, setting=setting, gallery_size=gallery_size,
                             insert_s=insert_s, insert_rows_per_s=gallery_size / insert_s, build_s=index_s,
                             median_s=statistics.median(timings["Strong"]), min_s=min(timings["Strong"]),
                             median_bounded_s=statistics.median(timings["Bounded"]), recall_at_k=recall,
                             peak_rss_mb=peak_rss_mb(), server_peak_rss_mb=_process_peak_mb(
                                 server.server_pid() if server else None),
                             index_bytes=gallery_size * dim * 4))
        client.close()
        return rows
    finally:
        if server is not None:
            server.stop()
        else:  # Milvus Lite runs in this process: close it now, not at exit, after its folder is removed
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_all()


def tqdm_range(total: int, step: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(range(0, total, step), desc=description, file=sys.stderr, mininterval=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk_size", type=int, default=None, help="default: decd.search.backends.DEFAULT_CHUNK_SIZE")
    parser.add_argument("--matmul_size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all cores)")
    parser.add_argument("--backends", nargs="+", default=["exact", "unchunked", "faiss"],
                        help="exact, unchunked, faiss (IndexFlatIP) and/or FAISS index-factory strings (HNSW32, ...)")
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--clusters", type=int, default=10_000, help="mixture components of --data clustered")
    parser.add_argument("--recall_queries", type=int, default=1000, help="queries that measure recall@k")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 48, 64, 128], help="IVF settings tried")
    parser.add_argument("--ef_search", type=int, nargs="+", default=[32, 64, 128, 256], help="HNSW settings tried")
    parser.add_argument("--rerank", type=int, nargs="+", default=[0],
                        help="ANN candidates re-scored exactly (decd.search.backends.rerank_exact); 0: none")
    parser.add_argument("--train_size", type=int, default=None,
                        help="training sample of IVF/PQ indexes (default: decd.search.backends.ann_train_size)")
    parser.add_argument("--milvus", nargs="*", default=[], choices=("lite", "server"),
                        help="Milvus engines to measure beside the local backends (needs decd[milvus])")
    parser.add_argument("--milvus_indexes", nargs="+", default=["FLAT", "HNSW", "IVF_FLAT"],
                        help="Milvus index types (--backend names: FLAT, HNSW, IVF_FLAT, IVF1024,Flat, ...)")
    parser.add_argument("--lite_max_size", type=int, default=100_000,
                        help="largest gallery measured on Milvus Lite")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # "backend|gallery_size" (subprocess)
    parser.add_argument("--truth_file", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    from decd.search.backends import DEFAULT_CHUNK_SIZE

    chunk_size = arguments.chunk_size or DEFAULT_CHUNK_SIZE

    if arguments.case and arguments.case.startswith("milvus:"):
        import tempfile

        _, engine, kind, size = arguments.case.replace("|", ":").split(":")
        with tempfile.TemporaryDirectory(prefix="milvus-bench-") as scratch:
            result = run_milvus_case(engine, kind, int(size), arguments.dim, arguments.queries, arguments.top_k,
                                     arguments.repeats, arguments.data, arguments.clusters, arguments.recall_queries,
                                     arguments.truth_file, tuple(arguments.nprobe), tuple(arguments.ef_search),
                                     scratch)
        print(json.dumps(result))
        return
    if arguments.case:
        backend, size = arguments.case.split("|")
        result = run_case(backend, int(size), arguments.dim, arguments.queries, arguments.top_k, arguments.repeats,
                          chunk_size, arguments.data, arguments.clusters, arguments.recall_queries,
                          arguments.truth_file, tuple(arguments.nprobe), tuple(arguments.ef_search),
                          arguments.train_size, tuple(arguments.rerank))
        print(json.dumps(result))
        return

    backends = list(arguments.backends)
    special = ("exact", "unchunked", "faiss")
    if any(name not in ("exact", "unchunked") for name in backends):
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss not installed (pip install faiss-cpu): skipping the faiss and ANN rows")
            backends = [name for name in backends if name in ("exact", "unchunked")]
    gflops = matmul_gflops(arguments.matmul_size, repeats=3)
    shape_gflops = search_gemm_gflops(chunk_size, arguments.dim, arguments.queries, repeats=5)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    print(f"{machine}; float32 matmul {arguments.matmul_size}^3: {gflops:.1f} GFLOP/s "
          f"(the bound); at the search's shape [{chunk_size}, {arguments.dim}] @ [{arguments.dim}, "
          f"{arguments.queries}]: {shape_gflops:.1f} GFLOP/s")
    print(f"Q={arguments.queries} queries per batch, D={arguments.dim}, top-{arguments.top_k}, "
          f"chunk_size={chunk_size}, median of {arguments.repeats}, data={arguments.data}"
          + (f" ({arguments.clusters} clusters)" if arguments.data == "clustered" else "")
          + f", recall over {arguments.recall_queries} queries")

    rows, milvus_rows = [], []
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if arguments.threads:
        environment["OMP_NUM_THREADS"] = str(arguments.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        for size in arguments.sizes:
            reference = exact_qps = None
            truth_file = os.path.join(scratch, f"truth_{size}.npy")
            ordered = ["unchunked"] if "unchunked" in backends or "exact" in backends else []
            milvus_cases = [f"milvus:{engine}:{kind}" for engine in arguments.milvus
                            for kind in arguments.milvus_indexes if engine != "lite" or size <= arguments.lite_max_size]
            needs_truth = any(name not in special for name in backends) or bool(milvus_cases)
            if "exact" in backends or needs_truth:
                ordered.append("exact")
            ordered += [name for name in backends if name not in ordered] + milvus_cases
            for backend in ordered:
                command = [sys.executable, __file__, "--case", f"{backend}|{size}", "--dim", str(arguments.dim),
                           "--queries", str(arguments.queries), "--top_k", str(arguments.top_k),
                           "--repeats", str(arguments.repeats), "--chunk_size", str(chunk_size),
                           "--data", arguments.data, "--clusters", str(arguments.clusters),
                           "--recall_queries", str(arguments.recall_queries if needs_truth else 0),
                           "--truth_file", truth_file, "--nprobe", *map(str, arguments.nprobe),
                           "--ef_search", *map(str, arguments.ef_search), "--rerank", *map(str, arguments.rerank)]
                if arguments.train_size:
                    command += ["--train_size", str(arguments.train_size)]
                if arguments.threads:
                    command += ["--threads", str(arguments.threads)]
                completed = subprocess.run(command, capture_output=True, text=True, env=environment)
                if completed.returncode != 0:
                    print(f"{backend} at {size}: failed\n{completed.stderr[-2000:]}")
                    continue
                result = json.loads(completed.stdout.strip().splitlines()[-1])
                if backend.startswith("milvus:"):
                    for row in result:
                        row["queries_per_s"] = arguments.queries / row["median_s"]
                        row["speedup_vs_exact"] = row["queries_per_s"] / exact_qps if exact_qps else None
                        milvus_rows.append(row)
                        print(_format_milvus_row(row), flush=True)
                    continue
                for row in result if isinstance(result, list) else [result]:
                    row["queries_per_s"] = arguments.queries / row["median_s"]
                    if row["backend"] in special:
                        if row["backend"] == "unchunked":
                            reference = row["topk_fingerprint"]
                        bound = 2 * arguments.queries * size * arguments.dim / (gflops * 1e9)
                        row.update(bound_s=bound, fraction_of_bound=bound / row["median_s"],
                                   same_topk=row["topk_fingerprint"] == reference)
                        if row["backend"] == "exact":
                            exact_qps = row["queries_per_s"]
                    row["bytes_per_vector"] = row["index_bytes"] / size
                    row["gb_per_1e8"] = row["bytes_per_vector"] * 1e8 / 1e9
                    row["speedup_vs_exact"] = row["queries_per_s"] / exact_qps if exact_qps else None
                    if row["backend"] in backends:
                        rows.append(row)
                    print(_format_row(row), flush=True)

    print()
    print(HEADER)
    print("-" * len(HEADER))
    for row in rows:
        print(_format_row(row))
    if milvus_rows:
        print()
        print(MILVUS_HEADER)
        print("-" * len(MILVUS_HEADER))
        for row in milvus_rows:
            print(_format_milvus_row(row))
    if arguments.output_json:
        versions = {}
        for package in ("pymilvus", "milvus-lite", "milvus"):
            try:
                from importlib.metadata import version

                versions[package] = version(package)
            except Exception:  # noqa: BLE001 - not installed
                versions[package] = None
        Path(arguments.output_json).write_text(json.dumps(dict(
            machine=machine, matmul_gflops=gflops, search_shape_gflops=shape_gflops, milvus_versions=versions,
            date=time.strftime("%Y-%m-%d"),
            settings={key: value for key, value in vars(arguments).items() if key not in ("case", "truth_file")},
            rows=rows, milvus_rows=milvus_rows), indent=1))


HEADER = (f"{'gallery':>9}  {'backend':<13}  {'setting':<22}  {'build s':>7}  {'ms/batch':>9}  {'queries/s':>10}  "
          f"{'x exact':>7}  {'recall@k':>8}  {'peak RSS MiB':>12}  {'B/vector':>8}  {'GB/1e8':>7}")


MILVUS_HEADER = (f"{'gallery':>9}  {'engine':<13}  {'index':<9}  {'setting':<12}  {'insert rows/s':>13}  "
                 f"{'index s':>7}  {'ms/64 Strong':>12}  {'ms/64 Bounded':>13}  {'recall@k':>8}  {'client MiB':>10}  "
                 f"{'server MiB':>10}")


def _format_milvus_row(row: dict) -> str:
    setting = ",".join(f"{key}={value}" for key, value in (row.get("setting") or {}).items()) or "-"
    recall = row.get("recall_at_k")
    server = row.get("server_peak_rss_mb")
    return (f"{row['gallery_size']:>9,}  {row['backend']:<13}  {row['index']:<9}  {setting:<12}  "
            f"{row['insert_rows_per_s']:>13,.0f}  {row['build_s']:>7.1f}  {row['median_s'] * 1e3:>12.1f}  "
            f"{row['median_bounded_s'] * 1e3:>13.1f}  {recall if recall is not None else float('nan'):>8.3f}  "
            f"{row['peak_rss_mb']:>10.0f}  {server if server is not None else float('nan'):>10.0f}")


def _format_row(row: dict) -> str:
    setting = ",".join(f"{key}={value}" for key, value in (row.get("setting") or {}).items()) or "-"
    if row["backend"] in ("exact", "unchunked", "faiss"):
        setting = "same top-k" if row.get("same_topk") else "DIFFERENT"
    recall = row.get("recall_at_k")
    return (f"{row['gallery_size']:>9,}  {row['backend']:<13}  {setting:<22}  {row.get('build_s', 0):>7.1f}  "
            f"{row['median_s'] * 1e3:>9.1f}  {row['queries_per_s']:>10.1f}  "
            f"{row['speedup_vs_exact'] or float('nan'):>7.1f}  {recall if recall is not None else float('nan'):>8.3f}  "
            f"{row['peak_rss_mb']:>12.0f}  {row['bytes_per_vector']:>8.0f}  {row['gb_per_1e8']:>7.1f}")


if __name__ == "__main__":
    main()
