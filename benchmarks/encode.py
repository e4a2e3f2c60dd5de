"""Encoding throughput of the detached DECD dual encoder vs transformers' `CLIPModel` of the same size.

What it measures
    Images/s (`get_image_features`) and captions/s (`get_text_features`) of
      * DECD: `DecdModel(config).detach_decoder()`, the inference dual encoder, and
      * CLIP: `transformers.CLIPModel` built from the SAME text/vision sub-configs and projection_dim,
    and the ratio DECD / CLIP for each (the claim under test: DECD costs what CLIP costs, ratio ~1.0).

How
    * Same weights: DECD's weights are copied into CLIP with `load_state_dict` (every tensor whose
      name and shape match: all of them except CLIP's `logit_scale`, which encoding does not use), so
      both models do the same arithmetic. As a correctness check the embeddings of the two models are
      compared on the benchmark inputs (max |difference| must be <= 1e-4) and the result is printed.
    * Two image settings:
        - "square": 224x224, the one size both models take natively (CLIPModel accepts only its own
          square size without interpolation); DECD is built with `image_size=(224, 224)`.
        - "crop": DECD at its person-crop size (384x128 for `base`, 128x64 for `tiny`, its native
          position table) vs the same CLIP model at that size with `interpolate_pos_encoding=True`.
          CLIP then bicubically resizes its 14x14 position table on EVERY forward pass; DECD stored the
          resized table once. DECD's crop table is set to exactly that resize of the 224 table, so the
          embeddings are still equal.
    * Captions: a fixed batch of random token ids shaped like real captions (SOT, 28-48 body tokens,
      EOT, i.e. 30-50 tokens), padded with EOT to the longest caption of the batch, with an
      attention mask. The text path does not depend on the image size, so it is measured once.
    * Same inputs for both models, same process, `torch.inference_mode()`, a fixed
      `torch.set_num_threads` (all cores unless `--threads`). One warm-up round, then `--repeats`
      interleaved rounds: in each round every workload runs DECD then CLIP, and the order flips on
      every other round (A B, B A, A B, ...) so neither model always runs second. Each number is the
      median over the rounds of batch_size / seconds per forward call.

How to run (from the repo root)
    .venv/bin/python benchmarks/encode.py --preset base          # ViT-B/16 sizes; ~3.5 min on 2 idle CPU cores
    .venv/bin/python benchmarks/encode.py --preset tiny          # seconds
    .venv/bin/python benchmarks/encode.py --preset base --repeats 7 --threads 1 --output-json bench.json

Weights are random (no download): throughput does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from configuration_decd import DecdConfig  # noqa: E402
from modeling_decd import DecdModel, resize_position_embedding  # noqa: E402

SOT, EOT = 49406, 49407
SQUARE = (224, 224)
POSITION_KEY = "vision_model.embeddings.position_embedding.weight"
PRESETS = {"base": DecdConfig.vit_base_patch16, "tiny": DecdConfig.tiny}
DEFAULT_REPEATS = {"base": 4, "tiny": 20}
ATOL = 1e-4


def log(message: str) -> None:
    print(message, flush=True)


# ---- models -----------------------------------------------------------------------------------
def build_models(preset: str, seed: int):
    """DECD at 224x224, DECD at the preset's crop size (same weights), and CLIPModel (same weights)."""
    torch.manual_seed(seed)
    square_config = PRESETS[preset](image_size=SQUARE)
    decd_square = DecdModel(square_config).detach_decoder().eval()

    crop_config = PRESETS[preset]()  # the preset's person-crop size
    decd_crop = DecdModel(crop_config).detach_decoder().eval()
    state = decd_square.state_dict()
    state[POSITION_KEY] = resize_position_embedding(state[POSITION_KEY], decd_crop.vision_model.embeddings.grid_size)
    decd_crop.load_state_dict(state, strict=True)

    text_config = square_config.text_config.to_dict()
    vision_config = square_config.vision_config.to_dict()
    vision_config["image_size"] = SQUARE[0]  # CLIPVisionConfig takes one int (square images)
    clip_config = CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=square_config.projection_dim
    )
    clip = CLIPModel(clip_config).eval()
    clip_state = clip.state_dict()
    copied = {key: value for key, value in state_for_clip(decd_square).items()
              if key in clip_state and clip_state[key].shape == value.shape}
    missing, unexpected = clip.load_state_dict(copied, strict=False)
    not_copied = sorted(set(clip_state) - set(copied))
    return decd_square, decd_crop, clip, not_copied


def state_for_clip(decd: DecdModel) -> dict[str, torch.Tensor]:
    return {key: value for key, value in decd.state_dict().items() if key != "logit_scale"}


