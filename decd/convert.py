"""Convert published CLIP ViT checkpoints (IRRA family, OpenAI / open_clip layout) into DECD model folders.

    decd-convert SOURCE OUTPUT_DIR [--format irra|openai-clip] [--image_size H W] [--dtype float32]
                 [--temperature 0.02] [--vision_heads N] [--text_heads N] [--overwrite]

Both formats hold a CLIP ViT dual encoder in OpenAI's parameter layout (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, ...):

- ``irra``: a ``torch.save``d dict whose ``"model"`` entry is IRRA's state dict; the encoders sit under
  ``base_model.``, and IRRA's training heads (``cross_attn``, ``cross_modal_transformer``, ``ln_pre_t``,
  ``ln_pre_i``, ``ln_post``, ``mlm_head``, ``classifier``, ...) are dropped (DECD's inference model has no
  use for them; ``examples/train.py`` builds DECD's own decoder and heads afresh).
- ``openai-clip``: the same keys without a prefix (OpenAI's or open_clip's state dict), as ``.pt`` /
  ``.pth`` / ``.bin`` (``torch.save``) or ``.safetensors``.

Files are read with ``torch.load(weights_only=True)`` (or safetensors): TorchScript archives (OpenAI's
released ``.pt`` JIT files) and pickled modules are refused, never unpickled. Sizes are read off the tensors
as OpenAI's ``build_model`` does (heads = width // 64 unless given); the vision position table keeps its
grid (a non-square grid needs ``--image_size`` unless it has 24 x 8 + 1 rows, IRRA's 384 x 128 crops); the
vocabulary gains DECD's mask token (the mean embedding row). Every mapped tensor is loaded into
``DecdModel`` with strict key accounting: no encoder parameter may be missing and no source tensor may go
unused unless it is reported as dropped.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from configuration_decd import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE

FORMATS = ("irra", "openai-clip")
IRRA_PREFIX = "base_model."
# IRRA's method temperature (not stored in its checkpoints) and DECD's default.
DEFAULT_TEMPERATURE = 0.02
IRRA_GRID = (24, 8)  # IRRA's 384 x 128 crops with patch 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Not parameters of the model: OpenAI's JIT state dicts carry the first three, open_clip's older
# checkpoints the causal mask buffer; CLIP's own logit scale is replaced by DECD's temperature.
_BUFFER_KEYS = ("input_resolution", "context_length", "vocab_size")
_LAYER_PARTS = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Top-level (not per-layer) tensors of both towers, renamed as they are.
_TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",  # the mask row is added later
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# The projections, [width, dim] applied as `x @ proj`: transposed into nn.Linear weights.
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_LAYER_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and what to do."""


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@dataclass
class ConversionReport:
    """What `convert_checkpoint` did: where the weights came from and what was left behind."""

    source: str
    output_dir: str
    format: str
    sha256: str
    image_size: tuple[int, int]
    dtype: str
    source_dtypes: list[str]
    temperature: float
    sizes: dict
    dropped: dict[str, int] = field(default_factory=dict)  # group -> number of tensors
    dropped_parameters: dict[str, int] = field(default_factory=dict)  # group -> number of values
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        sizes = self.sizes
        lines = [
            f"Converted {self.source} ({self.format}, sha256 {self.sha256[:16]}...) to {self.output_dir}",
            f"  vision: width {sizes['vision_width']}, {sizes['vision_layers']} layers, "
            f"{_plural(sizes['vision_heads'], 'head')}, patch {sizes['patch_size']}, "
            f"grid {sizes['grid'][0]} x {sizes['grid'][1]} (image {self.image_size[0]} x {self.image_size[1]})",
            f"  text: width {sizes['text_width']}, {sizes['text_layers']} layers, "
            f"{_plural(sizes['text_heads'], 'head')}, context {sizes['context_length']}, "
            f"vocabulary {sizes['vocab_size']} + 1 mask token; projection {sizes['projection_dim']}",
            f"  weights: {', '.join(self.source_dtypes)} -> {self.dtype}; temperature {self.temperature}",
        ]
        if self.dropped:
            parts = [f"{name} ({_plural(count, 'tensor')}, {_plural(self.dropped_parameters[name], 'value')})"
                     for name, count in self.dropped.items()]
            lines.append("  dropped: " + "; ".join(parts))
        else:
            lines.append("  dropped: nothing")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------
