"""decd-convert: IRRA-family and OpenAI-layout CLIP checkpoints -> DECD folders, against OpenAI's own CLIP code.

The reference is OpenAI's original `clip/model.py` and `clip/simple_tokenizer.py` from the `openai-clip`
package (`make setup` installs it with --no-deps), loaded by file path because the package's __init__
imports torchvision. Its `CLIP` class builds random-weight ViT models offline; the weights are then
perturbed everywhere (LayerNorms, biases, projections) so that a wrong mapping cannot pass.
"""

import hashlib
import importlib.util
import json
import math
import os
import random
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from captions_decd import caption_problem
from decd.convert import ConversionError, convert_checkpoint, main
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import BLOCK_REPOSITORY_MODULES as BLOCKER

REPO = Path(__file__).resolve().parents[1]
SOT, EOT = 49406, 49407
WIDTH, LAYERS, EMBED = 128, 2, 64  # two heads per tower at OpenAI's head width of 64
IRRA_HEADS = {  # IRRA's training heads next to base_model.* (shapes as in IRRA with a 128-wide model)
    "cross_attn.in_proj_weight": (3 * WIDTH, WIDTH), "cross_attn.in_proj_bias": (3 * WIDTH,),
    "cross_attn.out_proj.weight": (WIDTH, WIDTH), "cross_attn.out_proj.bias": (WIDTH,),
    "cross_modal_transformer.resblocks.0.attn.in_proj_weight": (3 * WIDTH, WIDTH),
    "cross_modal_transformer.resblocks.0.ln_1.weight": (WIDTH,),
    "ln_pre_t.weight": (WIDTH,), "ln_pre_t.bias": (WIDTH,), "ln_pre_i.weight": (WIDTH,), "ln_pre_i.bias": (WIDTH,),
    "ln_post.weight": (WIDTH,), "ln_post.bias": (WIDTH,),
    "mlm_head.dense.weight": (WIDTH, WIDTH), "mlm_head.fc.weight": (49408, WIDTH),
    "classifier.weight": (11003, EMBED), "classifier.bias": (11003,),
}


