#!/usr/bin/env python
"""Checks and timings that need a CUDA GPU (not part of the test suite, which runs on CPU).

    python benchmarks/gpu_check.py [--output-json results.json]

1. A training step of the tiny model on the GPU under bf16 autocast: all three losses finite,
   gradients finite and reaching encoders, decoder and heads.
2. The ViT-B/16 DECD (384x128) gives the same embeddings on the GPU (fp32, TF32 off) as on the CPU.
3. Inference throughput on the GPU (fp16, batch 256): the detached DECD vs transformers' CLIPModel
   with the same weights, at 224x224 (both native) and 384x128 (CLIP interpolating its position
   table per call), and captions of 50 tokens. CUDA events, 5 warm-up + 20 timed calls, median.
4. Training throughput of the ViT-B/16 DECD (Sew + MCM, batch 64, bf16 autocast, AdamW).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import CLIPConfig, CLIPModel  # noqa: E402

from configuration_decd import DecdConfig  # noqa: E402
from modeling_decd import DecdModel, resize_position_embedding  # noqa: E402


def batch_for(config, batch_size, length=50, seed=0, with_mcm=True, device="cuda"):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch_size, length), generator=generator)
    ids[:, 0], ids[:, -1] = 49406, 49407
    height, width = config.image_size
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(batch_size, 3, height, width, generator=generator),
        person_ids=torch.arange(batch_size) // 2,
        caption_quality=torch.rand(batch_size, generator=generator),
    )
    if with_mcm:
        labels = torch.full_like(ids, -100)
        labels[:, 3:8] = ids[:, 3:8]
        masked = ids.clone()
        masked[:, 3:8] = config.mask_token_id
        batch.update(masked_input_ids=masked, mcm_labels=labels)
    return {name: value.to(device) for name, value in batch.items()}


def time_cuda(function, warmup=5, repeats=20):
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def clip_twin(decd: DecdModel, square: int) -> CLIPModel:
    config = decd.config
    vision = config.vision_config.to_dict()
    vision["image_size"] = square
    clip = CLIPModel(CLIPConfig(text_config=config.text_config.to_dict(), vision_config=vision,
                                projection_dim=config.projection_dim))
    state = {k: v for k, v in decd.state_dict().items() if not k.startswith(("decoder.", "mcm_head.", "identity"))}
    state.pop("logit_scale", None)
    key = "vision_model.embeddings.position_embedding.weight"
    if state[key].shape != clip.state_dict()[key].shape:
        state.pop(key)
    clip.load_state_dict(state, strict=False)
    return clip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__

    # 1. tiny training step, bf16 autocast
    torch.manual_seed(0)
    tiny = DecdModel(DecdConfig.tiny(num_identities=32, id_weight=1.0)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = tiny(**batch_for(tiny.config, 64))
    output.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in tiny.parameters() if p.grad is not None)
    reached = {name: tiny.get_parameter(name).grad is not None for name in (
        "text_model.embeddings.token_embedding.weight", "vision_model.embeddings.patch_embedding.weight",
        "decoder.layers.0.cross_attn.in_proj_weight", "mcm_head.decoder.weight", "identity_classifier.weight")}
    results["tiny_bf16_step"] = {
        "losses": {k: float(getattr(output, k)) for k in ("loss", "loss_sew", "loss_mcm", "loss_id")},
        "grads_finite": grads_finite, "gradients_reach": reached,
    }
    print(json.dumps(results["tiny_bf16_step"]), flush=True)

    # 2. CPU vs GPU agreement of the base model (fp32, no TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    base = DecdModel(DecdConfig.vit_base_patch16()).eval()
    cpu_batch = batch_for(base.config, 4, with_mcm=False, device="cpu")
    with torch.no_grad():
        cpu_text = base.get_text_features(cpu_batch["input_ids"], cpu_batch["attention_mask"]).pooler_output
        cpu_image = base.get_image_features(cpu_batch["pixel_values"]).pooler_output
        base = base.cuda()
        gpu_text = base.get_text_features(cpu_batch["input_ids"].cuda(), cpu_batch["attention_mask"].cuda()).pooler_output.cpu()
        gpu_image = base.get_image_features(cpu_batch["pixel_values"].cuda()).pooler_output.cpu()
    results["cpu_gpu_max_abs_diff"] = {"text": float((cpu_text - gpu_text).abs().max()),
                                       "image": float((cpu_image - gpu_image).abs().max())}
    print(json.dumps(results["cpu_gpu_max_abs_diff"]), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    # 3. inference throughput, fp16, batch 256
    throughput = {}
    detached = base.detach_decoder().half().eval()
    for size in ((224, 224), (384, 128)):
        torch.manual_seed(0)
        decd = DecdModel(DecdConfig.vit_base_patch16(image_size=size, use_decoder=False)).cuda().half().eval()
        clip = clip_twin(decd, 224).cuda().half().eval()
        if size != (224, 224):
            # The CLIP twin gets the 224 table whose per-call resize equals DECD's stored table.
            table = clip.vision_model.embeddings.position_embedding.weight.detach().float()
            decd.vision_model.embeddings.position_embedding.weight.data.copy_(
                resize_position_embedding(table, decd.vision_model.embeddings.grid_size).half())
        pixels = torch.randn(256, 3, *size, device="cuda", dtype=torch.half)
        interpolate = size != (224, 224)
        with torch.inference_mode():
            same = torch.allclose(decd.get_image_features(pixels[:8]).pooler_output.float(),
                                  clip.get_image_features(pixel_values=pixels[:8],
                                                          interpolate_pos_encoding=interpolate).pooler_output.float(),
                                  atol=2e-2)
            decd_s = time_cuda(lambda: decd.get_image_features(pixels).pooler_output)
            clip_s = time_cuda(lambda: clip.get_image_features(pixel_values=pixels,
                                                               interpolate_pos_encoding=interpolate))
        throughput[f"images_{size[0]}x{size[1]}"] = {
            "decd_per_s": 256 / decd_s, "clip_per_s": 256 / clip_s, "ratio": clip_s / decd_s, "same_output": same}
        if size == (224, 224):
            ids = batch_for(decd.config, 256, with_mcm=False)
            with torch.inference_mode():
                decd_s = time_cuda(lambda: decd.get_text_features(ids["input_ids"], ids["attention_mask"]).pooler_output)
                clip_s = time_cuda(lambda: clip.get_text_features(input_ids=ids["input_ids"],
                                                                  attention_mask=ids["attention_mask"]))
            throughput["captions_50_tokens"] = {"decd_per_s": 256 / decd_s, "clip_per_s": 256 / clip_s,
                                                "ratio": clip_s / decd_s}
        print(json.dumps(throughput), flush=True)
        del decd, clip
    del detached
    results["inference_fp16_batch256"] = throughput

    # 4. training throughput of the full base model
    torch.manual_seed(0)
    model = DecdModel(DecdConfig.vit_base_patch16(num_identities=11003)).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = batch_for(model.config, 64)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_cuda(step, warmup=3, repeats=10)
    results["train_step_base_bs64_bf16"] = {"seconds": seconds, "pairs_per_s": 64 / seconds,
                                           "cuhk_epoch_minutes": 68126 / 64 * seconds / 60,
                                           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(results["train_step_base_bs64_bf16"]), flush=True)
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
