"""Packed attention: flex attention (block mask) and per-sample SDPA vs dense SDPA with an L x L mask.

    python bench/attention.py [--quick] [--block-size 128] [--tokens L ...] [--samples N ...] [--out FILE]

Pack sizes L of 1k-16k tokens hold 4-32 samples of random lengths; each sample is a causal text span, a
full (bidirectional) visual span and a noisy target span, the layouts of MODEL.md. Heads: 16 query / 2
key-value heads of width 64 (GQA as in Lance, half its head width to keep CPU runs short), float32.

Each configuration runs in a fresh subprocess: one warm-up call per backend (flex compiles there, or
loads its kernel from inductor's on-disk cache after an earlier run; its extra time is ``flex warm-up
s``), then the median of a few timed forward calls, the backends taking turns call by call so that a
change in load hits all alike; in wall time and in process CPU time (the steadier of the two when other
work shares the cores; the load average is recorded). Block-mask creation is timed apart,
after its own warm-up (done once per step and shared by all layers). Peak memory is the largest growth
of the resident set during one call, sampled at 2 kHz, with glibc told to return large blocks to the OS
on free (MALLOC_MMAP_THRESHOLD_) so the resident set tracks live memory; ``ru_maxrss`` would instead
report the compile-time peak of the process.

Cost model: dense work follows L^2; per-sample SDPA follows sum(len^2); flex computes the non-empty
blocks of its block mask (``flex blocks/L²``): the visible part of each sample (below len^2: earlier
spans do not see later ones, text is causal) rounded out to whole blocks; partial blocks evaluate the
mask per element. The scaling table fits, at each L, the exponent of time against sum(len^2) over the
sample counts: ~0 means the backend pays L^2 whatever the packing, ~1 means it pays sum(len^2).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, peak_rss_increase, print_table, wall_and_cpu, write_json

HEADS, KV_HEADS, HEAD_DIM = 16, 2, 64
BACKENDS = ("sdpa", "flex", "per_sample")


def sample_lengths(total: int, samples: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [rng.uniform(0.5, 1.5) for _ in range(samples)]
    lengths = [max(8, int(total * w / sum(weights))) for w in weights]
    lengths[-1] += total - sum(lengths)
    return lengths


def build_layout(lengths: list[int]):
    """Each sample: causal text (1/8), full visual span (1/4), noisy target (the rest)."""
    import torch

    from lance_core.model.layout import AttentionLayout

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


def visited_area(block_mask) -> int:
    """Query-key pairs flex computes: (partial + full) non-empty blocks times the block area."""
    blocks = int(block_mask.kv_num_blocks.sum()) + int(block_mask.full_kv_num_blocks.sum())
    q_block, kv_block = block_mask.BLOCK_SIZE
    return blocks * q_block * kv_block


def worker(tokens: int, samples: int, reps: int, block_size: int) -> dict:
    """All backends on one layout, their timed calls interleaved so that a change in the machine's load
    hits every backend alike."""
    import torch

    from lance_core.model.attention import packed_attention, prepare_attention

    torch.manual_seed(0)
    lengths = sample_lengths(tokens, samples, seed=tokens + samples)
    layout = build_layout(lengths)
    q = torch.randn(HEADS, tokens, HEAD_DIM)
    k = torch.randn(KV_HEADS, tokens, HEAD_DIM)
    v = torch.randn(KV_HEADS, tokens, HEAD_DIM)
    runs, results = {}, {}
    for backend in BACKENDS:
        prepare_attention(layout, backend, block_size)  # warm-up, compiles the mask kernel for flex
        start = time.perf_counter()
        _, prepared = prepare_attention(layout, backend, block_size)
        mask_seconds = time.perf_counter() - start
        runs[backend] = functools.partial(packed_attention, q, k, v, layout, backend, prepared)
        start = time.perf_counter()
        runs[backend]()  # warm-up; flex compiles its kernel here
        results[backend] = {"first_seconds": time.perf_counter() - start, "mask_seconds": mask_seconds,
                            "visited": visited_area(prepared) if backend == "flex" else None}
    walls, cpus = {b: [] for b in BACKENDS}, {b: [] for b in BACKENDS}
    for _ in range(reps):
        for backend in BACKENDS:
            (wall,), (cpu,) = wall_and_cpu(runs[backend], 1)
            walls[backend].append(wall)
            cpus[backend].append(cpu)
    for backend in BACKENDS:
        results[backend].update(seconds=statistics.median(walls[backend]), min_seconds=min(walls[backend]),
                                cpu_seconds=statistics.median(cpus[backend]),
                                peak_mib=peak_rss_increase(runs[backend]) / 2**20)
    return {"tokens": tokens, "samples": samples, "sum_len_sq": sum(n * n for n in lengths), "l_sq": tokens**2,
            "backends": results}


def run_config(tokens: int, samples: int, reps: int, block_size: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", str(tokens), str(samples), str(reps), str(block_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"L={tokens}, {samples} samples failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_row(result: dict) -> dict:
    sum_sq, l_sq = result["sum_len_sq"], result["l_sq"]
    dense, flex, per_sample = (result["backends"][b] for b in ("sdpa", "flex", "per_sample"))
    return {
        "tokens": result["tokens"], "samples": result["samples"], "sum_len_sq": sum_sq,
        "sum_len_sq_over_l_sq": sum_sq / l_sq, "flex_visited_over_l_sq": flex["visited"] / l_sq,
        "dense_ms": dense["seconds"] * 1e3, "flex_ms": flex["seconds"] * 1e3, "per_sample_ms": per_sample["seconds"] * 1e3,
        "speedup": dense["seconds"] / flex["seconds"], "per_sample_speedup": dense["seconds"] / per_sample["seconds"],
        "cpu_speedup": dense["cpu_seconds"] / flex["cpu_seconds"],
        "per_sample_cpu_speedup": dense["cpu_seconds"] / per_sample["cpu_seconds"],
        "dense_cpu_ms": dense["cpu_seconds"] * 1e3, "flex_cpu_ms": flex["cpu_seconds"] * 1e3,
        "per_sample_cpu_ms": per_sample["cpu_seconds"] * 1e3,
        "dense_min_ms": dense["min_seconds"] * 1e3, "flex_min_ms": flex["min_seconds"] * 1e3,
        "per_sample_min_ms": per_sample["min_seconds"] * 1e3,
        "mask_ms": flex["mask_seconds"] * 1e3, "flex_warmup_s": flex["first_seconds"] - flex["seconds"],
        "dense_mib": dense["peak_mib"], "flex_mib": flex["peak_mib"], "per_sample_mib": per_sample["peak_mib"],
        "dense_ns_per_l_sq": dense["seconds"] / l_sq * 1e9,
        "flex_ns_per_len_sq": flex["seconds"] / sum_sq * 1e9,
        "flex_ns_per_visited": flex["seconds"] / flex["visited"] * 1e9,
        "per_sample_ns_per_len_sq": per_sample["seconds"] / sum_sq * 1e9,
    }


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var else None


def scaling(rows: list[dict]) -> list[dict]:
    """Per L: exponent of time in sum(len^2) across sample counts (0: pays L^2, 1: pays sum(len^2)),
    from wall and from CPU time; and of flex CPU time in the visited block area."""
    out = []
    for tokens in sorted({r["tokens"] for r in rows}):
        group = [r for r in rows if r["tokens"] == tokens]
        sums = [r["sum_len_sq"] for r in group]
        fit = {"tokens": tokens}
        for name in ("dense", "flex", "per_sample"):
            fit[f"{name}_exponent"] = slope(sums, [r[f"{name}_ms"] for r in group])
            fit[f"{name}_cpu_exponent"] = slope(sums, [r[f"{name}_cpu_ms"] for r in group])
        fit["flex_visited_exponent"] = slope([r["flex_visited_over_l_sq"] for r in group],
                                             [r["flex_cpu_ms"] for r in group])
        out.append(fit)
    return out


TIME_COLUMNS = [
    ("tokens", "L", "d"), ("samples", "samples", "d"), ("sum_len_sq_over_l_sq", "Σlen²/L²", ".3f"),
    ("flex_visited_over_l_sq", "flex blocks/L²", ".3f"), ("dense_ms", "dense ms", ".1f"), ("flex_ms", "flex ms", ".1f"),
    ("per_sample_ms", "per-sample ms", ".1f"), ("speedup", "flex x", ".2f"), ("per_sample_speedup", "per-sample x", ".2f"),
    ("cpu_speedup", "flex x cpu", ".2f"), ("per_sample_cpu_speedup", "per-sample x cpu", ".2f"),
    ("mask_ms", "block mask ms", ".1f"), ("flex_warmup_s", "flex warm-up s", ".1f"),
]
COST_COLUMNS = [
    ("tokens", "L", "d"), ("samples", "samples", "d"), ("dense_ns_per_l_sq", "dense ns/L²", ".2f"),
    ("flex_ns_per_len_sq", "flex ns/Σlen²", ".2f"), ("flex_ns_per_visited", "flex ns/block area", ".2f"),
    ("per_sample_ns_per_len_sq", "per-sample ns/Σlen²", ".2f"), ("dense_mib", "dense MiB", ".0f"),
    ("flex_mib", "flex MiB", ".0f"), ("per_sample_mib", "per-sample MiB", ".0f"),
]
SCALING_COLUMNS = [
    ("tokens", "L", "d"), ("dense_exponent", "dense", ".2f"), ("flex_exponent", "flex", ".2f"),
    ("per_sample_exponent", "per-sample", ".2f"), ("dense_cpu_exponent", "dense cpu", ".2f"),
    ("flex_cpu_exponent", "flex cpu", ".2f"), ("per_sample_cpu_exponent", "per-sample cpu", ".2f"),
    ("flex_visited_exponent", "flex cpu vs block area", ".2f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small configuration (smoke test)")
    parser.add_argument("--block-size", type=int, default=128, help="flex block size (MODEL.md: 128)")
    parser.add_argument("--tokens", type=int, nargs="+", help="pack sizes L (default 1024 ... 16384)")
    parser.add_argument("--samples", type=int, nargs="+", help="samples per pack (default 4 8 16 32)")
    parser.add_argument("--out", help="JSON path (default bench/results/attention.json)")
    parser.add_argument("--worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    sizes = args.tokens or ([512] if args.quick else [1024, 2048, 4096, 8192, 16384])
    counts = args.samples or ([4] if args.quick else [4, 8, 16, 32])
    rows = []
    load_start = load_average()
    for tokens in sizes:
        for samples in counts:
            reps = 1 if args.quick else (2 if tokens >= 16384 else 3 if tokens >= 8192 else 5)
            row = make_row(run_config(tokens, samples, reps, args.block_size))
            rows.append(row)
            print(f"L={tokens:>5} samples={samples:>2}: dense {row['dense_ms']:8.1f} ms, flex {row['flex_ms']:8.1f} ms, "
                  f"per-sample {row['per_sample_ms']:8.1f} ms", flush=True)
    fits = scaling(rows)
    load = {"start": load_start, "end": load_average()}
    print(f"\nload average {load['start']:.1f} at start, {load['end']:.1f} at end ({_threads()} torch threads)")
    print(f"forward time, {HEADS} q / {KV_HEADS} kv heads x {HEAD_DIM}, float32, flex block {args.block_size}; "
          "x = speedup over dense in wall time, x cpu = in process CPU time")
    print_table(rows, TIME_COLUMNS)
    print("\ncost per unit of work and peak memory growth of one call")
    print_table(rows, COST_COLUMNS)
    print("\nexponent of time in Σlen² at fixed L over the sample counts (0: cost follows L², 1: follows Σlen²)")
    print_table(fits, SCALING_COLUMNS)
    meta = {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
            "block_size": args.block_size, "threads": _threads(), "load_average": load}
    write_json("attention", {**meta, "rows": rows, "scaling": fits}, args.out)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
