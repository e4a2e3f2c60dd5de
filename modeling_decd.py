"""DECD: a CLIP dual encoder for text-based person search, trained with a detachable cross-modal decoder.

Reads bottom-up: vision embeddings on the person-crop grid -> encoders (CLIP's) -> the training-only
cross-modal decoder and heads -> `DecdModel`, whose `forward` encodes and then calls the losses (pure
functions in `losses_decd`). Loading a trained model and embedding with it live in `inference_decd`.

Inference is the dual encoder alone: `get_text_features` / `get_image_features` cost exactly what a
CLIP model of the same dimensions costs. The decoder, the MCM head and the identity classifier exist
only for training and are removed by `DecdModel.detach_decoder()`.

This file travels to the Hugging Face Hub (`trust_remote_code=True`): it imports only torch,
transformers and its sibling modules.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPVisionModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPPreTrainedModel, CLIPVisionEmbeddings
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

try:  # relative imports when loaded as Hub remote code (transformers copies the siblings)
    from .configuration_decd import DecdConfig
    from .losses_decd import (IGNORE_INDEX, batch_vocabulary, batch_vocabulary_fixed, gather_with_grad,
                              identity_loss, masked_caption_loss, masked_positions, sample_mcm_rows, sew_loss)
    from .processing_decd import DecdProcessor
except ImportError:  # installed as top-level modules
    from configuration_decd import DecdConfig
    from losses_decd import (IGNORE_INDEX, batch_vocabulary, batch_vocabulary_fixed, gather_with_grad,
                             identity_loss, masked_caption_loss, masked_positions, sample_mcm_rows, sew_loss)
    from processing_decd import DecdProcessor


# --------------------------------------------------------------------------------------------------
# Vision tower on a (height, width) person-crop grid
# --------------------------------------------------------------------------------------------------
class DecdVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP patch + position embeddings for a non-square grid (e.g. 24 x 8 patches for 384 x 128 crops).

    The position table is stored at the crop grid size (grid + 1 rows, CLS first): resizing from a
    square CLIP checkpoint happens once, in `DecdModel.from_clip`, never per forward pass.
    """

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.image_size = tuple(config.image_size)
        self.grid_size = (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=False
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.position_ids = nn.Buffer(torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape [batch, {self.config.num_channels}, height, width], got "
                f"{tuple(pixel_values.shape)}. Prepare images with DecdProcessor."
            )
        height, width = pixel_values.shape[-2:]
        positions = self.position_embedding(self.position_ids)[0]
        if (height, width) != self.image_size:
            if not interpolate_pos_encoding or height % self.patch_size or width % self.patch_size:
                raise ValueError(
                    f"pixel_values are {height}x{width} (height x width) but this model expects "
                    f"{self.image_size[0]}x{self.image_size[1]}. Use DecdProcessor(image_size={self.image_size}) "
                    "or the processor saved with the model, or pass interpolate_pos_encoding=True with sides "
                    f"divisible by the patch size {self.patch_size}."
                )
            # Bicubic over the stored grid, as `from_clip` resizes once: costs a resize per call.
            positions = resize_position_embedding(positions, (height // self.patch_size, width // self.patch_size),
                                                  self.grid_size)
        batch_size = pixel_values.shape[0]
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        return embeddings + positions[None]


def _initialize_like_library_code(model_class):
    """transformers skips `_init_weights` of parameter-less container modules (e.g. `CLIPAttention`) in code it
    considers custom, unless their parameters are flagged; our `_init_weights` only uses the guarded
    `transformers.initialization` functions, so the library-code path (CLIP's own initialisation) is safe."""

    def _initialize_weights(self, module, is_custom_code: bool = False):
        return PreTrainedModel._initialize_weights(self, module, is_custom_code=False)

    model_class._initialize_weights = _initialize_weights
    return model_class


@_initialize_like_library_code
class DecdVisionModel(CLIPVisionModel):
    """CLIP's vision transformer (same parameter names and forward) on the person-crop grid."""

    _no_split_modules = ["CLIPEncoderLayer", "DecdVisionEmbeddings"]  # CLIP's list names CLIPVisionEmbeddings

    def __init__(self, config):
        CLIPPreTrainedModel.__init__(self, config)
        self.embeddings = DecdVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()


def resize_position_embedding(
    weight: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize a ViT position table [1 + h*w, dim] to [1 + h'*w', dim] (bicubic over the grid, CLS kept).

    `old_grid` (h, w) defaults to a square grid, which is all a table alone can tell.
    """
    class_position, patch_positions = weight[:1], weight[1:]
    if old_grid is None:
        side = int(round(math.sqrt(patch_positions.shape[0])))
        if side * side != patch_positions.shape[0]:
            raise ValueError(f"Expected a square grid of position embeddings, got {patch_positions.shape[0]} rows.")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return weight.clone()
    grid = patch_positions.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patch_positions = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(weight.dtype)
    return torch.cat([class_position, patch_positions], dim=0)


# --------------------------------------------------------------------------------------------------
# Detachable cross-modal decoder (training only)
# --------------------------------------------------------------------------------------------------
class DecdDecoderLayer(nn.Module):
    """Pre-LN layer: self-attention over caption tokens, cross-attention caption -> image tokens, MLP."""

    def __init__(self, config: DecdConfig):
        super().__init__()
        width, heads = config.decoder_hidden_size, config.decoder_attention_heads
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn_layer_norm = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.final_layer_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.decoder_intermediate_size),
            nn.GELU(),
            nn.Linear(config.decoder_intermediate_size, width),
        )

    def forward(self, text_states, image_states, text_padding_mask=None):
        hidden = self.self_attn_layer_norm(text_states)
        hidden, _ = self.self_attn(hidden, hidden, hidden, key_padding_mask=text_padding_mask, need_weights=False)
        text_states = text_states + hidden
        hidden = self.cross_attn_layer_norm(text_states)
        hidden, _ = self.cross_attn(hidden, image_states, image_states, need_weights=False)
        text_states = text_states + hidden
        return text_states + self.mlp(self.final_layer_norm(text_states))


class DecdCrossModalDecoder(nn.Module):
    """Queries: token states of the masked caption; keys/values: all image token states (CLS + patches)."""

    def __init__(self, config: DecdConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.text_input = nn.Linear(config.text_config.hidden_size, width)
        self.image_input = nn.Linear(config.vision_config.hidden_size, width)
        self.image_layer_norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(DecdDecoderLayer(config) for _ in range(config.decoder_layers))
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, text_states, image_states, text_attention_mask=None):
        padding_mask = None if text_attention_mask is None else text_attention_mask == 0
        text_states = self.text_input(text_states)
        image_states = self.image_layer_norm(self.image_input(image_states))
        for layer in self.layers:
            text_states = layer(text_states, image_states, padding_mask)
        return self.final_layer_norm(text_states)


class DecdMaskedCaptionHead(nn.Module):
    """MCM head: Linear -> GELU -> LayerNorm -> Linear(vocabulary)."""

    def __init__(self, config: DecdConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.dense = nn.Linear(width, width)
        self.activation = nn.GELU()
        self.layer_norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, config.text_config.vocab_size)

    def forward(self, hidden_states, candidates=None):
        """Logits over the whole vocabulary, or over the `candidates` token ids only (in their order)."""
        hidden_states = self.layer_norm(self.activation(self.dense(hidden_states)))
        if candidates is None:
            return self.decoder(hidden_states)
        return F.linear(hidden_states, self.decoder.weight[candidates], self.decoder.bias[candidates])


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclass
class DecdOutput(ModelOutput):
    """Output of `DecdModel.forward`.

    loss: weighted total (when `return_loss`); loss_sew / loss_mcm / loss_id: its parts (unweighted).
    logits_per_image: [images, captions] cosine / temperature; logits_per_text: its transpose.
    text_embeds / image_embeds: [batch, projection_dim], L2-normalised.
    text_model_output / vision_model_output: the encoders' outputs (`pooler_output` projected), as in CLIPOutput.
    """

    loss: torch.Tensor | None = None
    loss_sew: torch.Tensor | None = None
    loss_mcm: torch.Tensor | None = None
    loss_id: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


# Keywords DecdModel accepts beyond its named arguments, as transformers' CLIPModel does.
PASSED_THROUGH_KEYWORDS = ("output_attentions", "output_hidden_states")


def _check_keywords(kwargs: dict, method: str) -> None:
    """Refuse keywords the model would otherwise drop silently, suggesting the closest real name."""
    unknown = sorted(set(kwargs) - set(PASSED_THROUGH_KEYWORDS))
    if unknown:
        import difflib
        import inspect

        known = [name for name in inspect.signature(getattr(DecdModel, method)).parameters if name != "self"]
        hints = [f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
                 for name in unknown
                 for close in [difflib.get_close_matches(name, known + list(PASSED_THROUGH_KEYWORDS), n=1)]]
        raise TypeError(f"DecdModel.{method} got unexpected keyword argument(s) {', '.join(hints)}.")


@_initialize_like_library_code
class DecdPreTrainedModel(PreTrainedModel):
    config_class = DecdConfig
    config: DecdConfig
    base_model_prefix = "decd"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "DecdVisionEmbeddings", "DecdDecoderLayer"]
    # Every loss here is a batch mean: the Trainer must scale it for gradient accumulation itself
    # rather than pass `num_items_in_batch` through **kwargs.
    accepts_loss_kwargs = False
    # Checkpoints saved before the temperature lived in the weights hold no `logit_scale` (or a `log_logit_scale`,
    # which their config's temperature states): `_init_weights` fills `logit_scale` from that config.
    _keys_to_ignore_on_load_missing = [r"^logit_scale$"]
    _keys_to_ignore_on_load_unexpected = [r"^log_logit_scale$"]
    # A half-precision load keeps the temperature exact (bfloat16 would turn 0.02 into 0.0201).
    _keep_in_fp32_modules_strict = ["logit_scale"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=std)
            init.zeros_(module.in_proj_bias)
            init.normal_(module.out_proj.weight, mean=0.0, std=std)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DecdModel):
            init.constant_(module.logit_scale, math.log(1.0 / self.config.temperature))
            factor = self.config.initializer_factor
            init.normal_(module.text_projection.weight, std=self.config.text_config.hidden_size**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=self.config.vision_config.hidden_size**-0.5 * factor)


class DecdModel(DecdPreTrainedModel):
    r"""DECD for text-based person search.

    Inference (`get_text_features`, `get_image_features`, `forward` without labels) uses only the two
    CLIP encoders and their projections. Training (`forward` with `person_ids`) adds the Sew loss and,
    when MCM inputs are given, runs the cross-modal decoder for the MCM loss.
    """

    def __init__(self, config: DecdConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = DecdVisionModel._from_config(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        # log(1 / temperature), as CLIP's `logit_scale`: saved with the weights, set from `config.temperature` by
        # `_init_weights` (so also when a checkpoint lacks it).
        logit_scale = torch.empty((), dtype=torch.float32)
        if config.learnable_temperature:
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            self.register_buffer("logit_scale", logit_scale)
        self.decoder = self.mcm_head = self.identity_classifier = None
        if config.use_decoder:
            self.decoder = DecdCrossModalDecoder(config)
            self.mcm_head = DecdMaskedCaptionHead(config)
            if config.num_identities > 0:
                self.identity_classifier = nn.Linear(config.projection_dim, config.num_identities)
        self.post_init()
        # post_init merges the towers' lists, and CLIP's names CLIPVisionEmbeddings, which DECD replaces.
        self._no_split_modules = set(DecdPreTrainedModel._no_split_modules)

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def from_clip(cls, clip_name_or_path: str, **overrides: Any) -> "DecdModel":
        """Build a DECD model from a CLIP checkpoint (Hub name or local folder), e.g. "openai/clip-vit-base-patch16".

        The config comes from the CLIP config (encoder sizes, projection_dim) plus `overrides` (any
        `DecdConfig` field, e.g. `image_size=(384, 128)`, `num_identities=11003`). CLIP's weights go
        into the encoders and projections; the vision position embeddings are resized once to the
        person-crop grid; the token embedding gains one row for the mask token (initialised to the mean
        embedding); the decoder and heads are freshly initialised. Weights are read from safetensors only.
        """
        clip = CLIPModel.from_pretrained(clip_name_or_path, use_safetensors=True)
        clip_config: CLIPConfig = clip.config
        text_config = clip_config.text_config.to_dict()
        clip_vocab_size = text_config["vocab_size"]
        text_config.update(vocab_size=clip_vocab_size + 1)
        # Older CLIP configs carry eos_token_id=2 (pooling by argmax of ids), which would pool the mask
        # token (the highest id): pool at the real end-of-text token instead.
        if text_config.get("eos_token_id") in (None, 2):
            text_config["eos_token_id"] = clip_vocab_size - 1
        vision_config = clip_config.vision_config.to_dict()
        for sub in (text_config, vision_config):
            for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
                sub.pop(key, None)
        settings = dict(
            text_config=text_config,
            vision_config=vision_config,
            projection_dim=clip_config.projection_dim,
            mask_token_id=clip_vocab_size,
        )
        model = cls(DecdConfig(**{**settings, **overrides}))

        state = clip.state_dict()
        state.pop("logit_scale", None)  # CLIP's trained scale: DECD starts from config.temperature instead
        for key in [k for k in state if k.endswith("position_ids")]:
            state.pop(key)
        position_key = "vision_model.embeddings.position_embedding.weight"
        state[position_key] = resize_position_embedding(state[position_key], model.vision_model.embeddings.grid_size)
        token_key = "text_model.embeddings.token_embedding.weight"
        tokens = state[token_key]
        state[token_key] = torch.cat([tokens, tokens.mean(dim=0, keepdim=True)], dim=0)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith(NEW_MODULE_PREFIXES)]
        if missing or unexpected:
            raise ValueError(
                f"{clip_name_or_path} does not match a CLIP model: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        model.config.name_or_path = ""
        model.config.base_model = str(clip_name_or_path)
        return model

    def detach_decoder(self) -> "DecdModel":
        """Drop the decoder, the MCM head and the identity classifier (training-only modules), in place.

        The result is a plain dual encoder: it saves without decoder weights, loads, and embeds exactly
        as before. Returns the model itself.
        """
        self.decoder = self.mcm_head = self.identity_classifier = None
        self.config.use_decoder = False
        return self

    @property
    def temperature(self) -> torch.Tensor:
        """The temperature the model uses, exp(-logit_scale) (a detached scalar); `config.temperature` is its start."""
        return torch.exp(-self.logit_scale.detach())

    # ---- encoders -------------------------------------------------------------------------------
    def _fit_context(self, input_ids, attention_mask):
        """Cut captions longer than CLIP's context, keeping the end-of-text token last (as the processor does)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}.")
        context = self.config.text_config.max_position_embeddings
        if input_ids.shape[1] <= context:
            return input_ids, attention_mask
        warnings.warn(
            f"Captions of {input_ids.shape[1]} tokens exceed the {context}-token context; truncating them "
            "(use DecdProcessor, which truncates, to silence this).",
            stacklevel=3,
        )
        eos = self.config.text_config.eos_token_id
        cut = input_ids[:, :context].clone()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask[:, :context].clone()
        overflowing = ~(cut == eos).any(dim=1)
        cut[overflowing, -1] = eos
        mask[overflowing, -1] = 1
        return cut, mask

    def _encode_text(self, input_ids, attention_mask, position_ids=None, **kwargs) -> BaseModelOutputWithPooling:
        input_ids, attention_mask = self._fit_context(input_ids, attention_mask)
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  return_dict=True, **kwargs)
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return outputs

    def _encode_image(self, pixel_values, interpolate_pos_encoding=False, **kwargs) -> BaseModelOutputWithPooling:
        outputs = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                    return_dict=True, **kwargs)
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        caption_quality: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Caption embeddings, as transformers' `CLIPModel.get_text_features` returns them.

        Returns a `BaseModelOutputWithPooling`: `pooler_output` [batch, projection_dim] is the projected
        end-of-text state (NOT normalised), `last_hidden_state` the token states. `caption_quality` (a
        processor output) is accepted so that `get_text_features(**processor(text=...))` works; it only
        matters for the training loss. `output_attentions`, `output_hidden_states` and `return_dict` work
        as for CLIP; any other keyword is an error.
        """
        _check_keywords(kwargs, "get_text_features")
        return self._encode_text(input_ids, attention_mask, position_ids, **kwargs)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """Image embeddings, as transformers' `CLIPModel.get_image_features` returns them.

        Returns a `BaseModelOutputWithPooling`: `pooler_output` [batch, projection_dim] is the projected
        CLS state (NOT normalised). `interpolate_pos_encoding=True` accepts another input size (sides
        divisible by the patch size) by resizing the position table for that call.
        """
        _check_keywords(kwargs, "get_image_features")
        return self._encode_image(pixel_values, interpolate_pos_encoding, **kwargs)

    # ---- training + scoring -----------------------------------------------------------------------
    def _caption_quality(self, caption_quality, batch_size, device):
        mode = self.config.caption_quality
        if mode == "none" or self.config.sew_margin == 0:
            return None, 0.0
        if mode == "uniform":
            return torch.ones(batch_size, device=device), self.config.sew_margin
        if caption_quality is None:
            raise ValueError(
                "caption_quality is required for the Sew loss with caption_quality='density': pass the "
                "`caption_quality` that DecdProcessor returns for the captions (or set caption_quality='uniform')."
            )
        return caption_quality.to(device), self.config.sew_margin

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        person_ids: torch.Tensor | None = None,
        caption_quality: torch.Tensor | None = None,
        masked_input_ids: torch.Tensor | None = None,
        mcm_labels: torch.Tensor | None = None,
        return_loss: bool | None = None,
        position_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> DecdOutput:
        r"""Encode a batch of (caption, image) pairs; with `person_ids`, also compute the training losses.

        Args:
            input_ids, attention_mask: [batch, tokens] captions from DecdProcessor.
            pixel_values: [batch, 3, height, width] images from DecdProcessor.
            person_ids: [batch] identity of each pair (needed for the losses).
            caption_quality: [batch] caption quality in [0, 1] from DecdProcessor (Sew margins).
            masked_input_ids, mcm_labels: [batch, tokens] from `DecdProcessor.mask_captions`; when given,
                the cross-modal decoder runs and the MCM loss is computed.
            return_loss: defaults to `person_ids is not None`.
            position_ids, interpolate_pos_encoding, output_attentions, output_hidden_states, return_dict:
                as for transformers' `CLIPModel`. Any other keyword is an error (a misspelt `person_id`
                would otherwise train without a loss).

        Returns:
            `DecdOutput` (the fields of `CLIPOutput` plus the loss parts). Under several processes the Sew
            loss uses the global batch.
        """
        _check_keywords(kwargs, "forward")
        if input_ids is None or pixel_values is None:
            raise ValueError("DecdModel.forward needs both input_ids and pixel_values (use DecdProcessor).")
        if return_loss is None:
            return_loss = person_ids is not None
        text_outputs = self._encode_text(input_ids, attention_mask, position_ids, **kwargs)
        vision_outputs = self._encode_image(pixel_values, interpolate_pos_encoding, **kwargs)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        logit_scale = self.logit_scale.exp()
        logits_per_text = logit_scale * text_embeds @ image_embeds.t()
        output = DecdOutput(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )
        if return_loss:
            self._add_losses(output, person_ids, caption_quality, input_ids, attention_mask, masked_input_ids,
                             mcm_labels, logit_scale)
        return output

    # ---- losses -------------------------------------------------------------------------------------
    def _add_losses(self, output, person_ids, caption_quality, input_ids, attention_mask, masked_input_ids,
                    mcm_labels, logit_scale) -> None:
        """Fill `output.loss` and its parts: Sew on the global batch, MCM through the decoder, identity."""
        if person_ids is None:
            raise ValueError("return_loss=True needs person_ids (the identity of each pair).")
        text_features = output.text_model_output.pooler_output
        image_features = output.vision_model_output.pooler_output
        if text_features.shape[0] != image_features.shape[0]:
            raise ValueError(
                f"Training needs paired batches: got {text_features.shape[0]} captions and "
                f"{image_features.shape[0]} images."
            )
        config = self.config
        quality, margin = self._caption_quality(caption_quality, text_features.shape[0], text_features.device)
        global_quality = None if quality is None else gather_with_grad(quality.float())
        output.loss_sew = sew_loss(
            gather_with_grad(output.image_embeds),
            gather_with_grad(output.text_embeds),
            gather_with_grad(person_ids),
            global_quality,
            margin=margin,
            temperature=1.0 / logit_scale,
            formulation=config.sew_formulation,
        )
        total = config.sew_weight * output.loss_sew
        if masked_input_ids is not None:
            output.loss_mcm = self._masked_caption_loss(input_ids, attention_mask, masked_input_ids, mcm_labels,
                                                        output.vision_model_output.last_hidden_state)
            total = total + config.mcm_weight * output.loss_mcm
        if self.identity_classifier is not None and config.id_weight > 0:
            output.loss_id = identity_loss(self.identity_classifier, image_features, text_features, person_ids)
            total = total + config.id_weight * output.loss_id
        output.loss = total

    def _masked_caption_loss(self, input_ids, attention_mask, masked_input_ids, mcm_labels, image_states):
        """MCM: the masked captions (of `sample_mcm_rows`' pairs in training) through the text encoder and the
        decoder over their images; the head scores the masked positions (the whole vocabulary, or the
        `batch_vocabulary`)."""
        if self.decoder is None:
            raise ValueError("MCM inputs were given but this model's decoder was detached (use_decoder=False).")
        if mcm_labels is None:
            raise ValueError("masked_input_ids were given without mcm_labels (see DecdProcessor.mask_captions).")
        config = self.config
        masked_ids, masked_attention = self._fit_context(masked_input_ids, attention_mask)
        labels = mcm_labels[:, : masked_ids.shape[1]]
        rows = sample_mcm_rows(masked_ids.shape[0], config.mcm_fraction if self.training else 1.0, masked_ids.device)
        if rows is not None:
            masked_ids, labels, image_states = masked_ids[rows], labels[rows], image_states[rows]
            masked_attention = None if masked_attention is None else masked_attention[rows]
        masked_states = self.text_model(input_ids=masked_ids, attention_mask=masked_attention).last_hidden_state
        decoded = self.decoder(masked_states, image_states, masked_attention)
        if torch.compiler.is_compiling():
            return self._fixed_shape_mcm_loss(decoded, labels, input_ids, attention_mask)
        # The vocabulary-sized head runs on masked positions only (~15% of tokens): same loss, far less work.
        selected = labels != IGNORE_INDEX
        if config.mcm_max_positions is not None:
            selected &= selected.cumsum(dim=1) <= config.mcm_max_positions
        targets, candidates = labels[selected], None
        if config.mcm_vocabulary == "batch":
            words = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
            candidates, targets = batch_vocabulary(words, targets)
        return masked_caption_loss(self.mcm_head(decoded[selected], candidates), targets)

    def _fixed_shape_mcm_loss(self, decoded, labels, input_ids, attention_mask):
        """The same MCM loss with every shape known before the data, for a compiled step: a fixed number of
        positions per caption (`masked_positions`) and, for the batch vocabulary, a fixed number of candidate slots
        whose repeats and padding get a logit of -inf (`batch_vocabulary_fixed`). Nothing synchronises the host."""
        positions, targets = masked_positions(labels, self.config.mcm_max_positions)
        if positions is not None:
            decoded = decoded.gather(1, positions[..., None].expand(-1, -1, decoded.shape[-1]))
        if self.config.mcm_vocabulary != "batch":
            return masked_caption_loss(self.mcm_head(decoded), targets)
        words_valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        candidates, targets, valid = batch_vocabulary_fixed(input_ids, words_valid, targets)
        logits = self.mcm_head(decoded, candidates).masked_fill(~valid, float("-inf"))
        return masked_caption_loss(logits, targets)

    # ---- saving and loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a saved DECD model (folder or Hub id). Weights are read from safetensors only: a checkpoint
        that has only pickled weights (`pytorch_model.bin`) is refused rather than unpickled."""
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors), config and the custom code; `auto_map` covers every Auto class."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(AUTO_MAP)
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


