"""Configuration of DECD: a CLIP dual encoder with a detachable cross-modal decoder.

The file travels to the Hugging Face Hub next to ``config.json`` (``trust_remote_code=True``),
so it imports nothing but ``transformers`` and its sibling ``losses_decd`` (the Sew formulations it names).
"""

from __future__ import annotations

import math

from transformers import CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig

try:  # relative import when loaded as Hub remote code (transformers copies the siblings)
    from .losses_decd import SEW_FORMULATIONS
except ImportError:
    from losses_decd import SEW_FORMULATIONS

CAPTION_QUALITY_MODES = ("density", "uniform", "none")
MCM_VOCABULARIES = ("full", "batch")

# CLIP's text side, the one source of these numbers: a BPE vocabulary of 49,408 tokens (start-of-text 49406,
# end-of-text 49407, which also pads) and a context of 77 tokens. DECD appends the MCM mask token as id 49408.
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
_CLIP_TEXT_TOKENS = dict(
    vocab_size=CLIP_VOCAB_SIZE + 1, max_position_embeddings=CLIP_CONTEXT_LENGTH, bos_token_id=CLIP_VOCAB_SIZE - 2,
    eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1,
)
# ViT-B/16 sizes, the default when no sub-config is given.
BASE_TEXT_CONFIG = dict(_CLIP_TEXT_TOKENS, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8)
BASE_VISION_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          patch_size=16)
TINY_TEXT_CONFIG = dict(_CLIP_TEXT_TOKENS, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4)
TINY_VISION_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          patch_size=16)


