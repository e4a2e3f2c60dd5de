"""The demo in a real browser: headless Chromium driven through the DevTools protocol (tests/cdp.py).

Types a description, presses Enter, and finds the ranked results in the page, at desktop width and at
phone width (412 px), where every result must lie inside the viewport; drops an unreadable file on the
photo box and finds the loader's message in the status line. Chromium is required (the
Makefile's test target installs Debian's `chromium`): without it this test FAILS, it does not skip.
Set DECD_UPDATE_SCREENSHOT=1 to also write docs/app_screenshot.png.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")

import json  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

gr = pytest.importorskip("gradio")

import app  # noqa: E402
from configuration_decd import DecdConfig  # noqa: E402
from decd.synthetic import generate_synthetic_person_search  # noqa: E402
from modeling_decd import DecdModel  # noqa: E402
from processing_decd import DecdProcessor  # noqa: E402

from .cdp import Browser, find_chromium  # noqa: E402

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
INPUT = "#decd-description input, #decd-description textarea"
ITEMS = "#decd-results .gallery-item"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    DecdModel(DecdConfig.tiny()).save_pretrained(root / "model")
    DecdProcessor(image_size=(128, 64)).save_pretrained(root / "model")
    data = generate_synthetic_person_search(root / "synthetic", num_train_ids=2, num_val_ids=1, num_test_ids=5,
                                            images_per_id=2, progress=False)
    model, processor = app.load_model(root / "model", device="cpu")
    gallery = app.load_gallery(model, processor, data / "imgs" / "test", batch_size=8, show_progress=False)
    demo = app.build_demo(model, processor, gallery, examples=app.gallery_examples(data / "imgs" / "test"))
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    demo.launch(server_name=HOST, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://{HOST}:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (make test installs it)")
    browser = Browser.launch(executable)
    try:
        yield browser
    finally:
        browser.close()


def _search_with_enter(browser, url, width, height, mobile, text="a woman in a red coat"):
    browser.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                 mobile=mobile)
    browser.send("Page.enable")
    browser.send("Page.navigate", url=url)
    browser.wait_for(f"!!document.querySelector({json.dumps(INPUT)})")
    browser.evaluate(f"document.querySelector({json.dumps(INPUT)}).focus()")
    browser.type_text(text)
    browser.press_enter()
    browser.wait_for(f"document.querySelectorAll({json.dumps(ITEMS)}).length >= 10")
    return json.loads(browser.evaluate(
        "JSON.stringify({value: document.querySelector(" + json.dumps(INPUT) + ").value,"
        " status: document.querySelector('#decd-status').innerText, width: window.innerWidth,"
        " pageWidth: document.documentElement.scrollWidth,"
        " items: [...document.querySelectorAll(" + json.dumps(ITEMS) + ")].map(item => {"
        "   const box = item.getBoundingClientRect(), label = item.querySelector('.caption-label');"
        "   return {left: box.left, right: box.right, width: box.width, caption: label ? label.innerText : null,"
        "           cut: label ? label.scrollWidth > label.clientWidth + 1 : true}; })})"))


def _check_ranked(page, text):
    assert "\n" not in page["value"] and page["value"] == text  # Enter searched; it added no line
    assert "10** best" in page["status"] or "10 best of 10" in page["status"]
    captions = [item["caption"] for item in page["items"]]
    assert [caption.split(" · ")[0] for caption in captions] == [f"#{rank}" for rank in range(1, 11)]
    scores = [float(caption.split(" · ")[1]) for caption in captions]
    assert scores == sorted(scores, reverse=True)
    assert all(" of 10 · " in caption for caption in captions)


def test_enter_searches_on_desktop(browser, url, tmp_path):
    page = _search_with_enter(browser, url, 1280, 900, False)
    _check_ranked(page, "a woman in a red coat")
    assert len({round(item["left"]) for item in page["items"]}) >= 4  # several columns on a wide screen
    shot = tmp_path / "app.png"
    browser.screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("DECD_UPDATE_SCREENSHOT"):
        (REPO / "docs" / "app_screenshot.png").write_bytes(shot.read_bytes())


def test_phone_width_every_result_visible(browser, url):
    page = _search_with_enter(browser, url, 412, 915, True, text="a man with a backpack")
    _check_ranked(page, "a man with a backpack")
    assert page["width"] == 412 and page["pageWidth"] <= 412  # no sideways scrolling
    for item in page["items"]:
        assert item["left"] >= 0 and item["right"] <= 412 and item["width"] > 100, item
        assert not item["cut"], item  # the whole caption is readable


def test_unreadable_photo_is_named_in_the_status_line(browser, url, tmp_path):
    broken = tmp_path / "broken-photo.png"
    broken.write_bytes(b"not an image")
    _search_with_enter(browser, url, 1280, 900, False)  # results on the page, which an error leaves in place
    file_input = "#decd-photo input[type=file]"
    browser.wait_for(f"!!document.querySelector({json.dumps(file_input)})")
    root = browser.send("DOM.getDocument")["root"]["nodeId"]
    node = browser.send("DOM.querySelector", nodeId=root, selector=file_input)["nodeId"]
    browser.send("DOM.setFileInputFiles", files=[str(broken)], nodeId=node)
    browser.wait_for("document.querySelector('#decd-status').innerText.includes('not a readable image')")
    status = browser.evaluate("document.querySelector('#decd-status').innerText")
    assert status.startswith("⚠️") and "broken-photo.png" in status, status
    assert browser.evaluate(f"document.querySelectorAll({json.dumps(ITEMS)}).length") == 10