def describe(decd: DecdModel, clip: CLIPModel) -> dict:
    config = decd.config
    return dict(
        text=f"{config.text_config.num_hidden_layers}L x {config.text_config.hidden_size}",
        vision=f"{config.vision_config.num_hidden_layers}L x {config.vision_config.hidden_size} "
               f"patch {config.vision_config.patch_size}",
        projection_dim=config.projection_dim,
        decd_parameters=sum(p.numel() for p in decd.parameters()),
        clip_parameters=sum(p.numel() for p in clip.parameters()),
        attention=dict(
            decd_text=decd.text_model.config._attn_implementation,
            decd_vision=decd.vision_model.config._attn_implementation,
            clip_text=clip.text_model.config._attn_implementation,
            clip_vision=clip.vision_model.config._attn_implementation,
        ),
    )


# ---- inputs -----------------------------------------------------------------------------------
def make_captions(batch_size: int, seed: int):
    """SOT + 28..48 random body tokens + EOT (30-50 tokens), EOT-padded to the longest, with a mask."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(30, 51, (batch_size,), generator=generator)
    longest = int(lengths.max())
    input_ids = torch.full((batch_size, longest), EOT, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, 0] = SOT
        input_ids[row, 1:length - 1] = torch.randint(0, SOT, (length - 2,), generator=generator)
        input_ids[row, length - 1] = EOT
        attention_mask[row, :length] = 1
    return input_ids, attention_mask, lengths


def make_images(batch_size: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, *size, generator=generator)


# ---- timing -----------------------------------------------------------------------------------
def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args) -> dict:
    load_start = os.getloadavg()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    repeats = args.repeats or DEFAULT_REPEATS[args.preset]
    batch = args.batch_size

    log(f"[setup] building DECD ({args.preset}, square {SQUARE} and crop) and CLIPModel with the same weights ...")
    start = time.perf_counter()
    decd_square, decd_crop, clip, not_copied = build_models(args.preset, args.seed)
    crop = decd_crop.config.image_size
    info = describe(decd_square, clip)
    log(f"[setup] done in {time.perf_counter() - start:.1f}s; text {info['text']}, vision {info['vision']}, "
        f"projection {info['projection_dim']}; parameters DECD {info['decd_parameters']:,} / CLIP "
        f"{info['clip_parameters']:,}; CLIP tensors not copied from DECD: {not_copied or 'none'}; "
        f"attention {info['attention']}")

    input_ids, attention_mask, lengths = make_captions(batch, args.seed)
    images_square = make_images(batch, SQUARE, args.seed + 1)
    images_crop = make_images(batch, crop, args.seed + 2)
    log(f"[setup] captions {tuple(input_ids.shape)} (lengths {int(lengths.min())}-{int(lengths.max())}, "
        f"mean {lengths.float().mean():.1f}); images {tuple(images_square.shape)} and {tuple(images_crop.shape)}; "
        f"threads {threads}; {repeats} timed rounds after 1 warm-up")

    # name -> (DECD call, CLIP call, items per call)
    workloads = {
        "image_square": (
            lambda: decd_square.get_image_features(pixel_values=images_square).pooler_output,
            lambda: clip.get_image_features(pixel_values=images_square).pooler_output,
        ),
        "image_crop": (
            lambda: decd_crop.get_image_features(pixel_values=images_crop).pooler_output,
            lambda: clip.get_image_features(pixel_values=images_crop, interpolate_pos_encoding=True).pooler_output,
        ),
        "text": (
            lambda: decd_square.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
            lambda: clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
        ),
    }
    seconds = {name: {"decd": [], "clip": []} for name in workloads}
    checks = {}
    with torch.inference_mode():
        for round_index in range(repeats + 1):
            warmup = round_index == 0
            order = ("decd", "clip") if round_index % 2 == 0 else ("clip", "decd")
            round_start = time.perf_counter()
            for name, (decd_fn, clip_fn) in workloads.items():
                outputs = {}
                for model in order:
                    elapsed, outputs[model] = timed(decd_fn if model == "decd" else clip_fn)
                    if not warmup:
                        seconds[name][model].append(elapsed)
                if warmup:  # correctness: same weights, same inputs -> same embeddings
                    difference = (outputs["decd"] - outputs["clip"]).abs().max().item()
                    checks[name] = dict(
                        max_abs_difference=difference,
                        max_abs_embedding=outputs["decd"].abs().max().item(),
                        shape=list(outputs["decd"].shape),
                        passed=bool(outputs["decd"].shape == outputs["clip"].shape and difference <= ATOL),
                    )
            label = "warm-up" if warmup else f"round {round_index}/{repeats}"
            log(f"[{label}] {time.perf_counter() - round_start:.1f}s (order {' '.join(order)})")

    def rate(name, model):
        return statistics.median(batch / s for s in seconds[name][model])

    rows = []
    for name, size, extra in (
        ("image_square", SQUARE, ""),
        ("image_crop", crop, " (CLIP: interpolate_pos_encoding=True)"),
    ):
        row = dict(preset=args.preset, image_size=f"{size[0]}x{size[1]}", batch=batch, note=extra.strip(" ()"))
        for model in ("decd", "clip"):
            row[f"{model}_images_per_s"] = rate(name, model)
        row["image_ratio"] = row["decd_images_per_s"] / row["clip_images_per_s"]
        rows.append(row)
    text = {model: rate("text", model) for model in ("decd", "clip")}
    text["ratio"] = text["decd"] / text["clip"]
    # Noise diagnostics: the ratio of adjacent (paired) calls is robust to load that drifts between
    # rounds, the best-round ratio to sporadic interference; spread = slowest / fastest call.
    diagnostics = {}
    for name in workloads:
        decd_s, clip_s = seconds[name]["decd"], seconds[name]["clip"]
        diagnostics[name] = dict(
            paired_ratio=statistics.median(c / d for d, c in zip(decd_s, clip_s)),
            best_ratio=min(clip_s) / min(decd_s),
            spread=max(max(decd_s) / min(decd_s), max(clip_s) / min(clip_s)),
        )
    return dict(
        preset=args.preset,
        batch_size=batch,
        repeats=repeats,
        threads=threads,
        caption_tokens=list(input_ids.shape),
        caption_lengths=dict(min=int(lengths.min()), max=int(lengths.max()), mean=float(lengths.float().mean())),
        models=info,
        clip_tensors_not_copied=not_copied,
        correctness=checks,
        diagnostics=diagnostics,
        load_average=dict(start=load_start, end=os.getloadavg()),
        images=rows,
        captions_per_s=text,
        seconds=seconds,
        environment=dict(
            torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
            machine=platform.machine(), processor=platform.processor() or "unknown", cpu_count=os.cpu_count(),
        ),
    )


def report(result: dict) -> None:
    text = result["captions_per_s"]
    header = "| model | preset | image size | batch | images/s | captions/s |"
    lines = ["", header, "|---|---|---|---:|---:|---:|"]
    for row in result["images"]:
        for model, name in (("decd", "DECD (detached)"), ("clip", "CLIPModel")):
            lines.append(f"| {name} | {row['preset']} | {row['image_size']} | {row['batch']} | "
                         f"{row[f'{model}_images_per_s']:.2f} | {text[model]:.2f} |")
        lines.append(f"| **ratio DECD/CLIP** | {row['preset']} | {row['image_size']} | {row['batch']} | "
                     f"**{row['image_ratio']:.3f}** | **{text['ratio']:.3f}** |")
    print("\n".join(lines))
    crop = result["images"][1]["image_size"]
    length = result["caption_lengths"]
    print(f"\nMedian of {result['repeats']} interleaved rounds, torch {result['environment']['torch']}, "
          f"transformers {result['environment']['transformers']}, {result['threads']} thread(s). "
          f"Captions: {length['min']}-{length['max']} tokens, padded to {result['caption_tokens'][1]}; "
          "the text encoder does not depend on the image size, so captions/s is measured once and shown on every row. "
          f"At {crop} CLIPModel runs with interpolate_pos_encoding=True and resizes its position table on every "
          "forward pass; DECD stores the table at the crop grid.")
    print("\nCorrectness (same weights, same inputs; max |DECD - CLIP| <= 1e-4):")
    for name, check in result["correctness"].items():
        status = "PASS" if check["passed"] else "FAIL"
        print(f"  {status} {name:<13} max|diff| = {check['max_abs_difference']:.2e} "
              f"(max|embedding| = {check['max_abs_embedding']:.2e}, shape {check['shape']})")
    print("\nNoise (ratio DECD/CLIP from adjacent pairs and from best rounds; spread = slowest/fastest call):")
    for name, diag in result["diagnostics"].items():
        print(f"  {name:<13} paired {diag['paired_ratio']:.3f}  best {diag['best_ratio']:.3f}  spread {diag['spread']:.2f}x")
    load = result["load_average"]
    print(f"  load average (1 min) {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end on "
          f"{result['environment']['cpu_count']} cores")
    if max(diag["spread"] for diag in result["diagnostics"].values()) > 1.5:
        print("  WARNING: call times vary a lot (spread > 1.5x): other processes probably share the "
              "cores, so the ratios are noisy. Rerun on an idle machine (or with --threads 1 and more --repeats).")
    outside = [f"{row['image_size']} images ({row['image_ratio']:.3f})" for row in result["images"]
               if abs(row["image_ratio"] - 1) > 0.05]
    if abs(text["ratio"] - 1) > 0.05:
        outside.append(f"captions ({text['ratio']:.3f})")
    print("\nAll ratios within 5% of 1.0." if not outside else f"\nOutside 5% of 1.0: {', '.join(outside)}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="base")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds after one warm-up (default: {DEFAULT_REPEATS})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("--batch-size and --repeats must be >= 1")

    result = run(args)
    report(result)
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nWrote {args.output_json}")
    return 0 if all(check["passed"] for check in result["correctness"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
