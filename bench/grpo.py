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
from pipelines.rl.loop import run_grpo
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


COLUMNS = [
    ("bench", "bench", "s"), ("setting", "setting", "s"), ("images", "images", "d"),
    ("seconds", "seconds", ".2f"), ("images_per_s", "images/s", ".2f"), ("ratio", "ratio", ".2f"),
    ("utilisation", "reward util", ".2f"), ("cpu_share", "cpu share", ".2f"), ("rollout_s", "rollout s", ".2f"),
    ("reward_s", "reward s", ".2f"),
    ("learn_s", "learn s", ".2f"), ("epoch_s", "epoch s", ".2f"), ("staleness", "staleness", "d"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few batches and epochs (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/grpo.json)")
    args = parser.parse_args()
    batches, epochs = (2, 2) if args.quick else (16, 5)
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
    rows = [one, two, sequential, streaming, end_to_end, synchronous, asynchronous]
    load = {"start": load_start, "end": load_average()}
    print(f"\nload average {load['start']:.1f} at start, {load['end']:.1f} at end; {os.cpu_count()} cores")
    print("reward pool ratio = throughput over 1 actor (goal >= 1.7); cpu share = process CPU seconds of the "
          "actors over actors x wall seconds (below 1 when other work takes the cores); epoch ratio = generation time (rollout + "
          "rewards) over rollout-then-rewards (goal <= 0.8); epoch rows are medians over epochs after the first; "
          "async ratio = mean epoch time (all epochs) async / sync")
    print_table(rows, COLUMNS)
    write_json("grpo", {"load_average": load, "cores": os.cpu_count(), "rows": rows,
                        "pool_speedup": two["ratio"], "streaming_ratio": streaming["ratio"],
                        "images_per_s_end_to_end": end_to_end["images_per_s"],
                        "async_ratio": asynchronous["ratio"]}, args.out)


if __name__ == "__main__":
    main()
