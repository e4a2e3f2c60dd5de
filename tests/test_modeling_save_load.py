"""Save/load round trips: in-package Auto classes, Hub remote code without the package, detached models, pipeline."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    pipeline,
)

from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import BLOCK_REPOSITORY_MODULES as BLOCKER
from .helpers import hub_cache, tiny_config

CAPTIONS = ["a woman in a red coat carrying a black backpack", "a man in blue jeans and a white shirt"]


def _images():
    return [Image.new("RGB", (40, 90), (200, 30, 30)), Image.new("RGB", (64, 128), (20, 40, 220))]


def _save_model(folder: Path, detach=False, seed=0):
    torch.manual_seed(seed)
    model = DecdModel(tiny_config(num_identities=3)).eval()
    processor = DecdProcessor(image_size=model.config.image_size)
    if detach:
        model.detach_decoder()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def _embed(model, processor):
    inputs = processor(text=CAPTIONS, images=_images(), return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
        image = model.get_image_features(inputs["pixel_values"]).pooler_output
    return text, image


def test_saved_folder_has_code_auto_map_and_safetensors(tmp_path):
    _save_model(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "configuration_decd.py", "modeling_decd.py",
            "processing_decd.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    auto_map = json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_decd.DecdConfig",
        "AutoModel": "modeling_decd.DecdModel",
        "AutoModelForZeroShotImageClassification": "modeling_decd.DecdModel",
        "AutoProcessor": "processing_decd.DecdProcessor",
    }


def test_in_package_auto_classes_round_trip(tmp_path):
    model, processor = _save_model(tmp_path / "m")
    expected = _embed(model, processor)
    assert type(AutoConfig.from_pretrained(tmp_path / "m")).__name__ == "DecdConfig"
    for auto_class in (AutoModel, AutoModelForZeroShotImageClassification):
        loaded = auto_class.from_pretrained(tmp_path / "m").eval()
        assert isinstance(loaded, DecdModel)
        loaded_processor = AutoProcessor.from_pretrained(tmp_path / "m")
        assert isinstance(loaded_processor, DecdProcessor)
        for a, b in zip(expected, _embed(loaded, loaded_processor)):
            assert torch.equal(a, b)


def _run_without_package(tmp_path: Path, body: str, cache: Path) -> None:
    script = tmp_path / "remote.py"
    repo = str(Path(__file__).resolve().parents[1])
    script.write_text("import os\nREPO = %r\n" % repo + BLOCKER + textwrap.dedent(body))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH="", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_remote_code_from_hub_cache_without_the_package(tmp_path):
    model, processor = _save_model(tmp_path / "m")
    text, image = _embed(model, processor)
    cache = hub_cache(tmp_path, tmp_path / "m", "org/decd")
    body = f"""
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained("org/decd", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained("org/decd", trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    images = [Image.new("RGB", (40, 90), (200, 30, 30)), Image.new("RGB", (64, 128), (20, 40, 220))]
    inputs = processor(text={CAPTIONS!r}, images=images, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
        image = model.get_image_features(inputs["pixel_values"]).pooler_output
    save_file({{"text": text, "image": image}}, "remote.safetensors")
    """
    _run_without_package(tmp_path, body, cache)
    remote = load_file(tmp_path / "remote.safetensors")
    assert torch.equal(remote["text"], text)
    assert torch.equal(remote["image"], image)


def test_detached_model_saves_without_decoder_and_embeds_identically(tmp_path):
    full, processor = _save_model(tmp_path / "full")
    expected = _embed(full, processor)
    detached = DecdModel.from_pretrained(tmp_path / "full").detach_decoder()
    assert detached.decoder is None and detached.mcm_head is None and detached.identity_classifier is None
    detached.save_pretrained(tmp_path / "detached")
    with safe_open(tmp_path / "detached" / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and not any(k.startswith(("decoder.", "mcm_head.", "identity_classifier.")) for k in keys)
    full_size = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert (tmp_path / "detached" / "model.safetensors").stat().st_size < full_size

    reloaded = AutoModel.from_pretrained(tmp_path / "detached").eval()
    assert reloaded.config.use_decoder is False and reloaded.decoder is None
    for a, b in zip(expected, _embed(reloaded, processor)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decoder was detached"):
        inputs = processor(text=CAPTIONS, images=_images(), return_tensors="pt")
        masked = processor.mask_captions(inputs["input_ids"], inputs["attention_mask"])
        reloaded(**inputs, person_ids=torch.tensor([0, 1]), **masked)


def test_zero_shot_pipeline_ranks_descriptions_and_survives_long_prompts(tmp_path):
    model, processor = _save_model(tmp_path / "m", detach=True)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "m"))
    long_prompt = "a person wearing " + " and ".join(["a red scarf"] * 60)
    labels = CAPTIONS + [long_prompt]
    with pytest.warns(UserWarning, match="context"):
        results = classifier(_images()[0], candidate_labels=labels, hypothesis_template="{}")
    assert sorted(r["label"] for r in results) == sorted(labels)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(scores) - 1) < 1e-5
    # The pipeline's scores are the model's softmax over its logits_per_image.
    inputs = processor(text=labels, images=_images()[:1], return_tensors="pt")
    with torch.no_grad():
        probabilities = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              pixel_values=inputs["pixel_values"]).logits_per_image.softmax(-1)[0]
    by_label = {r["label"]: r["score"] for r in results}
    for label, probability in zip(labels, probabilities.tolist()):
        assert abs(by_label[label] - probability) < 1e-4
