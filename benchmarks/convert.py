"""Time and peak memory of `decd-convert` on a ViT-B/16 checkpoint shaped like IRRA's `best.pth`.

What it measures
    A random-weight checkpoint with IRRA's layout is written once: CLIP ViT-B/16 under `base_model.`
    (vision 768 wide, text 512 wide, 12 layers each, a 24 x 8 + 1 position table for 384 x 128 crops,
    projection 512) plus IRRA's heads (cross-attention, a 4-layer cross-modal transformer, the MLM head,
    an 11,003-identity classifier), all fp16 as IRRA saves them. Each repeat converts it to float32 in a
    fresh subprocess (`decd.convert.convert_checkpoint`, what `decd-convert` runs) and reports
      * seconds: the conversion call alone (read + sha256 + map + save), and the subprocess's import time;
      * peak RSS: the subprocess's VmHWM at the end, and before the conversion (after the imports), so
        the difference is what the conversion itself needed.
    The median over repeats is printed and written as JSON (default benchmarks/results/convert_cpu.json).

How to run (from the repo root)
    .venv/bin/python benchmarks/convert.py                 # ~1-2 min on 2 CPU cores, ~1 GB of temporary files
    .venv/bin/python benchmarks/convert.py --repeats 1 --workdir /tmp/bench-convert
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from configuration_decd import CLIP_VOCAB_SIZE  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "convert_cpu.json"

CHILD = r"""
import json, sys, time
from pathlib import Path

def vm_hwm_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")

start = time.perf_counter()
from decd.convert import convert_checkpoint
import_seconds = time.perf_counter() - start
rss_before = vm_hwm_mib()
start = time.perf_counter()
report = convert_checkpoint(sys.argv[1], sys.argv[2], overwrite=True)
seconds = time.perf_counter() - start
print(json.dumps({"import_seconds": import_seconds, "convert_seconds": seconds, "peak_rss_before_mib": rss_before,
                  "peak_rss_mib": vm_hwm_mib(), "dropped": report.dropped, "image_size": report.image_size}))
