"""Training-step and forward throughput of the dual-stream model on packed batches of every task.

    python bench/model_step.py [--quick] [--out FILE]

Models: the ``tiny`` preset and a mid-size config (hidden 512, 4 layers, 8/2 heads of 64) so that
matmuls, not Python overhead, dominate. Batches: synthetic samples of all eight tasks packed and padded
to a fixed budget; ``fill`` is the fraction of real (non-padding) tokens, and tokens/s counts real
tokens only. For each attention backend: forward + backward (the loss of ``compute_losses``) and
forward alone under ``no_grad``, as medians after a warm-up (flex compiles there), with ratios against
dense SDPA measured in the same run, in wall time and in process CPU time (steadier when other work
shares the cores; the load average is recorded). torch's flex attention has no CPU backward, so on CPU
flex gets a forward row only. GFLOP/s uses the 6·N_active + attention formula of ``lance_core.flops``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import load_average, print_table, wall_and_cpu, write_json
from lance_core.config import model_preset
from lance_core.flops import count_parameters, training_flops_per_token
from lance_core.flow import LossConfig, compute_losses, noise_latents
from lance_core.model import build_model
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_mix
from lance_core.tokenizer import ByteTokenizer

MODELS = {
    "tiny": {},
    "mid": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "head_dim": 64,
            "intermediate_size": 1408, "mrope_section": (8, 12, 12), "vit": {"out_hidden_size": 512}},
}
BACKENDS = ("sdpa", "per_sample", "flex")


def has_backward(backend: str, device: torch.device) -> bool:
    return backend != "flex" or device.type == "cuda"


def measure(name: str, backend: str, budget: int, per_task: int, image_side: int, reps: int) -> dict:
    torch.manual_seed(0)
    cfg = model_preset("tiny", attention_backend=backend, **MODELS[name])
    model = build_model(cfg)
    device = next(model.parameters()).device
    samples = synthetic_mix(ByteTokenizer(), cfg, per_task=per_task, image_side=image_side)
    batch = pack_samples(samples, cfg, pad_to=budget)
    loss_cfg = LossConfig()
    noised = noise_latents(batch, loss_cfg, torch.Generator().manual_seed(0))
    real = batch.num_real_tokens

    def step() -> None:
        model.zero_grad(set_to_none=True)
        compute_losses(model, batch, loss_cfg, noised=noised).total.backward()

    def forward() -> None:
        with torch.no_grad():
            compute_losses(model, batch, loss_cfg, noised=noised)

    row = {"model": name, "backend": backend, "budget": budget, "real_tokens": real, "samples": batch.num_samples,
           "fill": real / budget, "step_ms": None, "step_cpu_ms": None, "tokens_per_s": None, "gflops_per_s": None}
    forward()  # warm-up (flex compiles here)
    walls, cpus = wall_and_cpu(forward, reps)
    fwd_seconds = statistics.median(walls)
    row.update(fwd_ms=fwd_seconds * 1e3, fwd_tokens_per_s=real / fwd_seconds, fwd_cpu_ms=statistics.median(cpus) * 1e3)
    if has_backward(backend, device):
        step()
        walls, cpus = wall_and_cpu(step, reps)
        seconds = statistics.median(walls)
        counts = count_parameters(model)
        flops = training_flops_per_token(cfg, counts, int(real / batch.num_samples)) * real
        row.update(step_ms=seconds * 1e3, tokens_per_s=real / seconds, gflops_per_s=flops / seconds / 1e9,
                   step_cpu_ms=statistics.median(cpus) * 1e3)
    return row


COLUMNS = [
    ("model", "model", "s"), ("backend", "backend", "s"), ("budget", "pack", "d"), ("samples", "samples", "d"),
    ("fill", "fill", ".3f"), ("step_ms", "fwd+bwd ms", ".1f"), ("tokens_per_s", "fwd+bwd tok/s", ".0f"),
    ("over_sdpa", "vs sdpa", ".2f"), ("over_sdpa_cpu", "vs sdpa cpu", ".2f"), ("gflops_per_s", "GFLOP/s", ".2f"),
    ("fwd_ms", "fwd ms", ".1f"), ("fwd_tokens_per_s", "fwd tok/s", ".0f"), ("fwd_over_sdpa", "fwd vs sdpa", ".2f"),
    ("fwd_over_sdpa_cpu", "fwd vs sdpa cpu", ".2f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, one small pack, one rep (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/model_step.json)")
    args = parser.parse_args()
    reps = 1 if args.quick else 5
    # (model, pack budget, samples per task, image side in latents)
    plans = [("tiny", 2560, 1, 4)] if args.quick else [("tiny", 6144, 2, 6), ("mid", 6144, 2, 6)]
    rows = []
    load_start = load_average()
    for name, budget, per_task, side in plans:
        dense = None
        for backend in BACKENDS:
            row = measure(name, backend, budget, per_task, side, reps)
            dense = dense or row
            row["fwd_over_sdpa"] = row["fwd_tokens_per_s"] / dense["fwd_tokens_per_s"]
            row["fwd_over_sdpa_cpu"] = dense["fwd_cpu_ms"] / row["fwd_cpu_ms"]
            row["over_sdpa"] = row["tokens_per_s"] / dense["tokens_per_s"] if row["tokens_per_s"] else None
            row["over_sdpa_cpu"] = dense["step_cpu_ms"] / row["step_cpu_ms"] if row["step_cpu_ms"] else None
            rows.append(row)
            step = f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] else "-"
            print(f"{name} {backend}: fwd+bwd {step} tok/s, fwd {row['fwd_tokens_per_s']:.0f} tok/s", flush=True)
    load = {"start": load_start, "end": load_average()}
    print(f"\nload average {load['start']:.1f} at start, {load['end']:.1f} at end")
    print(f"real tokens per second, {torch.get_num_threads()} threads, float32; vs sdpa = throughput ratio to dense "
          "SDPA in wall time, vs sdpa cpu = in process CPU time")
    print_table(rows, COLUMNS)
    write_json("model_step", {"threads": torch.get_num_threads(), "load_average": load, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
