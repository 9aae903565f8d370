"""GRPO rollouts over two nodes: images/s of 1 rollout actor on one node against 2 rollout actors on two nodes.

    python bench/grpo_nodes.py [--quick] [--out FILE]

A two-node local Ray cluster (ray.cluster_utils.Cluster, one CPU and one custom resource per node pins each
actor to its node). The same groups (tiny model, 128 px, 10 SDE-sampler steps, G = 8) are sampled and decoded
by one actor, then split evenly between two actors as the GRPO loop splits them; after a warm-up group per
actor, images/s of the whole rollout and the ratio 2 / 1, measured in the same run (the machine is shared;
the load average is recorded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import ray
from ray.cluster_utils import Cluster

from bench.common import load_average, print_table, write_json
from bench.grpo import grpo_config
from pipelines.rl.config import load_grpo_config
from pipelines.rl.prompts import epoch_prompts, load_prompts
from pipelines.rl.rollout import GroupTask, RolloutWorker, group_seed
from pipelines.runtime.ray_session import REPO_ROOT

NODES = ("node_a", "node_b")


def rollout_rate(cfg, nodes: tuple[str, ...], tasks: list[GroupTask]) -> dict:
    data = cfg.model_dump(mode="json")
    remote = ray.remote(RolloutWorker)
    workers = [remote.options(num_cpus=1, resources={node: 1}).remote(data) for node in nodes]
    try:
        placed = ray.get([worker.node_id.remote() for worker in workers])
        for stream in [worker.rollout.remote([tasks[0].__dict__]) for worker in workers]:  # warm-up
            ray.get(list(stream))
        chunks = [tasks[k * len(tasks) // len(workers):(k + 1) * len(tasks) // len(workers)]
                  for k in range(len(workers))]
        started = time.perf_counter()
        streams = [worker.rollout.remote([t.__dict__ for t in chunk]) for worker, chunk in zip(workers, chunks)]
        for stream in streams:  # the actors run at once; their items are taken in turn
            ray.get(list(stream))
        seconds = time.perf_counter() - started
    finally:
        for worker in workers:
            ray.kill(worker, no_restart=True)
    images = len(tasks) * cfg.rollout.group_size
    return {"setting": f"{len(workers)} rollout actor{'s' if len(workers) > 1 else ''}",
            "nodes": len(set(placed)), "groups": len(tasks), "images": images, "seconds": seconds,
            "images_per_s": images / seconds}


COLUMNS = [("setting", "setting", "s"), ("nodes", "nodes", "d"), ("groups", "groups", "d"),
           ("images", "images", "d"), ("seconds", "seconds", ".2f"), ("images_per_s", "images/s", ".2f"),
           ("ratio", "ratio", ".2f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few groups (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/grpo_nodes.json)")
    args = parser.parse_args()
    groups = 4 if args.quick else 16
    cfg = load_grpo_config(grpo_config(True, 1, 10, 128))
    prompts = epoch_prompts(load_prompts(cfg.prompts, cfg.seed).train, 0, groups)
    tasks = [GroupTask(i, p.text, p.target, group_seed(cfg.seed, 0, i)) for i, p in enumerate(prompts)]
    load_start = load_average()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {NODES[0]: 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={NODES[1]: 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu"}})
        one = rollout_rate(cfg, NODES[:1], tasks)
        two = rollout_rate(cfg, NODES, tasks)
    finally:
        ray.shutdown()
        cluster.shutdown()
    one["ratio"], two["ratio"] = 1.0, two["images_per_s"] / one["images_per_s"]
    load = {"start": load_start, "end": load_average()}
    print(f"\nload average {load['start']:.1f} at start, {load['end']:.1f} at end; {os.cpu_count()} cores")
    print("ratio = images/s over 1 actor (goal >= 1.7 with a free core per node)")
    print_table([one, two], COLUMNS)
    write_json("grpo_nodes", {"load_average": load, "cores": os.cpu_count(), "rows": [one, two],
                              "rollout_speedup": two["ratio"]}, args.out)


if __name__ == "__main__":
    main()
