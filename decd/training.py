"""Training DECD with `transformers.Trainer`: collators, IRRA augmentation, P x K sampler, `DecdTrainer`."""

from __future__ import annotations

import ctypes
import logging
import math
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainingArguments

from .data import without_image_decoding
from .retrieval import evaluate_retrieval

NEW_MODULE_PREFIXES = ("decoder.", "mcm_head.", "identity_classifier.", "log_logit_scale")
logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step, the loss part and likely causes."""


# ----------------------------------------------------------------------------------------------------
# Augmentation (IRRA): flip 0.5, pad 10 + random crop back, random erasing (p 0.5, area 0.02-0.4)
# ----------------------------------------------------------------------------------------------------
def augment_person_crops(
    pixel_values: torch.Tensor,
    flip_probability: float = 0.5,
    padding: int = 10,
    erase_probability: float = 0.5,
    erase_area: tuple[float, float] = (0.02, 0.4),
    erase_aspect: tuple[float, float] = (0.3, 3.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment normalised crops [batch, 3, H, W] (returns a new tensor of the same shape).

    Padding and erasing fill with 0, i.e. the dataset mean colour after CLIP normalisation.
    """
    batch, _, height, width = pixel_values.shape
    padded = torch.nn.functional.pad(pixel_values, (padding, padding, padding, padding))
    output = torch.empty_like(pixel_values)
    draws = torch.rand(batch, 8, generator=generator)
    for index in range(batch):
        top = int(draws[index, 0] * (2 * padding + 1))
        left = int(draws[index, 1] * (2 * padding + 1))
        crop = padded[index, :, top : top + height, left : left + width]
        if draws[index, 2] < flip_probability:
            crop = crop.flip(-1)
        crop = crop.clone()
        if draws[index, 3] < erase_probability:
            area = height * width * (erase_area[0] + (erase_area[1] - erase_area[0]) * draws[index, 4].item())
            log_low, log_high = math.log(erase_aspect[0]), math.log(erase_aspect[1])
            aspect = math.exp(log_low + (log_high - log_low) * draws[index, 5].item())
            erase_h = min(height, max(1, int(round(math.sqrt(area * aspect)))))
            erase_w = min(width, max(1, int(round(math.sqrt(area / aspect)))))
            y = int(draws[index, 6] * (height - erase_h + 1))
            x = int(draws[index, 7] * (width - erase_w + 1))
            crop[:, y : y + erase_h, x : x + erase_w] = 0
        output[index] = crop
    return output


# ----------------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------------
@dataclass
class DecdTrainingCollator:
    """Rows of a training split (`image`, `caption`, `person_id`) -> a `DecdModel.forward` batch.

    `image` may be anything `load_image` opens; `DecdTrainer` hands over the stored path or bytes, so
    the processor opens each image the way every other entry point does. Adds `caption_quality`, and
    MCM inputs (`masked_input_ids`, `mcm_labels`) when `mask_captions`.
    """

    processor: Any
    augment: bool = True
    mask_captions: bool = True

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            text=[row["caption"] for row in rows], images=[row["image"] for row in rows], return_tensors="pt"
        )
        features = dict(batch)
        if self.augment:
            features["pixel_values"] = augment_person_crops(features["pixel_values"])
        if self.mask_captions:
            features.update(self.processor.mask_captions(features["input_ids"], features["attention_mask"]))
        features["person_ids"] = torch.tensor([int(row["person_id"]) for row in rows], dtype=torch.long)
        return features


