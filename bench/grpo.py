"""GRPO on Ray: reward-pool scaling, streaming rewards against rollout-then-reward, end-to-end images/s.

    python bench/grpo.py [--quick] [--out FILE]

1. Reward pool: the PP-OCRv4 OCR reward (rapidocr-onnxruntime, one intra-op thread per ONNX session)
   scores the same batches of rendered text images with 1 and then 2 actors; throughput ratio 2 / 1.
2. Streaming: the tiny-model GRPO loop with the OCR reward, once with rewards streamed per decoded
   micro-batch (scoring overlaps the next rollout) and once scored only after the whole rollout; ratio of
   the median epoch generation time (rollout + rewards, learner excluded) streaming / sequential.
3. End to end: images per second of whole epochs (rollout, rewards, learner update, weight broadcast).
4. Asynchronous rollouts: the same epochs with ``rollout.async`` (the next epoch's rollouts overlap the
   learner update); ratio of the mean epoch time async / sync (all epochs, the first included).
5. Learner ranks: one epoch's update of the same groups (sampled once, fixed advantages) by 1 learner rank
   and by 2 data-parallel gloo ranks (ZeRO 0, then ZeRO-2), one torch thread each; groups/s per update
   (median of the updates after a warm-up one), ratio over 1 rank.
Ratios are measured in the same run (the machine is shared; the load average is recorded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import ray
from PIL import Image, ImageDraw, ImageFont

from bench.common import load_average, print_table, write_json
from pipelines.rl.config import RewardPoolConfig, load_grpo_config
from pipelines.rl.learner_group import LearnerGroup, gather
from pipelines.rl.loop import run_grpo
from pipelines.rl.placement import create_placement
from pipelines.rl.prompts import epoch_prompts, load_prompts
from pipelines.rl.rewards import RewardPool, RewardWorker
from pipelines.runtime.ray_session import REPO_ROOT

WORDS = ("Open Today", "Gas Next Exit", "Hello World", "Stop", "Fresh Coffee", "Lance", "Street Art Rules",
         "Private Property")


def text_image(text: str, size: int = 256) -> np.ndarray:
    image = Image.new("RGB", (size, size), (250, 250, 245))
    ImageDraw.Draw(image).text((10, size // 3), text, fill=(10, 10, 10), font=ImageFont.load_default(size=28))
    return np.asarray(image)


def pool_throughput(actors: int, batches: int, batch_size: int) -> dict:
    cfg = RewardPoolConfig.model_validate({
        "actors": {"count": actors, "num_cpus": 1},
        "terms": [{"name": "ocr", "kind": "ocr", "ocr": {"threads": 1, "det_limit_side_len": 480}}]})
    specs = [spec.model_dump(mode="json") for spec in cfg.terms]
    remote = ray.remote(RewardWorker)
    pool = RewardPool(cfg, lambda slot: remote.options(num_cpus=1).remote(specs, 1))
    pool.wait_ready()
    images = [text_image(WORDS[i % len(WORDS)]) for i in range(batch_size)]
    refs = [ray.put(np.stack(images)) for _ in range(batches)]
    prompts = [f'a sign that reads "{WORDS[i % len(WORDS)]}"' for i in range(batch_size)]
    pool.submit(-1, refs[0], prompts, [None] * batch_size)  # warm-up: first inference allocates
    pool.drain()
    pool.take(-1)
    pool.reset_clock()
    started = time.perf_counter()
    for batch_id, ref in enumerate(refs):
        pool.submit(batch_id, ref, prompts, [None] * batch_size)
    pool.drain()
    seconds = time.perf_counter() - started
    results = [pool.take(b) for b in range(batches)]
    mean_reward = statistics.mean(s for r in results for s in r["total"])
    cpu_s = sum(r["cpu_s"] for r in results)
    utilisation = pool.utilisation()
    pool.shutdown()
    return {"bench": "reward pool", "setting": f"{actors} OCR actor{'s' if actors > 1 else ''}",
            "images": batches * batch_size, "seconds": seconds, "images_per_s": batches * batch_size / seconds,
            "utilisation": utilisation, "cpu_share": cpu_s / (actors * seconds), "ocr_reward": mean_reward}


def grpo_config(streaming: bool, epochs: int, steps: int, image_size: int, overlap: bool = False) -> dict:
    return {
        "model": {"preset": "tiny"}, "epochs": epochs, "gallery_size": 0, "seed": 0,
        "rollout": {"group_size": 8, "prompts_per_epoch": 4, "image_size": image_size, "groups_per_micro_batch": 1,
                    "sampler": {"steps": steps, "window_size": 2, "window_range": [0, steps // 2]},
                    "actors": {"count": 1, "num_cpus": 1, "torch_threads": 1}, "async": overlap},
        "rewards": {"streaming": streaming, "actors": {"count": 1, "num_cpus": 1},
                    "terms": [{"name": "ocr", "kind": "ocr", "ocr": {"threads": 1, "det_limit_side_len": 480}},
                                {"name": "brightness", "kind": "brightness", "weight": 0.1}]},
        "learner": {"clip_range": 1e-3, "actor": {"num_cpus": 1, "torch_threads": 1}}, "optim": {"lr": 1e-4},
    }


def grpo_epochs(streaming: bool, epochs: int, steps: int, image_size: int, overlap: bool = False) -> dict:
    cfg = load_grpo_config(grpo_config(streaming, epochs, steps, image_size, overlap))
    with tempfile.TemporaryDirectory() as run_dir:
        run_grpo(cfg, run_dir, log=lambda line: None)
        import json

        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    mean_epoch_s = sum(r["epoch_s"] for r in rows) / len(rows)
    staleness = max(r["rollout/staleness"] for r in rows)
    rows = rows[1:] if len(rows) > 1 else rows  # the first epoch warms the actors up
    med = {key: statistics.median(r[key] for r in rows) for key in (
        "generation_s", "rollout_s", "reward_s", "reward_busy_s", "learn_s", "epoch_s", "images_per_s",
        "reward_utilisation")}
    return {"bench": "epoch", "setting": "streaming" if streaming else "rollout, then rewards",
            "images": rows[0]["images"], "seconds": med["generation_s"], **med, "mean_epoch_s": mean_epoch_s,
            "staleness": staleness}


def learner_config(ranks: int, zero_stage: int, groups: int) -> dict:
    data = grpo_config(True, 1, 10, 128)
    data["rollout"].update(prompts_per_epoch=groups, groups_per_micro_batch=2, actors={"count": 1, "num_cpus": 0})
    data["rewards"]["actors"] = {"count": 1, "num_cpus": 0}
    data["learner"].update(ranks=ranks, kl_weight=0.04)
    data["deepspeed"] = {"zero_stage": zero_stage}
    return data


def fixed_trajectories(cfg) -> tuple[list, list[list[float]]]:
    """The epoch-0 rollouts of ``cfg``, sampled once in this process, in the object store in micro-batches."""
    import torch

    from pipelines.rl.rollout import GroupTask, RolloutWorker, group_seed

    worker = RolloutWorker(cfg.model_dump(mode="json"))
    worker.version = 0
    prompts = epoch_prompts(load_prompts(cfg.prompts, cfg.seed).train, 0, cfg.rollout.prompts_per_epoch)
    tasks = [GroupTask(i, p.text, p.target, group_seed(cfg.seed, 0, i)).__dict__ for i, p in enumerate(prompts)]
    chunks = list(worker.rollout(tasks))[1::2]
    advantages = torch.randn(len(tasks), cfg.rollout.group_size, generator=torch.Generator().manual_seed(0))
    return [(ray.put(chunk), [g["group_id"] for g in chunk]) for chunk in chunks], advantages.clamp(-2, 2).tolist()


def learner_throughput(ranks: int, zero_stage: int, groups: int, updates: int, trajectories) -> dict:
    cfg = load_grpo_config(learner_config(ranks, zero_stage, groups))
    placement = create_placement(cfg)
    learners = LearnerGroup(cfg, placement)
    try:
        learners.ready()
        seconds = []
        for _ in range(updates + 1):  # the first update warms up
            started = time.perf_counter()
            metrics = gather(learners.update(*trajectories))[0]
            seconds.append(time.perf_counter() - started)
    finally:
        learners.kill()
        placement.remove()
    median = statistics.median(seconds[1:])
    return {"bench": "learner", "setting": f"{ranks} rank{'s' if ranks > 1 else ''}, ZeRO-{zero_stage}",
            "groups": metrics["groups_trained"], "images": metrics["groups_trained"] * cfg.rollout.group_size,
            "seconds": median, "groups_per_s": metrics["groups_trained"] / median, "learn_s": metrics["learn_s"]}


COLUMNS = [
    ("bench", "bench", "s"), ("setting", "setting", "s"), ("images", "images", "d"),
    ("seconds", "seconds", ".2f"), ("images_per_s", "images/s", ".2f"), ("ratio", "ratio", ".2f"),
    ("utilisation", "reward util", ".2f"), ("cpu_share", "cpu share", ".2f"), ("rollout_s", "rollout s", ".2f"),
    ("reward_s", "reward s", ".2f"),
    ("learn_s", "learn s", ".2f"), ("epoch_s", "epoch s", ".2f"), ("staleness", "staleness", "d"),
    ("groups_per_s", "groups/s", ".2f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few batches and epochs (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/grpo.json)")
    args = parser.parse_args()
    batches, epochs = (2, 2) if args.quick else (16, 5)
    groups, updates = (4, 1) if args.quick else (8, 3)
    load_start = load_average()
    # 3 logical CPUs on 2 cores: the learner works between generation phases, so it holds a slot of its own
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        one = pool_throughput(1, batches, 8)
        two = pool_throughput(2, batches, 8)
        one["ratio"], two["ratio"] = 1.0, two["images_per_s"] / one["images_per_s"]
        print(f"reward pool: 1 actor {one['images_per_s']:.2f} img/s, 2 actors {two['images_per_s']:.2f} img/s",
              flush=True)
        sequential = grpo_epochs(False, epochs, 10, 128)
        streaming = grpo_epochs(True, epochs, 10, 128)
        overlapped = grpo_epochs(True, epochs, 10, 128, overlap=True)
        trajectories = fixed_trajectories(load_grpo_config(learner_config(1, 0, groups)))
        learners = [learner_throughput(ranks, stage, groups, updates, trajectories)
                    for ranks, stage in ((1, 0), (2, 0), (2, 2))]
    finally:
        ray.shutdown()
    sequential["ratio"] = 1.0
    streaming["ratio"] = streaming["generation_s"] / sequential["generation_s"]
    sequential["utilisation"] = sequential.pop("reward_utilisation")
    streaming["utilisation"] = streaming.pop("reward_utilisation")
    end_to_end = {"bench": "end to end", "setting": "streaming epochs", "images": streaming["images"],
                  "seconds": streaming["epoch_s"], "images_per_s": streaming["images"] / streaming["epoch_s"]}
    synchronous = {"bench": "async", "setting": "sync (streaming)", "images": streaming["images"],
                   "seconds": streaming["mean_epoch_s"],
                   "images_per_s": streaming["images"] / streaming["mean_epoch_s"],
                   "ratio": 1.0, "learn_s": streaming["learn_s"], "epoch_s": streaming["mean_epoch_s"],
                   "rollout_s": streaming["rollout_s"], "reward_s": streaming["reward_s"],
                   "staleness": streaming["staleness"]}
    asynchronous = {"bench": "async", "setting": "async (one update behind)", "images": overlapped["images"],
                    "seconds": overlapped["mean_epoch_s"],
                    "images_per_s": overlapped["images"] / overlapped["mean_epoch_s"],
                    "ratio": overlapped["mean_epoch_s"] / streaming["mean_epoch_s"], "learn_s": overlapped["learn_s"],
                    "rollout_s": overlapped["rollout_s"], "reward_s": overlapped["reward_s"],
                    "epoch_s": overlapped["mean_epoch_s"], "staleness": overlapped["staleness"]}
    print(f"async / sync mean epoch time over {epochs} epochs: {asynchronous['ratio']:.2f}")
    for row in learners:
        row["ratio"] = row["groups_per_s"] / learners[0]["groups_per_s"]
    rows = [one, two, sequential, streaming, end_to_end, synchronous, asynchronous, *learners]
    load = {"start": load_start, "end": load_average()}
    print(f"\nload average {load['start']:.1f} at start, {load['end']:.1f} at end; {os.cpu_count()} cores")
    print("reward pool ratio = throughput over 1 actor (goal >= 1.7); cpu share = process CPU seconds of the "
          "actors over actors x wall seconds (below 1 when other work takes the cores); epoch ratio = generation time (rollout + "
          "rewards) over rollout-then-rewards (goal <= 0.8); epoch rows are medians over epochs after the first; "
          "async ratio = mean epoch time (all epochs) async / sync; learner ratio = groups/s of one update "
          "over 1 rank (goal with 2 ranks on 2 free cores: >= 1.6)")
    print_table(rows, COLUMNS)
    write_json("grpo", {"load_average": load, "cores": os.cpu_count(), "rows": rows,
                        "pool_speedup": two["ratio"], "streaming_ratio": streaming["ratio"],
                        "images_per_s_end_to_end": end_to_end["images_per_s"],
                        "async_ratio": asynchronous["ratio"], "learner_2_ranks_ratio": learners[1]["ratio"],
                        "learner_2_ranks_zero2_ratio": learners[2]["ratio"]}, args.out)


if __name__ == "__main__":
    main()
