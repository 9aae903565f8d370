"""Data-parallel learner ranks (``learner.ranks``): each rank's share of the groups, the same update from two
gloo ranks (ZeRO-2 over them) as from one rank on the same trajectories, and a GRPO run with two ranks that
checkpoints and resumes."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.rl.learner_group import rank_shares
from tests.test_grpo import tiny_grpo


def test_rank_shares_split_every_update():
    order = [5, 2, 7, 0, 1, 3, 6, 4]
    assert rank_shares(order, 1, 2) == [order]
    assert rank_shares(order, 2, 2) == [[5, 2, 1, 3], [7, 0, 6, 4]]
    assert rank_shares(order, 4, 1) == [[5, 2], [7, 0], [1, 3], [6, 4]]


def _trajectories(cfg):
    """The epoch-0 rollouts of ``cfg`` sampled in this process, in the object store in micro-batches as
    rollout workers stream them, and fixed advantages per group."""
    import ray

    from pipelines.rl.prompts import epoch_prompts, load_prompts
    from pipelines.rl.rollout import GroupTask, RolloutWorker, group_seed

    worker = RolloutWorker(cfg.model_dump(mode="json"))
    worker.version = 0
    prompts = epoch_prompts(load_prompts(cfg.prompts, cfg.seed).train, 0, cfg.rollout.prompts_per_epoch)
    tasks = [GroupTask(i, p.text, p.target, group_seed(cfg.seed, 0, i)).__dict__ for i, p in enumerate(prompts)]
    chunks = list(worker.rollout(tasks))[1::2]
    trajectories = [(ray.put(chunk), [g["group_id"] for g in chunk]) for chunk in chunks]
    advantages = torch.randn(len(tasks), cfg.rollout.group_size, generator=torch.Generator().manual_seed(1))
    return trajectories, advantages.clamp(-2, 2).tolist()


def _update_once(cfg, trajectories, advantages) -> tuple[list[dict], list[dict]]:
    """Every rank's metrics of one epoch's update, and every rank's trained weights after it."""
    import ray

    from pipelines.rl.learner_group import LearnerGroup, gather
    from pipelines.rl.placement import create_placement

    placement = create_placement(cfg)
    learners = LearnerGroup(cfg, placement)
    try:
        learners.ready()
        metrics = gather(learners.update(trajectories, advantages))
        weights = ray.get([actor.get_weights.remote() for actor in learners.actors])
    finally:
        learners.kill()
        placement.remove()
    return metrics, weights


@pytest.mark.slow
def test_two_ranks_update_as_one_rank_does(ray_local):
    base = {"rollout": {"group_size": 4, "prompts_per_epoch": 4, "image_size": 32, "groups_per_micro_batch": 2,
                        "sampler": {"steps": 4, "window_size": 2, "window_range": [0, 2]},
                        "actors": {"count": 1, "num_cpus": 0}},
            "rewards": {"actors": {"count": 1, "num_cpus": 0}}, "optim": {"lr": 1e-3}}
    one = tiny_grpo(**base, learner={"clip_range": 0.2, "kl_weight": 0.04, "minibatches": 2,
                                     "actor": {"num_cpus": 0.5}})
    two = tiny_grpo(**base, learner={**one.learner.model_dump(), "ranks": 2}, deepspeed={"zero_stage": 2})
    trajectories, advantages = _trajectories(one)
    # rank r trains group r then group 2 + r: both ranks need both micro-batches
    single, (weights,) = _update_once(one, trajectories, advantages)
    double, (rank0, rank1) = _update_once(two, trajectories, advantages)
    assert single[0]["groups_trained"] == double[0]["groups_trained"] == 4 and single[0]["updates"] == 2
    assert double[0] == double[1]  # every rank reports the metrics reduced over the ranks
    for key in ("loss", "kl", "ratio_mean", "ratio_std", "clip_fraction", "grad_norm"):
        assert double[0][key] == pytest.approx(single[0][key], rel=1e-4, abs=1e-7), key
    assert double[0]["ratio_first_update_max_dev"] < 1e-6
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # data parallel: one set of weights
    moved = max(float((weights[name] - initial).abs().max()) for name, initial in
                _initial_weights(one).items())
    assert moved > 1e-4
    for name in weights:
        torch.testing.assert_close(rank0[name], weights[name], rtol=1e-4, atol=1e-6)


def _initial_weights(cfg) -> dict[str, torch.Tensor]:
    from pipelines.rl.policy import Policy

    return Policy(cfg, torch.device("cpu")).get_weights()


@pytest.mark.slow
def test_grpo_with_two_learner_ranks_checkpoints_and_resumes(ray_local, tmp_path):
    from pipelines.rl.loop import run_grpo

    cfg = tiny_grpo(epochs=2, gallery_size=0, checkpoint={"every_epochs": 1}, deepspeed={"zero_stage": 2},
                    rollout={"actors": {"count": 1, "num_cpus": 0.25}},
                    rewards={"actors": {"count": 1, "num_cpus": 0.25}},
                    learner={"clip_range": 0.2, "kl_weight": 0.0, "minibatches": 1, "ranks": 2,
                             "actor": {"num_cpus": 0.5}})
    summary = run_grpo(cfg, tmp_path)
    assert len(summary["placement"]["learner"]) == 2
    engine = tmp_path / "checkpoints" / "epoch_0001" / "state"
    assert len(list(engine.glob("rank_*.safetensors"))) == 2  # ZeRO-2: one optimizer partition per rank
    resumed = run_grpo(cfg.model_copy(update={"epochs": 3}), tmp_path)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1, 2] and resumed["last"]["updates"] == 3
    assert all(r["learner_ranks"] == 2 and r["groups_trained"] == 2 for r in history)
    assert all(r["ratio_first_update_max_dev"] < 1e-6 and r["weight_sync_fallbacks"] == 0 for r in history)
