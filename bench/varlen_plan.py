"""Flash-attention varlen plan: the vectorised ``varlen_plan`` vs the span-by-span Python loop it replaced.

    python bench/varlen_plan.py [--quick] [--tokens L ...] [--samples N ...] [--reps R] [--threads T] [--out FILE]

The plan is built on the host once per step (``prepare_attention``), before any layer runs. Packs of L tokens
hold N samples of random lengths, each laid out as a Lance understanding-and-generation sample: prompt text
(causal), ViT span (full), clean VAE span (full), text (causal), noisy target (noise), closing token (causal).
The loop implementation is the reference kept in ``tests/test_varlen.py``; both build the same plan (checked
here). Timed calls of the two alternate; medians of wall and process CPU time, ratio = loop / vectorised.
One torch thread by default: the plan's tensor ops are small, and on a shared machine intra-op threads
spend their time in hand-offs (``--threads`` to change). In training on a GPU the layout, and so the
vectorised plan, lives on the device; the loop copied it to the host first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import load_average, print_table, wall_and_cpu, write_json
from lance_core.model.layout import AttentionLayout
from lance_core.model.varlen import varlen_plan
from tests.test_varlen import loop_varlen_plan

SPAN_SHARES = ((0.1, "causal"), (0.15, "full"), (0.25, "full"), (0.05, "causal"), (None, "noise"), (0, "causal"))
"""Share of a sample's tokens per span (None: the rest; 0: one token)."""


def build_layout(tokens: int, samples: int, seed: int) -> AttentionLayout:
    rng = random.Random(seed)
    weights = [rng.uniform(0.5, 1.5) for _ in range(samples)]
    lengths = [max(16, int(tokens * w / sum(weights))) for w in weights]
    lengths[-1] += tokens - sum(lengths)
    sample, span, bidir, noise = [], [], [], []
    span_no = 0
    for index, n in enumerate(lengths):
        sizes = [max(1, int(n * share)) if share is not None else 0 for share, _ in SPAN_SHARES]
        sizes[SPAN_SHARES.index((None, "noise"))] = n - sum(sizes)
        for size, (_, mode) in zip(sizes, SPAN_SHARES):
            sample += [index] * size
            span += [span_no] * size
            bidir += [mode != "causal"] * size
            noise += [mode == "noise"] * size
            span_no += 1
    return AttentionLayout(torch.tensor(sample), torch.tensor(span), torch.tensor(bidir), torch.tensor(noise))


def same_plan(a, b) -> bool:
    return len(a) == len(b) and all(
        x.causal == y.causal and (x.max_q, x.max_k) == (y.max_q, y.max_k)
        and all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("q_index", "k_index", "cu_q", "cu_k"))
        for x, y in zip(a, b))


def measure(tokens: int, samples: int, reps: int) -> dict:
    layout = build_layout(tokens, samples, seed=tokens + samples)
    if not same_plan(varlen_plan(layout), loop_varlen_plan(layout)):  # also the warm-up of both
        raise AssertionError(f"plans differ at L={tokens}, {samples} samples")
    runs = {"loop": lambda: loop_varlen_plan(layout), "vectorised": lambda: varlen_plan(layout)}
    walls, cpus = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            (wall,), (cpu,) = wall_and_cpu(run, 1)
            walls[name].append(wall)
            cpus[name].append(cpu)
    loop, vec = statistics.median(walls["loop"]), statistics.median(walls["vectorised"])
    loop_cpu, vec_cpu = statistics.median(cpus["loop"]), statistics.median(cpus["vectorised"])
    return {"tokens": tokens, "samples": samples, "spans": int(torch.unique_consecutive(layout.span).numel()),
            "loop_ms": loop * 1e3, "vectorised_ms": vec * 1e3, "ratio": loop / vec,
            "loop_cpu_ms": loop_cpu * 1e3, "vectorised_cpu_ms": vec_cpu * 1e3, "cpu_ratio": loop_cpu / vec_cpu}


COLUMNS = [
    ("tokens", "L", "d"), ("samples", "samples", "d"), ("spans", "spans", "d"), ("loop_ms", "loop ms", ".2f"),
    ("vectorised_ms", "vectorised ms", ".2f"), ("ratio", "loop / vectorised", ".1f"),
    ("loop_cpu_ms", "loop cpu ms", ".2f"), ("vectorised_cpu_ms", "vectorised cpu ms", ".2f"),
    ("cpu_ratio", "cpu ratio", ".1f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small configuration (smoke test)")
    parser.add_argument("--tokens", type=int, nargs="+", help="pack sizes L (default 4096 16384 65536)")
    parser.add_argument("--samples", type=int, nargs="+", help="samples per pack (default 4 32)")
    parser.add_argument("--reps", type=int, help="timed calls of each implementation (default 7; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", help="JSON path (default bench/results/varlen_plan.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.tokens or ([2048] if args.quick else [4096, 16384, 65536])
    counts = args.samples or ([4] if args.quick else [4, 32])
    reps = args.reps or (1 if args.quick else 7)
    load_start = load_average()
    rows = [measure(tokens, samples, reps) for tokens in sizes for samples in counts]
    load = {"start": load_start, "end": load_average()}
    print(f"varlen plan on the host, {torch.get_num_threads()} torch threads, load average {load['start']:.1f} "
          f"at start, {load['end']:.1f} at end; ratio = loop / vectorised (median of {reps})")
    print_table(rows, COLUMNS)
    write_json("varlen_plan", {"reps": reps, "threads": torch.get_num_threads(), "load_average": load,
                               "rows": rows}, args.out)


if __name__ == "__main__":
    main()
