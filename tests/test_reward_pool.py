"""The reward actor pool under faults: a reward raising on one image, an actor hanging on a batch, an error
escaping the worker. Prompts read ``<batch>:<image>:<tag>``; the reward logs each prompt it scores, so a
batch scored twice would show."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lance_core.rewards import RewardSpec, WeightedReward, import_callable
from pipelines.rl.config import RewardPoolConfig
from pipelines.rl.metrics import reward_metrics
from pipelines.rl.rewards import RewardPool, RewardWorker


class Flaky:
    """Brightness in [0, 1], with faults by tag: ``bad`` raises (on its batch, and on that image alone);
    ``hang`` sleeps for good, the first time any actor meets it (a marker file remembers); ``hang_always``
    every time."""

    def __init__(self, log: str, marker: str = "") -> None:
        self.log, self.marker = log, marker

    def __call__(self, images, prompts):
        tags = {p.split(":")[2] for p in prompts}
        if "bad" in tags:
            raise ValueError("unreadable image")
        if "hang_always" in tags:
            time.sleep(3600)
        if "hang" in tags and not os.path.exists(self.marker):
            Path(self.marker).write_text("hung")
            time.sleep(3600)
        with open(self.log, "a") as f:
            f.write("".join(f"{p}\n" for p in prompts))
        return [float(np.mean(image)) / 255 for image in images]


class EscapingWorker(RewardWorker):
    """Raises outside the per-image handling: always on ``escape`` batches, on ``escape_once`` the first time."""

    def __init__(self, specs: list[dict], torch_threads: int, marker: str) -> None:
        super().__init__(specs, torch_threads)
        self.marker = marker

    def score(self, images, prompts, targets):
        tags = {p.split(":")[2] for p in prompts}
        if "escape" in tags or ("escape_once" in tags and not os.path.exists(self.marker)):
            Path(self.marker).write_text("escaped")
            raise RuntimeError("cannot read the batch")
        return super().score(images, prompts, targets)


def levels(batch: int, count: int) -> list[int]:
    return [(37 * batch + 61 * k) % 256 for k in range(count)]


def submit(pool: RewardPool, batch: int, tags: list[str]) -> None:
    import ray

    images = np.stack([np.full((4, 4, 3), level, dtype=np.uint8) for level in levels(batch, len(tags))])
    pool.submit(batch, ray.put(images), [f"{batch}:{k}:{tag}" for k, tag in enumerate(tags)], [None] * len(tags))


def scored(log: Path) -> Counter:
    return Counter(log.read_text().splitlines()) if log.exists() else Counter()


def make_pool(tmp_path: Path, actors: int = 2, worker=RewardWorker, extra_args=(), **cfg) -> RewardPool:
    import ray

    terms = [{"name": "flaky", "kind": "callable", "callable": "tests.test_reward_pool:Flaky",
              "options": {"log": str(tmp_path / "scored.log"), "marker": str(tmp_path / "hung.marker")}}]
    config = RewardPoolConfig.model_validate({"terms": terms, "actors": {"count": actors, "num_cpus": 0.5},
                                            **cfg})
    specs = [spec.model_dump(mode="json") for spec in config.terms]
    remote = ray.remote(worker)
    pool = RewardPool(config, lambda slot: remote.options(num_cpus=0.5, max_restarts=0).remote(specs, 1,
                                                                                                 *extra_args))
    pool.wait_ready()
    return pool


def test_isolated_errors_without_ray():
    specs = [RewardSpec(name="bright", kind="brightness"),
             RewardSpec(name="flaky", kind="callable", callable="tests.test_reward_pool:Flaky",
                        options={"log": os.devnull})]
    reward = WeightedReward(specs)
    images = [np.full((4, 4, 3), 255, dtype=np.uint8)] * 2
    with pytest.raises(ValueError, match="unreadable"):
        reward(images, ["0:0:ok", "0:1:bad"])
    out = reward(images, ["0:0:ok", "0:1:bad"], isolate_errors=True)
    assert out.components == {"bright": [1.0, 1.0], "flaky": [1.0, 0.0]}
    assert out.reasons["flaky"] == [None, "error:ValueError"]
    assert out.total == [2.0, 1.0]
    assert out.errors == {"flaky": 1}


def test_an_image_a_reward_raises_on_scores_zero_and_is_counted(ray_local, tmp_path):
    pool = make_pool(tmp_path, actors=1)
    try:
        submit(pool, 0, ["ok", "bad", "ok"])
        submit(pool, 1, ["ok", "ok"])
        pool.drain()
        results = {batch: pool.take(batch) for batch in (0, 1)}
    finally:
        pool.shutdown()
    bright = [level / 255 for level in levels(0, 3)]
    assert results[0]["components"]["flaky"] == pytest.approx([bright[0], 0.0, bright[2]])
    assert results[0]["reasons"]["flaky"] == [None, "error:ValueError", None]
    assert results[0]["errors"] == {"flaky": 1}
    assert results[1]["components"]["flaky"] == pytest.approx([level / 255 for level in levels(1, 2)])
    metrics = reward_metrics(results)
    assert metrics["reward/count"] == 5
    assert metrics["reward/errors"] == metrics["reward/flaky/errors"] == 1
    assert metrics["reward/flaky/reason/error:ValueError"] == 1
    assert scored(tmp_path / "scored.log") == Counter(["0:0:ok", "0:2:ok", "1:0:ok", "1:1:ok"])


@pytest.mark.slow
def test_a_hung_actor_is_replaced_and_its_batches_scored_once(ray_local, tmp_path):
    pool = make_pool(tmp_path, call_timeout_s=5, max_restarts=2)
    tags = {batch: ["hang", "ok"] if batch == 1 else ["ok", "ok"] for batch in range(6)}
    try:
        for batch, batch_tags in tags.items():
            submit(pool, batch, batch_tags)
        pool.drain()
        results = {batch: pool.take(batch) for batch in tags}
    finally:
        pool.shutdown()
    assert (tmp_path / "hung.marker").is_file()
    assert pool.restarts == 1
    assert not pool.results and not pool.pending()
    for batch, result in results.items():
        assert result["total"] == pytest.approx([level / 255 for level in levels(batch, 2)])
        assert result["errors"] == {}
    expected = Counter(f"{batch}:{k}:{tag}" for batch, batch_tags in tags.items() for k, tag in enumerate(batch_tags))
    assert scored(tmp_path / "scored.log") == expected  # every image scored once, by live actors only


@pytest.mark.slow
def test_an_error_escaping_the_worker_is_retried_once_then_scores_zero(ray_local, tmp_path):
    # by its package path, which the actors' processes import (pytest imports this file as a top-level module)
    worker = import_callable("tests.test_reward_pool:EscapingWorker")
    pool = make_pool(tmp_path, worker=worker, extra_args=(str(tmp_path / "escaped.marker"),))
    tags = {0: ["escape_once", "ok"], 1: ["escape", "ok"], 2: ["ok", "ok"]}
    try:
        for batch, batch_tags in tags.items():
            submit(pool, batch, batch_tags)
        pool.drain()
        results = {batch: pool.take(batch) for batch in tags}
    finally:
        pool.shutdown()
    assert pool.restarts == 0  # the actors live on
    assert results[0]["total"] == pytest.approx([level / 255 for level in levels(0, 2)])
    assert results[1]["total"] == [0.0, 0.0]
    assert results[1]["reasons"]["flaky"] == ["error:RuntimeError"] * 2
    assert results[1]["errors"] == {"flaky": 2}
    assert reward_metrics(results)["reward/errors"] == 2
    assert scored(tmp_path / "scored.log") == Counter(["0:0:escape_once", "0:1:ok", "2:0:ok", "2:1:ok"])


@pytest.mark.slow
def test_a_batch_that_hangs_every_time_is_retried_once_then_scores_zero(ray_local, tmp_path):
    pool = make_pool(tmp_path, call_timeout_s=3, max_restarts=3)
    tags = {0: ["ok", "ok"], 1: ["hang_always", "ok"], 2: ["ok", "ok"]}
    try:
        for batch, batch_tags in tags.items():
            submit(pool, batch, batch_tags)
        pool.drain()
        results = {batch: pool.take(batch) for batch in tags}
    finally:
        pool.shutdown()
    assert pool.restarts == 2  # the actor it hung first, then the one it was sent to once more
    assert results[1]["total"] == [0.0, 0.0] and results[1]["errors"] == {"flaky": 2}
    assert results[1]["reasons"]["flaky"] == ["error:GetTimeoutError"] * 2
    for batch in (0, 2):
        assert results[batch]["total"] == pytest.approx([level / 255 for level in levels(batch, 2)])
    assert scored(tmp_path / "scored.log") == Counter(["0:0:ok", "0:1:ok", "2:0:ok", "2:1:ok"])


class Producer:
    """A rollout worker stand-in whose process dies while it makes a batch of images."""

    def images(self, die: bool) -> np.ndarray:
        if die:
            os._exit(1)
        return np.full((2, 4, 4, 3), 128, dtype=np.uint8)


@pytest.mark.slow
def test_a_lost_input_drops_its_batch_and_keeps_the_reward_actors(ray_local, tmp_path):
    import ray

    pool = make_pool(tmp_path, max_restarts=0)  # replacing a reward actor would end the run
    producer = ray.remote(import_callable("tests.test_reward_pool:Producer")).options(num_cpus=0, max_restarts=0).remote()
    prompts = [["0:0:ok", "0:1:ok"], ["1:0:ok", "1:1:ok"]]
    try:
        made = producer.images.remote(False)
        ray.wait([made])  # made before the producer dies
        pool.submit(0, made, prompts[0], [None, None])
        pool.submit(1, producer.images.remote(True), prompts[1], [None, None])  # its images never exist
        submit(pool, 2, ["ok", "ok"])
        pool.drain()
        results = {batch: pool.take(batch) for batch in range(3)}
    finally:
        pool.shutdown()
    assert pool.restarts == 0 and pool.lost_inputs == 1
    assert results[1]["lost_input"] and results[1]["errors"] == {}
    assert not results[0].get("lost_input") and results[0]["total"] == pytest.approx([128 / 255] * 2)
    assert scored(tmp_path / "scored.log") == Counter(["0:0:ok", "0:1:ok", "2:0:ok", "2:1:ok"])


def test_dropped_groups_keep_out_of_the_advantages():
    import torch

    from lance_core.rl import group_advantages
    from pipelines.rl.loop import kept_advantages

    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]], dtype=torch.float64)
    dropped = kept_advantages(rewards, {1}, "batch", 5.0)
    alone = group_advantages(rewards[[0, 2]], "batch", 5.0)
    assert torch.equal(dropped.values[[0, 2]], alone.values) and not dropped.values[1].any()
    assert dropped.zero_spread.tolist() == [False, False, False]
    assert torch.equal(kept_advantages(rewards, set(), "group", 5.0).values, group_advantages(rewards).values)


def test_a_nan_or_infinite_score_counts_as_an_error_and_scores_zero():
    spec = RewardSpec(name="odd", kind="callable", callable="tests.test_reward_pool:Odd")
    scores = WeightedReward([spec, RewardSpec(name="b", kind="brightness", weight=0.5)])(
        [np.full((4, 4, 3), 255, np.uint8)] * 3, ["a", "b", "c"])
    assert scores.components["odd"] == [0.0, 0.0, 0.25]
    assert scores.reasons["odd"] == ["nonfinite", "nonfinite", None]
    assert scores.errors == {"odd": 2}
    assert scores.total == pytest.approx([0.5, 0.5, 0.75])


class Odd:
    def __call__(self, images, prompts):
        return [float("nan"), float("-inf"), 0.25]
