"""Load on `decd-search serve` and on the app over loopback: N concurrent clients, requests/s, latency, equality.

What it measures
    A server is started as its own process on 127.0.0.1 (a free port): `decd-search serve INDEX --model M`
    (target `service`) or `python app.py --model M --gallery G` (target `app`, Gradio; `--app_script` runs another
    copy, e.g. an older commit's). Then:
      1. in process: `gallery.search_text(model, processor, [description], top_k)` for each description of the
         pool, one at a time, here (text encoding plus ranking: the search itself, without HTTP);
      2. serial: one client sends each description of the pool once; its answers are the reference, and its
         median latency minus the in-process median is the per-request overhead of the server;
      3. load: `--clients` clients (asyncio, one keep-alive connection each) send `--queries` requests in all, each
         the next description of the pool, and each answer is compared with the serial one (same files in the same
         order and the same scores within `--tolerance`; places whose scores tie within it may swap);
    requests/s = queries / wall time of phase 3; p50 / p99 of its latencies; errors = anything but an answer
    (a 503 of a full queue included); the server's resident memory (VmRSS) after a warm-up of 2 requests per
    client, at the end, and its maximum (sampled every second).

    The service is asked `POST /search {"text", "top_k"}`; the app its Gradio API, `POST /gradio_api/call/search`
    then `GET /gradio_api/call/search/EVENT_ID` (the server-sent events of the answer), as a script would.

Data: the tiny model (`DecdConfig.tiny()`, random weights, seed 0: speed does not depend on training) and a
synthetic gallery of `--gallery_size` crops (`decd.synthetic`, test identities only, 4 crops each), indexed with
`GalleryIndex.build` for the service; the app encodes that folder when it starts. The descriptions are the
gallery's own captions (`--distinct` of them). Everything is cached under `--work`.

How to run (from the repo root)
    .venv/bin/python benchmarks/serve_load.py service --clients 32 --queries 10000 --gallery_size 10000 \\
        --output-json benchmarks/results/serve_service_cpu.json
    .venv/bin/python benchmarks/serve_load.py app --clients 16 --queries 10000 --gallery_size 400 \\
        --output-json benchmarks/results/serve_app_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOST = "127.0.0.1"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("service", "app"), help="decd-search serve, or app.py (Gradio)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--queries", type=int, default=10_000, help="requests in the load phase, all clients together")
    parser.add_argument("--gallery_size", type=int, default=10_000, help="crops in the gallery (a multiple of 4)")
    parser.add_argument("--distinct", type=int, default=200, help="distinct descriptions (the serial reference)")
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="scores closer than this are equal (float noise of batched text encoding)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/decd-serve-load"),
                        help="where the model, the gallery and its index are cached")
    parser.add_argument("--app_script", type=Path, default=REPO / "app.py", help="the app to start (target app)")
    parser.add_argument("--server_args", default="", help="extra arguments for the server's command line")
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                        help="torch threads of the in-process measurement (default: the cores but one, as the service)")
    parser.add_argument("--note", default="", help="recorded in the results file (e.g. what else the machine ran)")
    parser.add_argument("--output-json", dest="output_json", type=Path, default=None)
    return parser.parse_args(argv)


# ---- data -------------------------------------------------------------------------------------------------------
def prepare(work: Path, gallery_size: int, need_index: bool) -> tuple[Path, Path, Path, list[str]]:
    """(model folder, gallery folder, index folder, captions of the gallery), made once under `work`."""
    import torch

    from configuration_decd import DecdConfig
    from decd.search import GalleryIndex
    from decd.synthetic import generate_synthetic_person_search
    from modeling_decd import DecdModel
    from processing_decd import DecdProcessor

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        DecdModel(DecdConfig.tiny()).save_pretrained(model_dir)
        DecdProcessor(image_size=(128, 64)).save_pretrained(model_dir)
    if gallery_size % 4:
        raise SystemExit(f"--gallery_size must be a multiple of 4 (4 crops per identity), got {gallery_size}")
    root = generate_synthetic_person_search(work / f"synthetic-{gallery_size}", num_train_ids=0, num_val_ids=0,
                                            num_test_ids=gallery_size // 4, images_per_id=4, progress=False)
    gallery = root / "imgs" / "test"
    index = work / f"index-{gallery_size}"
    if need_index and not (index / "meta.json").is_file():
        model = DecdModel.from_pretrained(model_dir).eval()
        processor = DecdProcessor.from_pretrained(model_dir)
        GalleryIndex.build(model, processor, gallery, index, batch_size=64, show_progress=True,
                           model_id=str(model_dir))
    captions = []
    for record in json.loads((root / "reid_raw.json").read_text()):
        for caption in record["captions"]:
            if caption not in captions:
                captions.append(caption)
    return model_dir, gallery, index, captions


def in_process_ms(model_dir: Path, source: Path, descriptions: list[str], top_k: int, threads: int) -> float:
    """Median ms of one description's search in this process (`search_text`: text encoding plus ranking)."""
    import torch

    from decd.search import open_gallery
    from inference_decd import load_model

    torch.set_num_threads(threads)
    model, processor = load_model(model_dir, "cpu")
    gallery = open_gallery(model, processor, source)
    gallery.search_text(model, processor, descriptions[:1], top_k=top_k, verify=False)  # warm-up
    times = []
    for description in descriptions:
        started = time.perf_counter()
        gallery.search_text(model, processor, [description], top_k=top_k, verify=False)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


