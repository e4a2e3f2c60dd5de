#!/usr/bin/env python
"""Pretrain a small CLIP from random weights on a synthetic captioned-image corpus (stage 1 of two).

Every real DECD run starts from a pretrained CLIP (`DecdModel.from_clip`). No CLIP weights are reachable
here, so this script makes one the way CLIP itself is made, offline on a CPU: transformers' own `CLIPModel`,
trained with its own contrastive loss (`return_loss=True`) through `Trainer`, on
`decd.synthetic.generate_synthetic_captioned_images`: square renders with one caption each, no identities,
and no outfit that any identity of the synthetic person-search set wears (train, val or test). The result is
an ordinary CLIP folder (safetensors + `CLIPProcessor`: a square `CLIPImageProcessor` and CLIP's
49,408-token tokenizer), which `CLIPModel.from_pretrained`, `CLIPProcessor.from_pretrained` and
`examples/train.py --model_name_or_path FOLDER` (stage 2) load.

    python examples/pretrain_clip.py      # 1,000 steps (estimated 5-8 min on an idle 2-core CPU); prints the folder
    python examples/train.py recipes/two-stage.json \\
        --model_name_or_path "$(python examples/pretrain_clip.py --print_path_only)"   # stage 2

Cached: the folder (default `$DECD_CACHE/clip-pretrained-<hash of the settings>`) carries
`pretraining.json` with the settings; a second run with the same settings reuses it and trains nothing.
The folder is written next to its place and renamed into it, so an interrupted run never leaves half a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import is_torchvision_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from decd.synthetic import (  # noqa: E402
    _replace_directory,
    default_cache_dir,
    generate_synthetic_captioned_images,
)
from configuration_decd import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE  # noqa: E402
from image_loading_decd import load_image  # noqa: E402
from tokenization_decd import clip_vocabulary  # noqa: E402

logger = logging.getLogger("decd.pretrain_clip")

# Bump when the training procedure changes: a cached model with another version is retrained.
PRETRAIN_VERSION = "1"
MARKER = "pretraining.json"


@dataclass
class PretrainArguments:
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the CLIP folder goes (default: $DECD_CACHE/clip-pretrained-<hash>)."}
    )
    num_images: int = field(default=8000, metadata={"help": "Images in the captioned corpus (one caption each)."})
    image_size: int = field(default=112, metadata={"help": "Square input side (patch 16: 112 -> 7 x 7 grid)."})
    patch_size: int = field(default=16)
    hidden_size: int = field(default=128, metadata={"help": "Width of both encoders."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Layers of each encoder."})
    num_attention_heads: int = field(default=4)
    intermediate_size: int = field(default=512)
    projection_dim: int = field(default=128)
    num_train_epochs: float = field(default=8.0)
    max_steps: int = field(default=-1, metadata={"help": "If > 0: train this many steps instead of epochs."})
    per_device_train_batch_size: int = field(default=64)
    learning_rate: float = field(default=5e-4)
    weight_decay: float = field(default=0.1)
    warmup_ratio: float = field(default=0.05)
    seed: int = field(default=0, metadata={"help": "Seed of the weights and the batch order."})
    corpus_seed: int = field(default=0, metadata={"help": "Seed of the captioned corpus."})
    logging_steps: int = field(default=10)
    dataloader_num_workers: int = field(default=0)
    overwrite: bool = field(default=False, metadata={"help": "Retrain even when a matching model is cached."})
    print_path_only: bool = field(
        default=False, metadata={"help": "Print only the folder on stdout (for $(...) in a shell)."}
    )


# Settings that do not change the trained model, so they are not part of the cache key.
_NOT_IN_KEY = ("output_dir", "overwrite", "print_path_only", "logging_steps", "dataloader_num_workers")


def cache_parameters(args: PretrainArguments) -> dict:
    parameters = {k: v for k, v in dataclasses.asdict(args).items() if k not in _NOT_IN_KEY}
    parameters["version"] = PRETRAIN_VERSION
    return parameters


def default_output_dir(args: PretrainArguments) -> Path:
    digest = hashlib.sha1(json.dumps(cache_parameters(args), sort_keys=True).encode()).hexdigest()[:10]
    return default_cache_dir() / f"clip-pretrained-{digest}"


def is_cache_hit(folder: Path, parameters: dict) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("parameters") == parameters and (folder / "model.safetensors").is_file()


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer (49,408 tokens), offline from the vocabulary in decd/assets: the one
    `tokenization_decd.default_clip_tokenizer()` builds, without DECD's mask token (DECD adds it in from_clip)."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_CONTEXT_LENGTH)


def clip_processor(image_size: int) -> CLIPProcessor:
    """CLIP's usual preprocessing for a square model: resize the shortest edge, centre crop, CLIP mean/std."""
    if is_torchvision_available() or not hasattr(transformers, "CLIPImageProcessorPil"):
        image_processor_class = transformers.CLIPImageProcessor
    else:
        image_processor_class = transformers.CLIPImageProcessorPil
    image_processor = image_processor_class(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


def clip_config(args: PretrainArguments) -> CLIPConfig:
    encoder = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                   num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads)
    text = dict(encoder, vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT_LENGTH,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(encoder, image_size=args.image_size, patch_size=args.patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim)


class CaptionedImageCollator:
    """Rows {"image": path, "caption": str} -> CLIPModel inputs with `return_loss=True`."""

    def __init__(self, processor: CLIPProcessor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        images = [load_image(row["image"]) for row in rows]  # the one way DECD opens an image
        batch = self.processor(text=[row["caption"] for row in rows], images=images, padding=True,
                               truncation=True, return_tensors="pt")
        return {**batch, "return_loss": True}


class CaptionedImages(torch.utils.data.Dataset):
    def __init__(self, root: Path):
        records = json.loads((root / "captions.json").read_text())
        self.rows = [{"image": str(root / r["file_path"]), "caption": r["caption"]} for r in records]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def pretrain_clip(args: PretrainArguments) -> Path:
    """Train (or reuse) the CLIP folder for these settings and return it."""
    parameters = cache_parameters(args)
    folder = Path(args.output_dir).expanduser().absolute() if args.output_dir else default_output_dir(args)
    if not args.overwrite and is_cache_hit(folder, parameters):
        logger.info("Pretrained CLIP with these settings is cached at %s: reusing it.", folder)
        return folder

    corpus = generate_synthetic_captioned_images(num_images=args.num_images, image_size=args.image_size,
                                                 seed=args.corpus_seed, progress=False)
    dataset = CaptionedImages(corpus)
    logger.info("Captioned corpus: %d images (%s)", len(dataset), corpus)
    set_seed(args.seed)
    model = CLIPModel(clip_config(args))
    processor = clip_processor(args.image_size)
    logger.info("CLIP with %.1fM parameters, %dx%d inputs", sum(p.numel() for p in model.parameters()) / 1e6,
                args.image_size, args.image_size)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        training_args = TrainingArguments(
            output_dir=str(staging / "trainer"), per_device_train_batch_size=args.per_device_train_batch_size,
            learning_rate=args.learning_rate, weight_decay=args.weight_decay, warmup_steps=args.warmup_ratio,
            lr_scheduler_type="cosine", num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
            logging_steps=args.logging_steps, save_strategy="no", report_to=[], seed=args.seed,
            remove_unused_columns=False, dataloader_num_workers=args.dataloader_num_workers,
            dataloader_drop_last=True, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                          data_collator=CaptionedImageCollator(processor))
        started, cpu_started = time.time(), time.process_time()
        result = trainer.train()
        seconds, cpu_seconds = time.time() - started, time.process_time() - cpu_started
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        marker = {
            "parameters": parameters,
            "corpus": str(corpus),
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "logged_losses": losses,
            "train_seconds": round(seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),
            "torch_threads": torch.get_num_threads(),
        }
        # The marker last: its presence with matching parameters is what marks the folder complete.
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        _replace_directory(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Pretrained CLIP saved to %s (%d steps, %.0f s; loss %s -> %s)", folder, marker["steps"], seconds,
                f"{losses[0]:.3f}" if losses else "?", f"{losses[-1]:.3f}" if losses else "?")
    return folder


def main(argv=None) -> Path:
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.WARNING if args.print_path_only else logging.INFO,
                        handlers=[logging.StreamHandler(sys.stderr)])
    transformers.utils.logging.set_verbosity_warning()
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs: stdout carries only the folder
        folder = pretrain_clip(args)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
