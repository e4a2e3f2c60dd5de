#!/usr/bin/env python
"""Train DECD for text-based person search with `transformers.Trainer`, from a recipe file.

    python examples/train.py recipes/synthetic.json                     # the main job (`make train`): CPU, offline
    accelerate launch examples/train.py recipes/cuhk-pedes.json --data_dir /data/CUHK-PEDES   # the paper's recipe
    torchrun --nproc_per_node 2 examples/train.py recipes/synthetic.json   # N processes on CPUs (or GPUs)

A recipe (`recipes/*.json`, read by `decd.training.recipe`) states every value it changes from the method's
defaults (docs/method.md); flags after it override it. Reads top to bottom: arguments -> data -> model ->
Trainer -> train -> save -> test evaluation.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import transformers
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from decd.data import PersonSearchDataError, load_person_search, num_identities  # noqa: E402
from decd.processes import ProcessCountError, check_process_count, end_processes  # noqa: E402
from decd.training import DecdTrainer, DecdTrainingArguments, DecdTrainingCollator, keep_freed_cpu_memory  # noqa: E402
from decd.training.recipe import RecipeError, build_model, parse_arguments  # noqa: E402
from decd.training.runs import RunFolderError, prepare_output_dir, resolve_resume  # noqa: E402

logger = logging.getLogger("decd.train")


def check_settings(training_args: DecdTrainingArguments, train_set) -> None:
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
    try:
        model_args, data_args, training_args = parse_arguments(argv)
    except (RecipeError, ValueError) as error:  # a bad recipe, start or loss setting, before any data is loaded
        raise SystemExit(f"error: {error}") from None
    # Asked to be one of several processes but alone (accelerate launch --cpu starts one): said, not trained alone.
    command = shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])  # named in how to launch it
    try:
        check_process_count(training_args.world_size, command)
    except ProcessCountError as error:
        raise SystemExit(f"error: {error}") from None

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    world = training_args.world_size
    logger.info("Training on %d process%s (%s): the Sew loss compares each pair with the global batch of %d pairs",
                world, "es" if world > 1 else "", training_args.device.type,
                world * training_args.per_device_train_batch_size)
    # Process-wide, hence here: glibc keeps the memory a CPU step frees for the next step (decd.training.memory).
    if training_args.device.type == "cpu" and training_args.keep_freed_cpu_memory and keep_freed_cpu_memory():
        logger.info("Freed CPU memory is kept for reuse between steps (--keep_freed_cpu_memory).")

    # A finished run is never destroyed: another run's folder is refused unless this run resumes or overwrites it.
    try:
        resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
        if training_args.should_save:
            prepare_output_dir(training_args.output_dir, resume is not None, training_args.overwrite_output_dir)
    except RunFolderError as error:
        raise SystemExit(f"error: {error}") from None

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
    try:  # a bad record or file in any split: its message (the file, the split, each record), not a traceback
        train_set = load_person_search(split="train", **load)
        if data_args.max_train_samples is not None:
            train_set = train_set.select(range(min(data_args.max_train_samples, len(train_set))))
        # Every split the run will use is loaded (and its images decoded) now, not after hours of training.
        test_set = load_person_search(split=data_args.test_split, **load)
        eval_split = data_args.eval_split
        try:
            eval_set = test_set if eval_split == data_args.test_split else load_person_search(split=eval_split, **load)
        except PersonSearchDataError as error:
            no_val = "unknown split" in str(error) or ("no usable records" in str(error)
                                                       and "skipped" not in str(error))
            if eval_split != "val" or not no_val:
                raise
            logger.warning("No val split (%s); selecting the model on %s instead.", error, data_args.test_split)
            eval_split, eval_set = data_args.test_split, test_set
    except PersonSearchDataError as error:
        raise SystemExit(f"error: {error}") from None
    check_settings(training_args, train_set)
    identities = num_identities(train_set)
    logger.info("%d training pairs, %d identities; model selection on %s (%d queries, %d gallery images)",
                len(train_set), identities, eval_split, len(eval_set["queries"]), len(eval_set["gallery"]))

    # ---- model --------------------------------------------------------------------------------------
    model, processor = build_model(model_args, identities)
    logger.info("DECD with %.1fM parameters (%s)", sum(p.numel() for p in model.parameters()) / 1e6,
                model_args.model_name_or_path or f"{model_args.config_preset} from random weights")

    # ---- train ----------------------------------------------------------------------------------------
    # Publishing happens once, at the end (decd.hub.publish: inference model + processor + code + card),
    # not at every checkpoint as the Trainer's own push would.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and not training_args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id ORG/NAME.")
    logger.info("Image augmentation: %s", "on" if training_args.augment else "off")
    # A compiled step (--torch_compile) needs the same shapes every step: captions padded to the whole context.
    collator = DecdTrainingCollator(processor, augment=training_args.augment, mask_captions=model.config.mcm_weight > 0,
                                    pad_to_context=training_args.torch_compile)
    trainer = DecdTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, processing_class=processor)
    train_result = trainer.train(resume_from_checkpoint=resume)
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
    try:
        main()
    finally:
        end_processes()
