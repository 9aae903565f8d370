"""Packed attention: flex attention (block mask) and per-sample SDPA vs dense SDPA with an L x L mask.

    python bench/attention.py [--quick] [--out FILE]

Pack sizes L of 1k-16k tokens hold 4-32 samples of random lengths; each sample is a causal text span, a
full (bidirectional) visual span and a noisy target span, the layouts of MODEL.md. Heads: 16 query / 2
key-value heads of width 64 (GQA as in Lance, half its head width to keep CPU runs short).

Each configuration runs in a fresh subprocess: warm-up (flex compiles there), then the median of a few
timed forward calls. Block-mask creation is timed apart (done once per step, shared by all layers). Peak
memory is the largest growth of the resident set during one call, sampled at 2 kHz, with glibc told to
return large blocks to the OS on free (MALLOC_MMAP_THRESHOLD_), so the resident set tracks live memory.
Cost model: flex work follows sum(len^2) over samples (masked blocks are skipped), dense follows L^2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median_seconds, peak_rss_increase, print_table, write_json  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 16, 2, 64


def sample_lengths(total: int, samples: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [rng.uniform(0.5, 1.5) for _ in range(samples)]
    lengths = [max(8, int(total * w / sum(weights))) for w in weights]
    lengths[-1] += total - sum(lengths)
    return lengths


def build_layout(lengths: list[int]):
    import torch

    from lance_core.model.attention import AttentionLayout

    sample, span, bidir, noise = [], [], [], []
    span_no = 0
    for index, n in enumerate(lengths):
        text, visual = max(1, n // 8), max(1, n // 4)
        for size, mode in ((text, "causal"), (visual, "full"), (n - text - visual, "noise")):
            sample += [index] * size
            span += [span_no] * size
            bidir += [mode != "causal"] * size
            noise += [mode == "noise"] * size
            span_no += 1
    return AttentionLayout(torch.tensor(sample), torch.tensor(span), torch.tensor(bidir), torch.tensor(noise))


def worker(tokens: int, samples: int, backend: str, reps: int) -> dict:
    import time

    import torch

    from lance_core.model.attention import packed_attention, prepare_attention

    torch.manual_seed(0)
    lengths = sample_lengths(tokens, samples, seed=tokens + samples)
    layout = build_layout(lengths)
    q = torch.randn(HEADS, tokens, HEAD_DIM)
    k = torch.randn(KV_HEADS, tokens, HEAD_DIM)
    v = torch.randn(KV_HEADS, tokens, HEAD_DIM)
    prepare_attention(layout, backend, 128)  # warm-up, compiles the mask kernel for flex
    start = time.perf_counter()
    backend, prepared = prepare_attention(layout, backend, 128)
    mask_seconds = time.perf_counter() - start

    def run():
        return packed_attention(q, k, v, layout, backend, prepared)

    run()
    seconds = median_seconds(run, reps)
    peak = peak_rss_increase(run)
    return {"tokens": tokens, "samples": samples, "backend": backend, "seconds": seconds,
            "mask_seconds": mask_seconds, "peak_mib": peak / 2**20,
            "sum_len_sq": sum(n * n for n in lengths), "l_sq": tokens * tokens}


def run_config(tokens: int, samples: int, backend: str, reps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", str(tokens), str(samples), backend, str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{backend} at L={tokens}, {samples} samples failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small configurations (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/attention.json)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tokens, samples, backend, reps = args.worker
        print(json.dumps(worker(int(tokens), int(samples), backend, int(reps))))
        return
    sizes = [512, 1024] if args.quick else [1024, 2048, 4096, 8192, 16384]
    counts = [4] if args.quick else [4, 8, 16, 32]
    rows = []
    for tokens in sizes:
        for samples in counts:
            reps = 1 if args.quick else (2 if tokens >= 8192 else 3)
            flex = run_config(tokens, samples, "flex", reps)
            dense = run_config(tokens, samples, "sdpa", reps)
            per_sample = run_config(tokens, samples, "per_sample", reps)
            rows.append({
                "tokens": tokens, "samples": samples,
                "dense_ms": dense["seconds"] * 1e3, "flex_ms": flex["seconds"] * 1e3,
                "per_sample_ms": per_sample["seconds"] * 1e3,
                "speedup": dense["seconds"] / flex["seconds"],
                "per_sample_speedup": dense["seconds"] / per_sample["seconds"],
                "mask_ms": flex["mask_seconds"] * 1e3,
                "dense_mib": dense["peak_mib"], "flex_mib": flex["peak_mib"], "per_sample_mib": per_sample["peak_mib"],
                "sum_len_sq_over_l_sq": flex["sum_len_sq"] / flex["l_sq"],
                "flex_ns_per_len_sq": flex["seconds"] / flex["sum_len_sq"] * 1e9,
                "dense_ns_per_l_sq": dense["seconds"] / dense["l_sq"] * 1e9,
            })
            print(f"L={tokens:>5} samples={samples:>2}: dense {dense['seconds'] * 1e3:8.1f} ms, "
                  f"flex {flex['seconds'] * 1e3:8.1f} ms, per-sample {per_sample['seconds'] * 1e3:8.1f} ms", flush=True)
    print()
    print_table(rows, COLUMNS)
    write_json("attention", {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "rows": rows}, args.out)


COLUMNS = [
    ("tokens", "L", "d"), ("samples", "samples", "d"), ("dense_ms", "dense ms", ".1f"), ("flex_ms", "flex ms", ".1f"),
    ("per_sample_ms", "per-sample ms", ".1f"), ("speedup", "flex x", ".2f"), ("per_sample_speedup", "per-sample x", ".2f"),
    ("mask_ms", "block mask ms", ".1f"), ("dense_mib", "dense MiB", ".0f"), ("flex_mib", "flex MiB", ".0f"),
    ("per_sample_mib", "per-sample MiB", ".0f"), ("sum_len_sq_over_l_sq", "Σlen²/L²", ".3f"),
    ("flex_ns_per_len_sq", "flex ns/Σlen²", ".3f"), ("dense_ns_per_l_sq", "dense ns/L²", ".3f"),
]

if __name__ == "__main__":
    main()
