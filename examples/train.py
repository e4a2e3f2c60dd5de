#!/usr/bin/env python
"""Train DECD for text-based person search with `transformers.Trainer`.

With no arguments: the tiny DECD from scratch on the embedded synthetic benchmark (offline, CPU).
The paper's recipe (CUHK-PEDES, CLIP ViT-B/16 start):

    accelerate launch examples/train.py --model_name_or_path openai/clip-vit-base-patch16 \
        --dataset_name cuhk-pedes --data_dir /data/CUHK-PEDES --output_dir outputs/decd-cuhk \
        --learning_rate 1e-5 --num_train_epochs 60 --warmup_steps 0.0834 --per_device_train_batch_size 64

Reads top to bottom: arguments -> data -> model -> Trainer -> train -> test evaluation -> save.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from configuration_decd import CAPTION_QUALITY_MODES, MCM_VOCABULARIES, DecdConfig  # noqa: E402
from modeling_decd import DecdModel, load_model  # noqa: E402
from processing_decd import DecdProcessor  # noqa: E402

from decd.hub import saved_model_type  # noqa: E402
from decd.data import PersonSearchDataError, load_person_search, num_identities  # noqa: E402
from decd.training import DecdTrainer, DecdTrainingArguments, DecdTrainingCollator  # noqa: E402

logger = logging.getLogger("decd.train")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A CLIP checkpoint (e.g. openai/clip-vit-base-patch16) to start from, a saved DECD "
                          "model to continue from, or empty to train the `config_preset` model from scratch."},
    )
    config_preset: str = field(default="tiny", metadata={"help": "From-scratch model size: tiny or base."})
    image_size: list[int] | None = field(
        default=None, metadata={"help": "Crop height and width, e.g. --image_size 384 128 (default: the preset's)."}
    )
    sew_margin: float | None = field(default=None, metadata={"help": "Largest Sew margin m_max (0 = SDM)."})
    learnable_temperature: bool | None = field(
        default=None, metadata={"help": "Train the temperature, starting from --temperature (default: fixed)."}
    )
    caption_quality: str | None = field(
        default=None,
        metadata={"help": "Margin per caption: density, uniform or none.", "choices": list(CAPTION_QUALITY_MODES)},
    )
    temperature: float | None = field(default=None, metadata={"help": "Softmax temperature (default 0.02)."})
    mcm_weight: float | None = field(default=None, metadata={"help": "Weight of the MCM loss (0 disables MCM)."})
    mcm_vocabulary: str | None = field(
        default=None,
        metadata={"help": "Vocabulary rows the MCM head scores: full (the paper's) or batch (the batch's own words; "
                  "default from scratch, full from a CLIP).", "choices": list(MCM_VOCABULARIES)},
    )
    mcm_fraction: float | None = field(
        default=None,
        metadata={"help": "Share of each batch's pairs that go through MCM, a random subset drawn each step "
                          "(default 0.25 from scratch, 1 from a CLIP: the paper's)."},
    )
    id_weight: float | None = field(default=None, metadata={"help": "Weight of the identity loss (default 0)."})
    # The detachable decoder's size (default: the preset's from scratch, 4 x 512 wide with 8 heads from a CLIP);
    # e.g. a small pretrained CLIP takes the tiny preset's decoder: 2 layers, 128 wide, 4 heads, MLP 512.
    decoder_layers: int | None = field(default=None, metadata={"help": "Decoder layers."})
    decoder_hidden_size: int | None = field(default=None, metadata={"help": "Decoder width."})
    decoder_attention_heads: int | None = field(default=None, metadata={"help": "Decoder attention heads."})
    decoder_intermediate_size: int | None = field(default=None, metadata={"help": "Decoder MLP width."})
    keep_decoder: bool = field(
        default=False,
        metadata={"help": "Save the final model with its decoder (a training checkpoint) instead of the detached "
                          "inference model. Checkpoints under output_dir always keep it."},
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="synthetic", metadata={"help": "cuhk-pedes, icfg-pedes, rstpreid, synthetic or custom."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Dataset folder (annotation JSON + imgs/)."})
    annotation_file: str | None = field(default=None, metadata={"help": "Annotation JSON for dataset 'custom'."})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip (and list) bad records instead of stopping at them."}
    )
    eval_split: str = field(
        default="val", metadata={"help": "Split used for model selection (falls back to test when there is no val)."}
    )
    test_split: str = field(default="test", metadata={"help": "Split evaluated with the best model at the end."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    synthetic_train_ids: int | None = field(
        default=None,
        metadata={"help": "Synthetic set: training identities (default 1000; from 500 up, val and test stay put)."},
    )
    synthetic_eval_ids: int | None = field(
        default=None, metadata={"help": "Synthetic set: identities in each of val and test."}
    )
    synthetic_images_per_id: int | None = field(default=None, metadata={"help": "Synthetic set: images per identity."})


@dataclass
class TrainingArguments(DecdTrainingArguments):
    """Defaults for the embedded synthetic benchmark on a CPU (about 5 minutes on 2 cores)."""

    output_dir: str | None = field(default="outputs/decd-tiny-synthetic")
    per_device_train_batch_size: int = field(default=64)
    per_device_eval_batch_size: int = field(default=128)
    learning_rate: float = field(default=1e-3)
    new_module_lr_multiplier: float = field(default=1.0)
    weight_decay: float = field(default=4e-5)
    num_train_epochs: float = field(default=10.0)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.05)
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    load_best_model_at_end: bool = field(default=True)
    logging_steps: float = field(default=10)
    seed: int = field(default=42)


# ModelArguments that are DecdConfig fields of the same name. The loss settings are checked on their own before
# the data load (check_loss_settings); the decoder's size is checked with the model it belongs to.
LOSS_SETTINGS = ("sew_margin", "caption_quality", "temperature", "learnable_temperature", "mcm_weight",
                 "mcm_vocabulary", "mcm_fraction", "id_weight")
DECODER_SETTINGS = ("decoder_layers", "decoder_hidden_size", "decoder_attention_heads", "decoder_intermediate_size")


def _given(model_args: ModelArguments, names: tuple[str, ...]) -> dict:
    return {name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None}


def check_loss_settings(model_args: ModelArguments) -> None:
    """Refuse a bad loss setting (e.g. --mcm_fraction 0) before any data is loaded, by DecdConfig's own checks."""
    try:
        DecdConfig(**_given(model_args, LOSS_SETTINGS))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def build_model(model_args: ModelArguments, identities: int) -> tuple[DecdModel, DecdProcessor]:
    overrides = _given(model_args, LOSS_SETTINGS + DECODER_SETTINGS)
    if model_args.image_size is not None:
        overrides["image_size"] = tuple(model_args.image_size)
    source = model_args.model_name_or_path
    if source is None:
        # From random weights the method's temperature (0.02) collapses every embedding onto one point
        # before the encoders learn anything; a softer 0.2 plus the identity loss gets the encoders going.
        # Measured on the synthetic set (README, "Training from scratch").
        overrides.setdefault("temperature", 0.2)
        overrides.setdefault("id_weight", 1.0)
        # The tiny model's MCM head scores 49,409 vocabulary rows for a ~100-word synthetic vocabulary; the
        # batch's own words are the same task at a fraction of the cost, and MCM on a quarter of each batch's
        # pairs kept the test R@1 at 0.53x the step time of both at the paper's (README, "Training from scratch").
        overrides.setdefault("mcm_vocabulary", "batch")
        overrides.setdefault("mcm_fraction", 0.25)
        preset = {"tiny": DecdConfig.tiny, "base": DecdConfig.vit_base_patch16}.get(model_args.config_preset)
        if preset is None:
            raise SystemExit(f"--config_preset must be 'tiny' or 'base', got {model_args.config_preset!r}.")
        model = DecdModel(preset(num_identities=identities, **overrides))
        return model, DecdProcessor(image_size=model.config.image_size)
    if saved_model_type(source) == "decd":  # continue training: the decoder and heads come back (fresh if detached)
        return load_model(source, device="cpu", num_identities=identities, use_decoder=True, **overrides)
    overrides.setdefault("image_size", (384, 128))
    model = DecdModel.from_clip(source, num_identities=identities, **overrides)
    return model, DecdProcessor(image_size=model.config.image_size)