# ---- the server -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(arguments, model_dir: Path, gallery: Path, index: Path, port: int, log: Path) -> subprocess.Popen:
    environment = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1",
                       GRADIO_SSR_MODE="False", PYTHONPATH=str(REPO))
    if arguments.target == "service":
        command = [sys.executable, "-m", "decd.cli", "serve", str(index), "--model", str(model_dir), "--host", HOST,
                   "--port", str(port)]
    else:
        command = [sys.executable, str(arguments.app_script), "--model", str(model_dir), "--gallery", str(gallery),
                   "--host", HOST, "--port", str(port), "--device", "cpu"]
    command += arguments.server_args.split()
    with open(log, "w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=REPO)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_ready(session, url: str, server: subprocess.Popen, log: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"the server did not answer {url} within {timeout:.0f} s")


# ---- one request ------------------------------------------------------------------------------------------------
async def ask_service(session, base: str, description: str, top_k: int) -> list[tuple[str, float]]:
    async with session.post(f"{base}/search", json={"text": description, "top_k": top_k}) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body}")
    return [(match["path"], float(match["score"])) for match in body["results"]]


async def ask_app(session, base: str, description: str, top_k: int) -> list[tuple[str, float]]:
    async with session.post(f"{base}/gradio_api/call/search", json={"data": [description, top_k]}) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        event = (await response.json(content_type=None))["event_id"]
    async with session.get(f"{base}/gradio_api/call/search/{event}") as response:
        text = await response.text()
    kind, data = None, None
    for line in text.splitlines():
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind in ("complete", "error"):
            data = line.split(":", 1)[1].strip()
            break
    if kind != "complete" or data is None:
        raise RuntimeError(f"the app answered {kind}: {data}")
    answer = []
    for item in json.loads(data)[0]:
        _, score, _, name = item["caption"].split(" · ")  # "#rank · score · top p% of N · file name"
        answer.append((name, float(score)))
    return answer


def same_answer(answer: list, reference: list, tolerance: float) -> bool:
    """The same files in the same order and the same scores within `tolerance`; places whose reference scores tie
    within it with a neighbour may hold each other's files."""
    if len(answer) != len(reference):
        return False
    scores = [score for _, score in reference]
    for place, ((name, score), (expected, expected_score)) in enumerate(zip(answer, reference)):
        if abs(score - expected_score) > tolerance:
            return False
        if name != expected:
            tied = [neighbour for neighbour in (place - 1, place + 1) if 0 <= neighbour < len(scores)
                    and abs(scores[neighbour] - expected_score) <= tolerance]
            if not tied:
                return False
    return sorted(name for name, _ in answer) == sorted(name for name, _ in reference)


