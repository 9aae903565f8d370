"""Training step of Ray Train + DeepSpeed against a plain single-process PyTorch loop, on the same model
and the same packed batches.

    python bench/train_step.py [--quick] [--rounds N] [--default-allocator] [--out FILE]

Data: latent shards of five tasks (t2i, t2v, i2i, i2t, v2t) with random latents and ViT features of the
model's sizes, written in the shard schema; every run streams them through the same loader and packer
(rank 0 of 1 sees the same packs in both loops). Model: the ``mid`` config of bench/model_step.py
(hidden 512, 4 layers), fp32 on CPU, one thread per worker in both loops.

Rows: the plain loop (the training loop's optimizer, fused AdamW, clip 1.0, packs built before timing),
Ray Train + DeepSpeed ZeRO-2 with 1 worker and with 2 workers (packs built by the loader thread during
training). Step time is the median over the steps after the warm-up, from the per-step metrics of the
run. The plain loop and the 1-worker run alternate over ``--rounds`` rounds (plain, Ray, plain, ...,
plain), because the load of a shared machine drifts by more than the overhead measured; ``vs plain`` is
the median over the rounds of the Ray run's step time over the mean of the plain runs either side of it
(goal <= 1.10); ``vs 1 worker`` the throughput ratio of 2 workers to 1 (ideal 2.0 with a core per
worker); ``fill`` the real-token share of the budget (goal >= 0.95); ``data wait`` the share of the step
spent waiting for the next pack (goal <= 5 %). Both loops run with the allocator settings of the training
workers (``scaling.retain_freed_memory``: freed memory kept for reuse); ``--default-allocator`` runs both
without them.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq
import torch

from bench.common import load_average, print_table, write_json
from lance_core.flow import LossConfig, compute_losses
from lance_core.shards import parquet_options, shard_table
from lance_core.tokenizer import ByteTokenizer

MID = {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "head_dim": 64,
       "intermediate_size": 1408, "mrope_section": (8, 12, 12), "vit": {"out_hidden_size": 512}}
TASK_SHAPES = {"t2i": (1, 8, 8), "t2v": (3, 6, 8), "i2i": (1, 8, 8), "i2t": None, "v2t": None}
WORDS = ("red", "blue", "sign", "square", "moving", "right", "small", "large", "cat", "tree")


def _latent_slot(row: dict, slot: str, shape, gen: torch.Generator) -> None:
    row[f"{slot}_vae"] = torch.randn(*shape, 48, generator=gen)


def _vit_slot(row: dict, slot: str, grid, dim: int, gen: torch.Generator) -> None:
    n = grid[0] * grid[1] * grid[2]
    row[f"{slot}_vit"] = torch.randn(n, dim, generator=gen) * 0.5
    row[f"{slot}_vit_grid"] = list(grid)


def write_shards(root: Path, rows_per_task: int, hidden: int, seed: int = 0) -> Path:
    """Shards (one per task) with random latents in the latent shard schema, and their manifest."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (task, shape) in enumerate(TASK_SHAPES.items()):
        rows = []
        for k in range(rows_per_task):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
            row = {"sample_id": f"{task}-{k}", "source_uri": f"bench://{task}/{k}", "content_sha256": "",
                   "task": task, "caption": caption}
            if shape is not None:
                _latent_slot(row, "target", shape, gen)
            if task == "i2i":
                _latent_slot(row, "source", shape, gen)
                _vit_slot(row, "source", (1, 2, 2), hidden, gen)
            if task in ("i2t", "v2t"):
                _vit_slot(row, "target", (1, 3, 3) if task == "i2t" else (2, 3, 3), hidden, gen)
                row.update(question="What is shown?", answer=caption)
            rows.append(row)
        name = f"shards/part-{index:05d}.parquet"
        table = shard_table(rows, "bf16")
        pq.write_table(table, root / name, row_group_size=16, **parquet_options(table.schema))
        entries.append({"partition": index, "shard": name, "rows": len(rows)})
    (root / "manifest.json").write_text(json.dumps({"schema": "lance-latent-shards/1", "shards": entries}))
    return root


