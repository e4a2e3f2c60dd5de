"""Publishing to the Hub, against a loopback stub of the Hub API (tests/hub_stub.py): no network.

Covers `decd.hub.publish` / `build_model_card`, `examples/push_to_hub.py`, loading the pushed repository
with `trust_remote_code=True` in a process that cannot import this package, and `handler.py`.
"""

import base64
import importlib.util
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from PIL import Image
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from decd.hub import CODE_FILES, build_model_card, publish, published_results
from decd.training.recipe import saved_model_type
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import BLOCK_REPOSITORY_MODULES as BLOCKER
from .helpers import tiny_config
from .hub_stub import HubStub

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a woman in a red coat carrying a black backpack", "a man in blue jeans and a white shirt"]
RESULTS = [{
    "dataset_name": "synthetic", "dataset_type": "decd-synthetic", "split": "test",
    "metrics": {"R1": 41.25, "R5": 77.5, "R10": 90.0, "mAP": 38.123456789, "mINP": 12.3456},
    "selected_on": "val",
}]
TRAINING_OUTPUT_METRICS = {"test_R1": 33.3, "test_R5": 66.6, "test_R10": 80.1, "test_mAP": 30.25, "test_mINP": 9.75,
                           "test_selected_on": "val", "train_loss": 1.5}
DECODER_PREFIXES = ("decoder.", "mcm_head.", "identity_classifier.")


def _images():
    return [Image.new("RGB", (40, 90), (200, 30, 30)), Image.new("RGB", (64, 128), (20, 40, 220))]


def _embed(model, processor):
    inputs = processor(text=CAPTIONS, images=_images(), return_tensors="pt")
    with torch.no_grad():
        return (model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
                model.get_image_features(inputs["pixel_values"]).pooler_output)