class DecdConfig(PreTrainedConfig):
    r"""
    Configuration of [`DecdModel`].

    Args:
        text_config (`dict` or `CLIPTextConfig`):
            The CLIP text encoder. Its `vocab_size` includes the MCM mask token (CLIP's 49,408 + 1).
        vision_config (`dict` or `CLIPVisionConfig`):
            The CLIP vision encoder. Its `image_size` is kept equal to `image_size` below.
        image_size (`tuple[int, int]`, defaults to `(384, 128)`):
            Person-crop size as (height, width) in pixels; both must be divisible by the patch size.
        projection_dim (`int`, defaults to 512):
            Size of the shared text-image embedding space.
        decoder_layers, decoder_hidden_size, decoder_attention_heads, decoder_intermediate_size (`int`):
            The detachable cross-modal decoder (training only): pre-LN layers of self-attention over the
            masked caption, cross-attention to all image tokens, and an MLP.
        temperature (`float`, defaults to 0.02):
            Initial softmax temperature of the Sew loss and of the returned logits. As CLIP's `logit_scale`, the
            weights hold the temperature in use (`DecdModel.logit_scale` = log(1 / temperature)), set from here
            when a model is built or a checkpoint lacks it. A saved config keeps this initial value and the weights
            a learnable one's trained value, so `from_pretrained(path, temperature=...)` leaves a saved temperature
            as it is (examples/train.py's `--temperature` restarts it).
        learnable_temperature (`bool`, defaults to `False`):
            Train the temperature (`logit_scale` a parameter) instead of keeping it fixed (a buffer).
        sew_margin (`float`, defaults to 0.05):
            The Sew loss's strength m (cosine units): with `"tighten"`, caption i's positives must beat its
            negatives by `m * q_i`. 0 gives IRRA's SDM loss in every formulation.
        sew_formulation (`str`, defaults to `"compress"`):
            Which reading of the paper's Sew loss trains (docs/method.md, "Sew loss"): `"tighten"` (informative
            captions get larger margins), `"relax"` (vague captions' positives are eased by `m * (1 - q_i)`) or
            `"compress"` (SDM plus a quality-weighted pull of same-identity captions and images together). The
            defaults, `"compress"` at 0.05, are the best the paper's regime measured (docs/findings.md, "Do Sew and
            MCM help, and which Sew?").
        caption_quality (`str`, defaults to `"density"`):
            `"density"`: margins follow the information density of each caption, computed by the processor
            (`DecdProcessor.quality_reference_words`; the MCM masking rate is `DecdProcessor.mask_probability`);
            `"uniform"`: every caption gets q = 1; `"none"`: no margin at all (ablation).
        sew_weight, mcm_weight, id_weight (`float`, defaults to 1.0, 1.0, 0.0):
            Weights of the three losses in the total.
        mcm_vocabulary (`str`, defaults to `"full"`):
            Which vocabulary rows the MCM head scores at a masked position. `"full"`: all of them (the paper's
            cross-entropy over the whole vocabulary). `"batch"`: only the tokens that occur in the batch's
            captions (every masked token is among them), a sampled softmax whose negatives are the batch's
            other words; it skips the vocabulary-sized product, which dominates a step of a small model
            (docs/findings.md). The head's weights are the same in both modes.
        mcm_fraction (`float`, defaults to 1.0):
            Share of a training batch's pairs whose masked caption goes through MCM at each step: a random subset
            of `round(mcm_fraction * batch)` pairs (at least one), drawn anew each step. 1.0 is the paper's (every
            pair); a smaller share is an unbiased estimate of the same loss that skips that share of the second text
            pass and of the decoder. Training only: in eval mode every pair is used.
        mcm_max_positions (`int`, *optional*):
            Masked positions scored per caption: at most this many, the first ones (None: all of them). A compiled
            step scores a fixed number of positions per caption (masked ones first, padded with ignored ones),
            all of the caption's positions when this is None; a cap keeps the whole-vocabulary head small. With
            the 15% masking rule, a 75-token caption has more than 32 masked tokens with probability 2e-9.
        num_identities (`int`, defaults to 0):
            Number of training identities for the identity classifier (0: no classifier).
        use_decoder (`bool`, defaults to `True`):
            Whether the training-only modules (decoder, MCM head, identity classifier) exist.
            [`DecdModel.detach_decoder`] sets it to `False`.
        mask_token_id (`int`, defaults to 49408):
            Id of the MCM mask token (the token appended to CLIP's vocabulary).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of new modules.
        initializer_factor (`float`, defaults to 1.0):
            Scale of CLIP's own initialisation of the encoders and projections (from-scratch training).
    """

    model_type = "decd"
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}
    sub_configs = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}  # transformers < 5.20

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    image_size: list[int] | tuple[int, int] = (384, 128)
    projection_dim: int = 512
    decoder_layers: int = 4
    decoder_hidden_size: int = 512
    decoder_attention_heads: int = 8
    decoder_intermediate_size: int = 2048
    temperature: float = 0.02
    learnable_temperature: bool = False
    sew_margin: float = 0.05
    sew_formulation: str = "compress"
    caption_quality: str = "density"
    sew_weight: float = 1.0
    mcm_weight: float = 1.0
    id_weight: float = 0.0
    mcm_vocabulary: str = "full"
    mcm_fraction: float = 1.0
    mcm_max_positions: int | None = None
    num_identities: int = 0
    use_decoder: bool = True
    mask_token_id: int = CLIP_VOCAB_SIZE
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        if self.text_config is None:
            self.text_config = dict(BASE_TEXT_CONFIG)
        if self.vision_config is None:
            self.vision_config = dict(BASE_VISION_CONFIG)
        # Build the sub-configs here too: older transformers 5.x releases leave dicts as they are.
        if isinstance(self.text_config, dict):
            self.text_config = CLIPTextConfig(**self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = CLIPVisionConfig(**self.vision_config)
        super().__post_init__(**kwargs)
        self._check_types()
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(side) for side in self.image_size)
        # The vision tower reads its grid from its own config: keep the two in step.
        self.vision_config.image_size = list(self.image_size)
        self.text_config.projection_dim = self.projection_dim
        self.vision_config.projection_dim = self.projection_dim
        self._validate()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # A config.json saved before `sew_formulation` existed trained the first reading, not today's default.
        if "sew_margin" in config_dict and "sew_formulation" not in config_dict:
            config_dict = {**config_dict, "sew_formulation": "tighten"}
        return super().from_dict(config_dict, **kwargs)

    @property
    def similarity_loss(self) -> str:
        """The image-text loss this configuration trains, in words (a model card states it): IRRA's SDM when no
        margin applies, else the Sew reading with its strength and caption quality."""
        if self.sew_margin == 0 or self.caption_quality == "none":
            return "SDM (similarity distribution matching, IRRA's; Sew off: sew_margin 0)"
        return (f"Sew, reading {self.sew_formulation!r} (docs/method.md), strength {self.sew_margin:g}, caption "
                f"quality {self.caption_quality!r}")

    def _check_types(self):
        """Refuse a value of the wrong type (e.g. from a hand-edited config.json), naming the field."""
        def fail(name, expected):
            value = getattr(self, name)
            raise ValueError(f"DecdConfig.{name} must be {expected}, got {value!r} ({type(value).__name__}); "
                             "fix it in config.json or pass a valid value.")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name, (check, expected) in {
            "projection_dim": (lambda v: is_int(v) and v > 0, "a positive integer"),
            "decoder_layers": (lambda v: is_int(v) and v > 0, "a positive integer"),
            "decoder_hidden_size": (lambda v: is_int(v) and v > 0, "a positive integer"),
            "decoder_attention_heads": (lambda v: is_int(v) and v > 0, "a positive integer"),
            "decoder_intermediate_size": (lambda v: is_int(v) and v > 0, "a positive integer"),
            "num_identities": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
            "mask_token_id": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
            "temperature": (lambda v: is_number(v) and v > 0, "a positive number"),
            "sew_margin": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
            "sew_weight": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
            "mcm_weight": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
            "id_weight": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
            "initializer_range": (lambda v: is_number(v) and v > 0, "a positive number"),
            "initializer_factor": (lambda v: is_number(v) and v > 0, "a positive number"),
            "learnable_temperature": (lambda v: isinstance(v, bool), "true or false"),
            "use_decoder": (lambda v: isinstance(v, bool), "true or false"),
            "caption_quality": (lambda v: isinstance(v, str), f"one of {CAPTION_QUALITY_MODES}"),
            "sew_formulation": (lambda v: v in SEW_FORMULATIONS, f"one of {SEW_FORMULATIONS}"),
            "mcm_vocabulary": (lambda v: v in MCM_VOCABULARIES, f"one of {MCM_VOCABULARIES}"),
            "mcm_fraction": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
            "mcm_max_positions": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
        }.items():
            if not check(getattr(self, name)):
                fail(name, expected)
        size = self.image_size
        if not (is_int(size) and size > 0) and not (
            isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(side) and side > 0 for side in size)
        ):
            fail("image_size", "[height, width] (two positive integers)")

    def _validate(self):
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"DecdConfig.image_size must be (height, width) with positive sides, got {self.image_size}.")
        patch = self.vision_config.patch_size
        if isinstance(patch, (list, tuple)):
            raise ValueError("DecdConfig supports square patches only: vision_config.patch_size must be an int.")
        height, width = self.image_size
        if height % patch or width % patch:
            raise ValueError(
                f"DecdConfig.image_size={self.image_size} is not divisible by the patch size {patch}: "
                f"choose sides that are multiples of {patch}, e.g. ({height // patch * patch or patch}, "
                f"{width // patch * patch or patch})."
            )
        if self.caption_quality not in CAPTION_QUALITY_MODES:
            raise ValueError(
                f"DecdConfig.caption_quality must be one of {CAPTION_QUALITY_MODES}, got {self.caption_quality!r}."
            )
        if self.temperature <= 0:
            raise ValueError(f"DecdConfig.temperature must be positive, got {self.temperature}.")
        if self.sew_margin < 0:
            raise ValueError(f"DecdConfig.sew_margin must be >= 0, got {self.sew_margin}.")
        if self.decoder_hidden_size % self.decoder_attention_heads:
            raise ValueError(
                f"decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by decoder_attention_heads "
                f"({self.decoder_attention_heads})."
            )
        if self.mask_token_id >= self.text_config.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} is outside the text vocabulary ({self.text_config.vocab_size} "
                "tokens); the vocabulary must include the mask token."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is None:
            raise ValueError(f"{pretrained_model_name_or_path} has no model_type in its config: it is not a saved "
                             f"DECD model (model_type {cls.model_type!r}).")
        if model_type != cls.model_type:
            hint = " To start from CLIP weights use DecdModel.from_clip(...)." if model_type == "clip" else ""
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} checkpoint, not a DECD one "
                f"(model_type {cls.model_type!r}).{hint}"
            )
        return config_dict, kwargs

    @classmethod
    def vit_base_patch16(cls, **overrides) -> "DecdConfig":
        """The paper's model: CLIP ViT-B/16 sizes on 384x128 crops (text 512 wide, vision 768 wide, 12 layers each)."""
        return cls._preset(BASE_TEXT_CONFIG, BASE_VISION_CONFIG, {}, overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DecdConfig":
        """A ~14M-parameter model (12.6M of it CLIP-vocabulary embeddings) for tests and CPU demos: 128x64
        crops, patch 16, two 128-wide layers per encoder.

        The vocabulary is CLIP's plus the mask token, so the shipped processor works with it.
        """
        model = dict(image_size=(128, 64), projection_dim=128, decoder_layers=2, decoder_hidden_size=128,
                     decoder_attention_heads=4, decoder_intermediate_size=512)
        return cls._preset(TINY_TEXT_CONFIG, TINY_VISION_CONFIG, model, overrides)

    @classmethod
    def _preset(cls, text, vision, model, overrides):
        text = dict(text, **(overrides.pop("text_config", None) or {}))
        vision = dict(vision, **(overrides.pop("vision_config", None) or {}))
        return cls(text_config=text, vision_config=vision, **dict(model, **overrides))


__all__ = ["DecdConfig", "CAPTION_QUALITY_MODES", "CLIP_CONTEXT_LENGTH", "CLIP_VOCAB_SIZE", "MCM_VOCABULARIES"]
