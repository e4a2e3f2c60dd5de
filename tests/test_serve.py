"""`decd-search serve` (decd/serve.py): answers equal to `GalleryIndex.search`, dynamic batching, overload, bad
requests and which files are served. Servers run on 127.0.0.1 with a free port (uvicorn in a thread, or the CLI in a
subprocess) and every request goes to them; each test is bounded in time."""

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from decd.search import GalleryIndex  # noqa: E402
from decd.serve import Overloaded, Query, SearchBatcher, create_app  # noqa: E402
from decd.synthetic import generate_synthetic_person_search  # noqa: E402
from inference_decd import load_model  # noqa: E402

from .helpers import save_tiny_model  # noqa: E402
from .milvus_fixtures import milvus_gallery  # noqa: E402,F401

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
DESCRIPTIONS = ["a man in a red shirt and blue trousers", "a woman with a long black coat and a white bag",
                "a person in white shoes", "a young man in a green top carrying a backpack",
                "a woman in a yellow dress", "a man with a grey jacket and black trousers"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model, a synthetic gallery with a text file and an unreadable image beside its crops, and its index."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(root / "model")
    gallery = generate_synthetic_person_search(root / "synthetic", num_train_ids=2, num_val_ids=1, num_test_ids=3,
                                               images_per_id=2, progress=False) / "imgs"
    (gallery / "secret.txt").write_text("not a gallery image")
    (gallery / "bad.png").write_bytes(b"this is not a png" * 20)
    model, processor = load_model(model_dir, "cpu")
    with pytest.warns(UserWarning, match="unreadable"):
        index = GalleryIndex.build(model, processor, gallery, root / "index", batch_size=4, show_progress=False,
                                   model_id=str(model_dir))
    return dict(root=root, model_dir=model_dir, gallery=gallery, model=model, processor=processor, index=index)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn on 127.0.0.1 in a thread; yields its base URL, stops it at the end."""
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def call(url: str, body=None, raw: bytes | None = None, timeout: float = 30.0):
    """(status, decoded JSON or bytes, headers) of a GET (no body) or a POST of `body` as JSON (or `raw` bytes)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, payload, headers = error.code, error.read(), error.headers
    if headers.get("content-type", "").startswith("application/json"):
        payload = json.loads(payload)
    return status, payload, headers


def png_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def expected(served, query, top_k: int):
    """(paths, scores) of `GalleryIndex.search` for one description or photo, as a library user gets them."""
    index, model, processor = served["index"], served["model"], served["processor"]
    if isinstance(query, Path):
        result = index.search_image(model, processor, [str(query)], top_k=top_k)
    else:
        result = index.search_text(model, processor, [query], top_k=top_k)
    return result.paths[0], result.scores[0].tolist()


def assert_same(answer: dict, paths: list, scores: list) -> None:
    assert [match["path"] for match in answer["results"]] == paths
    assert [match["score"] for match in answer["results"]] == pytest.approx(scores, abs=1e-5)
    assert [match["rank"] for match in answer["results"]] == list(range(1, len(paths) + 1))


def test_answers_equal_gallery_index_search_and_images_are_served(served):
    app = create_app(served["model"], served["processor"], served["index"], source="index")
    with running(app) as base:
        for description, top_k in zip(DESCRIPTIONS[:3], (1, 5, 100)):
            status, answer, _ = call(f"{base}/search", {"text": description, "top_k": top_k})
            assert status == 200 and answer["searched"] == len(served["index"]) == 12
            assert_same(answer, *expected(served, description, top_k))
        photo = served["gallery"] / served["index"].paths[4]
        status, answer, _ = call(f"{base}/search", {"image": png_base64(photo), "top_k": 3})
        assert status == 200
        assert_same(answer, *expected(served, photo, 3))
        assert answer["results"][0]["path"] == served["index"].paths[4]  # a gallery image finds itself first
        status, answer, _ = call(f"{base}/search", {"image": "data:image/png;base64," + png_base64(photo)})
        assert status == 200 and len(answer["results"]) == 10  # a data: URL; top_k's default
        best = answer["results"][0]
        status, data, headers = call(base + best["image_url"])
        assert status == 200 and data == photo.read_bytes() and headers["content-type"] == "image/png"
        status, health, _ = call(f"{base}/health")
        assert status == 200 and health["images"] == 12 and health["status"] == "ok"
        status, schema, _ = call(f"{base}/openapi.json")
        assert status == 200 and {"/search", "/health", "/images/{path}"} <= set(schema["paths"])
        assert call(f"{base}/docs")[0] == 200


def test_concurrent_requests_are_one_forward_pass_and_answer_as_one_at_a_time(served):
    model, processor, index = served["model"], served["processor"], served["index"]
    passes = []
    text_features = model.get_text_features

    def counted(*args, **kwargs):
        passes.append(kwargs["input_ids"].shape[0])
        return text_features(*args, **kwargs)

    queries = [(description, top_k) for top_k in (3, 7) for description in DESCRIPTIONS]  # 12 queries, 2 top_k
    serial = [expected(served, description, top_k) for description, top_k in queries]
    # A long wait makes the batch deterministic: all 12 arrive while the first waits.
    app = create_app(model, processor, index, max_batch=len(queries), max_wait_ms=3000)
    with running(app) as base, ThreadPoolExecutor(len(queries)) as pool:
        model.get_text_features = counted
        try:
            answers = list(pool.map(lambda query: call(f"{base}/search", {"text": query[0], "top_k": query[1]}),
                                    queries))
        finally:
            del model.get_text_features
        assert app.state.batcher.batches == 1 and app.state.batcher.queries == len(queries)
    assert passes == [len(queries)]  # one text forward pass for the whole batch
    for (status, answer, _), (paths, scores) in zip(answers, serial):
        assert status == 200
        assert_same(answer, paths, scores)


def test_batcher_answers_texts_and_photos_of_one_batch_like_the_index(served):
    model, processor, index = served["model"], served["processor"], served["index"]
    photo = processor.load_image(served["gallery"] / index.paths[2])
    batcher = SearchBatcher(model, processor, index, max_batch=8, max_wait_ms=3000)
    try:
        futures = [batcher.submit(Query(text=text, top_k=4)) for text in DESCRIPTIONS[:3]]
        futures.append(batcher.submit(Query(image=photo, top_k=2)))
        results = [future.result(60) for future in futures]
    finally:
        batcher.close()
    assert batcher.batches == 1
    for text, result in zip(DESCRIPTIONS[:3], results):
        alone = index.search_text(model, processor, text, top_k=4)
        assert result.paths == alone.paths and result.searched == alone.searched
        assert torch.allclose(result.scores, alone.scores, atol=1e-5)
    alone = index.search_image(model, processor, [photo], top_k=2)
    assert results[3].paths == alone.paths and torch.allclose(results[3].scores, alone.scores, atol=1e-5)


def test_overload_gets_503_with_retry_after_not_a_hang(served):
    model, processor, index = served["model"], served["processor"], served["index"]
    release, busy = threading.Event(), threading.Event()
    text_features = model.get_text_features

    def held(*args, **kwargs):  # the model is busy until the test lets it go
        busy.set()
        release.wait(60)
        return text_features(*args, **kwargs)

    app = create_app(model, processor, index, max_batch=1, max_wait_ms=0, max_queue=2)
    with running(app) as base, ThreadPoolExecutor(3) as pool:
        model.get_text_features = held
        try:
            first = pool.submit(call, f"{base}/search", {"text": DESCRIPTIONS[0]})
            assert busy.wait(30)
            queued = [pool.submit(call, f"{base}/search", {"text": text}) for text in DESCRIPTIONS[1:3]]
            deadline = time.monotonic() + 30
            while app.state.batcher.waiting < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            started = time.monotonic()
            status, answer, headers = call(f"{base}/search", {"text": DESCRIPTIONS[3]}, timeout=10)
            assert status == 503 and int(headers["Retry-After"]) >= 1 and "queue is full" in answer["detail"]
            assert time.monotonic() - started < 5  # refused at once, not after the queue drains
            with pytest.raises(Overloaded):
                app.state.batcher.submit(Query(text=DESCRIPTIONS[4]))
        finally:
            release.set()
            outcomes = [first.result(60)] + [future.result(60) for future in queued]
            del model.get_text_features
    assert [status for status, _, _ in outcomes] == [200, 200, 200]


def test_bad_requests_get_4xx_naming_the_field(served, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    not_image = base64.b64encode(broken.read_bytes()).decode()
    app = create_app(served["model"], served["processor"], served["index"], max_top_k=20, max_request_bytes=4096)
    cases = [
        ({"text": "a man", "topk": 5}, "topk", r"unknown key 'topk'; the accepted ones are 'text', 'image', 'top_k'"),
        ({"text": 5}, "text", "text"),
        ({"text": "a man", "top_k": "5"}, "top_k", "top_k"),
        ({"text": "a man", "top_k": 0}, "top_k", "top_k must be a positive whole number, got 0"),
        ({"text": "a man", "top_k": 2.5}, "top_k", "top_k must be a positive whole number, got 2.5"),
        ({"text": "a man", "top_k": True}, "top_k", "top_k"),
        ({"text": "a man", "top_k": 21}, "top_k", "top_k must be at most 20, got 21"),
        ({"text": " , . "}, "text", "text is"),
        ({"image": "this is not base64!"}, "image", "image is not valid base64"),
        ({"image": not_image}, "image", "image: not a readable image"),
        ({"text": "a man", "image": not_image}, None, 'either "text"'),
        ({}, None, 'either "text"'),
        ({"text": "a man", "filter": 'camera == "c1"'}, "filter", "needs a gallery in Milvus"),
        (["a man"], None, "must be a JSON object"),
    ]
    with running(app) as base:
        for body, field, message in cases:
            status, answer, _ = call(f"{base}/search", body)
            assert status == 422 and answer["field"] == field, (body, answer)
            assert message in answer["detail"], (body, answer)
            assert not_image not in json.dumps(answer)  # the input is not echoed back
        status, answer, _ = call(f"{base}/search", raw=b'{"text": "a man",')
        assert status == 422 and "must be a JSON object" in answer["detail"]
        status, answer, _ = call(f"{base}/search", {"image": "A" * 5000})
        assert status == 413 and "more than the limit" in answer["detail"]
        assert call(f"{base}/search", {"text": "a man", "top_k": 20.0})[0] == 200  # a whole float is a number


def test_a_file_the_index_does_not_name_is_never_served(served):
    gallery, index = served["gallery"], served["index"]
    app = create_app(served["model"], served["processor"], index)
    named = index.paths[0]
    with running(app) as base:
        assert call(f"{base}/images/{named}")[0] == 200
        for other in ("secret.txt", "bad.png", "../index/meta.json", "%2E%2E/index/meta.json", "test",
                      f"{named}/..", f"./{named}", str(gallery / named), ""):
            status, answer, _ = call(f"{base}/images/{other}")
            assert status == 404, (other, status)
        assert not any(call(f"{base}/images/{path.relative_to(gallery)}")[0] == 200
                       for path in gallery.rglob("*") if path.is_file() and path.relative_to(gallery).as_posix()
                       not in set(index.paths))


def test_cli_serves_on_loopback_and_refuses_bad_options_in_one_line(served, tmp_path):
    port = free_port()
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    bad = subprocess.run([sys.executable, "-m", "decd.cli", "serve", str(served["root"] / "index"), "--model",
                          str(served["model_dir"]), "--max_batch", "0"], capture_output=True, text=True, timeout=120,
                         env=environment)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "decd-search serve: error: --max_batch must be at least 1, got 0"
    missing = subprocess.run([sys.executable, "-m", "decd.cli", "serve", str(tmp_path / "nowhere"), "--model",
                              str(served["model_dir"])], capture_output=True, text=True, timeout=120, env=environment)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "nowhere" in missing.stderr
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "decd.cli", "serve", str(served["root"] / "index"), "--model",
                               str(served["model_dir"]), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env=environment)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not answer /health"
            try:
                if call(f"http://{HOST}:{port}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        status, answer, _ = call(f"http://{HOST}:{port}/search", {"text": DESCRIPTIONS[0], "top_k": 2})
        assert status == 200
        assert_same(answer, *expected(served, DESCRIPTIONS[0], 2))
        listening = {connection.laddr.ip for connection in psutil.Process(server.pid).net_connections()
                     if connection.status == "LISTEN"}
        assert listening == {HOST}  # the default binds this machine only
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_a_milvus_gallery_is_served_with_its_filter_and_only_its_images(milvus_gallery, tmp_path):
    from decd.search import MilvusGallery, open_gallery

    model, processor, folder = milvus_gallery["model"], milvus_gallery["processor"], milvus_gallery["gallery"]
    store = f"{tmp_path / 'gallery.db'}/crops"
    MilvusGallery.build(model, processor, folder, store, show_progress=False, metadata=milvus_gallery["metadata"],
                        model_id=str(milvus_gallery["model_dir"]))
    gallery = open_gallery(model, processor, store)
    (folder / "beside.png").write_bytes(next(folder.rglob("*.png")).read_bytes())  # an image the store does not name
    try:
        with running(create_app(model, processor, gallery)) as base:
            expression = 'camera == "c3"'
            status, answer, _ = call(f"{base}/search", {"text": DESCRIPTIONS[0], "top_k": 12, "filter": expression})
            alone = gallery.search_text(model, processor, DESCRIPTIONS[0], top_k=12, filter=expression)
            assert status == 200 and answer["searched"] == alone.searched < 12
            assert_same(answer, [path for path in alone.paths[0] if path is not None],
                        [score for score, path in zip(alone.scores[0].tolist(), alone.paths[0]) if path is not None])
            status, answer, _ = call(f"{base}/search", {"text": DESCRIPTIONS[0], "filter": "camra == 1"})
            assert status == 400 and answer["field"] == "filter" and "camera (str)" in answer["detail"]
            named = alone.paths[0][0]
            status, data, _ = call(f"{base}/images/{named}")
            assert status == 200 and data == (folder / named).read_bytes()
            for other in ("beside.png", "../" + Path(milvus_gallery["metadata"]).name, 'x" or path != "'):
                assert call(f"{base}/images/{quote(other)}")[0] == 404, other
    finally:
        (folder / "beside.png").unlink()
        gallery.close()


def test_the_load_benchmark_counts_an_answer_equal_only_when_files_and_scores_agree():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import serve_load
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    reference = [("a.png", 0.9), ("b.png", 0.5), ("c.png", 0.50001), ("d.png", 0.1)]
    assert serve_load.same_answer(list(reference), reference, 1e-4)
    assert serve_load.same_answer([("a.png", 0.9), ("c.png", 0.50001), ("b.png", 0.5), ("d.png", 0.1)], reference,
                                  1e-4)  # a tie within the tolerance may swap
    assert not serve_load.same_answer([("b.png", 0.9), ("a.png", 0.5), ("c.png", 0.50001), ("d.png", 0.1)],
                                      reference, 1e-4)  # not a tie
    assert not serve_load.same_answer([("a.png", 0.9), ("b.png", 0.51), ("c.png", 0.50001), ("d.png", 0.1)],
                                      reference, 1e-4)  # a score off
    assert not serve_load.same_answer(reference[:3], reference, 1e-4)
    assert not serve_load.same_answer([("a.png", 0.9), ("b.png", 0.5), ("e.png", 0.50001), ("d.png", 0.1)],
                                      reference, 1e-4)  # another file in a tied place