def _weight_names(repo_files: dict) -> list[str]:
    return list(load_safetensors_bytes(repo_files["model.safetensors"]))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    with HubStub(tmp_path_factory.mktemp("hub-stub")) as stub, stub.patched(home=home):
        yield stub


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """A tiny model published from memory (decoder detached on a copy) to org/decd-tiny."""
    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=3)).eval()
    processor = DecdProcessor(image_size=model.config.image_size)
    url = publish(model, "org/decd-tiny", processor=processor, results=RESULTS)
    return dict(url=url, repo_id="org/decd-tiny", model=model, processor=processor, expected=_embed(model, processor))


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A training output folder: full model (with decoder), processor and all_results.json."""
    folder = tmp_path_factory.mktemp("training-output")
    torch.manual_seed(1)
    model = DecdModel(tiny_config(num_identities=3)).eval()
    model.save_pretrained(folder)
    DecdProcessor(image_size=model.config.image_size).save_pretrained(folder)
    (folder / "all_results.json").write_text(json.dumps(TRAINING_OUTPUT_METRICS))
    return folder


def test_publish_uploads_inference_model_code_processor_handler_and_card_last(hub, published):
    assert published["url"] == f"{hub.url}/org/decd-tiny"
    files = hub.files("org/decd-tiny")
    expected = {"config.json", "model.safetensors", "configuration_decd.py", "modeling_decd.py", "processing_decd.py",
                "processor_config.json", "tokenizer_config.json", "handler.py", "example_person.png", "README.md"}
    assert expected <= set(files), sorted(files)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert files["handler.py"] == (REPO / "handler.py").read_bytes()
    for name in CODE_FILES:  # every module of the custom code, the handler's inference_decd.py included
        assert files[name] == (REPO / name).read_bytes()
    config = json.loads(files["config.json"])
    assert config["use_decoder"] is False
    assert config["auto_map"]["AutoModel"] == "modeling_decd.DecdModel"
    # Detached by default, on a copy: the caller's training model keeps its decoder.
    assert not any(name.startswith(DECODER_PREFIXES) for name in _weight_names(files))
    assert published["model"].decoder is not None and published["model"].config.use_decoder is True
    # The card is pushed last (push_to_hub writes a generic README.md first) and is what README.md holds.
    commits = hub.repo("org/decd-tiny").commits
    assert commits[-1]["changed"] == ["README.md"]
    readme = files["README.md"].decode("utf-8")
    assert "## Published reference numbers (not measured here)" in readme
    assert "## Results measured for this model" in readme
    assert "| `image-text loss` | Sew, reading 'compress' (docs/method.md), strength 0.05" in readme  # which Sew
    assert "This is the model card of a 🤗 transformers model" not in readme
    assert hub.unhandled == []


def test_a_converted_models_card_claims_no_decd_training(hub):
    """Weights converted from another checkpoint (decd-convert) were not trained with DECD's losses: the card keeps
    the settings inference uses and names no image-text loss, MCM or decoder."""
    model = DecdModel(tiny_config()).eval()
    model.config.conversion = {"source": "irra.pth", "format": "irra", "sha256": "0" * 64, "dropped": []}
    publish(model, "org/decd-converted", processor=DecdProcessor(image_size=model.config.image_size))
    readme = hub.files("org/decd-converted")["README.md"].decode("utf-8")
    assert "trained elsewhere, not with DECD's losses" in readme and "| `temperature` | 0.02 |" in readme
    for claim in ("image-text loss", "mask_probability", "loss weights", "decoder`"):
        assert claim not in readme, claim


def test_card_on_the_hub_parses_and_holds_exactly_the_numbers_passed(published):
    card = ModelCard.load(published["repo_id"])  # downloaded from the stub
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "zero-shot-image-classification"
    assert data.license == "apache-2.0" and data.datasets == ["decd-synthetic"]
    assert {"text-based-person-search", "person-retrieval", "clip", "decd"} <= set(data.tags)
    assert data.widget[0]["src"].endswith("/org/decd-tiny/resolve/main/example_person.png")
    assert "candidate_labels" in data.widget[0]
    measured = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert measured == {
        ("decd-synthetic", "test", "recall@1"): 41.25, ("decd-synthetic", "test", "recall@5"): 77.5,
        ("decd-synthetic", "test", "recall@10"): 90.0, ("decd-synthetic", "test", "mAP"): 38.123456789,
        ("decd-synthetic", "test", "mINP"): 12.3456,
    }
    assert {r.task_type for r in data.eval_results} == {"zero-shot-image-classification"}
    assert {r.dataset_args["model_selection_split"] for r in data.eval_results} == {"val"}


def test_model_card_separates_measured_and_published_numbers():
    card = build_model_card("org/m", RESULTS, base_model="openai/clip-vit-base-patch16",
                            training_hyperparameters={"learning_rate": 1e-5, "epochs": 60})
    text = str(card)
    measured, published = text.split("## Published reference numbers (not measured here)")
    assert "| synthetic | test | val | 41.25 | 77.50 | 90.00 | 38.12 | 12.35 |" in measured
    assert "73.81" not in measured  # no published number among the measured ones
    for method in published_results():
        assert f"| {method} |" in published
    assert "| DECD / SCMM paper (R@1 only) | 73.81 | 64.25 | 57.35 |" in published
    assert "| IRRA (CVPR23) | 73.38 / 89.93 / 93.71 / 66.13 / 50.24 |" in published
    assert "| `learning_rate` | 1e-05 |" in text
    assert card.data.base_model == "openai/clip-vit-base-patch16"
    assert 'AutoModel.from_pretrained(repo_id, trust_remote_code=True)' in text
    assert 'pipeline("zero-shot-image-classification", model=repo_id, trust_remote_code=True)' in text
    assert "arXiv:2304.02278" in text and "2304.02278" in text.split("## Citation")[1]
    for topic in ("surveillance", "privacy", "track", "Synthetic-data models are demos only"):
        assert topic.lower() in text.lower()
    with pytest.raises(ValueError, match="lacks 'split'"):
        build_model_card("org/m", [{"dataset_name": "x", "dataset_type": "x", "metrics": {"R1": 1.0}}])
    with pytest.raises(ValueError, match="unknown metrics"):
        build_model_card("org/m", [dict(RESULTS[0], metrics={"accuracy": 1.0})])


def test_push_to_hub_script_reads_results_and_keeps_decoder_on_request(hub, saved_folder):
    spec = importlib.util.spec_from_file_location("push_to_hub_script", REPO / "examples" / "push_to_hub.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    url = script.main([str(saved_folder), "org/decd-with-decoder", "--keep_decoder", "--dataset_name", "synthetic"])
    assert url == f"{hub.url}/org/decd-with-decoder"
    files = hub.files("org/decd-with-decoder")
    names = _weight_names(files)
    assert any(name.startswith("decoder.") for name in names) and any(name.startswith("mcm_head.") for name in names)
    assert json.loads(files["config.json"])["use_decoder"] is True
    card = ModelCard.load("org/decd-with-decoder")
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {"recall@1": 33.3, "recall@5": 66.6, "recall@10": 80.1, "mAP": 30.25, "mINP": 9.75}
    assert "| DECD synthetic person search (generated) | test | val | 33.30 |" in files["README.md"].decode()
    # The folder is untouched and still holds the decoder; without a dataset name the results are refused.
    assert DecdModel.from_pretrained(saved_folder).decoder is not None
    with pytest.raises(ValueError, match="dataset_name"):
        publish(saved_folder, "org/unlabelled")




def _python_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", markdown, flags=re.S))


def test_remote_code_from_the_hub_without_the_package(hub, published, tmp_path):
    snippet = _python_blocks(hub.files("org/decd-tiny")["README.md"].decode("utf-8"))
    body = f"""
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor, pipeline
    repo_id = "org/decd-tiny"
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert model.decoder is None and model.config.use_decoder is False
    images = [Image.new("RGB", (40, 90), (200, 30, 30)), Image.new("RGB", (64, 128), (20, 40, 220))]
    inputs = processor(text={CAPTIONS!r}, images=images, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
        image = model.get_image_features(inputs["pixel_values"]).pooler_output
    classifier = pipeline("zero-shot-image-classification", model=repo_id, trust_remote_code=True)
    ranked = classifier(images[0], candidate_labels={CAPTIONS!r}, hypothesis_template="{{}}")
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5, ranked
    assert sorted(r["label"] for r in ranked) == sorted({CAPTIONS!r})
    save_file({{"text": text, "image": image}}, "remote.safetensors")

    # handler.py as Inference Endpoints run it: from the downloaded repository, with its remote code.
    import base64, importlib.util, io
    from huggingface_hub import snapshot_download
    folder = snapshot_download(repo_id, local_dir="repository")
    spec = importlib.util.spec_from_file_location("endpoint_handler", folder + "/handler.py")
    endpoint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(endpoint)
    handler = endpoint.EndpointHandler(folder)
    assert type(handler.model).__module__.startswith("transformers_modules"), type(handler.model).__module__
    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    answer = handler({{"inputs": {{"text": {CAPTIONS!r}, "image": base64.b64encode(buffer.getvalue()).decode()}},
                      "parameters": {{"mode": "image-to-text"}}}})
    assert [entry["score"] for entry in answer] == sorted((entry["score"] for entry in answer), reverse=True)
    """
    script = tmp_path / "remote.py"
    # The card's usage snippet runs as written (it repeats the loads, then prints cosine scores and a ranking).
    script.write_text("REPO = %r\n" % str(REPO) + BLOCKER + textwrap.dedent(body) + "\n# --- model card snippet\n"
                      + snippet)
    env = hub.environment(tmp_path / "hf-home")
    env.update(PYTHONPATH="", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hub.unhandled == [], hub.unhandled  # every request of the loading client has a route
    remote = load_file(tmp_path / "remote.safetensors")
    text, image = published["expected"]
    assert torch.equal(remote["text"], text)
    assert torch.equal(remote["image"], image)


def _base64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_handler_from_a_downloaded_snapshot(published, tmp_path):
    folder = Path(snapshot_download(published["repo_id"], local_dir=tmp_path / "repository"))
    spec = importlib.util.spec_from_file_location("endpoint_handler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(str(folder))
    # In this process the checkout's classes are registered, so transformers may use them; the
    # subprocess test runs the same handler where only the repository's own code exists.
    assert type(handler.model).__name__ == "DecdModel"

    text, image = published["expected"]
    cosine = torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(image, dim=-1).T
    images = [_base64_png(im) for im in _images()]

    ranked = handler({"inputs": {"text": CAPTIONS[0], "image": images}, "parameters": {"mode": "text-to-image"}})
    assert [entry["index"] for entry in ranked] == sorted(range(2), key=lambda i: -cosine[0, i].item())
    assert abs(sum(entry["probability"] for entry in ranked) - 1) < 1e-5
    for entry in ranked:
        assert abs(entry["score"] - cosine[0, entry["index"]].item()) < 1e-5

    answers = handler({"inputs": {"text": CAPTIONS, "image": ["data:image/png;base64," + images[1], images[0]]},
                       "parameters": {"mode": "image-to-text", "top_k": 1}})
    assert len(answers) == 2 and all(len(answer) == 1 for answer in answers)
    best_for_second_image = answers[0][0]
    assert best_for_second_image["text"] == CAPTIONS[int(cosine[:, 1].argmax())]
    assert abs(best_for_second_image["score"] - cosine[:, 1].max().item()) < 1e-5

    with pytest.raises(ValueError, match=r"lacks \['image'\]"):
        handler({"inputs": {"text": CAPTIONS}})
    with pytest.raises(ValueError, match="not valid base64"):
        handler({"inputs": {"text": CAPTIONS, "image": "not*base64!"}})
    with pytest.raises(ValueError, match="not a readable image"):
        handler({"inputs": {"text": CAPTIONS, "image": base64.b64encode(b"hello").decode()}})
    with pytest.raises(ValueError, match="mode"):
        handler({"inputs": {"text": CAPTIONS, "image": images}, "parameters": {"mode": "text-to-video"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'text'; the accepted ones are 'inputs', 'parameters'"):
        handler({"text": CAPTIONS})


def test_handler_from_a_saved_folder_in_this_checkout(published, tmp_path):
    import handler as checkout_handler

    published["model"].save_pretrained(tmp_path / "saved")
    published["processor"].save_pretrained(tmp_path / "saved")
    endpoint = checkout_handler.EndpointHandler(str(tmp_path / "saved"))
    ranked = endpoint({"inputs": {"text": CAPTIONS, "image": _base64_png(_images()[0])},
                       "parameters": {"mode": "image-to-text"}})
    assert [entry["text"] for entry in ranked] and len(ranked) == 2
    assert ranked[0]["score"] >= ranked[1]["score"]


def test_saved_model_type_tells_decd_folders_from_others(tmp_path):
    DecdModel(tiny_config()).save_pretrained(tmp_path / "decd")
    assert saved_model_type(tmp_path / "decd") == "decd"
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert saved_model_type(tmp_path / "clip") == "clip"
    assert saved_model_type(tmp_path / "missing") is None
    assert saved_model_type("openai/clip-vit-base-patch16") is None  # a Hub id, not a local folder
    for name, text in (("broken", "{not json"), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"{name}.config.json"):
            saved_model_type(tmp_path / name)
