#!/usr/bin/env python
"""A training step of the paper's model on one GPU, eager and compiled, against transformers' CLIPModel (a benchmark).

    python benchmarks/train_step_gpu.py --output_json benchmarks/results/train_step_gpu_h200.json
    python benchmarks/train_step_gpu.py --device cpu --tiny --steps 2 --warmup 1    # a smoke run of the script

Every variant takes the same batch of random pairs: ViT-B/16 sizes (`DecdConfig.vit_base_patch16()`, random
weights), 384 x 128 crops, captions of 15 to 40 random words padded to CLIP's 77-token context, MCM masks drawn
by the processor's rule, two captions per identity. A step is forward (bf16 autocast) + backward + AdamW
(`fused=True`) + `zero_grad(set_to_none=True)`, as the Trainer's default optimizer does. Variants:

    decd          the paper's recipe: Sew + whole-vocabulary MCM on every pair
    decd-cap32    the same, MCM scoring at most 32 masked positions per caption (`mcm_max_positions=32`)
    dual          the dual encoder alone: Sew, no MCM (the decoder never runs)
    clip          transformers' CLIPModel with its contrastive loss (`return_loss=True`; 384 x 128 through
                  `interpolate_pos_encoding=True`), the reference a DECD step should approach

each `eager` or `compiled` (`torch.compile(model)`, or `compiled-graphs`: `mode="reduce-overhead"`, CUDA graphs),
at each batch size. Per variant: median step time over `--steps` steps (CUDA events, after `--warmup` steps, the
first of which compiles), pairs/s, peak GPU memory, FLOPs per pair (`torch.utils.flop_counter.FlopCounterMode`
over one eager step computing what the variant computes) and their share of the GPU's dense bf16 peak
(`--peak_tflops`, default 989: the H100/H200 datasheet), and the loss next to the eager variant's on the same
batch. Variants run in the order given until `--time_budget` seconds have passed; the JSON is rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configuration_decd import DecdConfig  # noqa: E402
from modeling_decd import DecdModel  # noqa: E402
from processing_decd import DecdProcessor  # noqa: E402

WORDS = ("man woman young old wearing black white red blue green grey yellow jacket coat shirt t-shirt jeans "
         "trousers shorts skirt dress shoes boots sneakers bag backpack handbag carrying holding hair long short "
         "dark light striped with a the and of in on his her glasses cap hat umbrella walking phone").split()
DEFAULT_VARIANTS = ("decd:eager:64", "decd:compiled:64", "clip:eager:64", "clip:compiled:64", "dual:eager:64",
                    "decd-cap32:compiled:64", "decd:compiled:128", "clip:compiled:128", "decd:eager:128",
                    "clip:eager:128", "dual:compiled:64", "decd:compiled-graphs:64")


def make_batch(processor: DecdProcessor, batch_size: int, image_size, device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    captions = []
    for _ in range(batch_size):
        count = int(torch.randint(15, 41, (1,), generator=generator))
        picks = torch.randint(0, len(WORDS), (count,), generator=generator).tolist()
        captions.append(" ".join(WORDS[index] for index in picks))
    text = processor(text=captions, padding="max_length", return_tensors="pt")
    batch = dict(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                 caption_quality=text["caption_quality"],
                 pixel_values=torch.randn(batch_size, 3, *image_size, generator=generator),
                 person_ids=torch.arange(batch_size) // 2)
    batch.update(processor.mask_captions(batch["input_ids"], batch["attention_mask"],
                                         generator=torch.Generator().manual_seed(seed + 1)))
    return {name: value.to(device) for name, value in batch.items()}


def build(kind: str, tiny: bool):
    if kind == "clip":
        from transformers import CLIPConfig, CLIPModel

        reference = DecdConfig.tiny() if tiny else DecdConfig.vit_base_patch16()
        vision = reference.vision_config.to_dict()
        vision["image_size"] = 224 if not tiny else 64
        return CLIPModel(CLIPConfig(text_config=reference.text_config.to_dict(), vision_config=vision,
                                    projection_dim=reference.projection_dim))
    overrides = {"dual": dict(mcm_weight=0.0), "decd": {}, "decd-cap32": dict(mcm_max_positions=32)}[kind]
    config = (DecdConfig.tiny if tiny else DecdConfig.vit_base_patch16)(**overrides)
    return DecdModel(config)


def inputs_for(kind: str, batch: dict) -> dict:
    if kind == "clip":
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], return_loss=True, interpolate_pos_encoding=True)
    if kind == "dual":
        return {name: batch[name] for name in ("input_ids", "attention_mask", "pixel_values", "person_ids",
                                               "caption_quality")}
    return batch


def flops_per_pair(model, inputs: dict, device, batch_size: int, compiled_form: bool) -> float:
    """FLOPs of one step (forward + backward) per pair; `compiled_form`: what the compiled step computes."""
    from torch.utils.flop_counter import FlopCounterMode

    original = torch.compiler.is_compiling
    torch.compiler.is_compiling = (lambda: True) if compiled_form else original
    try:
        with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16):
            model(**inputs).loss.backward()
    finally:
        torch.compiler.is_compiling = original
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def time_steps(step, device, warmup: int, steps: int) -> tuple[list[float], float]:
    """(step times in seconds, seconds of the first warm-up step: the compilation for a compiled model)."""
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - started
    for _ in range(max(0, warmup - 1)):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return times, first


def run_variant(spec: str, args, device, processor, batches, eager_losses, results) -> None:
    kind, mode, batch_size = spec.split(":")
    batch_size = int(batch_size)
    if batch_size not in batches:
        batches[batch_size] = make_batch(processor, batch_size, processor.image_size, device)
    torch.manual_seed(0)
    model = build(kind, args.tiny).to(device).train()
    inputs = inputs_for(kind, batches[batch_size])
    flops = flops_per_pair(model, inputs, device, batch_size, compiled_form=mode != "eager")
    forward = model if mode == "eager" else torch.compile(
        model, mode="reduce-overhead" if mode == "compiled-graphs" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    losses = []

    graphs = mode == "compiled-graphs"

    def step():
        if graphs:  # a new step: the graphs' outputs of the last one may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone() if graphs else loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    times, first = time_steps(step, device, args.warmup, args.steps)
    median = statistics.median(times)
    first_loss = float(losses[0])
    key = f"{kind}:{batch_size}"
    if mode == "eager":
        eager_losses[key] = first_loss
    pairs_per_second = batch_size / median
    results[spec] = {
        "kind": kind, "mode": mode, "batch_size": batch_size, "median_step_ms": round(median * 1000, 2),
        "min_step_ms": round(min(times) * 1000, 2), "max_step_ms": round(max(times) * 1000, 2),
        "pairs_per_second": round(pairs_per_second, 1), "first_step_seconds": round(first, 1),
        "gflops_per_pair": round(flops / 1e9, 2),
        "share_of_peak": round(flops * pairs_per_second / (args.peak_tflops * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "first_loss": round(first_loss, 5), "eager_first_loss": eager_losses.get(key),
        "losses_finite": bool(all(math.isfinite(float(value)) for value in losses)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="KIND:MODE:BATCH, in order")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (a smoke run of this script)")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (datasheet)")
    parser.add_argument("--time_budget", type=float, default=float("inf"), help="seconds; no variant starts after")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 products outside autocast (the losses' small ones)
    torch.backends.cudnn.allow_tf32 = True
    image_size = (128, 64) if args.tiny else (384, 128)
    processor = DecdProcessor(image_size=image_size)
    started = time.perf_counter()
    results, batches, eager_losses = {}, {}, {}
    payload = {"benchmark": "train_step_gpu", "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
               "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"},
               "results": results, "not_run": []}
    for spec in args.variants:
        if time.perf_counter() - started > args.time_budget:
            payload["not_run"].append(spec)
            continue
        try:
            run_variant(spec, args, device, processor, batches, eager_losses, results)
        except Exception as error:  # noqa: BLE001 - a failing variant is a result too
            results[spec] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:500]}"}
        print(spec, json.dumps(results[spec]), flush=True)
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(payload, indent=1) + "\n")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(payload, indent=1) + "\n")
    print("\n| variant | batch | ms / step | pairs/s | GFLOP/pair | share of peak | peak GiB | first step s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, row in results.items():
        if "error" in row:
            print(f"| {spec} | | error: {row['error'][:80]} |")
            continue
        print(f"| {row['kind']} {row['mode']} | {row['batch_size']} | {row['median_step_ms']} | "
              f"{row['pairs_per_second']} | {row['gflops_per_pair']} | {100 * row['share_of_peak']:.1f}% | "
              f"{row['peak_memory_gib']} | {row['first_step_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