# --------------------------------------------------------------------------------------------------
# The reference: OpenAI's CLIP code
# --------------------------------------------------------------------------------------------------
def _openai_clip_file(name: str):
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("The `openai-clip` package (OpenAI's CLIP code, the reference of these tests) is not installed: "
                    "run `make setup`, or `pip install --no-deps openai-clip ftfy regex`.")
    path = Path(spec.submodule_search_locations[0]) / name
    module_spec = importlib.util.spec_from_file_location(f"openai_clip_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai_model_code():
    return _openai_clip_file("model.py")


@pytest.fixture(scope="module")
def simple_tokenizer():
    return _openai_clip_file("simple_tokenizer.py").SimpleTokenizer()


def _reference_clip(code, grid=None, seed=0, text_heads=None):
    """OpenAI's CLIP ViT (patch 16), 224 x 224 or with a position table of grid[0] * grid[1] + 1 rows, randomised."""
    torch.manual_seed(seed)
    model = code.CLIP(EMBED, 224, LAYERS, WIDTH, 16, 77, 49408, WIDTH, text_heads or WIDTH // 64, LAYERS)
    if grid is not None:  # OpenAI's forward adds the table as is: a non-square grid is just another table
        model.visual.positional_embedding = torch.nn.Parameter(
            torch.randn(grid[0] * grid[1] + 1, WIDTH) * WIDTH**-0.5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # LayerNorms start at 1 / 0, biases at 0: perturb everything so a swapped or missed tensor shows.
            parameter.add_(torch.randn_like(parameter) * (0.05 if parameter.dim() < 2 else parameter.std() * 0.5))
    return model.eval()


def _openai_tokenize(tokenizer, texts, context=77):
    """clip.tokenize(texts, truncate=True), without importing clip/clip.py (it needs torchvision)."""
    result = torch.zeros(len(texts), context, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [SOT] + tokenizer.encode(text) + [EOT]
        if len(tokens) > context:
            tokens = tokens[:context]
            tokens[-1] = EOT
        result[row, : len(tokens)] = torch.tensor(tokens)
    return result


def _captions(count=300, seed=0):
    """Varied person descriptions: case, punctuation, numbers, contractions, accents, long ones (truncated)."""
    rng = random.Random(seed)
    words = ("man woman person girl boy wearing wears a an the red blue Black WHITE grey-green dark light jacket "
             "T-shirt shirt jeans trousers skirt dress shoes sneakers backpack bag handbag hat cap glasses long "
             "short hair ponytail carrying holding walking with and of in on his her striped plaid denim "
             "knee-length sleeveless café naïve Über").split()
    extras = [",", ".", "!", "?", ";", ":", "'s", "(", ")", "/", "-", "&", "%", "$", "#", "\"", "...", "--"]
    captions = []
    for index in range(count):
        length = rng.choice([3, 8, 15, 30]) if index % 10 else rng.randint(80, 140)  # every 10th is truncated
        tokens = []
        for _ in range(length):
            roll = rng.random()
            if roll < 0.7:
                word = rng.choice(words)
                word = word.upper() if rng.random() < 0.05 else word.capitalize() if rng.random() < 0.1 else word
                tokens.append(word)
            elif roll < 0.85:
                tokens.append(rng.choice(extras))
            elif roll < 0.95:
                tokens.append(str(rng.choice([rng.randint(0, 9), rng.randint(10, 2024), rng.uniform(0, 100)])))
            else:
                tokens.append("".join(rng.choice(string.ascii_letters + "'") for _ in range(rng.randint(2, 9))))
        separator = rng.choice([" ", " ", "  ", " \t"])
        caption = separator.join(tokens)
        if rng.random() < 0.2:
            caption = caption.replace(" ,", ",").replace(" .", ".") + rng.choice(["", ".", "!!", " "])
        # The processor refuses what is not a caption (`caption_problem`), as every entry point does.
        captions.append(caption if caption_problem(caption) is None else "a person")
    return captions


# --------------------------------------------------------------------------------------------------
# Checkpoints as the field stores them
# --------------------------------------------------------------------------------------------------
def _save_irra(model, path: Path):
    """IRRA's Checkpointer: {"model": state_dict} with the CLIP under base_model.*, fp16, plus its heads."""
    generator = torch.Generator().manual_seed(1)
    state = {"base_model." + key: value.half() for key, value in model.state_dict().items()}
    for key, shape in IRRA_HEADS.items():
        state[key] = torch.randn(shape, generator=generator).half()
    torch.save({"model": state, "epoch": 37}, path)


def _fp16_rounded(model, code, grid):
    """The reference with the weights IRRA's fp16 file holds, cast back to fp32."""
    rounded = _reference_clip(code, grid)
    rounded.load_state_dict({key: value.half().float() for key, value in model.state_dict().items()})
    return rounded


CASES = {  # name: (grid of the position table (None: 224 x 224 square), file format, image size)
    "irra-384x128-fp16": ((24, 8), "irra", (384, 128)),
    "openai-384x128-fp32": ((24, 8), "openai-clip", (384, 128)),
    "irra-224-fp16": (None, "irra", (224, 224)),
    "openai-224-fp32": (None, "openai-clip", (224, 224)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, openai_model_code, simple_tokenizer):
    """Each case converted, then loaded through remote code in a process that cannot import this package."""
    root = tmp_path_factory.mktemp("convert")
    captions = _captions()
    references, reports = {}, {}
    pixels = {}
    for name, (grid, fmt, image_size) in CASES.items():
        model = _reference_clip(openai_model_code, grid, seed=len(references))
        source = root / (f"{name}.pth" if fmt == "irra" else f"{name}.pt")
        if fmt == "irra":
            _save_irra(model, source)
            model = _fp16_rounded(model, openai_model_code, grid)
        else:
            torch.save(model.state_dict(), source)
        reports[name] = convert_checkpoint(source, root / name)
        references[name] = model
        pixels[name] = torch.randn(3, 3, *image_size, generator=torch.Generator().manual_seed(2))
    save_file({name: value.contiguous() for name, value in pixels.items()}, root / "pixels.safetensors")
    (root / "captions.json").write_text(json.dumps(captions))

    body = f"""
    import json
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoProcessor
    pixels = load_file("pixels.safetensors")
    captions = json.load(open("captions.json"))
    ids = {{}}
    features = {{}}
    for name in {list(CASES)!r}:
        model = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        encoding = processor(text=captions, return_tensors="pt")
        with torch.no_grad():
            text = model.get_text_features(encoding["input_ids"], encoding["attention_mask"])
            image = model.get_image_features(pixels[name])
        features[name + ".text"] = getattr(text, "pooler_output", text).contiguous()
        features[name + ".image"] = getattr(image, "pooler_output", image).contiguous()
        features[name + ".input_ids"] = encoding["input_ids"].contiguous()
        features[name + ".attention_mask"] = encoding["attention_mask"].contiguous()
        features[name + ".pixel_values"] = processor(
            images=torch.zeros(3, 50, 20, dtype=torch.uint8), return_tensors="pt")["pixel_values"].contiguous()
    save_file(features, "features.safetensors")
    """
    script = root / "remote.py"
    script.write_text("import os\nREPO = %r\n" % str(REPO) + BLOCKER + textwrap.dedent(body))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf-home"), PYTHONPATH="",
               TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dict(root=root, references=references, reports=reports, pixels=pixels, captions=captions,
                remote=load_file(root / "features.safetensors"))


# --------------------------------------------------------------------------------------------------
# Embeddings and tokens equal OpenAI's
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_embeds_like_openai_clip(converted, simple_tokenizer, name):
    reference = converted["references"][name]
    remote = converted["remote"]
    with torch.no_grad():
        expected_images = reference.encode_image(converted["pixels"][name])
        # OpenAI's own inputs: its tokenizer, zero padding, argmax pooling.
        expected_text = reference.encode_text(_openai_tokenize(simple_tokenizer, converted["captions"]))
    assert expected_images.abs().mean() > 0.1 and expected_text.std(dim=0).mean() > 0.05  # not degenerate
    torch.testing.assert_close(remote[name + ".image"], expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(remote[name + ".text"], expected_text, atol=1e-5, rtol=0)
    # DECD's padding differs (end-of-text + attention mask): the causal mask makes it irrelevant.
    assert (remote[name + ".input_ids"] == EOT).sum() > (remote[name + ".input_ids"].shape[0])


def test_processor_token_ids_equal_openai_simple_tokenizer(converted, simple_tokenizer):
    captions = converted["captions"]
    assert len(captions) >= 300
    expected = _openai_tokenize(simple_tokenizer, captions)
    truncated = 0
    for name in CASES:
        input_ids = converted["remote"][name + ".input_ids"]
        lengths = converted["remote"][name + ".attention_mask"].sum(dim=1)
        assert input_ids.shape[1] == 77
        for row, caption in enumerate(captions):
            n = int(lengths[row])
            reference = expected[row][: int((expected[row] == EOT).nonzero()[0]) + 1]
            assert input_ids[row, :n].tolist() == reference.tolist(), caption
            truncated += n == 77 and name == "irra-384x128-fp16"
    assert truncated >= 25  # the long captions were cut, keeping the end-of-text token last


def test_fp16_source_is_not_the_fp32_model(converted, openai_model_code):
    """The fp16 comparison is meaningful: the rounding changes features by more than the tolerance used."""
    reference = converted["references"]["irra-384x128-fp16"]
    unrounded = _reference_clip(openai_model_code, (24, 8), seed=0)
    with torch.no_grad():
        pixels = converted["pixels"]["irra-384x128-fp16"]
        difference = (unrounded.encode_image(pixels) - reference.encode_image(pixels)).abs().max()
    assert difference > 1e-4


def test_folder_holds_weights_config_processor_code_and_card(converted):
    root = converted["root"]
    for name, (grid, fmt, image_size) in CASES.items():
        folder = root / name
        files = {path.name for path in folder.iterdir()}
        assert {"model.safetensors", "config.json", "configuration_decd.py", "modeling_decd.py",
                "processing_decd.py", "README.md"} <= files
        assert not any(file.endswith((".bin", ".pt", ".pth")) for file in files)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "decd" and config["use_decoder"] is False
        assert tuple(config["image_size"]) == image_size
        assert config["temperature"] == 0.02
        assert config["text_config"]["vocab_size"] == 49409 and config["mask_token_id"] == 49408
        assert config["text_config"]["eos_token_id"] == EOT
        assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "quick_gelu"
        assert DecdProcessor.from_pretrained(folder).image_size == image_size
        assert tuple(converted["remote"][name + ".pixel_values"].shape[-2:]) == image_size

        source = folder.parent / (f"{name}.pth" if fmt == "irra" else f"{name}.pt")
        sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
        card = (folder / "README.md").read_text()
        assert sha256 in card and f"`{source.name}`" in card and f"`{fmt}`" in card
        assert config["temperature"] == 0.02 and config["learnable_temperature"] is False
        assert config["conversion"] == {"source": source.name, "format": fmt, "sha256": sha256,
                                        "dropped": sorted(converted["reports"][name].dropped)}
        with safe_open(folder / "model.safetensors", "pt") as weights:
            assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F32"}
            tokens = weights.get_tensor("text_model.embeddings.token_embedding.weight")
            assert torch.equal(weights.get_tensor("logit_scale"), torch.tensor(math.log(1 / 0.02)))  # not CLIP's
            assert not any(key.startswith(("decoder.", "mcm_head.", "ln_post", "cross", "classifier"))
                           for key in weights.keys())
        # The mask token row is the mean of CLIP's rows; CLIP's rows are the source's own.
        torch.testing.assert_close(tokens[-1], tokens[:-1].mean(dim=0))
        torch.testing.assert_close(tokens[:-1], converted["references"][name].token_embedding.weight.detach())


def test_irra_heads_and_logit_scale_are_dropped_and_reported(converted):
    irra = converted["reports"]["irra-384x128-fp16"]
    expected = {"classifier", "cross_attn", "cross_modal_transformer", "ln_post", "ln_pre_i", "ln_pre_t",
                "mlm_head", "base_model.logit_scale"}
    assert set(irra.dropped) == expected
    assert irra.dropped["cross_attn"] == 4 and irra.dropped_parameters["classifier"] == 11003 * EMBED + 11003
    card = (converted["root"] / "irra-384x128-fp16" / "README.md").read_text()
    for group in expected:
        assert f"| `{group}` |" in card
    assert "24 x 8" in card and "0.02" in card
    openai = converted["reports"]["openai-224-fp32"]
    assert set(openai.dropped) == {"logit_scale"} and openai.format == "openai-clip"
    assert openai.image_size == (224, 224) and openai.sizes["grid"] == (14, 14)


# --------------------------------------------------------------------------------------------------
# The command line and the options
# --------------------------------------------------------------------------------------------------
def test_cli_converts_and_prints_what_it_dropped(converted, tmp_path, capsys):
    source = converted["root"] / "irra-384x128-fp16.pth"
    assert main([str(source), str(tmp_path / "out"), "--format", "irra"]) == 0
    printed = capsys.readouterr().out
    assert "irra" in printed and "grid 24 x 8 (image 384 x 128)" in printed
    assert "dropped:" in printed and "mlm_head (2 tensors" in printed and "classifier (2 tensors" in printed
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(
        converted["root"] / "irra-384x128-fp16" / "model.safetensors").keys()
    # An existing model is not overwritten unless asked.
    assert main([str(source), str(tmp_path / "out")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(source), str(tmp_path / "out"), "--overwrite", "--dtype", "float16", "--temperature", "0.05"]) == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:  # the temperature stays exact in float32
        assert {weights.get_slice(key).get_dtype() for key in weights.keys() if key != "logit_scale"} == {"F16"}
        assert weights.get_slice("logit_scale").get_dtype() == "F32"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["temperature"] == 0.05
    assert DecdModel.from_pretrained(tmp_path / "out").temperature.item() == pytest.approx(0.05, rel=1e-3)


def test_image_size_sets_a_non_square_grid(openai_model_code, tmp_path):
    """16 x 12 patches: 193 rows like IRRA's 24 x 8, so the grid comes from --image_size."""
    reference = _reference_clip(openai_model_code, (16, 12))
    torch.save(reference.state_dict(), tmp_path / "clip.pt")
    report = convert_checkpoint(tmp_path / "clip.pt", tmp_path / "out", image_size=(256, 192))
    assert report.sizes["grid"] == (16, 12)
    model = DecdModel.from_pretrained(tmp_path / "out").eval()
    pixels = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        features = model.get_image_features(pixels)
        torch.testing.assert_close(getattr(features, "pooler_output", features), reference.encode_image(pixels),
                                   atol=1e-5, rtol=0)
    # Read as IRRA's 24 x 8 without the flag (the table alone cannot tell them apart).
    assert convert_checkpoint(tmp_path / "clip.pt", tmp_path / "default").image_size == (384, 128)


def test_head_count_can_be_given(openai_model_code, tmp_path):
    """Heads are not in the tensors: width // 64 by default, --text_heads for another head width."""
    reference = _reference_clip(openai_model_code, text_heads=4)
    torch.save(reference.state_dict(), tmp_path / "clip.pt")
    ids = torch.tensor([[SOT, 320, 1611, 530, 518, 3467, 2766, EOT]])
    with torch.no_grad():
        expected = reference.encode_text(torch.nn.functional.pad(ids, (0, 77 - ids.shape[1])))
    features = {}
    for heads in (None, 4):
        folder = tmp_path / f"heads-{heads}"
        convert_checkpoint(tmp_path / "clip.pt", folder, text_heads=heads)
        with torch.no_grad():
            out = DecdModel.from_pretrained(folder).eval().get_text_features(ids)
        features[heads] = getattr(out, "pooler_output", out)
    torch.testing.assert_close(features[4], expected, atol=1e-5, rtol=0)
    assert (features[None] - expected).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file, one line and a non-zero exit from the command
# --------------------------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.linear(x)


def _bad_checkpoint(kind, openai_model_code, path: Path) -> tuple[Path, str, list]:
    """(file, expected message fragment, extra CLI flags)."""
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(_Tiny()), path)
        return path, "TorchScript archive", []
    if kind == "pickled-module":
        torch.save(_Tiny(), path)
        return path, "torch.save(model.state_dict()", []
    if kind == "unknown-layout":
        torch.save({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, path)
        return path, "unknown layout", []
    if kind == "transformers-layout":
        torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 16, 16)}, path)
        return path, "DecdModel.from_clip", []
    if kind == "resnet":
        torch.manual_seed(0)
        torch.save(openai_model_code.CLIP(32, 64, (1, 1, 1, 1), 32, None, 77, 49408, 64, 1, 1).state_dict(), path)
        return path, "ResNet CLIP", []
    state = _reference_clip(openai_model_code, (24, 8)).state_dict()
    if kind == "truncated":
        torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated", []
    if kind == "wrong-projection":
        state["visual.proj"] = torch.zeros(WIDTH, EMBED + 1)
        message = "visual.proj projects to 65"
    elif kind == "wrong-attention":
        state["transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(2 * WIDTH, WIDTH)
        message = "transformer.resblocks.1.attn.in_proj_weight has shape (256, 128)"
    elif kind == "wrong-mlp":
        state["visual.transformer.resblocks.0.mlp.c_proj.weight"] = torch.zeros(WIDTH, 3 * WIDTH)
        message = "do not fit"
    elif kind == "extra-tensor":
        state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
        message = "visual.transformer.resblocks.0.ls_1.gamma"
    elif kind == "missing-tensor":
        del state["transformer.resblocks.0.ln_2.bias"]
        message = "text_model.encoder.layers.0.layer_norm2.bias"  # named by its DECD name
    elif kind == "ambiguous-grid":
        state["visual.positional_embedding"] = torch.zeros(12 * 8 + 1, WIDTH)
        message = "--image_size"
    elif kind == "wrong-vocabulary":
        state["token_embedding.weight"] = torch.zeros(32000, WIDTH)
        message = "32000 rows"
    elif kind == "irra-flag-on-openai-file":
        torch.save(state, path)
        return path, "not an IRRA-family checkpoint", ["--format", "irra"]
    else:
        raise AssertionError(kind)
    torch.save(state, path)
    return path, message, []


BAD = ["torchscript", "pickled-module", "unknown-layout", "resnet", "transformers-layout", "truncated",
       "wrong-projection", "wrong-attention", "wrong-mlp", "extra-tensor", "missing-tensor", "ambiguous-grid",
       "wrong-vocabulary", "irra-flag-on-openai-file"]


@pytest.mark.filterwarnings("ignore:`torch.jit.s:DeprecationWarning")  # building the TorchScript file
@pytest.mark.parametrize("kind", BAD)
def test_bad_checkpoints_give_clear_errors(kind, openai_model_code, tmp_path, capsys):
    path, message, flags = _bad_checkpoint(kind, openai_model_code, tmp_path / f"{kind}.pt")
    fmt = flags[1] if flags else None
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(path, tmp_path / "out", format=fmt)
    assert isinstance(error.value, ValueError)
    assert str(path) in str(error.value) and message in str(error.value), str(error.value)
    assert main([str(path), str(tmp_path / "out"), *flags]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("decd-convert: error: ")
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "out" / "config.json").exists()


def test_ambiguous_grid_converts_with_image_size(openai_model_code, tmp_path):
    path, _, _ = _bad_checkpoint("ambiguous-grid", openai_model_code, tmp_path / "clip.pt")
    assert convert_checkpoint(path, tmp_path / "out", image_size=(192, 128)).sizes["grid"] == (12, 8)
    with pytest.raises(ConversionError, match="needs 8 x 8 = 64"):
        convert_checkpoint(path, tmp_path / "other", image_size=(128, 128))


def test_safetensors_source_and_console_module(converted, tmp_path):
    """.safetensors and open_clip's wrapped state dict convert like the .pt file.

    `python -m decd.convert` on a truncated file fails in one line."""
    state = torch.load(converted["root"] / "openai-224-fp32.pt", weights_only=True)
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "clip.safetensors")
    convert_checkpoint(tmp_path / "clip.safetensors", tmp_path / "out")
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(
        converted["root"] / "openai-224-fp32" / "model.safetensors").keys()
    for key, value in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(value, load_file(converted["root"] / "openai-224-fp32" / "model.safetensors")[key]), key
    # open_clip's training checkpoints: {"epoch", "state_dict": {"module." + key}}.
    torch.save({"epoch": 3, "state_dict": {"module." + key: value for key, value in state.items()}},
               tmp_path / "open_clip.pt")
    assert convert_checkpoint(tmp_path / "open_clip.pt", tmp_path / "open_clip").format == "openai-clip"
    for key, value in load_file(tmp_path / "open_clip" / "model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "out" / "model.safetensors")[key]), key
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "clip.safetensors").read_bytes()[:5000])
    result = subprocess.run([sys.executable, "-m", "decd.convert", str(tmp_path / "cut.safetensors"),
                             str(tmp_path / "cut")], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "cut.safetensors" in result.stderr and "download it again" in result.stderr


# --------------------------------------------------------------------------------------------------
# Every entry point uses the folder as is
# --------------------------------------------------------------------------------------------------
def test_search_cli_indexes_and_queries_with_a_converted_model(converted, tmp_path, capsys):
    from decd.cli import main as search_main

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for index, color in enumerate([(200, 30, 30), (20, 40, 220), (30, 160, 40)]):
        Image.new("RGB", (64, 160), color).save(gallery / f"{index}.png")
    model = str(converted["root"] / "irra-384x128-fp16")
    assert search_main(["index", str(gallery), "--model", model, "--output", str(tmp_path / "index"),
                        "--quiet", "--device", "cpu"]) == 0
    assert search_main(["query", str(tmp_path / "index"), "a man in a red coat", "--top_k", "3",
                        "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Indexed 3 images" in printed and all(f"{index}.png" in printed for index in range(3))

    # The demo app (python app.py --model FOLDER --gallery INDEX) loads both and ranks the same way.
    sys.path.insert(0, str(REPO))
    import app

    model_, processor = app.load_model(model, device="cpu")
    gallery_ = app.load_gallery(model_, processor, tmp_path / "index", show_progress=False)
    ranked = app.search_gallery(model_, processor, gallery_, "a man in a red coat", top_k=3)
    assert sorted(Path(path).name for path, _ in ranked) == ["0.png", "1.png", "2.png"]
    top = [line.split()[-1] for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [Path(path).name for path, _ in ranked] == [Path(line).name for line in top]


def test_converted_model_fine_tunes_with_train_py(converted, tmp_path):
    from decd.synthetic import generate_synthetic_person_search

    data = generate_synthetic_person_search(tmp_path / "synthetic", num_train_ids=4, num_val_ids=2, num_test_ids=2,
                                            images_per_id=2, progress=False)
    source = converted["root"] / "openai-384x128-fp32"
    output = tmp_path / "run"
    command = [sys.executable, str(REPO / "examples" / "train.py"), "--model_name_or_path", str(source),
               "--dataset_name", "synthetic", "--data_dir", str(data), "--output_dir", str(output),
               "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-4",
               "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
               "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true",
               "--dataloader_num_workers", "0", "--report_to", "none"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    losses = [entry for entry in state["log_history"] if "loss_mcm" in entry]
    assert losses and all(math.isfinite(entry["loss_mcm"]) and math.isfinite(entry["loss_sew"]) for entry in losses)
    trained = load_file(output / "model.safetensors")
    start = load_file(source / "model.safetensors")
    assert trained.keys() == start.keys()  # the inference model again: decoder detached after training
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(trained[key], start[key])  # the converted encoders were fine-tuned
    assert json.loads((output / "config.json").read_text())["image_size"] == [384, 128]


def test_conversion_writes_only_into_a_new_or_empty_folder(converted, tmp_path, capsys):
    source = converted["root"] / "irra-384x128-fp16.pth"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "README.md").write_text("my notes")
    (taken / "tokenizer.json").write_text("{}")
    assert main([str(source), str(taken)]) == 1
    assert "is not empty (README.md, tokenizer.json) and holds no model" in capsys.readouterr().err
    assert main([str(source), str(taken), "--overwrite"]) == 1  # --overwrite replaces a converted model only
    assert (taken / "README.md").read_text() == "my notes" and (taken / "tokenizer.json").read_text() == "{}"
    (tmp_path / "empty").mkdir()
    assert main([str(source), str(tmp_path / "empty")]) == 0
    (tmp_path / "empty" / "mine.txt").write_text("kept")
    assert main([str(source), str(tmp_path / "empty"), "--overwrite"]) == 1
    assert "holds files a conversion does not write (mine.txt)" in capsys.readouterr().err
    assert (tmp_path / "empty" / "mine.txt").read_text() == "kept"
