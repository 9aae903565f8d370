"""Peak memory of a training step against tokens per rank, for each activation checkpointing policy.

    python bench/activation_memory.py [--quick] [--out FILE]

Model: the ``mid`` config of bench/model_step.py (hidden 512, 4 layers, 8/2 heads), float32 on the CPU,
per-sample attention. Each point runs in a fresh process (glibc returns freed memory at once, so the
resident set follows live memory) and records the peak growth of the resident set over one forward +
backward of a pack of synthetic samples of every task, after a warm-up step. A straight line fitted per
policy (fixed part + bytes per token) gives the longest pack that fits in 16 GiB of host memory once the
process's own base, the weights and AdamW's two states are counted.

With sequence parallelism over S ranks (Ulysses), a rank holds T / S tokens for everything but the joint
attention, where it holds all T tokens for H / S heads, the same number of values; its activations are
those of a T / S pack, so the longest pack is S times the S = 1 one (the fixed part is per rank). The S = 2
column applies that rule to the measured line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, print_table, write_json

POLICIES = ("none", "selective", "layer")
HOST_BYTES = 16 * 2**30
ADAM_BYTES_PER_PARAM = 12
"""float32 weights and AdamW's two states, held beside the step (its gradients are inside the measurement)."""


def _pack(cfg, tokens: int):
    from lance_core.packing import pack_samples
    from lance_core.synthetic import synthetic_mix
    from lance_core.tokenizer import ByteTokenizer

    chosen, used, seed = [], 0, 0
    while True:
        for sample in synthetic_mix(ByteTokenizer(), cfg, seed=seed, image_side=6):
            if used + sample.num_tokens > tokens:
                return pack_samples(chosen, cfg, pad_to=tokens)
            chosen.append(sample)
            used += sample.num_tokens
        seed += 1


def measure_point(model_name: str, policy: str, tokens: int) -> dict:
    """One point, in this process (called in a fresh one by :func:`run_point`)."""
    import torch

    from bench.common import _rss_bytes, peak_rss_increase
    from bench.model_step import MODELS
    from lance_core.config import model_preset
    from lance_core.flow import LossConfig, compute_losses, noise_latents
    from lance_core.model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = model_preset("tiny", attention_backend="per_sample", max_latent_frames=4, **MODELS[model_name])
    model = build_model(cfg).train()
    model.activation_checkpointing = policy
    batch = _pack(cfg, tokens)
    loss_cfg = LossConfig()
    noised = noise_latents(batch, loss_cfg, torch.Generator().manual_seed(0))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        compute_losses(model, batch, loss_cfg, noised=noised).total.backward()

    step()
    model.zero_grad(set_to_none=True)
    base = _rss_bytes()
    started = time.perf_counter()
    peak = peak_rss_increase(step)
    return {"model": model_name, "policy": policy, "tokens": tokens, "real_tokens": batch.num_real_tokens,
            "params": sum(p.numel() for p in model.parameters()),
            "base_bytes": base, "step_peak_bytes": peak, "step_s": time.perf_counter() - started}


def run_point(model_name: str, policy: str, tokens: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--point", model_name, policy, str(tokens)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (fixed bytes, bytes per token) of (tokens, bytes) points."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def longest_pack(fixed: float, per_token: float, static: float, ranks: int) -> int:
    """Tokens of the longest pack whose step fits in HOST_BYTES on each of ``ranks`` sequence-parallel ranks."""
    return int((HOST_BYTES - static - fixed) / per_token) * ranks


COLUMNS = [("policy", "policy", "s"), ("tokens", "tokens/rank", "d"), ("step_peak_mib", "step peak MiB", ".1f"),
           ("over_none", "vs none", ".2f"), ("step_s", "step s", ".2f"), ("step_over_none", "time vs none", ".2f")]
FIT_COLUMNS = [("policy", "policy", "s"), ("kib_per_token", "KiB/token", ".1f"), ("fixed_mib", "fixed MiB", ".1f"),
               ("longest_s1", "longest pack S=1", "d"), ("longest_s2", "longest pack S=2", "d")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, two small packs (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/activation_memory.json)")
    parser.add_argument("--point", nargs=3, metavar=("MODEL", "POLICY", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure_point(args.point[0], args.point[1], int(args.point[2]))))
        return
    model_name, sizes = ("tiny", (512, 1024)) if args.quick else ("mid", (1024, 2048, 4096, 8192))
    load_start = load_average()
    rows = [run_point(model_name, policy, tokens) for policy in POLICIES for tokens in sizes]
    by_key = {(r["policy"], r["tokens"]): r for r in rows}
    for row in rows:
        none = by_key[("none", row["tokens"])]
        row.update(step_peak_mib=row["step_peak_bytes"] / 2**20, over_none=row["step_peak_bytes"] / none["step_peak_bytes"],
                   step_over_none=row["step_s"] / none["step_s"])
    fits = []
    for policy in POLICIES:
        points = [(r["tokens"], r["step_peak_bytes"]) for r in rows if r["policy"] == policy]
        fixed, per_token = fit_line(points)
        sample = next(r for r in rows if r["policy"] == policy)
        static = sample["base_bytes"] + ADAM_BYTES_PER_PARAM * sample["params"]
        fits.append({"policy": policy, "kib_per_token": per_token / 1024, "fixed_mib": fixed / 2**20,
                     "longest_s1": longest_pack(fixed, per_token, static, 1),
                     "longest_s2": longest_pack(fixed, per_token, static, 2)})
    print(f"\nmodel {model_name}, float32 on CPU, per-sample attention; load average {load_start:.1f} -> "
          f"{load_average():.1f}")
    print_table(rows, COLUMNS)
    print("\nstraight-line fit per policy; longest pack in 16 GiB of host memory (S = 2: Ulysses, T / S per rank)")
    print_table(fits, FIT_COLUMNS)
    write_json("activation_memory", {"model": model_name, "host_bytes": HOST_BYTES, "rows": rows, "fits": fits},
               args.out)


if __name__ == "__main__":
    main()
