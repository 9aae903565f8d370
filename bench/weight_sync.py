"""Weight sync from the learner to the rollout actors: collective broadcast against the object store.

    python bench/weight_sync.py [--quick] [--out FILE]

One sender and 2 receivers (plain Ray actors holding the tensors, ``pipelines.rl.weight_sync.TensorSet``)
sync two tensor sets: the trained weights of the tiny model (its generation expert) and ~100M float32
parameters (--quick: the tiny model's set only). Each mode is warmed up once (the collective group is built then), then
timed over a few syncs; ratio = median seconds collective / object store, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
import torch

from bench.common import load_average, print_table, timings, write_json
from lance_core.config import model_preset
from lance_core.model import build_model
from pipelines.rl.weight_sync import TensorSet, WeightSync
from pipelines.runtime.ray_session import REPO_ROOT

RECEIVERS = 2


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    model = build_model(model_preset("tiny"), device="meta")
    return {f"model.{name}": tuple(p.shape) for name, p in model.gen_parameters()}


def large_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Square 2048² matrices (the size of a 3B model's attention projections) up to ``params``."""
    return {f"layers.{i}.weight": (2048, 2048) for i in range(max(1, round(params / 2048**2)))}


def sync_times(shapes: dict, mode: str, reps: int) -> list[float]:
    remote = ray.remote(TensorSet).options(num_cpus=0)
    sender = remote.remote(shapes, seed=1)
    receivers = [remote.remote(shapes) for _ in range(RECEIVERS)]
    sync = WeightSync(sender, receivers, mode)
    version = iter(range(reps + 1))
    try:
        sync.push(next(version))  # warm-up: actors started, group built
        times = timings(lambda: sync.push(next(version)), reps)
        if sync.fallbacks:
            raise RuntimeError(f"{sync.fallbacks} collective syncs fell back to the object store")
    finally:
        sync.close()
        for actor in [sender, *receivers]:
            ray.kill(actor, no_restart=True)
    return times


COLUMNS = [("tensors", "tensors", "s"), ("params", "params", ",d"), ("mib", "MiB", ".1f"), ("mode", "mode", "s"),
           ("seconds", "median s", ".3f"), ("gb_per_s", "GB/s sent", ".2f"), ("ratio", "ratio", ".2f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model's set only, fewer syncs (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/weight_sync.json)")
    args = parser.parse_args()
    reps = 3 if args.quick else 5
    load_start = load_average()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    rows = []
    try:
        sets = [(True, tiny_shapes())] + ([] if args.quick else [(False, large_shapes(100_000_000))])
        for tiny, shapes in sets:
            params = sum(int(torch.Size(s).numel()) for s in shapes.values())
            label = "tiny model (GEN expert)" if tiny else f"{params / 1e6:.0f}M float32"
            baseline = None
            for mode in ("object_store", "collective"):
                median = statistics.median(sync_times(shapes, mode, reps))
                baseline = baseline or median
                rows.append({"tensors": label, "params": params, "mib": params * 4 / 2**20, "mode": mode,
                             "seconds": median, "gb_per_s": params * 4 * RECEIVERS / median / 1e9,
                             "ratio": median / baseline})
                print(f"{label}, {mode}: {median:.3f} s", flush=True)
    finally:
        ray.shutdown()
    load = {"start": load_start, "end": load_average()}
    print(f"\nload average {load['start']:.1f} at start, {load['end']:.1f} at end; {os.cpu_count()} cores; "
          f"{RECEIVERS} receivers; ratio = collective / object store (median of {reps} syncs after a warm-up)")
    print_table(rows, COLUMNS)
    ratios = {row["tensors"]: row["ratio"] for row in rows if row["mode"] == "collective"}
    write_json("weight_sync", {"load_average": load, "cores": os.cpu_count(), "receivers": RECEIVERS, "reps": reps,
                               "rows": rows, "ratios": ratios}, args.out)


if __name__ == "__main__":
    main()