# ---- the phases -------------------------------------------------------------------------------------------------
async def measure(arguments, base: str, server: subprocess.Popen, log: Path, descriptions: list[str]) -> dict:
    import aiohttp

    ask = ask_service if arguments.target == "service" else ask_app
    ready = f"{base}/health" if arguments.target == "service" else f"{base}/gradio_api/info"
    connector = aiohttp.TCPConnector(limit=arguments.clients + 4)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await wait_ready(session, ready, server, log)
        serial, serial_times = [], []
        for description in descriptions:  # the reference: one request at a time
            started = time.perf_counter()
            serial.append(await ask(session, base, description, arguments.top_k))
            serial_times.append(time.perf_counter() - started)

        async def client(queue: list[int], latencies: list, outcomes: list) -> None:
            while queue:
                number = queue.pop()
                started = time.perf_counter()
                try:
                    answer = await ask(session, base, descriptions[number % len(descriptions)], arguments.top_k)
                except Exception as error:  # an error is a result of the benchmark, counted and kept
                    outcomes.append(("error", repr(error)[:300]))
                    continue
                latencies.append(time.perf_counter() - started)
                outcomes.append(("equal" if same_answer(answer, serial[number % len(descriptions)],
                                                        arguments.tolerance) else "different", None))

        warm_up = list(range(2 * arguments.clients))
        await asyncio.gather(*(client(warm_up, [], []) for _ in range(arguments.clients)))
        rss_start = rss_mb(server.pid)
        samples = [rss_start]
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                samples.append(rss_mb(server.pid))
                try:
                    await asyncio.wait_for(done.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

        queue = list(range(arguments.queries))[::-1]
        latencies, outcomes = [], []
        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        await asyncio.gather(*(client(queue, latencies, outcomes) for _ in range(arguments.clients)))
        wall = time.perf_counter() - started
        done.set()
        await sampler
        rss_end = rss_mb(server.pid)
    errors = [detail for kind, detail in outcomes if kind == "error"]
    latencies.sort()

    def percentile(fraction: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] if latencies else float("nan")

    return dict(
        serial_requests=len(descriptions), serial_latency_ms_median=1000 * statistics.median(serial_times),
        requests=len(outcomes), wall_s=wall, requests_per_s=len(outcomes) / wall,
        latency_ms_p50=percentile(0.50), latency_ms_p99=percentile(0.99), latency_ms_max=percentile(1.0),
        errors=len(errors), first_errors=errors[:5],
        equal_to_serial=sum(kind == "equal" for kind, _ in outcomes),
        different_from_serial=sum(kind == "different" for kind, _ in outcomes),
        server_rss_mb_after_warmup=rss_start, server_rss_mb_end=rss_end, server_rss_mb_max=max(samples + [rss_end]),
        server_rss_growth_mb=rss_end - rss_start,
    )


def environment() -> dict:
    import torch
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return dict(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
                torch=torch.__version__, transformers=transformers.__version__, load_average_at_start=load)


def main(argv=None) -> int:
    arguments = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    model_dir, gallery, index, captions = prepare(arguments.work, arguments.gallery_size,
                                                  need_index=arguments.target == "service")
    descriptions = captions[:arguments.distinct]
    source = index if arguments.target == "service" else gallery
    base_ms = in_process_ms(model_dir, source, descriptions, arguments.top_k, arguments.threads)
    port = free_port()
    log = arguments.work / f"server-{arguments.target}-{port}.log"
    environment_before = environment()
    server = start_server(arguments, model_dir, gallery, index, port, log)
    try:
        results = asyncio.run(measure(arguments, f"http://{HOST}:{port}", server, log, descriptions))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    results["in_process_ms_median"] = base_ms
    results["overhead_ms_per_request"] = results["serial_latency_ms_median"] - base_ms
    payload = dict(
        benchmark="serve_load", target=arguments.target, date=started.isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        settings=dict(clients=arguments.clients, queries=arguments.queries, gallery_size=arguments.gallery_size,
                      distinct=len(descriptions), top_k=arguments.top_k, tolerance=arguments.tolerance,
                      app_script=str(arguments.app_script) if arguments.target == "app" else None,
                      server_args=arguments.server_args, in_process_threads=arguments.threads,
                      model="DecdConfig.tiny() random weights, seed 0"),
        note=arguments.note, environment=environment_before, results=results,
    )
    print(json.dumps(payload, indent=2))
    if arguments.output_json:
        arguments.output_json.parent.mkdir(parents=True, exist_ok=True)
        arguments.output_json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