# The modules DECD adds to a CLIP model: new in `from_clip`, trained at the new-module learning rate.
NEW_MODULE_PREFIXES = ("decoder.", "mcm_head.", "identity_classifier.", "logit_scale")

AUTO_MAP = {
    "AutoConfig": "configuration_decd.DecdConfig",
    "AutoModel": "modeling_decd.DecdModel",
    "AutoModelForZeroShotImageClassification": "modeling_decd.DecdModel",
    "AutoProcessor": "processing_decd.DecdProcessor",
}

# Registration: in-package Auto classes, and `auto_map` + copied code files on save_pretrained.
DecdConfig.register_for_auto_class()
DecdModel.register_for_auto_class("AutoModel")
DecdProcessor.register_for_auto_class("AutoProcessor")
# A copy loaded as Hub remote code (e.g. by handler.py) never displaces classes already registered.
if not (__name__.startswith("transformers_modules") and "decd" in CONFIG_MAPPING):
    AutoConfig.register("decd", DecdConfig, exist_ok=True)
    AutoModel.register(DecdConfig, DecdModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(DecdConfig, DecdModel, exist_ok=True)
    AutoProcessor.register(DecdConfig, DecdProcessor, exist_ok=True)

__all__ = [
    "DecdModel",
    "NEW_MODULE_PREFIXES",
    "DecdPreTrainedModel",
    "DecdOutput",
    "DecdVisionModel",
    "resize_position_embedding",
]
