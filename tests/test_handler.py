"""The Inference Endpoints handler (handler.py): limits checked before anything is decoded, and its optional
gallery (`gallery=` / DECD_GALLERY, opened once by `open_gallery`) searched by captions alone."""

import base64
import io
import struct
import sys
import zlib

import pytest
from PIL import Image

from decd.search import GalleryIndex, StaleIndexError, describe_match

from .helpers import save_tiny_model
from .milvus_fixtures import milvus_gallery, read_metadata_rows  # noqa: F401
from .search_fixtures import _build, five_images  # noqa: F401

QUERY = "a man in a red shirt"


def _png_base64(size=(48, 96)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_handler_refuses_requests_over_its_limits(setup, monkeypatch):
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]), max_images=2, max_texts=3,
                                                max_image_bytes=2000, max_text_chars=50)
    decoded = []
    monkeypatch.setattr(endpoint.processor, "load_image", lambda *a, **k: decoded.append(1))
    image = _png_base64()
    cases = [
        (dict(text="a man", image=[image] * 3), r"inputs.image has 3 items, more than the limit of 2 .*max_images"),
        (dict(text=["a man"] * 4, image=image), r"inputs.text has 4 items, more than the limit of 3 .*max_texts"),
        (dict(text="a man", image=[image, "A" * 4000]), r"inputs.image\[1\] is about 3,000 bytes.*max_image_bytes"),
        (dict(text=["a man", "x" * 51], image=image), r"inputs.text\[1\] has 51 characters.*max_text_chars"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            endpoint({"inputs": inputs})
        assert "\n" not in str(error.value)
    assert decoded == []  # refused before any image was decoded
    with pytest.raises(ValueError, match="max_images must be a positive integer or None"):
        checkout_handler.EndpointHandler(str(setup["model_dir"]), max_images=0)


def test_handler_defaults_accept_a_normal_request_and_refuse_a_huge_body(setup):
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    assert (endpoint.max_images, endpoint.max_texts) == (checkout_handler.MAX_IMAGES, checkout_handler.MAX_TEXTS)
    ranked = endpoint({"inputs": {"text": ["a man", "a woman"], "image": _png_base64()},
                       "parameters": {"mode": "image-to-text"}})
    assert len(ranked) == 2
    with pytest.raises(ValueError, match="max_images"):
        endpoint({"inputs": {"text": "a man", "image": [_png_base64()] * (checkout_handler.MAX_IMAGES + 1)}})
    with pytest.raises(ValueError, match="max_image_bytes"):
        endpoint({"inputs": {"text": "a man", "image": "A" * (checkout_handler.MAX_IMAGE_BYTES // 3 * 4 + 8)}})


# ---------------------------------------------------------------------------------------------
# Gallery search
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def index_dir(setup, tmp_path):
    return _build(setup, tmp_path / "index").path


def test_handler_gallery_mode_ranks_the_gallery_for_captions(setup, index_dir, monkeypatch):
    import handler as checkout_handler

    monkeypatch.delenv("DECD_GALLERY", raising=False)
    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]), gallery=str(index_dir))
    index = GalleryIndex.load(index_dir)
    expected = index.search_text(setup["model"], setup["processor"], [QUERY, "a woman"], top_k=3)
    matches = endpoint({"inputs": {"text": QUERY}, "parameters": {"top_k": 3}})
    assert [match["path"] for match in matches] == expected.paths[0]
    assert [match["index"] for match in matches] == expected.indices[0].tolist()
    assert matches[0] == dict(index=matches[0]["index"], path=matches[0]["path"],
                              **describe_match(1, matches[0]["score"], len(index)))
    assert matches[0]["score"] == pytest.approx(expected.scores[0, 0].item(), abs=1e-5)
    both = endpoint({"inputs": {"text": [QUERY, "a woman"]}})  # a list per caption; top_k: 10, clamped to 5
    assert len(both) == 2 and all(len(row) == len(index) for row in both)
    assert [[match["path"] for match in row[:3]] for row in both] == expected.paths
    with pytest.raises(ValueError, match="needs images"):
        endpoint({"inputs": {"text": QUERY}, "parameters": {"mode": "image-to-text"}})
    # Captions and images together: today's scoring of the request's own images, gallery or not.
    request = {"inputs": {"text": ["a man", "a woman"], "image": _png_base64()},
               "parameters": {"mode": "image-to-text"}}
    plain = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    assert endpoint(request) == plain(request)


def test_handler_gallery_defaults_to_decd_gallery_and_is_optional(setup, index_dir, monkeypatch):
    import handler as checkout_handler

    monkeypatch.delenv("DECD_GALLERY", raising=False)
    plain = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    assert plain.gallery is None
    with pytest.raises(ValueError, match=r"inputs lacks \['image'\]"):
        plain({"inputs": {"text": QUERY}})
    monkeypatch.setenv("DECD_GALLERY", str(setup["gallery"]))  # a folder of images: encoded at start-up
    from_env = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    assert sorted(from_env.gallery.paths) == [f"{number}.png" for number in range(5)]
    assert {match["path"] for match in from_env({"inputs": {"text": QUERY}})} == set(from_env.gallery.paths)


def test_handler_gallery_errors_are_one_line_at_start_up(setup, index_dir, tmp_path, monkeypatch):
    import handler as checkout_handler

    other = save_tiny_model(tmp_path / "other-model", seed=1)
    with pytest.raises(StaleIndexError, match="rebuild the index"):
        checkout_handler.EndpointHandler(str(other), gallery=str(index_dir))
    monkeypatch.setitem(sys.modules, "decd.search", None)  # `import decd.search` fails, as without the package
    with pytest.raises(ImportError, match="needs the decd package: pip install decd") as error:
        checkout_handler.EndpointHandler(str(setup["model_dir"]), gallery=str(index_dir))
    assert "\n" not in str(error.value)


def _png_header_base64(width: int, height: int) -> str:
    """A PNG whose header declares width x height over a few bytes of data (refused before it would be decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def test_handler_refuses_a_request_over_its_pixel_budget_before_decoding(setup, monkeypatch):
    """64 images of 100 megapixels, each within every per-image limit, are refused together by the default budget,
    read from their headers; a budget set on the handler counts the same way and a request within it is answered."""
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    assert endpoint.max_request_pixels == checkout_handler.MAX_REQUEST_PIXELS
    decoded = []
    monkeypatch.setattr(endpoint.processor, "load_image", lambda *a, **k: decoded.append(1))
    at_the_limit = _png_header_base64(10_000, 10_000)  # the processor's max_image_pixels, not over it
    with pytest.raises(ValueError) as error:
        endpoint({"inputs": {"text": "a man", "image": [at_the_limit] * checkout_handler.MAX_IMAGES}})
    assert str(error.value) == (
        f"inputs.image holds 6,400,000,000 pixels in its 64 images, more than the limit of "
        f"{checkout_handler.MAX_REQUEST_PIXELS:,} per request (max_request_pixels): send fewer or smaller images, "
        "or split the request.")
    over_pil = _png_header_base64(20_000, 10_000)  # beyond PIL's own limit: counted as the least it can hold
    with pytest.raises(ValueError, match=r"^inputs.image holds at least 357,913,942 pixels in its 2 images"):
        endpoint({"inputs": {"text": "a man", "image": [over_pil] * 2}})
    assert decoded == []  # refused from the headers alone

    crop = _png_base64((48, 96))
    budget = checkout_handler.EndpointHandler(str(setup["model_dir"]), max_request_pixels=2 * 48 * 96)
    with pytest.raises(ValueError, match=r"holds 13,824 pixels in its 3 images, more than the limit of 9,216 "):
        budget({"inputs": {"text": "a man", "image": [crop] * 3}})
    assert len(budget({"inputs": {"text": "a man", "image": [crop] * 2}})) == 2
    assert len(checkout_handler.EndpointHandler(str(setup["model_dir"]), max_request_pixels=None)(
        {"inputs": {"text": "a man", "image": [crop] * 3}})) == 3
    with pytest.raises(ValueError, match="max_request_pixels must be a positive integer or None, got 0"):
        checkout_handler.EndpointHandler(str(setup["model_dir"]), max_request_pixels=0)


def test_handler_names_the_bad_image(setup):
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    broken = io.BytesIO()
    Image.new("RGB", (48, 96), "red").save(broken, format="JPEG")
    truncated = base64.b64encode(broken.getvalue()[:-200]).decode()
    with pytest.raises(ValueError, match=r"inputs\.image\[1\]: (not a readable image|the image data cannot)"):
        endpoint({"inputs": {"text": QUERY, "image": [_png_base64(), truncated]}})


def test_handler_searches_a_milvus_gallery_named_by_decd_gallery_with_a_filter(milvus_gallery, tmp_path, monkeypatch):
    import handler as checkout_handler

    from decd.search import MilvusGallery

    model, processor, local = milvus_gallery["model"], milvus_gallery["processor"], milvus_gallery["index"]
    store = f"{tmp_path / 'gallery.db'}/crops"
    MilvusGallery.build(model, processor, milvus_gallery["gallery"], store, show_progress=False,
                        metadata=milvus_gallery["metadata"], model_id=str(milvus_gallery["model_dir"]))
    monkeypatch.setenv("DECD_GALLERY", store)
    endpoint = checkout_handler.EndpointHandler(str(milvus_gallery["model_dir"]))
    expected = local.search_text(model, processor, [QUERY, "a woman"], top_k=12)
    matches = endpoint({"inputs": {"text": QUERY}, "parameters": {"top_k": 3}})
    assert [match["path"] for match in matches] == expected.paths[0][:3]
    assert matches[0]["score"] == pytest.approx(expected.scores[0, 0].item(), abs=1e-5)
    cameras = {path: row["camera"] for path, row in read_metadata_rows(milvus_gallery["metadata"]).items()}
    both = endpoint({"inputs": {"text": [QUERY, "a woman"]}, "parameters": {"filter": 'camera == "c3"'}})
    for row, found in enumerate(both):  # only the matching images, none padded
        assert [match["path"] for match in found] == [path for path in expected.paths[row] if cameras[path] == "c3"]
        assert found[-1]["top_percent"] == 100.0  # of the images the filter lets through
        assert found[0]["label"].endswith(f"of {sum(camera == 'c3' for camera in cameras.values())}")
    with pytest.raises(ValueError, match=r"camra.*camera \(str\)") as rejected:
        endpoint({"inputs": {"text": QUERY}, "parameters": {"filter": "camra == 1"}})
    assert "\n" not in str(rejected.value)
    with pytest.raises(ValueError, match="parameters.filter must be a string"):
        endpoint({"inputs": {"text": QUERY, "image": _png_base64()}, "parameters": {"filter": 'camera == "c3"'}})


def test_handler_refuses_wrong_types_and_unknown_keys_and_reads_base64_with_line_breaks(setup):
    import handler as checkout_handler

    endpoint = checkout_handler.EndpointHandler(str(setup["model_dir"]))
    image = _png_base64()
    good = {"inputs": {"text": QUERY, "image": image}}
    for request, message in [
        ({**good, "parameters": {"top_k": True}}, r"parameters\.top_k must be a positive integer, got True \(bool\)"),
        ({**good, "parameters": {"top_k": "3"}}, r"parameters\.top_k must be a positive integer, got '3' \(str\)"),
        ({**good, "paramters": {"top_k": 1}}, r"the request has unknown key\(s\) 'paramters'; the accepted ones are "
                                             r"'inputs', 'parameters'"),
        ({**good, "parameters": {"topk": 1}}, r"parameters has unknown key\(s\) 'topk'; the accepted ones are 'mode'"),
        ({"inputs": {"text": QUERY, "images": [image]}}, r"inputs has unknown key\(s\) 'images'"),
        ({**good, "parameters": 0}, r'"parameters" must be a JSON object.*got 0'),
        ({"inputs": {"text": [QUERY, 7], "image": image}}, r"inputs\.text\[1\] is a int"),
    ]:
        with pytest.raises(ValueError, match=message):
            endpoint(request)
    wrapped = base64.encodebytes(base64.b64decode(image)).decode()  # 76-character lines, as GNU base64 writes
    assert "\n" in wrapped
    answer = endpoint({"inputs": {"text": QUERY, "image": [wrapped, image + "\n"]}})
    assert answer[0]["score"] == pytest.approx(answer[1]["score"])