def check_settings(training_args: TrainingArguments, train_set) -> None:
    """Refuse, before the first step, settings that cannot train or evaluate (all reasons at once)."""
    problems = []
    if training_args.per_device_eval_batch_size < 1:
        problems.append(f"--per_device_eval_batch_size is {training_args.per_device_eval_batch_size}; it must be "
                        "at least 1")
    if training_args.num_train_epochs <= 0 and training_args.max_steps <= 0:
        problems.append(f"--num_train_epochs is {training_args.num_train_epochs:g} and --max_steps is not set: "
                        "nothing would be trained")
    if training_args.per_device_train_batch_size < 2:
        problems.append(f"--per_device_train_batch_size is {training_args.per_device_train_batch_size}; the Sew "
                        "loss compares each pair with the rest of the batch, so with fewer than 2 pairs per "
                        "process it is identically 0: use at least 2 (64 in the paper's recipe)")
    identities = len(set(train_set["person_id"]))
    if identities < 2:
        problems.append(f"the training split has {identities} identity: every pair is a positive of every "
                        "other, so the Sew loss is identically 0; it needs at least 2 identities")
    if problems:
        raise SystemExit("error: cannot train with these settings:\n" + "\n".join(f"  - {p}" for p in problems))


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    check_loss_settings(model_args)

    # ---- data -------------------------------------------------------------------------------------
    if data_args.dataset_name == "synthetic" and data_args.data_dir is None:
        from decd.synthetic import generate_synthetic_person_search

        sizes = {}
        if data_args.synthetic_train_ids is not None:
            sizes["num_train_ids"] = data_args.synthetic_train_ids
        if data_args.synthetic_eval_ids is not None:
            sizes["num_val_ids"] = sizes["num_test_ids"] = data_args.synthetic_eval_ids
        if data_args.synthetic_images_per_id is not None:
            sizes["images_per_id"] = data_args.synthetic_images_per_id
        with training_args.main_process_first(desc="generating the synthetic set"):
            data_args.data_dir = str(generate_synthetic_person_search(**sizes, progress=training_args.should_log))
    load = dict(dataset_name=data_args.dataset_name, data_dir=data_args.data_dir,
                annotation_file=data_args.annotation_file, skip_bad_records=data_args.skip_bad_records)
    train_set = load_person_search(split="train", **load)
    if data_args.max_train_samples is not None:
        train_set = train_set.select(range(min(data_args.max_train_samples, len(train_set))))
    # Every split the run will use is loaded (and its images decoded) now, not after hours of training.
    test_set = load_person_search(split=data_args.test_split, **load)
    eval_split = data_args.eval_split
    try:
        eval_set = test_set if eval_split == data_args.test_split else load_person_search(split=eval_split, **load)
    except PersonSearchDataError as error:
        no_val = "unknown split" in str(error) or ("no usable records" in str(error) and "skipped" not in str(error))
        if eval_split != "val" or not no_val:
            raise
        logger.warning("No val split (%s); selecting the model on %s instead.", error, data_args.test_split)
        eval_split, eval_set = data_args.test_split, test_set
    check_settings(training_args, train_set)
    identities = num_identities(train_set)
    logger.info("%d training pairs, %d identities; model selection on %s (%d queries, %d gallery images)",
                len(train_set), identities, eval_split, len(eval_set["queries"]), len(eval_set["gallery"]))

    # ---- model --------------------------------------------------------------------------------------
    model, processor = build_model(model_args, identities)
    logger.info("DECD with %.1fM parameters (%s)", sum(p.numel() for p in model.parameters()) / 1e6,
                model_args.model_name_or_path or f"{model_args.config_preset} from scratch")

    # ---- train ----------------------------------------------------------------------------------------
    # Publishing happens once, at the end (decd.hub.publish: inference model + processor + code + card),
    # not at every checkpoint as the Trainer's own push would.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and not training_args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id ORG/NAME.")
    augment = training_args.augment if training_args.augment is not None else data_args.dataset_name != "synthetic"
    logger.info("Image augmentation: %s", "on" if augment else "off")
    collator = DecdTrainingCollator(processor, augment=augment,
                                    mask_captions=model.config.mcm_weight > 0)
    trainer = DecdTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, processing_class=processor)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)

    # ---- save first: nothing found after training may cost the trained model ----------------------------
    if not model_args.keep_decoder:
        trainer.accelerator.unwrap_model(trainer.model).detach_decoder()
    trainer.save_model()
    trainer.save_state()

    # ---- test with the best model (the decoder plays no part in retrieval) ------------------------------
    try:
        metrics = trainer.evaluate(test_set, metric_key_prefix="test")
    except Exception:
        logger.error("Testing failed; the trained model is saved in %s (evaluate it again with "
                     "examples/evaluate.py).", training_args.output_dir)
        raise
    metrics["test_selected_on"] = eval_split
    trainer.log_metrics("test", metrics)
    trainer.save_metrics("test", metrics)
    if trainer.is_world_process_zero():
        try:
            from decd.visualize import plot_training_curves

            plot_training_curves(trainer.state.log_history, Path(training_args.output_dir) / "training_curves.png")
        except (ImportError, ValueError) as error:
            logger.warning("No training-curve plot: %s", error)
        print("\nTest retrieval (%s, %s split, best model selected on %s):" % (
            data_args.dataset_name, data_args.test_split, eval_split))
        for name in ("R1", "R5", "R10", "mAP", "mINP"):
            print(f"  {name:>5}: {metrics[f'test_{name}']:6.2f}")
        print(f"Saved the {'full' if model_args.keep_decoder else 'inference'} model to {training_args.output_dir}")
        if push_to_hub:
            from decd.hub import publish

            url = publish(training_args.output_dir, training_args.hub_model_id, keep_decoder=model_args.keep_decoder,
                          private=bool(training_args.hub_private_repo), token=training_args.hub_token,
                          dataset_name=data_args.dataset_name)
            print(f"Published to {url}")
    return metrics


if __name__ == "__main__":
    main()