_REPICKLE = ("load it with the code that wrote it and save its weights alone: "
             "torch.save(model.state_dict(), 'weights.pt') (OpenAI's JIT files: "
             "clip.load(name, jit=False)[0].state_dict()), then convert that file.")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    # torch.jit.save writes code/ and constants.pkl next to data.pkl; torch.save never does.
    return any(name.split("/", 1)[-1] == "constants.pkl" or name.startswith("code/") or "/code/" in name
               for name in names)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint without unpickling code: safetensors, or ``torch.load(weights_only=True)``.

    Raises ConversionError for a missing, truncated or corrupt file, a TorchScript archive or a pickle
    that needs code (an ``nn.Module``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty: download or copy the checkpoint again.")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated: download it again."
            ) from None
    if _is_torchscript(path):
        raise ConversionError(
            f"{path} is a TorchScript archive (e.g. OpenAI's released JIT .pt file): reading it would run its "
            f"code, so it is refused. Instead, {_REPICKLE}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by cause
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in str(error):
            raise ConversionError(
                f"{path} holds pickled objects that need code to load (a pickled nn.Module or custom class), "
                f"so it is refused. Instead, {_REPICKLE}"
            ) from None
        raise ConversionError(
            f"{path} could not be read as a PyTorch checkpoint ({type(error).__name__}: {message}); it may be "
            "truncated or corrupt: download or copy it again."
        ) from None


def _tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _strip(state: dict, prefix: str) -> dict:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def find_state_dict(checkpoint, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: itself, or its ``"model"`` / ``"state_dict"`` entry."""
    if _tensor_dict(checkpoint):
        return _strip(checkpoint, "module.")
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            value = checkpoint.get(key)
            if isinstance(value, dict):
                tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return _strip(tensors, "module.")
        keys = ", ".join(repr(k) for k in list(checkpoint)[:8])
        raise ConversionError(
            f"{path} is a dict without a state dict of tensors (top-level keys: {keys}); expected IRRA's "
            "{'model': state_dict} or an OpenAI-layout CLIP state dict."
        )
    raise ConversionError(
        f"{path} holds a {type(checkpoint).__name__}, not a state dict; expected IRRA's {{'model': state_dict}} "
        "or an OpenAI-layout CLIP state dict."
    )


def detect_format(state: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    """'irra' when the encoders sit under ``base_model.``, 'openai-clip' when they are at the top level."""
    if f"{IRRA_PREFIX}visual.conv1.weight" in state:
        return "irra"
    if "visual.conv1.weight" in state:
        return "openai-clip"
    keys = sorted(state)
    hint = ""
    if any(key.startswith(("vision_model.", "text_model.")) for key in keys):
        hint = (" It looks like a transformers CLIP checkpoint: use DecdModel.from_clip(folder) or "
                "`examples/train.py --model_name_or_path FOLDER` instead.")
    elif any(".visual.conv1.weight" in key for key in keys):
        prefix = next(key for key in keys if key.endswith(".visual.conv1.weight"))[: -len("visual.conv1.weight")]
        hint = f" Its CLIP keys sit under {prefix!r}, which neither format uses."
    raise ConversionError(
        f"{path}: unknown layout, no CLIP ViT patch embedding ('visual.conv1.weight' or "
        f"'{IRRA_PREFIX}visual.conv1.weight') among its {len(keys)} tensors (first keys: "
        f"{', '.join(keys[:5])}).{hint} Expected an IRRA-family checkpoint or an OpenAI-layout CLIP ViT state dict."
    )


# --------------------------------------------------------------------------------------------------
# OpenAI layout -> DECD
# --------------------------------------------------------------------------------------------------
def _split_encoder_state(state: dict, fmt: str, path) -> tuple[dict, dict]:
    """(encoder tensors in OpenAI layout, dropped tensors)."""
    if fmt == "irra":
        encoder = {key[len(IRRA_PREFIX):]: value for key, value in state.items() if key.startswith(IRRA_PREFIX)}
        dropped = {key: value for key, value in state.items() if not key.startswith(IRRA_PREFIX)}
        if "visual.conv1.weight" not in encoder:
            raise ConversionError(
                f"{path} has no '{IRRA_PREFIX}visual.conv1.weight': it is not an IRRA-family checkpoint "
                "(try --format openai-clip, or leave --format out to detect it)."
            )
    else:
        if "visual.conv1.weight" not in state:
            raise ConversionError(
                f"{path} has no 'visual.conv1.weight' at the top level: it is not an OpenAI-layout CLIP state dict"
                + (" (its keys start with 'base_model.': use --format irra)." if any(
                    k.startswith(IRRA_PREFIX) for k in state) else ".")
            )
        encoder, dropped = dict(state), {}
    for key in list(encoder):
        name = key.rsplit(".", 1)[-1]
        if key in _BUFFER_KEYS or name == "attn_mask" or key == "logit_scale":
            dropped[(IRRA_PREFIX if fmt == "irra" else "") + key] = encoder.pop(key)
    return encoder, dropped


def _group(key: str) -> str:
    """Report group of a dropped key: its first module name (the model prefix kept)."""
    if key.startswith(IRRA_PREFIX):
        return IRRA_PREFIX + key[len(IRRA_PREFIX):].split(".")[0]
    return key.split(".")[0]


def _count_layers(encoder: dict, prefix: str) -> int:
    indices = sorted({int(m.group(2)) for key in encoder if (m := _LAYER_KEY.match(key))
                      and (m.group(1) or "") == prefix})
    if indices != list(range(len(indices))):
        raise ValueError(f"the {prefix or 'text '}transformer layers are not numbered 0..N-1 (found {indices})")
    return len(indices)


def infer_sizes(encoder: dict, image_size: Optional[Sequence[int]], vision_heads: Optional[int],
                text_heads: Optional[int], path) -> dict:
    """Sizes of both towers from the tensors (as OpenAI's ``build_model``) and the crop size."""

    def need(key):
        if key not in encoder:
            if key.startswith("visual.layer") or "visual.layer1.0.conv1.weight" in encoder:
                raise ConversionError(f"{path} is a ResNet CLIP; DECD converts ViT CLIP checkpoints only.")
            raise ConversionError(f"{path} lacks {key!r}: it is not a complete OpenAI-layout CLIP ViT.")
        return encoder[key]

    if "visual.proj" not in encoder and "visual.layer1.0.conv1.weight" in encoder:
        raise ConversionError(f"{path} is a ResNet CLIP (visual.layer1...); DECD converts ViT CLIP checkpoints only.")
    conv = need("visual.conv1.weight")
    if conv.dim() != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise ConversionError(
            f"{path}: visual.conv1.weight has shape {tuple(conv.shape)}; expected [width, 3, patch, patch]."
        )
    vision_width, patch = conv.shape[0], conv.shape[-1]
    text_width = need("ln_final.weight").shape[0]
    try:
        vision_layers = _count_layers(encoder, "visual.")
        text_layers = _count_layers(encoder, "")
    except ValueError as error:
        raise ConversionError(f"{path}: {error}.") from None
    if not vision_layers or not text_layers:
        raise ConversionError(f"{path} has no {'vision' if not vision_layers else 'text'} transformer layers.")
    projection, text_projection = need("visual.proj"), need("text_projection")
    for key, value, width_ in (("visual.proj", projection, vision_width),
                               ("text_projection", text_projection, text_width)):
        if value.dim() != 2 or value.shape[0] != width_:
            raise ConversionError(f"{path}: {key} has shape {tuple(value.shape)}; expected [{width_}, dim].")
    if projection.shape[1] != text_projection.shape[1]:
        raise ConversionError(
            f"{path}: visual.proj projects to {projection.shape[1]} dimensions but text_projection to "
            f"{text_projection.shape[1]}; both towers must share one embedding space."
        )
    tokens = need("token_embedding.weight")
    context = need("positional_embedding").shape[0]
    if tokens.shape[0] != CLIP_VOCAB_SIZE:
        raise ConversionError(
            f"{path}: the token embedding has {tokens.shape[0]} rows, not CLIP's {CLIP_VOCAB_SIZE}; DECD's processor "
            "uses CLIP's BPE vocabulary, so this text encoder cannot be converted."
        )
    if context != CLIP_CONTEXT_LENGTH:
        raise ConversionError(
            f"{path}: the text position table has {context} rows; DECD's processor uses CLIP's context of "
            f"{CLIP_CONTEXT_LENGTH} tokens."
        )
    positions = need("visual.positional_embedding").shape[0] - 1
    if image_size is not None:
        height, width = (int(side) for side in image_size)
        if height % patch or width % patch:
            raise ConversionError(f"--image_size {height} {width} is not divisible by the patch size {patch}.")
        grid = (height // patch, width // patch)
        if grid[0] * grid[1] != positions:
            raise ConversionError(
                f"{path}: the vision position table has {positions} patch rows but --image_size {height} {width} "
                f"with patch {patch} needs {grid[0]} x {grid[1]} = {grid[0] * grid[1]}."
            )
    elif positions == IRRA_GRID[0] * IRRA_GRID[1]:
        grid = IRRA_GRID
    elif round(math.sqrt(positions)) ** 2 == positions:
        side = round(math.sqrt(positions))
        grid = (side, side)
    else:
        raise ConversionError(
            f"{path}: the vision position table has {positions} patch rows, which is no square grid and not "
            f"IRRA's {IRRA_GRID[0]} x {IRRA_GRID[1]}; the grid cannot be read off the table alone: pass "
            "--image_size HEIGHT WIDTH (the crop size the model was trained on)."
        )
    vision_heads = vision_heads or vision_width // 64
    text_heads = text_heads or text_width // 64
    for name, width_, heads in (("vision", vision_width, vision_heads), ("text", text_width, text_heads)):
        if heads < 1 or width_ % heads:
            raise ConversionError(
                f"{path}: {name} width {width_} is not divisible into {heads} heads; pass --{name}_heads.")
    return dict(
        vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads, patch_size=patch,
        vision_intermediate=need("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        grid=grid, image_size=(grid[0] * patch, grid[1] * patch),
        text_width=text_width, text_layers=text_layers, text_heads=text_heads,
        text_intermediate=need("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        context_length=context, vocab_size=tokens.shape[0], projection_dim=projection.shape[1],
    )


def map_openai_to_decd(encoder: dict, path="checkpoint") -> dict[str, torch.Tensor]:
    """OpenAI-layout CLIP ViT tensors -> DECD (transformers CLIP) names; every key must be mapped.

    The packed attention projection ``in_proj_weight`` [3 * width, width] splits into q, k, v (in that
    order, as ``nn.MultiheadAttention`` packs them); ``visual.proj`` and ``text_projection`` ([width, dim],
    applied as ``x @ proj``) become the transposed ``nn.Linear`` weights. The token embedding is returned as is
    (the mask-token row is added by the caller).
    """
    mapped, unused = {}, []
    for key, value in encoder.items():
        if key in _TOP_LEVEL:
            mapped[_TOP_LEVEL[key]] = value
        elif key in _PROJECTIONS:
            mapped[_PROJECTIONS[key]] = value.t()
        elif match := _LAYER_KEY.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{match.group(2)}."
            part = match.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                width = value.shape[-1] if value.dim() == 2 else value.shape[0] // 3
                if value.shape[0] != 3 * width or (value.dim() == 2 and value.shape[1] != width):
                    raise ConversionError(
                        f"{path}: {key} has shape {tuple(value.shape)}; expected q, k, v packed as "
                        f"[3 * width{', width' if value.dim() == 2 else ''}]."
                    )
                suffix = "weight" if part.endswith("weight") else "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    mapped[f"{base}self_attn.{name}.{suffix}"] = chunk
            elif part in _LAYER_PARTS:
                mapped[base + _LAYER_PARTS[part]] = value
            else:
                unused.append(key)
        else:
            unused.append(key)
    if unused:
        raise ConversionError(
            f"{path} has {len(unused)} encoder tensor(s) that OpenAI's CLIP ViT does not have "
            f"({', '.join(sorted(unused)[:6])}{', ...' if len(unused) > 6 else ''}): this is another architecture "
            "(e.g. an open_clip variant with extra layers), which DECD cannot hold without changing its forward."
        )
    return mapped


def _decd_config(sizes: dict, temperature: float):
    from configuration_decd import DecdConfig

    clip_tokens = dict(vocab_size=sizes["vocab_size"] + 1, max_position_embeddings=sizes["context_length"],
                       bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1,
                       pad_token_id=CLIP_VOCAB_SIZE - 1)
    text_config = dict(clip_tokens, hidden_size=sizes["text_width"], intermediate_size=sizes["text_intermediate"],
                       num_hidden_layers=sizes["text_layers"], num_attention_heads=sizes["text_heads"],
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)
    vision_config = dict(hidden_size=sizes["vision_width"], intermediate_size=sizes["vision_intermediate"],
                         num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_heads"],
                         patch_size=sizes["patch_size"], hidden_act="quick_gelu", layer_norm_eps=1e-5)
    # The decoder exists only for further training (examples/train.py builds it afresh): sized to the text tower.
    return DecdConfig(
        text_config=text_config, vision_config=vision_config, image_size=sizes["image_size"],
        projection_dim=sizes["projection_dim"], temperature=temperature, use_decoder=False,
        mask_token_id=CLIP_VOCAB_SIZE, decoder_hidden_size=sizes["text_width"],
        decoder_intermediate_size=4 * sizes["text_width"], decoder_attention_heads=sizes["text_heads"],
    )


def _build_model(config, state: dict[str, torch.Tensor], path):
    """DecdModel holding exactly `state` (strict: nothing missing, nothing unexpected), built without random init."""
    from modeling_decd import DecdModel

    with torch.device("meta"):
        model = DecdModel(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ConversionError(f"{path}: the mapped weights do not fit DECD's model: {detail[:600]}") from None
    # Non-persistent buffers (position ids) are not in any state dict: rebuild them on the CPU.
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if name != "position_ids":
                    raise ConversionError(f"internal error: buffer {name} of {type(module).__name__} was not set")
                module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(1, -1), persistent=False)
    leftover = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if leftover:
        raise ConversionError(f"{path}: DECD parameters without a source tensor: {leftover[:5]}")
    return model.eval()


# What a conversion writes into its folder: a model, its processor, the custom code and the card.
_CONVERSION_FILES = re.compile(r"config\.json|model\.safetensors|(processor_config|preprocessor_config|tokenizer|"
                               r"tokenizer_config|special_tokens_map|vocab)\.json|merges\.txt|README\.md|\w+_decd\.py")


def _check_output_folder(output: Path, overwrite: bool) -> None:
    """A conversion writes into a new or empty folder only, or with `overwrite` over an earlier conversion's own
    files (deleted first); anything else is refused naming what is there, before the checkpoint is read."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a folder.")
    entries = sorted(entry.name for entry in output.iterdir()) if output.is_dir() else []
    if not entries:
        return
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    if not (output / "config.json").is_file():
        raise ConversionError(f"{output} is not empty ({shown}) and holds no model: decd-convert writes into a new "
                              "or empty folder only; choose one.")
    if not overwrite:
        raise ConversionError(f"{output} already holds a model (config.json): pass --overwrite or another folder.")
    foreign = [name for name in entries if not _CONVERSION_FILES.fullmatch(name)]
    if foreign:
        raise ConversionError(f"{output} holds files a conversion does not write ({', '.join(foreign[:8])}): "
                              "--overwrite replaces a converted model only; choose a new or empty folder.")
    for name in entries:
        (output / name).unlink()


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    format: Optional[str] = None,
    image_size: Optional[Sequence[int]] = None,
    dtype: str = "float32",
    temperature: Optional[float] = None,
    vision_heads: Optional[int] = None,
    text_heads: Optional[int] = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert an IRRA-family or OpenAI-layout CLIP ViT checkpoint into a DECD model folder.

    Args:
        source: the checkpoint file (``torch.save`` output or ``.safetensors``).
        output_dir: folder to write: ``model.safetensors``, ``config.json``, the processor files, the custom
            code and a model card (``README.md``) recording the source, its sha256 and what was dropped.
        format: ``"irra"`` or ``"openai-clip"``; detected when None.
        image_size: (height, width) of the crops; needed only when the position table's grid is neither square
            nor IRRA's 24 x 8.
        dtype: dtype of the saved weights (``float32``, ``float16`` or ``bfloat16``); default float32.
        temperature: ``config.temperature``; default 0.02 (IRRA's and DECD's; not stored in IRRA's files).
        vision_heads, text_heads: attention heads; default width // 64 as OpenAI's ``build_model``.
        overwrite: replace a model an earlier conversion wrote in ``output_dir`` (a folder holding nothing else).
            Otherwise only a new or empty folder is written to.

    Returns:
        ConversionReport (``.summary()`` is what the command prints).

    Raises:
        ConversionError (a ValueError) naming the file and what to do.
    """
    from processing_decd import DecdProcessor

    path = Path(source)
    if format is not None and format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    if not temperature > 0:
        raise ConversionError(f"--temperature must be positive, got {temperature}.")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    output = Path(output_dir)
    _check_output_folder(output, overwrite)

    checkpoint = load_checkpoint(path)
    state = find_state_dict(checkpoint, path)
    detected = detect_format(state, path) if format is None else format
    encoder, dropped = _split_encoder_state(state, detected, path)
    sizes = infer_sizes(encoder, image_size, vision_heads, text_heads, path)
    target = DTYPES[dtype]
    source_dtypes = sorted({str(value.dtype).replace("torch.", "") for value in encoder.values()})

    mapped = map_openai_to_decd(encoder, path)
    token_key = "text_model.embeddings.token_embedding.weight"
    tokens = mapped[token_key].float()
    mapped[token_key] = torch.cat([tokens, tokens.mean(dim=0, keepdim=True)], dim=0)
    # Own, contiguous storage per tensor (the q/k/v chunks and transposes are views of the source).
    state_out = {key: value.to(dtype=target, copy=True).contiguous() for key, value in mapped.items()}
    del mapped, tokens, encoder, state, checkpoint

    # DECD's temperature, as DecdModel keeps it: log(1 / temperature) in float32 (CLIP's own was dropped above).
    state_out["logit_scale"] = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
    config = _decd_config(sizes, temperature)
    model = _build_model(config, state_out, path)

    from .hub.card import build_model_card
    from .search.format import file_sha256

    report = ConversionReport(
        source=str(path), output_dir=str(output), format=detected, sha256=file_sha256(path),
        image_size=tuple(sizes["image_size"]), dtype=dtype, source_dtypes=source_dtypes, temperature=temperature,
        sizes=sizes,
    )
    groups = Counter(_group(key) for key in dropped)
    report.dropped = dict(sorted(groups.items()))
    report.dropped_parameters = {
        name: sum(value.numel() for key, value in dropped.items() if _group(key) == name) for name in report.dropped
    }
    if image_size is None and sizes["grid"] == IRRA_GRID:
        report.notes.append(
            f"The position table has {IRRA_GRID[0]} x {IRRA_GRID[1]} + 1 rows, read as IRRA's grid of "
            f"{IRRA_GRID[0]} x {IRRA_GRID[1]} patches (height x width); pass --image_size if it was trained otherwise.")
    if vision_heads is None or text_heads is None:
        report.notes.append("Attention heads are width // 64, as OpenAI's build_model infers them (the tensors do "
                            "not record them); pass --vision_heads / --text_heads for other head widths.")
    model.config.conversion = {
        "source": path.name, "format": detected, "sha256": report.sha256,
        "dropped": sorted(report.dropped),
    }

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    DecdProcessor(image_size=sizes["image_size"]).save_pretrained(output)
    card = build_model_card(output.name, results=None, widget_images=[], conversion=dict(
        source=path.name, format=detected, sha256=report.sha256, source_dtypes=source_dtypes, dtype=dtype,
        temperature=temperature, sizes=sizes, image_size=report.image_size, notes=report.notes,
        dropped=report.dropped, dropped_parameters=report.dropped_parameters))
    (output / "README.md").write_text(str(card), encoding="utf-8")
    return report


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decd-convert",
        description="Convert an IRRA-family or OpenAI-layout CLIP ViT checkpoint into a DECD model folder.",
    )
    parser.add_argument("source", metavar="SOURCE",
                        help="checkpoint file (IRRA best.pth, CLIP state dict, .safetensors)")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="DECD model folder to write")
    parser.add_argument("--format", choices=FORMATS, default=None, help="source layout (default: detected)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                        help="crop size; needed when the position grid is neither square nor 24 x 8 (384 128)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype of the saved weights (default: float32)")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"DECD temperature (default: {DEFAULT_TEMPERATURE}, IRRA's)")
    parser.add_argument("--vision_heads", type=int, default=None, help="default: vision width // 64")
    parser.add_argument("--text_heads", type=int, default=None, help="default: text width // 64")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUTPUT_DIR")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `decd-convert`: 0 on success, 1 with one line on stderr for a checkpoint it cannot convert."""
    arguments = _build_parser().parse_args(argv)
    from transformers.utils import logging as transformers_logging

    progress_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # the summary below says what was written
    try:
        report = convert_checkpoint(
            arguments.source, arguments.output_dir, format=arguments.format, image_size=arguments.image_size,
            dtype=arguments.dtype, temperature=arguments.temperature, vision_heads=arguments.vision_heads,
            text_heads=arguments.text_heads, overwrite=arguments.overwrite,
        )
    except ConversionError as error:
        print(f"decd-convert: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    finally:
        if progress_bars:
            transformers_logging.enable_progress_bar()
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
