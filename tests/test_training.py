"""Training: gradient accumulation, two-process Sew loss, sampler, collator, Trainer integration (a launched
two-process run: test_multiprocess.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from decd.data import load_person_search, without_image_decoding
from decd.training import (
    DecdTrainer,
    DecdTrainingArguments,
    DecdTrainingCollator,
    IdentityBalancedSampler,
    NonFiniteLossError,
    augment_person_crops,
)
from modeling_decd import DecdModel
from processing_decd import DecdProcessor

from .helpers import random_batch, tiny_config
from .test_data import _custom, _png

REPO = Path(__file__).resolve().parents[1]




def _trainer(tmp_path, train_set, eval_set=None, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, seed=0, new_module_lr_multiplier=1.0, dataloader_num_workers=0,
    )
    settings.update(overrides)
    args = DecdTrainingArguments(**settings)
    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=6, id_weight=0.5))
    processor = DecdProcessor(image_size=model.config.image_size)
    collator = DecdTrainingCollator(processor, augment=False, mask_captions=True)
    return DecdTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                       data_collator=collator, processing_class=processor)


def test_gradient_accumulation_applies_the_mean_of_micro_batch_gradients(tmp_path, tiny_set):
    train_set = load_person_search("synthetic", tiny_set, split="train").select(range(8))
    trainer = _trainer(tmp_path, train_set, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                       max_steps=1, gradient_accumulation_steps=2, max_grad_norm=0.0, weight_decay=0.0,
                       train_sampling_strategy="sequential")
    trainer.data_collator = DecdTrainingCollator(trainer.processing_class, augment=False, mask_captions=False)
    model = trainer.model
    names = ["text_projection.weight", "visual_projection.weight", "identity_classifier.weight",
             "text_model.encoder.layers.0.mlp.fc1.weight"]
    before = {name: model.get_parameter(name).detach().clone() for name in names}

    gradients = []
    for start in (0, 4):
        model.zero_grad()
        batch = trainer.data_collator([train_set[i] for i in range(start, start + 4)])
        model(**batch).loss.backward()
        gradients.append({name: model.get_parameter(name).grad.clone() for name in names})
    model.zero_grad()

    trainer.train()
    for name in names:
        applied = before[name] - model.get_parameter(name).detach()  # SGD, lr 1: the applied gradient
        mean = (gradients[0][name] + gradients[1][name]) / 2
        assert torch.allclose(applied, mean, atol=1e-5, rtol=1e-4), name
        assert not torch.allclose(applied, 2 * mean, atol=1e-5, rtol=1e-4), name


def _two_process_worker(rank, world_size, init_file, output_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=4, id_weight=0.5))
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    batch = random_batch(model.config, batch_size=8, with_mcm=False)
    half = {name: value[rank * 4:(rank + 1) * 4] for name, value in batch.items()}
    output = ddp(**half)
    output.loss.backward()
    if rank == 0:
        torch.save({"loss_sew": output.loss_sew.detach(), "loss": output.loss.detach(),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}},
                   os.path.join(output_dir, "rank0.pt"))
    # Leave without tearing DDP down: the Reducer's destructor joins gloo's worker thread while holding the
    # GIL, and that thread may still need the GIL to free its last work item, a deadlock that hung this test in
    # about one full-suite run in two (py-spy: ~ProcessGroupGloo -> std::thread::join). Once the barrier
    # returns, both ranks are done; the file above is closed.
    torch.distributed.barrier()
    os._exit(0)


def test_sew_loss_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_two_process_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    distributed = torch.load(tmp_path / "rank0.pt", weights_only=True)

    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=4, id_weight=0.5))
    output = model(**random_batch(model.config, batch_size=8, with_mcm=False))
    output.loss.backward()
    assert torch.allclose(distributed["loss_sew"], output.loss_sew, atol=1e-5)
    checked = 0
    for name, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        assert torch.allclose(distributed["grads"][name], parameter.grad, atol=1e-5, rtol=1e-3), name
        checked += 1
    assert checked > 20


def test_identity_balanced_sampler_builds_p_by_k_batches():
    person_ids = [i // 3 for i in range(30)] + [10]  # identity 10 has a single sample
    sampler = IdentityBalancedSampler(person_ids, batch_size=8, samples_per_identity=2, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 3 * 8
    for start in range(0, len(indices), 8):
        batch_ids = [person_ids[i] for i in indices[start:start + 8]]
        counts = {identity: batch_ids.count(identity) for identity in set(batch_ids)}
        assert len(counts) == 4 and set(counts.values()) == {2}, counts
    sampler.set_epoch(1)
    assert list(sampler) != indices
    sampler.set_epoch(0)
    assert list(sampler) == indices
    with pytest.raises(ValueError, match="multiple of samples_per_identity"):
        IdentityBalancedSampler(person_ids, batch_size=9, samples_per_identity=2)
    with pytest.raises(ValueError, match="fewer than the 8 needed"):
        IdentityBalancedSampler([0, 0, 1, 1], batch_size=16, samples_per_identity=2)


def test_augmentation_keeps_shape_and_changes_pixels():
    pixels = torch.randn(6, 3, 32, 16)
    generator = torch.Generator().manual_seed(0)
    augmented = augment_person_crops(pixels, generator=generator)
    assert augmented.shape == pixels.shape
    assert not torch.equal(augmented, pixels)
    unchanged = augment_person_crops(pixels, flip_probability=0, padding=0, erase_probability=0)
    assert torch.equal(unchanged, pixels)
    flipped = augment_person_crops(pixels, flip_probability=1, padding=0, erase_probability=0)
    assert torch.equal(flipped, pixels.flip(-1))


def test_collator_builds_a_full_training_batch(tiny_set):
    rows = [load_person_search("synthetic", tiny_set, split="train")[i] for i in range(5)]
    collator = DecdTrainingCollator(DecdProcessor(image_size=(128, 64)))
    batch = collator(rows)
    assert batch["pixel_values"].shape == (5, 3, 128, 64)
    assert batch["input_ids"].shape == batch["masked_input_ids"].shape == batch["mcm_labels"].shape
    assert ((batch["mcm_labels"] != -100).sum(dim=1) >= 1).all()
    assert batch["caption_quality"].shape == (5,)
    assert batch["person_ids"].tolist() == [row["person_id"] for row in rows]


def test_trainer_logs_each_loss_uses_parameter_groups_and_evaluates(tmp_path, tiny_set):
    train_set = load_person_search("synthetic", tiny_set, split="train")
    val_set = load_person_search("synthetic", tiny_set, split="val")
    trainer = _trainer(tmp_path, train_set, val_set, new_module_lr_multiplier=5.0, samples_per_identity=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"loss_sew", "loss_mcm", "loss_id"} <= entry.keys() for entry in logged)
    learning_rates = {group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert learning_rates == {1e-3, 5e-3}
    decoder_weight = trainer.model.get_parameter("decoder.text_input.weight")
    group = next(g for g in trainer.optimizer.param_groups if any(p is decoder_weight for p in g["params"]))
    assert group["initial_lr"] == 5e-3
    metrics = trainer.evaluate()
    for name in ("eval_R1", "eval_R5", "eval_R10", "eval_mAP", "eval_mINP"):
        assert 0 <= metrics[name] <= 100
    assert metrics["eval_num_queries"] == len(val_set["queries"])
    assert metrics["eval_num_gallery"] == len(val_set["gallery"])


def test_resume_from_checkpoint(tmp_path, tiny_set):
    train_set = load_person_search("synthetic", tiny_set, split="train")
    first = _trainer(tmp_path, train_set, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()
    second = _trainer(tmp_path, train_set, max_steps=3, save_strategy="no")
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 3


# One CPU training step's allocation pattern, reduced: two lookups in a 49,409-row embedding (caption and
# masked caption), a gathered vocabulary head, AdamW. Prints the page faults of each step.
_STEP_FAULTS_SCRIPT = r"""
import json, resource, sys, torch
from decd.training import keep_freed_cpu_memory
applied = keep_freed_cpu_memory() if sys.argv[1] == "kept" else None
torch.manual_seed(0)
emb, head, body = torch.nn.Embedding(49409, 128), torch.nn.Linear(128, 49409), torch.nn.Linear(128, 128)
opt = torch.optim.AdamW([*emb.parameters(), *head.parameters(), *body.parameters()], lr=1e-4)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ids, masked = torch.randint(0, 49409, (64, 35)), torch.randint(0, 49409, (16, 35))
    words = torch.unique(ids)[:200]
    logits = torch.nn.functional.linear(body(emb(masked)).reshape(-1, 128), head.weight[words], head.bias[words])
    (body(emb(ids)).square().mean() + logits.logsumexp(-1).mean()).backward()
    opt.step()
    opt.zero_grad()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _step_faults(memory: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _STEP_FAULTS_SCRIPT, memory], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_keep_freed_cpu_memory_lets_steps_reuse_memory_instead_of_faulting_in_pages():
    import platform

    kept, default = _step_faults("kept"), _step_faults("glibc-defaults")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert kept["applied"] is False  # nothing to change elsewhere, and it says so
        return
    assert kept["applied"] is True
    steady_kept, steady_default = sorted(kept["faults"][4:]), sorted(default["faults"][4:])
    # glibc's defaults fault in tens of MB of fresh pages every step (25 MB = 6,176 pages per gradient) ...
    assert steady_default[len(steady_default) // 2] > 6000, default
    # ... kept memory is reused: after the first steps have grown the heap, steps fault (almost) nothing.
    assert steady_kept[len(steady_kept) // 2] < 500, kept


# ----------------------------------------------------------------------------------------------------
# Training that goes wrong says so
# ----------------------------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_training_naming_the_step_and_the_part(tiny_set, tmp_path):
    train_set = load_person_search("synthetic", tiny_set, split="train")
    torch.manual_seed(0)
    model = DecdModel(tiny_config(num_identities=6, temperature=0.2))
    processor = DecdProcessor(image_size=model.config.image_size)
    trainer = DecdTrainer(
        model=model, train_dataset=train_set, processing_class=processor,
        data_collator=DecdTrainingCollator(processor, augment=False, mask_captions=True),
        args=DecdTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=5,
                                   learning_rate=1e-3, report_to="none", save_strategy="no", eval_strategy="no",
                                   disable_tqdm=True, use_cpu=True, warmup_steps=0),
    )
    with torch.no_grad():  # what a diverged update leaves behind in the decoder
        model.mcm_head.decoder.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 1 \(loss_mcm went non-finite; the weights "
                                                 r"already hold NaN or inf\).*learning rate.*temperature"):
        trainer.train()


def test_an_error_inside_a_batch_names_the_file(tmp_path):
    records = [dict(id=i, file_path=f"{i}.png", captions=[f"person {i}"], split="train") for i in range(3)]
    root = _custom(tmp_path, records, {f"{i}.png": _png for i in range(3)})
    train_set = load_person_search("custom", root, split="train")
    (root / "imgs" / "2.png").write_bytes(b"damaged after loading")
    collator = DecdTrainingCollator(DecdProcessor(image_size=(128, 64)), augment=False, mask_captions=False)
    rows = list(without_image_decoding(train_set))
    with pytest.raises(ValueError, match=r"imgs/2\.png: not a readable image"):
        collator(rows)


def test_a_non_finite_loss_found_at_a_logging_step_names_the_steps_it_happened_in(tmp_path, tiny_set):
    """On a GPU the loss parts are summed on the device and read at logging steps only (a read every step would stall
    the GPU): a NaN summed there stops training, naming the window of steps and the part."""
    train_set = load_person_search("synthetic", tiny_set, split="train")
    trainer = _trainer(tmp_path, train_set)
    trainer.state.global_step = 30
    trainer._loss_part_sums = {"loss_sew": torch.tensor(12.0), "loss_mcm": torch.tensor(float("nan"))}
    trainer._loss_part_count = 10
    with pytest.raises(NonFiniteLossError, match=r"not finite in steps 21 to 30 \(loss_mcm went non-finite\)"):
        trainer.log({"loss": 1.0})
    trainer._loss_part_sums = {"loss_sew": torch.tensor(12.0), "loss_mcm": torch.tensor(3.0)}
    trainer.log({"loss": 1.0})  # finite: logged as means over the window
    assert trainer.state.log_history[-1]["loss_sew"] == 1.2 and trainer.state.log_history[-1]["loss_mcm"] == 0.3
