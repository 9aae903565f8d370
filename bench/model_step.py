"""Forward + backward throughput of the dual-stream model on packed batches of every task.

    python bench/model_step.py [--quick] [--out FILE]

Models: the ``tiny`` preset and a mid-size config (hidden 512, 4 layers, 8/2 heads of 64) so that
matmuls, not Python overhead, dominate. Batches: synthetic samples of all eight tasks packed and padded
to a fixed budget. Reported: real tokens per second (padding excluded) for the dense SDPA and flex
and per-sample SDPA backends (plus flex on CUDA; torch's flex attention has no CPU backward), their
ratio, the pack fill ratio, and model FLOP/s from the 6·N_active + attention formula.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import median_seconds, print_table, write_json  # noqa: E402
from lance_core.config import model_preset  # noqa: E402
from lance_core.flops import count_parameters, training_flops_per_token  # noqa: E402
from lance_core.flow import LossConfig, compute_losses, noise_latents  # noqa: E402
from lance_core.model import build_model  # noqa: E402
from lance_core.packing import pack_samples  # noqa: E402
from lance_core.synthetic import synthetic_mix  # noqa: E402
from lance_core.tokenizer import ByteTokenizer  # noqa: E402

MODELS = {
    "tiny": {},
    "mid": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, intermediate_size=1408,
                mrope_section=(8, 12, 12), vit=dict(out_hidden_size=512)),
}


def measure(name: str, backend: str, budget: int, per_task: int, image_side: int, reps: int) -> dict:
    torch.manual_seed(0)
    cfg = model_preset("tiny", attention_backend=backend, **MODELS[name])
    model = build_model(cfg)
    samples = synthetic_mix(ByteTokenizer(), cfg, per_task=per_task, image_side=image_side)
    batch = pack_samples(samples, pad_to=budget)
    loss_cfg = LossConfig()
    noised = noise_latents(batch, loss_cfg, torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        compute_losses(model, batch, loss_cfg, noised=noised).total.backward()

    step()  # warm-up (flex compiles here)
    seconds = median_seconds(step, reps)
    counts = count_parameters(model)
    context = batch.num_real_tokens / batch.num_samples
    flops = training_flops_per_token(cfg, counts, int(context)) * batch.num_real_tokens
    return {"model": name, "backend": backend, "budget": budget, "real_tokens": batch.num_real_tokens,
            "samples": batch.num_samples, "fill": batch.num_real_tokens / budget, "step_ms": seconds * 1e3,
            "tokens_per_s": batch.num_real_tokens / seconds, "gflops_per_s": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    reps = 1 if args.quick else 5
    plans = [("tiny", 2048, 1, 4)] if args.quick else [("tiny", 4096, 2, 6), ("mid", 4096, 2, 6)]
    rows = []
    for name, budget, per_task, side in plans:
        dense = measure(name, "sdpa", budget, per_task, side, reps)
        rows.append(dense)
        for backend in ["per_sample"] + (["flex"] if torch.cuda.is_available() else []):
            row = measure(name, backend, budget, per_task, side, reps)
            row["over_sdpa"] = row["tokens_per_s"] / dense["tokens_per_s"]
            rows.append(row)
            print(f"{name}: sdpa {dense['tokens_per_s']:.0f} tok/s, {backend} {row['tokens_per_s']:.0f} tok/s",
                  flush=True)
    print()
    print_table(rows, [("model", "model", "s"), ("backend", "backend", "s"), ("budget", "pack", "d"),
                       ("samples", "samples", "d"), ("fill", "fill", ".3f"), ("step_ms", "fwd+bwd ms", ".1f"),
                       ("tokens_per_s", "tokens/s", ".0f"), ("gflops_per_s", "GFLOP/s", ".2f"),
                       ("over_sdpa", "vs sdpa", ".2f")])
    write_json("model_step", {"rows": rows}, args.out)


if __name__ == "__main__":
    main()