def train_config(data_root: Path, output: Path, name: str, workers: int, steps: int, budget: int,
                 retain_freed_memory: bool = True):
    from pipelines.train.config import load_train_config

    return load_train_config({
        "name": name, "output": str(output), "steps": steps, "seed": 0,
        "model": {"preset": "tiny", "overrides": MID},
        "data": {"uris": [str(data_root)], "token_budget": budget, "holdout_per_task": 0,
                 "caption_dropout": 0.0, "condition_dropout": 0.0},
        "mixture": {"weights": {t: 1.0 for t in TASK_SHAPES}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"workers": workers, "cpus_per_worker": 1, "threads_per_worker": 1,
                    "retain_freed_memory": retain_freed_memory},
        "checkpoint": {"every_steps": steps, "keep_last": 1, "export_safetensors": False},
        "eval": {"samples": False},
        "metrics": {"report_every": steps, "expert_grad_check": False},
    })


def retain_freed_memory_here() -> None:
    """This process's allocator set as the training workers' (``RETAIN_FREED_MEMORY_ENV``, read by glibc at
    start-up there): here by ``mallopt``, for the main arena the plain loop runs in."""
    from pipelines.train.driver import RETAINED_MEMORY_BYTES

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for option in (-1, -3):  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
        if libc.mallopt(option, RETAINED_MEMORY_BYTES) != 1:
            raise RuntimeError(f"mallopt({option}) refused")


def plain_loop(cfg, warmup: int, steps: int) -> dict:
    """The same packs (the loader of rank 0 of 1), the same optimizer, schedule and clipping, no Ray, no
    DeepSpeed, no cross-rank reductions."""
    from pipelines.train.data import PackLoader
    from pipelines.train.trainer import build_initial_model, build_optimizer
    from pipelines.train.mixture import MixtureSchedule
    from pipelines.train.plan import make_plan

    torch.set_num_threads(1)
    plan = make_plan(cfg.data, cfg.mixture.weights)
    model_cfg, model = build_initial_model(cfg)
    schedule = MixtureSchedule(cfg.mixture, list(plan.task_rows))
    loader = PackLoader(plan, cfg.data, model_cfg, ByteTokenizer(), 0, 1, cfg.seed, True)
    packs = [loader.build_pack(schedule.weights(k + 1)) for k in range(warmup + steps)]
    optimizer = build_optimizer(cfg, list(model.parameters()))
    warm = max(2, cfg.optim.warmup_steps)
    lr_at = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, k / warm))
    noise = torch.Generator().manual_seed(0)
    times, cpu_times = [], []
    for pack in packs:
        began, cpu_began = time.perf_counter(), time.process_time()
        out = compute_losses(model, pack.batch, LossConfig(), noise, run_all_heads=True)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        lr_at.step()
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu_began)
    steady = times[warmup:]
    tokens = statistics.median(p.batch.num_real_tokens for p in packs[warmup:])
    fill = statistics.mean(p.batch.num_real_tokens / cfg.data.token_budget for p in packs)
    step = statistics.median(steady)
    return {"loop": "plain PyTorch", "workers": 1, "step_ms": step * 1e3,
            "step_cpu_ms": statistics.median(cpu_times[warmup:]) * 1e3, "tokens_per_s": tokens / step,
            "fill": fill, "data_wait": None}


def ray_loop(cfg, warmup: int) -> dict:
    from pipelines.train.driver import run_training

    result = run_training(cfg)
    rows = result.metrics[warmup:]
    step = statistics.median(r["step_time_s"] for r in rows)
    return {"loop": "Ray Train + DeepSpeed ZeRO-2", "workers": cfg.scaling.workers, "step_ms": step * 1e3,
            "step_cpu_ms": statistics.median(r["step_cpu_s"] for r in rows) * 1e3,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "fill": statistics.mean(r["pack_fill"] for r in result.metrics),
            "data_wait": statistics.median(r["data_wait_share"] for r in rows),
            "mfu": statistics.median(r["mfu"] for r in rows)}


COLUMNS = [("loop", "loop", "s"), ("workers", "workers", "d"), ("step_ms", "step ms", ".1f"),
           ("vs_plain", "vs plain", ".3f"), ("step_cpu_ms", "step cpu ms", ".1f"),
           ("vs_plain_cpu", "vs plain cpu", ".3f"), ("tokens_per_s", "tokens/s", ".0f"), ("vs_one", "vs 1 worker", ".2f"),
           ("fill", "fill", ".3f"), ("data_wait", "data wait", ".3%"), ("mfu", "MFU", ".3f")]


