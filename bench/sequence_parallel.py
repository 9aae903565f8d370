"""Ulysses sequence parallelism on CPU: the step time of S = 2 against S = 1 at equal tokens per rank.

    python bench/sequence_parallel.py [--quick] [--tokens L ...] [--reps N] [--out FILE]

Two gloo processes, one torch thread each. Baseline (S = 1, data parallel): each rank trains on its own
pack of L tokens. Sequence parallel (S = 2): both ranks share the pack that holds the two baseline packs'
samples (2L tokens), L tokens each. Both take the same forward + backward (``compute_losses``) and one
all-reduce of the gradients, as DeepSpeed does; the per-sample attention does the same work per rank in
both (all samples, half the heads, against the own samples, all heads), so the ratio measures what sequence
parallelism adds: the all-to-alls (4 per layer forward, 4 backward; ``a2a MiB`` is what one rank sends per
step) and the extra key/value heads (2 KV heads stay whole at S = 2). The two kinds of step alternate in
the same processes, a step's time is the slower rank's, the median over ``reps`` is reported (the machine
is shared: the load average is recorded; CPU time, which a descheduled process does not accrue, is the
steadier figure). Models: ``tiny`` and the mid-size model of ``model_step.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import load_average, print_table, write_json
from bench.model_step import MODELS
from lance_core.config import model_preset
from lance_core.flow import LossConfig, compute_losses, noise_latents
from lance_core.model import build_model
from lance_core.model.sequence_parallel import kv_repeats, new_sequence_parallel
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_sample
from lance_core.tokenizer import ByteTokenizer

TASKS = ("t2i", "i2i", "v2v", "i2t", "t2v")
SIZE = 2


def fill(cfg, tokens: int, seed: int, image_side: int) -> list:
    """Synthetic samples cycling through TASKS, each added when it fits ``tokens``, until none of the tasks
    fits any more."""
    tokenizer, samples, used, misses = ByteTokenizer(), [], 0, 0
    for index in range(10_000):
        sample = synthetic_sample(TASKS[index % len(TASKS)], tokenizer, cfg, seed * 10_000 + index, image_side)
        if used + sample.num_tokens > tokens:
            misses += 1
            if misses == len(TASKS):
                break
            continue
        samples.append(sample)
        used += sample.num_tokens
        misses = 0
    if not samples:
        raise ValueError(f"a {TASKS[0]} sample with image side {image_side} is longer than {tokens} tokens")
    return samples


def a2a_mib(cfg, tokens_per_rank: int) -> float:
    """MiB one rank sends per step: per layer q, k, v and the output forward, their gradients backward;
    each all-to-all keeps 1/S of its tensor."""
    kv = cfg.num_kv_heads * kv_repeats(cfg.num_heads, cfg.num_kv_heads, SIZE)
    per_layer = 2 * (2 * cfg.num_heads + 2 * kv) * tokens_per_rank * cfg.head_dim * 4 * (SIZE - 1) / SIZE
    return per_layer * cfg.num_layers / 2**20


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def worker(rank: int, port: int, name: str, tokens: int, reps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SIZE)
    sp = new_sequence_parallel(SIZE)
    cfg = model_preset("tiny", attention_backend="per_sample", **MODELS[name])
    torch.manual_seed(0)
    model = build_model(cfg)
    image_side = 4 if tokens < 2048 else 8
    packs = [fill(cfg, tokens, seed, image_side) for seed in range(SIZE)]
    own = pack_samples(packs[rank], cfg, pad_to=tokens)
    shared = pack_samples(packs[0] + packs[1], cfg, pad_to=SIZE * tokens)
    loss_cfg = LossConfig()
    noise = {k: noise_latents(b, loss_cfg, torch.Generator().manual_seed(1)) for k, b in (("dp", own), ("sp", shared))}

    def count_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def step(kind: str) -> tuple[float, float]:
        """Wall and process CPU seconds of one step, each the slower rank's."""
        model.zero_grad(set_to_none=True)
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = own if kind == "dp" else shared
        loss = compute_losses(model, batch, loss_cfg, noised=noise[kind], count_reducer=count_sum,
                              run_all_heads=True, sequence_parallel=sp if kind == "sp" else None).total
        loss.backward()
        dist.all_reduce(_flat_grads(model))
        seconds = torch.tensor([time.perf_counter() - start, time.process_time() - cpu_start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return float(seconds[0]), float(seconds[1])

    step("dp"), step("sp")  # warm-up
    walls, cpus = {"dp": [], "sp": []}, {"dp": [], "sp": []}
    for _ in range(reps):
        for kind in ("dp", "sp"):
            wall, cpu = step(kind)
            walls[kind].append(wall * 1e3)
            cpus[kind].append(cpu * 1e3)
    if rank == 0:
        result = {"model": name, "tokens_per_rank": tokens, "samples_per_rank": len(packs[0]),
                  "fill": own.num_real_tokens / tokens, "a2a_mib": a2a_mib(cfg, tokens)}
        for kind in ("dp", "sp"):
            result.update({f"{kind}_ms": statistics.median(walls[kind]), f"{kind}_min_ms": min(walls[kind]),
                           f"{kind}_cpu_ms": statistics.median(cpus[kind]), f"{kind}_all_ms": walls[kind]})
        for suffix in ("", "_min", "_cpu"):
            result[f"sp_over_dp{suffix}"] = result[f"sp{suffix}_ms"] / result[f"dp{suffix}_ms"]
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(name: str, tokens: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "row.json")
        mp.spawn(worker, args=(_free_port(), name, tokens, reps, out), nprocs=SIZE)
        return json.loads(Path(out).read_text())


COLUMNS = [
    ("model", "model", "s"), ("tokens_per_rank", "tokens/rank", "d"), ("samples_per_rank", "samples/rank", "d"),
    ("dp_ms", "S=1 ms", ".1f"), ("sp_ms", "S=2 ms", ".1f"), ("sp_over_dp", "S=2/S=1", ".2f"),
    ("sp_over_dp_min", "S=2/S=1 min", ".2f"), ("dp_cpu_ms", "S=1 cpu ms", ".1f"), ("sp_cpu_ms", "S=2 cpu ms", ".1f"),
    ("sp_over_dp_cpu", "S=2/S=1 cpu", ".2f"), ("a2a_mib", "a2a MiB", ".1f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model at 1024 tokens per rank (seconds)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per rank (default 1024 4096)")
    parser.add_argument("--reps", type=int, help="timed steps of each kind (default 7, quick 2)")
    parser.add_argument("--out", help="JSON path (default bench/results/sequence_parallel.json)")
    args = parser.parse_args()
    models = ["tiny"] if args.quick else ["tiny", "mid"]
    sizes = args.tokens or ([1024] if args.quick else [1024, 4096])
    reps = args.reps or (2 if args.quick else 7)
    load_start = load_average()
    rows = []
    for name in models:
        for tokens in sizes:
            row = run_config(name, tokens, reps)
            rows.append(row)
            print(f"{name} {tokens} tokens/rank: S=1 {row['dp_ms']:.1f} ms, S=2 {row['sp_ms']:.1f} ms", flush=True)
    load = {"start": load_start, "end": load_average()}
    print(f"\n{SIZE} gloo processes, 1 torch thread each, per-sample attention, fp32; load average "
          f"{load['start']:.1f} at start, {load['end']:.1f} at end")
    print("S=1: each rank its own pack; S=2: both ranks share the pack of both (equal tokens per rank); "
          "median wall, min wall and median process CPU time of a step (the slower rank's)")
    print_table(rows, COLUMNS)
    write_json("sequence_parallel", {"processes": SIZE, "threads": 1, "reps": reps, "load_average": load,
                                     "rows": rows}, args.out)


if __name__ == "__main__":
    main()