"""


def irra_vit_b16_state_dict(seed: int = 0, grid=(24, 8), identities: int = 11003) -> dict[str, torch.Tensor]:
    """IRRA's state dict for CLIP ViT-B/16 at 384 x 128 (random fp16 weights, IRRA's key names and shapes)."""
    generator = torch.Generator().manual_seed(seed)
    vision, text, layers, embed, patch, vocab = 768, 512, 12, 512, 16, CLIP_VOCAB_SIZE

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).half()

    def block(prefix, width):
        return {
            f"{prefix}.attn.in_proj_weight": rand(3 * width, width), f"{prefix}.attn.in_proj_bias": rand(3 * width),
            f"{prefix}.attn.out_proj.weight": rand(width, width), f"{prefix}.attn.out_proj.bias": rand(width),
            f"{prefix}.ln_1.weight": rand(width), f"{prefix}.ln_1.bias": rand(width),
            f"{prefix}.mlp.c_fc.weight": rand(4 * width, width), f"{prefix}.mlp.c_fc.bias": rand(4 * width),
            f"{prefix}.mlp.c_proj.weight": rand(width, 4 * width), f"{prefix}.mlp.c_proj.bias": rand(width),
            f"{prefix}.ln_2.weight": rand(width), f"{prefix}.ln_2.bias": rand(width),
        }

    clip = {
        "positional_embedding": rand(77, text), "text_projection": rand(text, embed),
        "logit_scale": torch.tensor(4.6052).half(),
        "visual.class_embedding": rand(vision), "visual.positional_embedding": rand(grid[0] * grid[1] + 1, vision),
        "visual.proj": rand(vision, embed), "visual.conv1.weight": rand(vision, 3, patch, patch),
        "visual.ln_pre.weight": rand(vision), "visual.ln_pre.bias": rand(vision),
        "visual.ln_post.weight": rand(vision), "visual.ln_post.bias": rand(vision),
        "token_embedding.weight": rand(vocab, text), "ln_final.weight": rand(text), "ln_final.bias": rand(text),
    }
    for layer in range(layers):
        clip.update(block(f"visual.transformer.resblocks.{layer}", vision))
        clip.update(block(f"transformer.resblocks.{layer}", text))
    state = {"base_model." + key: value for key, value in clip.items()}
    heads = {
        "cross_attn.in_proj_weight": rand(3 * embed, embed), "cross_attn.in_proj_bias": rand(3 * embed),
        "cross_attn.out_proj.weight": rand(embed, embed), "cross_attn.out_proj.bias": rand(embed),
        "ln_pre_t.weight": rand(embed), "ln_pre_t.bias": rand(embed), "ln_pre_i.weight": rand(embed),
        "ln_pre_i.bias": rand(embed), "ln_post.weight": rand(embed), "ln_post.bias": rand(embed),
        "mlm_head.dense.weight": rand(embed, embed), "mlm_head.dense.bias": rand(embed),
        "mlm_head.ln.weight": rand(embed), "mlm_head.ln.bias": rand(embed),
        "mlm_head.fc.weight": rand(vocab, embed), "mlm_head.fc.bias": rand(vocab),
        "classifier.weight": rand(identities, embed), "classifier.bias": rand(identities),
    }
    for layer in range(4):
        heads.update(block(f"cross_modal_transformer.resblocks.{layer}", embed))
    state.update(heads)
    return state


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="folder for the checkpoint and outputs (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the converting process")
    parser.add_argument("--output-json", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        workdir = Path(workdir)
        source = workdir / "best.pth"
        start = time.perf_counter()
        state = irra_vit_b16_state_dict()
        torch.save({"model": state, "epoch": 60}, source)  # IRRA's Checkpointer layout
        parameters = sum(value.numel() for key, value in state.items() if key.startswith("base_model."))
        head_parameters = sum(value.numel() for key, value in state.items() if not key.startswith("base_model."))
        del state
        print(f"Wrote {source.stat().st_size / 2**20:.0f} MiB IRRA-shaped ViT-B/16 checkpoint "
              f"({parameters / 1e6:.1f}M CLIP + {head_parameters / 1e6:.1f}M head values, fp16) "
              f"in {time.perf_counter() - start:.1f} s")

        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        runs = []
        for repeat in range(args.repeats):
            result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(workdir / "decd")], env=env,
                                    capture_output=True, text=True, cwd=REPO_ROOT)
            if result.returncode:
                raise SystemExit(f"conversion failed:\n{result.stderr[-3000:]}")
            run = json.loads(result.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"  run {repeat + 1}: {run['convert_seconds']:.2f} s, peak RSS {run['peak_rss_mib']:.0f} MiB "
                  f"(after imports {run['peak_rss_before_mib']:.0f} MiB)")
        output_bytes = (workdir / "decd" / "model.safetensors").stat().st_size
        summary = {
            "benchmark": "decd-convert, IRRA-shaped CLIP ViT-B/16 (384 x 128), fp16 source -> float32 DECD folder",
            "command": "python benchmarks/convert.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
            "source_mib": source.stat().st_size / 2**20,
            "output_model_safetensors_mib": output_bytes / 2**20,
            "clip_parameters": parameters,
            "dropped_head_values": head_parameters,
            "repeats": args.repeats,
            "median_convert_seconds": statistics.median(run["convert_seconds"] for run in runs),
            "median_import_seconds": statistics.median(run["import_seconds"] for run in runs),
            "median_peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in runs),
            "median_peak_rss_after_imports_mib": statistics.median(run["peak_rss_before_mib"] for run in runs),
            "runs": runs,
            "environment": {
                "python": platform.python_version(), "torch": torch.__version__,
                "transformers": __import__("transformers").__version__, "cpu_count": os.cpu_count(),
                "threads": args.threads, "machine": platform.machine(),
            },
        }
    print(f"Median: {summary['median_convert_seconds']:.2f} s to convert (+ {summary['median_import_seconds']:.1f} s "
          f"imports), peak RSS {summary['median_peak_rss_mib']:.0f} MiB "
          f"({summary['median_peak_rss_after_imports_mib']:.0f} MiB after imports); "
          f"{summary['source_mib']:.0f} MiB fp16 in, {summary['output_model_safetensors_mib']:.0f} MiB float32 out")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"Wrote {args.output_json}")
    return summary


if __name__ == "__main__":
    main()
