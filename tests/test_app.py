"""The Gradio demo (app.py): launched on 127.0.0.1 and queried through its API with gradio_client.

Gradio is an optional extra, so the whole module is skipped without gradio / gradio_client. Nothing here
reaches the internet: Gradio's analytics and version check are switched off through the environment,
the client is built with analytics off, and a guard records every non-loopback connection attempt.
"""

import os

# Before Gradio is imported or any Blocks is built: no analytics, no version check (both are gated on
# GRADIO_ANALYTICS_ENABLED), no huggingface_hub telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")

import re  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import app  # noqa: E402
from configuration_decd import DecdConfig  # noqa: E402
from decd.search import GalleryIndex  # noqa: E402
from decd.synthetic import generate_synthetic_person_search  # noqa: E402
from modeling_decd import DecdModel  # noqa: E402
from processing_decd import DecdProcessor  # noqa: E402

from .milvus_fixtures import milvus_gallery, read_metadata_rows  # noqa: E402,F401

HOST = "127.0.0.1"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DESCRIPTION = "A woman in a red coat and black trousers carrying a white bag."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_decd")
    torch.manual_seed(0)
    DecdModel(DecdConfig.tiny()).save_pretrained(folder)
    DecdProcessor(image_size=(128, 64)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_person_search(root, num_train_ids=2, num_val_ids=1, num_test_ids=2, images_per_id=2,
                                     progress=False)
    return root / "imgs"


@pytest.fixture(scope="module")
def loaded(model_dir, gallery_dir):
    model, processor = app.load_model(model_dir, device="cpu")
    gallery = app.load_gallery(model, processor, gallery_dir, batch_size=4, show_progress=False)
    return model, processor, gallery


@pytest.fixture(scope="module")
def server(loaded):
    """The demo on 127.0.0.1 with a free port, and a client for it; closed at the end."""
    model, processor, gallery = loaded
    demo = app.build_demo(model, processor, gallery)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    demo.launch(server_name=HOST, server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    try:
        client = gradio_client.Client(f"http://{HOST}:{port}/", verbose=False, analytics_enabled=False,
                                      download_files=False)
        yield demo, client
    finally:
        demo.close()


@pytest.fixture
def outbound(monkeypatch):
    """Addresses of every attempted non-loopback connection or DNS look-up while the test runs."""
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test_app: outbound connection to {address} refused")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            attempts.append(host)
            raise socket.gaierror(f"test_app: look-up of {host!r} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def direct_ranking(model, processor, paths, description):
    """(file names, scores) of the whole gallery, best first, by cosine similarity computed here."""
    with torch.no_grad():
        text = processor(text=[description], return_tensors="pt")
        query = F.normalize(model.get_text_features(input_ids=text["input_ids"],
                                                    attention_mask=text["attention_mask"]).pooler_output, dim=-1)
        images = [Image.open(path).convert("RGB") for path in paths]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        keys = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    scores = (query @ keys.T)[0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [Path(paths[i]).name for i in order], [float(scores[i]) for i in order]


def _parse(item):
    """(image file name, rank, score, caption file name) of one gallery item returned by the API."""
    image = item["image"]
    location = image.get("path") or image.get("url") if isinstance(image, dict) else image
    rank, score, share, name = item["caption"].split(" · ")
    assert share.startswith("top ") and share.endswith(" of 10")
    return Path(str(location)).name, int(rank.removeprefix("#")), float(score), name


def test_gallery_is_every_image(loaded, gallery_dir):
    _, _, gallery = loaded
    expected = sorted(path.name for path in gallery_dir.rglob("*.png"))
    assert sorted(path.name for path in gallery.paths) == expected
    assert len(gallery) == 10 and tuple(gallery.embeddings.shape) == (10, 128)
    assert gallery.image_roots == [gallery_dir.resolve()]


def test_result_images_are_served_in_place_from_the_apps_image_route(server, loaded, outbound):
    import urllib.request

    _, client = server
    _, _, gallery = loaded
    results = client.predict(DESCRIPTION, 10, api_name="/search")
    urls = [item["image"]["url"] for item in results]
    assert all(url.startswith(f"{client.src.rstrip('/')}/images/") for url in urls)  # the app's route, no cache copy
    by_name = {path.name: path for path in gallery.paths}
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == by_name[Path(url).name].read_bytes()
    assert not any(gr.utils.is_static_file(path) for path in gallery.paths)  # nothing registered with Gradio
    assert outbound == []


@pytest.mark.parametrize("top_k", [3, 10])
def test_search_through_api_matches_direct_cosine_ranking(server, loaded, outbound, top_k):
    _, client = server
    model, processor, gallery = loaded
    results = client.predict(DESCRIPTION, top_k, api_name="/search")
    assert len(results) == top_k
    parsed = [_parse(item) for item in results]
    names, scores = direct_ranking(model, processor, gallery.paths, DESCRIPTION)
    assert [rank for _, rank, _, _ in parsed] == list(range(1, top_k + 1))
    assert [name for _, _, _, name in parsed] == names[:top_k]
    # the image served for each result is that gallery file (Gradio keeps the file name in its cache)
    assert [image for image, _, _, _ in parsed] == names[:top_k]
    assert [score for _, _, score, _ in parsed] == pytest.approx(scores[:top_k], abs=1e-3)
    assert all(a >= b for a, b in zip(scores, scores[1:]))
    assert outbound == []


def test_empty_description_is_an_error_message(server, outbound):
    _, client = server
    for empty in ("", "   "):
        with pytest.raises(Exception, match="Describe the person"):
            client.predict(empty, 5, api_name="/search")
    assert outbound == []


def test_search_handler_and_top_k_clamped(server, loaded):
    demo, _ = server
    _, _, gallery = loaded
    assert len(demo.search_fn(DESCRIPTION, 1000)) == len(gallery)
    with pytest.raises(gr.Error):
        demo.search_fn("", 3)


def test_index_folder_gives_the_same_results(loaded, gallery_dir, tmp_path):
    model, processor, gallery = loaded
    index_dir = tmp_path / "index"
    GalleryIndex.build(model, processor, gallery_dir, index_dir, batch_size=5, show_progress=False)
    from_index = app.load_gallery(model, processor, index_dir)
    assert from_index.source.startswith("index")
    assert (app.search_gallery(model, processor, from_index, DESCRIPTION, 4)
            == app.search_gallery(model, processor, gallery, DESCRIPTION, 4))


def test_missing_gallery_is_a_startup_message(model_dir, tmp_path, capsys):
    assert app.main(["--model", str(model_dir), "--gallery", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and "DECD_GALLERY" in error and "Traceback" not in error
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(app.AppConfigError, match="no images"):
        app.load_gallery(None, None, empty)


# ------------------------------------------------------------------------------------------------
# Search by photo, the UI's handlers, examples, Space defaults
# ------------------------------------------------------------------------------------------------


def direct_image_ranking(model, processor, paths, query_path):
    """(file names, scores) of the gallery by image-image cosine similarity to `query_path`, computed here."""
    with torch.no_grad():
        images = [Image.open(path).convert("RGB") for path in paths]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        keys = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        query_pixels = processor(images=[Image.open(query_path).convert("RGB")], return_tensors="pt")["pixel_values"]
        query = F.normalize(model.get_image_features(pixel_values=query_pixels).pooler_output, dim=-1)
    scores = (query @ keys.T)[0]
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [Path(paths[i]).name for i in order], [float(scores[i]) for i in order]


def test_search_by_photo_through_api_ranks_by_image_similarity(server, loaded, outbound):
    _, client = server
    model, processor, gallery = loaded
    query = gallery.paths[3]
    results = client.predict(gradio_client.handle_file(str(query)), 4, api_name="/search_image")
    parsed = [_parse(item) for item in results]
    names, scores = direct_image_ranking(model, processor, gallery.paths, query)
    assert [name for _, _, _, name in parsed] == names[:4]
    assert parsed[0][3] == query.name  # a gallery image finds itself first (cosine 1)
    assert [score for _, _, score, _ in parsed] == pytest.approx(scores[:4], abs=1e-3)
    assert parsed[0][2] == pytest.approx(1.0, abs=1e-3)
    assert outbound == []


def test_unreadable_or_oversized_photo_is_named_through_the_api(server, tmp_path):
    # Gradio's own image decoding answers these with a bare "Error"; the photo events hand the upload to
    # load_image, whose message names the file and the problem, as the CLI's does.
    _, client = server
    broken = tmp_path / "broken-photo.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"broken-photo\.png: not a readable image"):
        client.predict(gradio_client.handle_file(str(broken)), 3, api_name="/search_image")
    huge = tmp_path / "huge-photo.png"
    Image.new("1", (12_000, 9_000)).save(huge)  # 108 megapixels in a small file
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r"huge-photo\.png has 12000x9000 = 108,000,000 pixels, more than"):
        client.predict(gradio_client.handle_file(str(huge)), 3, api_name="/search_image")
    demo, _ = server
    ui = {fn.name: fn for fn in demo.fns.values()}
    assert all(not ui[name].preprocess for name in ("ui_image", "ui_rerun", "search_image"))


def test_ui_errors_are_a_status_line_and_keep_the_results(server, loaded, tmp_path):
    demo, _ = server
    found, status, mode = demo.ui_search_fn(DESCRIPTION, 3)
    assert len(found) == 3 and mode == "text" and "**3** best of 10 images" in status
    for empty in ("", "   ", None):
        results, status, mode = demo.ui_search_fn(empty, 3)
        assert results == gr.skip() and mode == gr.skip()  # the previous results stay
        assert status.startswith("⚠️") and "Describe the person" in status and "Enter" in status
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    results, status, _ = demo.ui_search_image_fn(str(broken), 3)
    assert results == gr.skip() and status.startswith("⚠️") and "broken" in status
    assert demo.ui_search_image_fn(None, 3) == (gr.skip(), gr.skip(), gr.skip())  # photo cleared


def test_top_k_change_reruns_the_last_search(server, loaded):
    demo, _ = server
    _, _, gallery = loaded
    assert len(demo.ui_rerun_fn("text", DESCRIPTION, None, 4)[0]) == 4
    by_photo = demo.ui_rerun_fn("image", DESCRIPTION, str(gallery.paths[0]), 2)
    assert by_photo[2] == "image" and Path(by_photo[0][0][0]).name == gallery.paths[0].name
    assert demo.ui_rerun_fn("text", "", None, 4) == (gr.skip(), gr.skip(), gr.skip())


def test_page_config_enter_submits_and_layout_reflows(server):
    demo, _ = server
    config = demo.get_config_file()
    by_id = {component.get("props", {}).get("elem_id"): component for component in config["components"]}
    box = by_id["decd-description"]["props"]
    assert box["lines"] == 1 and box["max_lines"] == 1  # Enter submits instead of adding a line
    assert "auto-fill" in (demo.css or "")  # results reflow (css passed at launch)
    targets = {(target[1]) for dependency in config["dependencies"] for target in dependency["targets"]}
    assert {"submit", "click", "upload", "release"} <= targets


def test_examples_match_the_synthetic_gallery(gallery_dir):
    from decd.data import load_person_search

    examples = app.gallery_examples(gallery_dir / "test", count=2)
    captions = load_person_search("synthetic", data_dir=gallery_dir.parent, split="test",
                                  verify_images=False)["queries"]["caption"]
    assert len(examples) == 2 and set(examples) <= set(captions)
    assert app.gallery_examples(gallery_dir) == list(app.EXAMPLE_DESCRIPTIONS)  # a plain folder: generic


def test_space_defaults_model_from_config_and_synthetic_gallery(model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / app.SPACE_CONFIG_FILE).write_text('{"model": "%s", "gallery": "crops"}' % model_dir)
    config = app.space_config(tmp_path)
    assert config == {"model": str(model_dir), "gallery": str(tmp_path / "crops")}
    monkeypatch.delenv("DECD_MODEL", raising=False)
    monkeypatch.delenv("DECD_GALLERY", raising=False)
    small = tmp_path / "synthetic" / "imgs" / "test"
    monkeypatch.setattr(app, "default_gallery", lambda: small)
    generate_synthetic_person_search(tmp_path / "synthetic", num_train_ids=1, num_val_ids=1, num_test_ids=2,
                                     images_per_id=2, progress=False)
    arguments = app._parse_args(["--model", str(model_dir), "--device", "cpu"])
    assert arguments.gallery is None
    model, processor, gallery, examples = app.prepare(arguments)  # no gallery configured: no exit
    assert len(gallery) == 4 and gallery.image_roots == [small.resolve()]
    assert "synthetic benchmark's test split" in capsys.readouterr().err
    assert examples and examples != list(app.EXAMPLE_DESCRIPTIONS)


# ------------------------------------------------------------------------------------------------
# A Milvus collection as the gallery: the same ranking, and a filter box for its metadata fields
# ------------------------------------------------------------------------------------------------


def test_milvus_gallery_ranks_like_the_index_and_gets_a_filter_box(milvus_gallery, loaded, tmp_path):
    from decd.search import MilvusGallery

    model, processor, local = milvus_gallery["model"], milvus_gallery["processor"], milvus_gallery["index"]
    store = f"{tmp_path / 'gallery.db'}/crops"
    MilvusGallery.build(model, processor, milvus_gallery["gallery"], store, show_progress=False,
                        metadata=milvus_gallery["metadata"], model_id=str(milvus_gallery["model_dir"]))
    gallery = app.load_gallery(model, processor, store)
    assert gallery.source.startswith("Milvus collection 'crops'") and len(gallery) == 12 and gallery.paths == []
    assert gallery.image_roots == [milvus_gallery["gallery"].resolve()]
    expected = local.search_text(model, processor, DESCRIPTION, top_k=12)
    ranked = app.search_gallery(model, processor, gallery, DESCRIPTION, 4)
    assert [image for image, _ in ranked] == [str((milvus_gallery["gallery"] / path).resolve())
                                              for path in expected.paths[0][:4]]
    assert ranked[0][1] == app.caption(1, expected.scores[0, 0].item(), ranked[0][0], 12)
    cameras = {path: row["camera"] for path, row in read_metadata_rows(milvus_gallery["metadata"]).items()}
    demo = app.build_demo(model, processor, gallery)
    assert demo.filter_box is not None and "camera (str)" in demo.filter_box.info
    found, status, mode = demo.ui_search_fn(DESCRIPTION, 10, 'camera == "c3"')
    assert [Path(image).name for image, _ in found] == [Path(path).name for path in expected.paths[0]
                                                        if cameras[path] == "c3"]
    assert "where camera" in status and mode == "text" and "of 12 images" not in status
    in_c3 = sum(camera == "c3" for camera in cameras.values())
    assert found[-1][1].startswith(f"#{in_c3} ") and f"top 100% of {in_c3} · " in found[-1][1]
    _, status, _ = demo.ui_search_fn(DESCRIPTION, 10, "camra == 1")
    assert status.startswith("⚠️") and "camera \\(str\\)" in status  # Milvus's message, the fields, escaped
    assert app.build_demo(*loaded).filter_box is None  # a local gallery has no fields to filter on


# ------------------------------------------------------------------------------------------------
# The app serves the gallery's images and nothing else; one rule for Top-k
# ------------------------------------------------------------------------------------------------
def test_only_the_indexed_images_are_served_and_a_moved_gallery_is_refused(loaded, gallery_dir, tmp_path):
    import shutil

    model, processor, _ = loaded
    home = tmp_path / "home"
    gallery = home / "crops"
    shutil.copytree(gallery_dir, gallery)
    (gallery / "secret.txt").write_text("not an image")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    GalleryIndex.build(model, processor, gallery, home / "gal.index", batch_size=5, show_progress=False)
    opened = app.load_gallery(model, processor, home / "gal.index")
    files = app.build_demo(model, processor, opened).gallery_files  # what the /images/ route serves
    assert [files.file(relative) for relative in opened.index.paths] == [gallery / relative
                                                                         for relative in opened.index.paths]
    for private in ("secret.txt", "../.ssh/id_rsa", "../gal.index/meta.json", str(gallery / "secret.txt"), "."):
        assert files.file(private) is None, private
    shutil.move(str(gallery), str(tmp_path / "moved"))  # the gallery moved: the index's folder is not guessed
    with pytest.raises(app.AppConfigError, match=r"were in .*crops.*which does not exist here: set DECD_IMAGES"):
        app.load_gallery(model, processor, home / "gal.index")
    assert len(app.load_gallery(model, processor, home / "gal.index", images_root=tmp_path / "moved")) == 10


def test_an_index_recording_a_path_outside_its_gallery_is_refused_and_never_served(loaded, gallery_dir, tmp_path):
    """An index from elsewhere whose paths.json names '../secret.txt' (or a file by its absolute path): the app does
    not start on it (one line naming the entry), and a gallery that names such a file anyway (built in memory, not
    read from disk), or an image that became a link out of the folder since, is never served by /images/."""
    import json
    import shutil

    from decd.serve import GalleryFiles

    model, processor, _ = loaded
    home = tmp_path / "home"
    gallery = home / "crops"
    shutil.copytree(gallery_dir, gallery)
    (home / "secret.txt").write_text("PRIVATE")
    (home / "secret.png").write_bytes(next(gallery.rglob("*.png")).read_bytes())
    built = GalleryIndex.build(model, processor, gallery, home / "gal.index", batch_size=5, show_progress=False)
    paths = list(built.paths)
    for recorded in ("../secret.txt", "../secret.png", str(home / "secret.png")):
        tampered = paths[:1] + [recorded] + paths[2:]
        (home / "gal.index" / "paths.json").write_text(json.dumps(tampered))
        with pytest.raises(app.AppConfigError, match=rf"entry 1 \({re.escape(repr(recorded))}\) .*rebuild it") \
                as refused:
            app.load_gallery(model, processor, home / "gal.index")
        assert "\n" not in str(refused.value)
        files = GalleryFiles(GalleryIndex(built.embeddings, tampered, dict(built.meta)), gallery)
        assert files.file(recorded) is None and files.file(paths[0]) == gallery / paths[0], recorded
    (home / "gal.index" / "paths.json").write_text(json.dumps(paths))
    opened = app.load_gallery(model, processor, home / "gal.index")
    files = app.build_demo(model, processor, opened).gallery_files  # what the app's /images/ route serves
    assert files.file(paths[0]) == gallery / paths[0]
    (gallery / paths[0]).unlink()
    os.symlink(home / "secret.png", gallery / paths[0])  # a link out of the folder, made while the app runs
    assert files.file(paths[0]) is None
    with pytest.raises(app.AppConfigError, match=r"leads through a symbolic link to .*secret.png"):
        app.load_gallery(model, processor, home / "gal.index")


def test_top_k_that_is_not_a_positive_whole_number_is_one_clear_message(server):
    demo, client = server
    for bad in (0, -5, 2.5, "abc", float("nan")):
        with pytest.raises(gr.Error, match=r"Top-k must be a positive whole number, got"):
            demo.search_fn(DESCRIPTION, bad)
    for bad in (0, -5):  # through the API: Gradio's own slider check, or ours, in words
        with pytest.raises(Exception, match=r"Top-k must be a positive whole number|less than minimum value 1"):
            client.predict(DESCRIPTION, bad, api_name="/search")
    assert len(demo.search_fn(DESCRIPTION, 2.0)) == 2  # a slider's float is a whole number