def paired_rounds(config, rounds: int, warmup: int, steps: int) -> dict:
    """The plain loop and the 1-worker Ray run alternated (plain, Ray, plain, ..., plain): each Ray run is
    compared with the mean of the plain runs either side of it, and the median of those ratios is the
    figure, so the drifting load of a shared host cancels. Each Ray run trains from scratch (its own name)."""
    plain = [plain_loop(config("plain", 1), warmup, steps)]
    print(f"plain loop: {plain[-1]['step_ms']:.1f} ms/step", flush=True)
    ray_runs = []
    for index in range(rounds):
        ray_runs.append(ray_loop(config(f"one-{index}", 1), warmup))
        print(f"Ray Train + DeepSpeed, 1 worker: {ray_runs[-1]['step_ms']:.1f} ms/step", flush=True)
        plain.append(plain_loop(config("plain", 1), warmup, steps))
        print(f"plain loop: {plain[-1]['step_ms']:.1f} ms/step", flush=True)
    ratios = {key: [run[key] / ((before[key] + after[key]) / 2) for run, before, after in zip(ray_runs, plain, plain[1:])]
              for key in ("step_ms", "step_cpu_ms")}
    return {"plain": plain, "ray_one": ray_runs, "ratios": ratios,
            "ratio": statistics.median(ratios["step_ms"]), "cpu_ratio": statistics.median(ratios["step_cpu_ms"])}


def _median_row(runs: list[dict]) -> dict:
    """The run whose step time is the median (the upper one of an even count)."""
    return sorted(runs, key=lambda row: row["step_ms"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, one round (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/train_step.json)")
    parser.add_argument("--budget", type=int, default=2048, help="token budget per rank per step")
    parser.add_argument("--rounds", type=int, default=3, help="paired plain / Ray rounds")
    parser.add_argument("--default-allocator", action="store_true",
                        help="both loops without the workers' retain_freed_memory allocator settings")
    args = parser.parse_args()
    warmup, steps, rounds = (2, 4, 1) if args.quick else (3, 12, args.rounds)
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="lance-bench-") as tmp:
        tmp = Path(tmp)
        data_root = write_shards(tmp / "latents", rows_per_task=48, hidden=MID["hidden_size"])
        retain = not args.default_allocator
        if retain:
            retain_freed_memory_here()

        def config(name: str, workers: int):
            return train_config(data_root, tmp / "runs", name, workers, warmup + steps, args.budget, retain)

        paired = paired_rounds(config, rounds, warmup, steps)
        ray_two = ray_loop(config("two", 2), warmup)
        print(f"Ray Train + DeepSpeed, 2 workers: {ray_two['step_ms']:.1f} ms/step", flush=True)
    plain, ray_one = dict(_median_row(paired["plain"])), dict(_median_row(paired["ray_one"]))
    plain.update(vs_plain=1.0, vs_plain_cpu=1.0, vs_one=None)
    ray_one.update(vs_plain=paired["ratio"], vs_plain_cpu=paired["cpu_ratio"], vs_one=1.0)
    ray_two.update(vs_plain=None, vs_plain_cpu=None, vs_one=ray_two["tokens_per_s"] / ray_one["tokens_per_s"])
    load = {"start": load_start, "end": load_average()}
    print(f"\nload average {load['start']:.1f} at start, {load['end']:.1f} at end; model 'mid' (hidden 512, 4 layers), "
          f"fp32 CPU, 1 thread per worker, token budget {args.budget} per rank, {steps} timed steps after {warmup}; "
          f"allocator: {'default' if args.default_allocator else 'freed memory retained (scaling.retain_freed_memory)'}")
    print(f"{rounds} paired rounds; Ray 1 worker / plain, wall: "
          + " ".join(f"{r:.3f}" for r in paired["ratios"]["step_ms"])
          + "; cpu: " + " ".join(f"{r:.3f}" for r in paired["ratios"]["step_cpu_ms"])
          + " (rows: the median runs; 'vs plain': the median paired ratio)")
    rows = [plain, ray_one, ray_two]
    print_table(rows, COLUMNS)
    write_json("train_step", {"budget": args.budget, "retain_freed_memory": not args.default_allocator, "warmup": warmup, "steps": steps, "load_average": load,
                              "rows": rows, "paired_ratios": paired["ratios"],
                              "plain_runs": paired["plain"], "ray_one_runs": paired["ray_one"]}, args.out)


if __name__ == "__main__":
    main()
