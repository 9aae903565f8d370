"""Peak memory of a training step against tokens per rank, for each activation checkpointing policy.

    python bench/activation_memory.py [--quick] [--out FILE]

Model: the ``mid`` config of bench/model_step.py (hidden 512, 4 layers, 8/2 heads), float32 on the CPU,
per-sample attention. Each point runs in a fresh process (glibc returns freed memory at once, so the
resident set follows live memory) and records the peak growth of the resident set over one forward +
backward of a pack of synthetic samples of every task, after a warm-up step. A straight line fitted per
policy (fixed part + bytes per token) gives the longest pack that fits in 16 GiB of host memory once the
process's own base, the weights and AdamW's two states are counted.

With sequence parallelism over S ranks (Ulysses), a rank holds T / S tokens for everything but the joint
attention, where it holds all T tokens for H / S heads, the same number of values. The S = 2 rows measure
it: two gloo processes share a pack of 2 x tokens, each records its own peak, the larger is reported, and
its line gives the longest pack with S = 2 (tokens per rank x 2).

``--quick`` (the test suite's smoke run): the tiny model, packs of 512 and 1,024 tokens, the policies
``none`` and ``layer`` only.
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
    return {"model": model_name, "policy": policy, "sp": 1, "tokens": tokens, "real_tokens": batch.num_real_tokens,
            "params": sum(p.numel() for p in model.parameters()),
            "base_bytes": base, "step_peak_bytes": peak, "step_s": time.perf_counter() - started}


def _sp_rank(rank: int, port: int, model_name: str, policy: str, tokens: int, out: str) -> None:
    """One rank of a sequence-parallel pair: its peak over a step on a shared pack of 2 x ``tokens``."""
    import torch
    import torch.distributed as dist

    from bench.common import _rss_bytes, peak_rss_increase
    from bench.model_step import MODELS
    from lance_core.config import model_preset
    from lance_core.flow import LossConfig, compute_losses, noise_latents
    from lance_core.model import build_model
    from lance_core.model.sequence_parallel import new_sequence_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sp = new_sequence_parallel(2)
    torch.manual_seed(0)
    cfg = model_preset("tiny", attention_backend="per_sample", max_latent_frames=4, **MODELS[model_name])
    model = build_model(cfg).train()
    model.activation_checkpointing = policy
    batch = _pack(cfg, 2 * tokens)
    loss_cfg = LossConfig()
    noised = noise_latents(batch, loss_cfg, torch.Generator().manual_seed(0))

    def count_sum(t):
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def step() -> None:
        model.zero_grad(set_to_none=True)
        compute_losses(model, batch, loss_cfg, noised=noised, count_reducer=count_sum, run_all_heads=True,
                       sequence_parallel=sp).total.backward()

    step()
    model.zero_grad(set_to_none=True)
    dist.barrier()
    base, started = _rss_bytes(), time.perf_counter()
    peak = peak_rss_increase(step)
    Path(f"{out}.{rank}").write_text(json.dumps({"base_bytes": base, "step_peak_bytes": peak,
                                                  "step_s": time.perf_counter() - started,
                                                  "params": sum(p.numel() for p in model.parameters())}))
    dist.destroy_process_group()


def measure_sp_point(model_name: str, policy: str, tokens: int) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rank")
        mp.spawn(_sp_rank, args=(port, model_name, policy, tokens, out), nprocs=2)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    worst = max(ranks, key=lambda r: r["step_peak_bytes"])
    return {"model": model_name, "policy": policy, "sp": 2, "tokens": tokens, **worst,
            "step_s": max(r["step_s"] for r in ranks)}


def run_point(model_name: str, policy: str, tokens: int, sp: int = 1) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--point", model_name, policy, str(tokens), "--sp", str(sp)],
                         env=env, capture_output=True, text=True, check=True)
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


COLUMNS = [("sp", "S", "d"), ("policy", "policy", "s"), ("tokens", "tokens/rank", "d"), ("step_peak_mib", "step peak MiB", ".1f"),
           ("over_none", "vs none", ".2f"), ("step_s", "step s", ".2f"), ("step_over_none", "time vs none", ".2f")]
FIT_COLUMNS = [("policy", "policy", "s"), ("kib_per_token_s1", "KiB/token S=1", ".1f"),
               ("kib_per_token_s2", "KiB/token/rank S=2", ".1f"), ("longest_s1", "longest pack S=1", "d"),
               ("longest_s2", "longest pack S=2", "d")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, two small packs, two policies (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/activation_memory.json)")
    parser.add_argument("--point", nargs=3, metavar=("MODEL", "POLICY", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        measure = measure_sp_point if args.sp == 2 else measure_point
        print(json.dumps(measure(args.point[0], args.point[1], int(args.point[2]))))
        return
    model_name, sizes = ("tiny", (512, 1024)) if args.quick else ("mid", (1024, 2048, 4096, 8192))
    policies = ("none", "layer") if args.quick else POLICIES
    load_start = load_average()
    rows = [run_point(model_name, policy, tokens, sp) for sp in (1, 2) for policy in policies for tokens in sizes]
    by_key = {(r["sp"], r["policy"], r["tokens"]): r for r in rows}
    for row in rows:
        none = by_key[(row["sp"], "none", row["tokens"])]
        row.update(step_peak_mib=row["step_peak_bytes"] / 2**20, over_none=row["step_peak_bytes"] / none["step_peak_bytes"],
                   step_over_none=row["step_s"] / none["step_s"])
    fits = []
    for policy in policies:
        fit = {"policy": policy}
        for sp in (1, 2):
            points = [(r["tokens"], r["step_peak_bytes"]) for r in rows if r["policy"] == policy and r["sp"] == sp]
            fixed, per_token = fit_line(points)
            sample = next(r for r in rows if r["policy"] == policy and r["sp"] == sp)
            static = sample["base_bytes"] + ADAM_BYTES_PER_PARAM * sample["params"]
            fit.update({f"kib_per_token_s{sp}": per_token / 1024, f"fixed_mib_s{sp}": fixed / 2**20,
                        f"longest_s{sp}": longest_pack(fixed, per_token, static, sp)})
        fits.append(fit)
    print(f"\nmodel {model_name}, float32 on CPU, per-sample attention; load average {load_start:.1f} -> "
          f"{load_average():.1f}")
    print_table(rows, COLUMNS)
    print("\nstraight-line fit per policy and S (peak against tokens per rank); longest pack in 16 GiB of host memory "
          "per rank")
    print_table(fits, FIT_COLUMNS)
    write_json("activation_memory", {"model": model_name, "host_bytes": HOST_BYTES, "rows": rows, "fits": fits},
               args.out)


if __name__ == "__main__":
    main()
