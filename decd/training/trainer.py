"""`DecdTrainer`: transformers' `Trainer` with DECD's parameter groups, per-loss logging, the P x K sampler and
retrieval evaluation; `DecdTrainingArguments`: `TrainingArguments` whose defaults are the method's recipe."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from modeling_decd import NEW_MODULE_PREFIXES

from ..data import without_image_decoding
from ..processes import launched_processes, runs_on_cpus
from ..retrieval import evaluate_retrieval
from .runs import resolve_resume, write_manifest
from .sampler import IdentityBalancedSampler

logger = logging.getLogger(__name__)
LOSS_PARTS = ("loss_sew", "loss_mcm", "loss_id")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step, the loss part and likely causes."""


@dataclass
class DecdTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose defaults are the method's recipe (docs/method.md, "Training recipe"), plus DECD's knobs.

    AdamW at learning rate 1e-5 for the encoders and 5x for the new modules (decoder, heads), weight decay 4e-5,
    a cosine schedule with 5 warm-up epochs of 60, batch 64, IRRA's augmentation, model selection by R@1. These
    are the only defaults: a recipe file (`recipes/*.json`) states every value it changes.
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the encoders (method: 1e-5)."})
    new_module_lr_multiplier: float = field(
        default=5.0, metadata={"help": "Learning-rate multiplier of the new modules (decoder, heads) over the encoders."}
    )
    weight_decay: float = field(default=4e-5, metadata={"help": "Weight decay (method: 4e-5)."})
    num_train_epochs: float = field(default=60.0, metadata={"help": "Training epochs (method: 60)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (method: cosine)."})
    warmup_steps: float = field(
        default=5 / 60, metadata={"help": "Warm-up: steps, or a fraction (< 1) of all steps (method: 5 of 60 epochs)."}
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Pairs per batch and device (method: 64)."})
    samples_per_identity: int = field(
        default=0,
        metadata={"help": "K of an identity-balanced P x K sampler (P = batch size / K); 0 samples pairs at random."},
    )
    augment: bool = field(
        default=True, metadata={"help": "IRRA's image augmentation (flip, pad + crop, random erasing)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: DECD's collator needs the raw image and caption columns."}
    )
    metric_for_best_model: str | None = field(
        default="R1", metadata={"help": "Retrieval metric for model selection (R1, R5, R10, mAP, mINP)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete an earlier run's files in output_dir before training (without it, a folder that "
                          "holds another run is refused unless the run resumes from one of its checkpoints)."},
    )
    keep_freed_cpu_memory: bool = field(
        default=True,
        metadata={"help": "Training on a CPU (Linux, glibc): keep freed memory in the process for the next step "
                          "instead of returning it to the kernel (decd.training.keep_freed_cpu_memory). "
                          "Same results, fewer page faults; the process keeps its peak heap."},
    )

    def __post_init__(self):
        # Processes a launcher (torchrun) started on CPUs join only as `use_cpu` processes: without it each one
        # would train alone on all the data, with a Sew loss over its own batch (decd.processes).
        if not self.use_cpu and launched_processes() > 1 and runs_on_cpus():
            self.use_cpu = True
        super().__post_init__()


class DecdTrainer(Trainer):
    """`Trainer` with per-loss logging, parameter groups for new modules, a P x K sampler, and retrieval evaluation.

    `eval_dataset` is a dict (or `DatasetDict`) with `gallery` (column `image`, `person_id`) and `queries`
    (`caption`, `person_id`); evaluation encodes each once per call, gathered across processes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.train_dataset is not None:  # images reach the collator as stored; it opens them (load_image)
            self.train_dataset = without_image_decoding(self.train_dataset)
        self._loss_part_sums: dict[str, float] = {}
        self._loss_part_count = 0

    # ---- checkpoints: complete or refused -----------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`; a checkpoint to resume from is checked first (decd.training.runs.check_checkpoint)."""
        return super().train(resolve_resume(resume_from_checkpoint, self.args.output_dir), *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # written last: a checkpoint without it was cut short
            write_manifest(Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}")

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
            # Summed on the loss's device: reading a GPU value every step would make the host wait for the GPU.
            for name in LOSS_PARTS:
                value = outputs.get(name)
                if value is not None:
                    self._loss_part_sums[name] = self._loss_part_sums.get(name, 0.0) + value.detach().float()
            self._loss_part_count += 1
            if loss.device.type == "cpu" and not torch.isfinite(loss.detach()).all():  # nothing to wait for: now
                raise NonFiniteLossError(self._explain_non_finite(
                    {name: outputs.get(name) for name in LOSS_PARTS}, f"at step {self.state.global_step + 1}"))
        return (loss, outputs) if return_outputs else loss

    def _explain_non_finite(self, parts: dict, when: str) -> str:
        bad = [name for name, value in parts.items() if value is not None and not torch.isfinite(value.detach()).all()]
        model = self.accelerator.unwrap_model(self.model)
        weights_bad = any(not torch.isfinite(parameter.detach()).all() for parameter in model.parameters())
        return (
            f"the training loss is not finite {when} "
            f"({', '.join(bad) if bad else 'the weighted total'} went non-finite"
            f"{'; the weights already hold NaN or inf' if weights_bad else ''}). Likely causes: a learning rate too "
            f"high for this model (now {self.args.learning_rate:g}), a temperature too low for random weights "
            f"(now {float(model.temperature):g}; the from-scratch default uses 0.2), or fp16 overflow. Training "
            "stopped here; the last saved checkpoint is intact."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_part_count:
            names = sorted(self._loss_part_sums)
            means = torch.stack([self._loss_part_sums[name] for name in names]) / self._loss_part_count
            if self.args.world_size > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            if not torch.isfinite(means).all():  # on a GPU, found here: at most logging_steps steps late
                first = self.state.global_step - self._loss_part_count + 1
                raise NonFiniteLossError(self._explain_non_finite(
                    dict(zip(names, means)), f"in steps {first} to {self.state.global_step}"))
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


__all__ = ["DecdTrainer", "DecdTrainingArguments", "NonFiniteLossError"]