# ----------------------------------------------------------------------------------------------------
# Identity-balanced sampling: P identities x K samples per batch
# ----------------------------------------------------------------------------------------------------
class IdentityBalancedSampler(Sampler[int]):
    """Yield indices so that every consecutive `batch_size` block holds `batch_size // K` identities x K samples.

    Identities with fewer than K samples are topped up by sampling with replacement. The number of
    batches per epoch is fixed (about one pass over the data). Under several processes, accelerate
    hands whole consecutive batches to each process, so every per-process batch stays P x K; call
    `set_epoch` (the Trainer does) for a new order each epoch.
    """

    def __init__(self, person_ids, batch_size: int, samples_per_identity: int, seed: int = 0):
        if samples_per_identity < 1 or batch_size % samples_per_identity:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of samples_per_identity ({samples_per_identity})."
            )
        self.person_ids = np.asarray(person_ids)
        self.batch_size = batch_size
        self.samples_per_identity = samples_per_identity
        self.identities_per_batch = batch_size // samples_per_identity
        self.seed = seed
        self.epoch = 0
        self.index_by_identity = {}
        for index, identity in enumerate(self.person_ids.tolist()):
            self.index_by_identity.setdefault(identity, []).append(index)
        if len(self.index_by_identity) < self.identities_per_batch:
            raise ValueError(
                f"Only {len(self.index_by_identity)} identities, fewer than the {self.identities_per_batch} needed per "
                f"batch (batch_size {batch_size} / samples_per_identity {samples_per_identity})."
            )
        self.num_batches = max(1, len(self.person_ids) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        k = self.samples_per_identity
        identities = list(self.index_by_identity)
        pools: dict[Any, list[list[int]]] = {}

        def refill(identity):
            members = np.asarray(self.index_by_identity[identity])
            if len(members) < k:
                members = rng.choice(members, size=k, replace=True)
            members = rng.permutation(members)
            usable = len(members) // k * k
            pools[identity] = [members[i : i + k].tolist() for i in range(0, usable, k)]

        for identity in identities:
            refill(identity)
        for _ in range(self.num_batches):
            with_chunks = [identity for identity in identities if pools[identity]]
            if len(with_chunks) < self.identities_per_batch:
                for identity in identities:
                    if not pools[identity]:
                        refill(identity)
                with_chunks = identities
            chosen = rng.choice(len(with_chunks), size=self.identities_per_batch, replace=False)
            for position in chosen:
                yield from pools[with_chunks[position]].pop()


# ----------------------------------------------------------------------------------------------------
# CPU memory reuse between steps
# ----------------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_applied_memory_reuse = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep the memory a CPU training step frees, so that the next step reuses it.

    Each step frees and re-allocates the same large buffers: the dense gradients of the 49,409-row token
    embedding and MCM output layer (25 MB each at width 128), activations, optimizer temporaries. glibc's
    defaults serve blocks of that size by `mmap` or trim them back to the kernel when freed, so every step
    faults in and zeroes fresh pages. This serves blocks under 1 GiB from the heap and never trims it: the
    process keeps its peak heap, as GPU caching allocators keep theirs, and steady-state steps fault almost
    nothing (`benchmarks/train_step.py` and `--memory glibc-defaults` count the page faults per step).

    Process-wide and not undone. Returns whether it applied: False off Linux with glibc (macOS, Windows,
    musl), where nothing is changed.
    """
    global _applied_memory_reuse
    if _applied_memory_reuse:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # mallopt's value is an int: -1 as the trim threshold is glibc's "never trim".
    _applied_memory_reuse = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, -1))
    return _applied_memory_reuse


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------
@dataclass
class DecdTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus DECD's recipe knobs (defaults: docs/method.md's recipe)."""

    new_module_lr_multiplier: float = field(
        default=5.0, metadata={"help": "Learning-rate multiplier of the new modules (decoder, heads) over the encoders."}
    )
    samples_per_identity: int = field(
        default=0,
        metadata={"help": "K of an identity-balanced P x K sampler (P = batch size / K); 0 samples pairs at random."},
    )
    augment: bool | None = field(
        default=None,
        metadata={"help": "IRRA-style image augmentation (flip, pad + crop, random erasing). Default: on, except "
                          "for the synthetic set, whose renderer already varies pose, scale, background and occlusion."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: DECD's collator needs the raw image and caption columns."}
    )
    metric_for_best_model: str | None = field(
        default="R1", metadata={"help": "Retrieval metric for model selection (R1, R5, R10, mAP, mINP)."}
    )
    keep_freed_cpu_memory: bool = field(
        default=True,
        metadata={"help": "Training on a CPU (Linux, glibc): keep freed memory in the process for the next step "
                          "instead of returning it to the kernel (see decd.training.keep_freed_cpu_memory). "
                          "Same results, fewer page faults; the process keeps its peak heap."},
    )


class DecdTrainer(Trainer):
    """`Trainer` with per-loss logging, parameter groups for new modules, a P x K sampler, and retrieval evaluation.

    `eval_dataset` is a dict (or `DatasetDict`) with `gallery` (column `image`, `person_id`) and `queries`
    (`caption`, `person_id`); evaluation encodes each once per call, gathered across processes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.device.type == "cpu" and getattr(self.args, "keep_freed_cpu_memory", False):
            if keep_freed_cpu_memory():
                logger.info("Freed CPU memory is kept for reuse between steps (--keep_freed_cpu_memory).")
        if self.train_dataset is not None:  # images reach the collator as stored; it opens them (load_image)
            self.train_dataset = without_image_decoding(self.train_dataset)
        self._loss_part_sums: dict[str, float] = {}
        self._loss_part_count = 0

    # ---- sampling -----------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        k = getattr(self.args, "samples_per_identity", 0)
        if not k:
            return super()._get_train_sampler(train_dataset)
        return IdentityBalancedSampler(
            train_dataset["person_id"], self.args.per_device_train_batch_size, k, seed=self.args.seed
        )

    # ---- optimiser ------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(model))
        base_lr = self.args.learning_rate
        new_lr = base_lr * getattr(self.args, "new_module_lr_multiplier", 1.0)
        groups: dict[tuple[bool, bool], list] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            groups.setdefault((name.startswith(NEW_MODULE_PREFIXES), name in decay_names), []).append(parameter)
        parameter_groups = [
            {"params": params, "lr": new_lr if is_new else base_lr,
             "weight_decay": self.args.weight_decay if decays else 0.0}
            for (is_new, decays), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("params", None)
        self.optimizer = optimizer_cls(parameter_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- per-loss logging ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(self._explain_non_finite(outputs))
            for name in ("loss_sew", "loss_mcm", "loss_id"):
                value = outputs.get(name)
                if value is not None:
                    self._loss_part_sums[name] = self._loss_part_sums.get(name, 0.0) + float(value.detach())
            self._loss_part_count += 1
        return (loss, outputs) if return_outputs else loss

    def _explain_non_finite(self, outputs) -> str:
        parts = {name: outputs.get(name) for name in ("loss_sew", "loss_mcm", "loss_id")}
        bad = [name for name, value in parts.items() if value is not None and not torch.isfinite(value.detach()).all()]
        model = self.accelerator.unwrap_model(self.model)
        weights_bad = any(not torch.isfinite(parameter.detach()).all() for parameter in model.parameters())
        return (
            f"the training loss is not finite at step {self.state.global_step + 1} "
            f"({', '.join(bad) if bad else 'the weighted total'} went non-finite"
            f"{'; the weights already hold NaN or inf' if weights_bad else ''}). Likely causes: a learning rate too "
            f"high for this model (now {self.args.learning_rate:g}), a temperature too low for random weights "
            f"(now {float(model.temperature):g}; the from-scratch default uses 0.2), or fp16 overflow. Training "
            "stopped here; the last saved checkpoint is intact."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_part_count:
            names = sorted(self._loss_part_sums)
            means = torch.tensor([self._loss_part_sums[n] / self._loss_part_count for n in names],
                                 device=self.args.device)
            if self.args.world_size > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs.update({name: round(float(value), 4) for name, value in zip(names, means)})
            self._loss_part_sums, self._loss_part_count = {}, 0
        super().log(logs, start_time)

    # ---- retrieval evaluation ----------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if eval_dataset is None or "gallery" not in eval_dataset or "queries" not in eval_dataset:
            raise ValueError("DecdTrainer.evaluate needs a dataset dict with 'gallery' and 'queries' splits.")
        metrics = evaluate_retrieval(
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            gallery=eval_dataset["gallery"],
            queries=eval_dataset["queries"],
            batch_size=self.args.per_device_eval_batch_size,
            accelerator=self.accelerator,
            num_workers=self.args.dataloader_num_workers,
            show_progress=self.is_local_process_zero() and not self.args.disable_tqdm,
        )
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


__all__ = [
    "NonFiniteLossError",
    "DecdTrainer",
    "DecdTrainingArguments",
    "DecdTrainingCollator",
    "IdentityBalancedSampler",
    "augment_person_crops",
    "keep_freed_cpu_memory",
]
