"""GRPO on Ray with the tiny model: learning a cheap verifiable reward, a reward actor that dies,
resume, LoRA with KL and CFG, bad inputs. Multi-node placement lives in test_grpo_nodes.py (its own Ray
cluster) and test_cluster.py (a whole run over two nodes with a node loss)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lance_core.checkpoint import load_lance_checkpoint, save_lance_checkpoint
from lance_core.config import ConfigError, model_preset
from lance_core.model import build_model
from pipelines.rl.config import GRPOConfig, PromptsConfig, load_grpo_config
from pipelines.rl.policy import CheckpointMismatchError, Policy, check_checkpoint
from pipelines.rl.prompts import load_prompts

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tiny_grpo(**overrides) -> GRPOConfig:
    """Two prompts x 8 samples per epoch, 6 steps with a 2-step SDE window, brightness reward."""
    data = {
        "model": {"preset": "tiny"}, "epochs": 2, "gallery_size": 4,
        "prompts": {"eval_count": 1},
        "rollout": {"group_size": 8, "prompts_per_epoch": 2, "image_size": 64,
                    "sampler": {"steps": 6, "window_size": 2, "window_range": [0, 4]},
                    "actors": {"count": 1, "num_cpus": 0.5}},
        "rewards": {"actors": {"count": 1, "num_cpus": 0.5},
                    "terms": [{"name": "brightness", "kind": "brightness"}]},
        "optim": {"lr": 3e-3},
        "learner": {"clip_range": 0.2, "kl_weight": 0.0, "minibatches": 2,
                    "actor": {"num_cpus": 0.5}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return load_grpo_config(data)


class DieOnce:
    """A brightness reward whose actor process exits the first time it scores (a marker file remembers)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, images, prompts):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            os._exit(1)
        return [float(np.mean(image)) / 255 for image in images]


# ------------------------------------------------------------------------------------------ no Ray
def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"grpo\.rollout\.group_size"):
        load_grpo_config({"rollout": {"group_size": 1}})
    with pytest.raises(ConfigError, match=r"grpo\.learner\.mode"):
        load_grpo_config({"learner": {"mode": "qlora"}})
    with pytest.raises(ConfigError, match="minibatches"):
        load_grpo_config({"rollout": {"prompts_per_epoch": 3}, "learner": {"minibatches": 2}})
    with pytest.raises(ConfigError, match=r"learner\.ranks x learner\.minibatches \(2 x 2\)"):
        load_grpo_config({"rollout": {"prompts_per_epoch": 6}, "learner": {"ranks": 2, "minibatches": 2}})
    with pytest.raises(ConfigError, match=r"grpo\.epochs"):
        load_grpo_config({"epochs": 0})


def test_prompts_text_and_jsonl(tmp_path, shared_dir):
    text = tmp_path / "p.txt"
    text.write_text('a sign "Open"\nno target here\n\nposter "Sale Today"\n')
    kept = load_prompts(PromptsConfig(path=str(text), eval_count=0))
    assert sorted(p.target or "" for p in kept.train) == ["", "Open", "Sale Today"]
    assert kept.missing_target == 1 and kept.rejected == 0
    strict = load_prompts(PromptsConfig(path=str(text), eval_count=1, require_target=True))
    assert strict.rejected == 1 and len(strict.train) == 1 and len(strict.eval) == 1
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a cafe sign", "target": "Cafe"}) + "\n"
                     + json.dumps({"prompt": 'a "Quoted" sign'}) + "\n")
    records = load_prompts(PromptsConfig(path=str(jsonl), eval_count=0)).train
    assert sorted(p.target for p in records) == ["Cafe", "Quoted"]
    jsonl.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        load_prompts(PromptsConfig(path=str(jsonl)))
    shared = load_prompts(PromptsConfig(path=str(shared_dir / "data" / "ocr_prompts.txt"), eval_count=4))
    assert len(shared.train) + len(shared.eval) > 1000 and shared.missing_target == 0


def test_prompts_generated_for_training_evaluation_file_never_trained_on(tmp_path, shared_dir):
    generated = load_prompts(PromptsConfig(generated_count=300, eval_count=3), seed=5)
    assert len(generated.train) == 297 and len(generated.eval) == 3
    assert all(p.key.startswith("generated:") and p.target for p in generated.train + generated.eval)
    assert load_prompts(PromptsConfig(generated_count=300, eval_count=3), seed=5) == generated
    assert not {p.target.lower() for p in generated.eval} & {p.target.lower() for p in generated.train}
    eval_file = shared_dir / "data" / "ocr_prompts.txt"
    with_eval = load_prompts(PromptsConfig(eval_path=str(eval_file), eval_count=8))
    assert len(with_eval.train) == 10_000 and with_eval.excluded == 0
    assert [p.key for p in with_eval.eval] == [f"ocr_prompts.txt:{n}" for n in range(1, 9)]
    # a training file that repeats evaluation prompts (or only their targets) loses them
    lines = eval_file.read_text(encoding="utf-8").splitlines()
    mixed = tmp_path / "train.txt"
    mixed.write_text("\n".join([lines[0], 'A mug that says "' + lines[1].split('"')[1].upper() + '"',
                                 'A quilt stitched with "Velvet Otter"']) + "\n")
    trained = load_prompts(PromptsConfig(path=str(mixed), eval_path=str(eval_file)))
    assert trained.excluded == 2 and [p.target for p in trained.train] == ["Velvet Otter"]
    assert PromptsConfig(path=str(mixed)).source == "file" and PromptsConfig().source == "generated"
    with pytest.raises(ValueError, match="needs path"):
        PromptsConfig(source="file")
    with pytest.raises(ValueError, match="only read with source 'file'"):
        PromptsConfig(source="generated", path=str(mixed))
    with pytest.raises(ConfigError, match=r"grpo\.prompts"):
        load_grpo_config({"prompts": {"source": "file"}})


def test_checkpoint_must_match_the_model(tmp_path):
    small = build_model(model_preset("tiny", hidden_size=32, num_heads=2, num_kv_heads=1,
                                     vit={"out_hidden_size": 32}))
    path = save_lance_checkpoint(small, tmp_path / "small")
    with pytest.raises(CheckpointMismatchError, match="does not match the model config"):
        check_checkpoint(tiny_grpo(), str(path))
    with pytest.raises(CheckpointMismatchError, match="does not match the model config"):
        Policy(tiny_grpo(), torch.device("cpu"), checkpoint=str(path))
    with pytest.raises(FileNotFoundError):
        check_checkpoint(tiny_grpo(), str(tmp_path / "absent.safetensors"))
    good = save_lance_checkpoint(build_model(model_preset("tiny")), tmp_path / "good")
    check_checkpoint(tiny_grpo(), str(good))


def test_lora_starts_as_the_base_model_and_merges(tokenizer):
    cfg = tiny_grpo(learner={"mode": "lora", "lora_rank": 4})
    policy = Policy(cfg, torch.device("cpu"), keep_reference=True)
    assert all(name.startswith("adapters.") for name in policy.trained())
    assert not any(p.requires_grad for p in policy.model.parameters())
    cond, _ = policy.group_prefixes("a sign", 2)
    from lance_core.rl import group_velocity

    x = torch.randn(2, 16, 48)
    base = group_velocity(policy.model, cond, x, 0.7)
    with torch.no_grad():
        for p in policy.adapters.up.values():
            p.normal_(std=0.05)
    tuned = group_velocity(policy.model, cond, x, 0.7)
    assert not torch.allclose(base, tuned)
    with policy.as_reference():
        assert torch.equal(group_velocity(policy.model, cond, x, 0.7), base)
    merged = build_model(policy.model_cfg)
    merged.load_state_dict(policy.export_state())
    assert torch.allclose(group_velocity(merged, cond, x, 0.7), tuned, atol=1e-5)


def test_full_policy_reference_swap():
    policy = Policy(tiny_grpo(), torch.device("cpu"), keep_reference=True)
    name, param = next(iter(policy.trained().items()))
    before = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    with policy.as_reference():
        assert torch.equal(policy.trained()[name], before)
    assert torch.equal(policy.trained()[name], before + 1.0)


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


# ------------------------------------------------------------------------------------------ on Ray
class NaNEvery:
    """Brightness, but NaN on every ``every``-th image of a batch (``every`` 1: on all)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, images, prompts):
        return [float("nan") if k % self.every == 0 else float(np.mean(image)) / 255 for k, image in enumerate(images)]


@pytest.mark.slow
def test_grpo_raises_brightness(ray_local, tmp_path):
    from pipelines.rl.loop import run_grpo

    summary = run_grpo(tiny_grpo(epochs=16, deepspeed={"ema_decay": 0.9}, eval={"every": 8, "steps": 8}), tmp_path)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 16
    start = np.mean([r["reward/mean"] for r in history[:3]])
    end = np.mean([r["reward/mean"] for r in history[-3:]])
    spread = np.mean([r["reward/std"] for r in history[:3]])
    assert end > start + 2 * spread, (start, end, spread)
    for row in history:
        assert row["reward/count"] == row["images"] == 16
        assert row["ratio_first_update_max_dev"] < 1e-6  # rollout and learner agree on the old log-probs
        for key in ("zero_spread_ratio", "ratio_std", "clip_fraction", "kl", "images_per_s", "rollout_s",
                    "reward_s", "learn_s", "reward_utilisation", "grad_norm"):
            assert np.isfinite(row[key]), key
    assert "eval/reward/mean" in history[7] and "eval/reward/mean" in history[15]
    gallery = json.loads((tmp_path / "gallery" / "epoch_0015" / "gallery.json").read_text())
    assert len(gallery) == 4 and all((tmp_path / "gallery" / "epoch_0015" / g["file"]).is_file() for g in gallery)
    assert {"prompt", "reward", "components"} <= set(gallery[0])
    assert (tmp_path / "gallery" / "epoch_0015" / "grid.png").stat().st_size > 0  # captioned with prompt + reward
    events = _tensorboard(tmp_path / "tb")
    assert {"reward/mean", "reward/brightness/mean", "kl", "clip_fraction", "ratio_std", "eval/reward/mean",
            "images_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("kl")] == list(range(16))
    assert [e.step for e in events.Scalars("eval/reward/mean")] == [7, 15]
    assert [e.step for e in events.Images("gallery")] == [0, 15]
    trained = build_model(model_preset("tiny"))
    load_lance_checkpoint(trained, summary["model"])
    torch.manual_seed(0)
    initial = build_model(model_preset("tiny"))
    state, start_state = trained.state_dict(), initial.state_dict()
    gen = {n for n, _ in initial.gen_parameters()}
    assert any(not torch.equal(state[n], start_state[n]) for n in gen)
    assert all(torch.equal(state[n], start_state[n]) for n in state if n not in gen)
    assert (Path(summary["checkpoint"]) / "ema.safetensors").is_file()


@pytest.mark.slow
def test_reward_actor_death_is_retried_then_resume(ray_local, tmp_path):
    from pipelines.rl.loop import run_grpo

    marker = tmp_path / "died.marker"
    rewards = {"terms": [{"name": "bright", "kind": "callable", "callable": "tests.test_grpo:DieOnce",
                            "options": {"marker": str(marker)}}], "max_restarts": 2}
    # also the LoRA learner with KL to the reference, EMA, and CFG in the rollout
    cfg = tiny_grpo(epochs=2, checkpoint={"every_epochs": 1}, rewards=rewards,
                    rollout={"groups_per_micro_batch": 1,
                             "sampler": {"steps": 6, "window_size": 2, "window_range": [0, 4], "cfg_scale": 2.0}},
                    learner={"mode": "lora", "kl_weight": 0.04}, optim={"lr": 1e-3}, deepspeed={"ema_decay": 0.9})
    summary = run_grpo(cfg, tmp_path / "run")
    assert marker.is_file()
    assert summary["reward_restarts"] == 1
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/count"] for r in history] == [16, 16]  # nothing lost, nothing counted twice
    # a second call with more epochs resumes after the latest checkpoint
    resumed = run_grpo(cfg.model_copy(update={"epochs": 3}), tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert resumed["epochs"] == 3 and resumed["reward_restarts"] == 0
    assert resumed["last"]["updates"] == 6  # 2 updates per epoch, counted on across the resume
    assert all(r["ratio_first_update_max_dev"] < 1e-6 and r["kl"] >= 0 for r in history)
    assert history[-1]["kl"] > 0  # LoRA moved the policy away from the reference
    events = _tensorboard(tmp_path / "run" / "tb")  # the resumed run's events continue the first run's
    assert [(e.step, e.value) for e in events.Scalars("kl")] == [(r["epoch"], pytest.approx(r["kl"])) for r in history]
    assert [e.step for e in events.Scalars("reward/bright/mean")] == [0, 1, 2]
    merged = build_model(model_preset("tiny"))
    load_lance_checkpoint(merged, resumed["model"])  # LoRA merged into plain Lance weights


@pytest.mark.slow
def test_async_rollouts_one_update_behind_then_resume(ray_local, tmp_path):
    from pipelines.rl.loop import RewardsFailedError, run_grpo

    # also: a reward term scoring some images NaN, under a batch-wide std (one NaN would make every advantage NaN)
    terms = [{"name": "brightness", "kind": "brightness"},
             {"name": "flaky", "kind": "callable", "callable": "tests.test_grpo:NaNEvery", "options": {"every": 5}}]
    cfg = tiny_grpo(epochs=2, gallery_size=0, checkpoint={"every_epochs": 1}, rollout={"async": True},
                    rewards={"terms": terms}, learner={"std_scope": "batch"})
    run_grpo(cfg, tmp_path)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/flaky/errors"] == 4 and r["reward/flaky/reason/nonfinite"] == 4 for r in history)
    logs = {path.name for path in (tmp_path / "logs").iterdir()}  # each actor's output in its own file
    assert {"learner-0.log", "rollout-0.log", "reward-0.log"} <= logs, logs
    assert all(np.isfinite(r["reward/mean"]) and r["skipped_steps"] == 0 for r in history)
    assert [r["rollout/staleness"] for r in history] == [0, 1]
    assert [r["rollout/weights_version"] for r in history] == [0, 0]
    assert history[0]["ratio_first_update_max_dev"] < 1e-6  # sampled with the learner's weights
    assert history[1]["ratio_first_update_max_dev"] > 1e-6  # sampled one update behind: the ratio is not 1
    assert all(r["weight_sync_fallbacks"] == 0 and np.isfinite(r["loss"]) for r in history)
    assert json.loads((tmp_path / "config.json").read_text())["rollout"]["async"] is True
    # resumed after epoch 1: the rollouts of epoch 2 that were in flight are redone with the latest weights
    resumed = run_grpo(cfg.model_copy(update={"epochs": 3}), tmp_path)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1, 2] and resumed["last"]["updates"] == 6
    assert history[2]["rollout/staleness"] == 0 and history[2]["rollout/weights_version"] == 2
    # a reward that fails on every image stops the run after rewards.max_failed_epochs epochs, saying why
    failing = tiny_grpo(epochs=4, gallery_size=0, rewards={"terms": [
        {"name": "flaky", "kind": "callable", "callable": "tests.test_grpo:NaNEvery", "options": {"every": 1}}],
        "max_failed_epochs": 2})
    with pytest.raises(RewardsFailedError, match="every reward term failed on every image for 2 epochs.*nonfinite"):
        run_grpo(failing, tmp_path / "failing")
    history = [json.loads(line) for line in (tmp_path / "failing" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1] and all(r["reward/errors"] == 16 for r in history)


def test_cli_errors(tmp_path, capsys):
    from jobs.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  group_size: 1\n")
    assert main(["grpo", "--config", str(bad), "--output", str(tmp_path / "run")]) == 2
    assert "grpo.rollout.group_size" in capsys.readouterr().err
    small = build_model(model_preset("tiny", hidden_size=32, num_heads=2, num_kv_heads=1,
                                     vit={"out_hidden_size": 32}))
    path = save_lance_checkpoint(small, tmp_path / "small")
    assert main(["grpo", "--checkpoint", str(path), "--output", str(tmp_path / "run")]) == 1
    assert "does not match the model config" in capsys.readouterr().err
    strict = tmp_path / "strict.yaml"
    prompts = tmp_path / "p.txt"
    prompts.write_text("no quoted target at all\n")
    strict.write_text("prompts:\n  require_target: true\n")
    assert main(["grpo", "--config", str(strict), "--prompts", str(prompts), "--output", str(tmp_path / "r")]) == 1
    assert "rejected without a quoted target" in capsys.readouterr().err


def test_shipped_configs_validate():
    from jobs.config_io import read_yaml
    from tests.conftest import ROOT

    for name in ("grpo_tiny.yaml", "grpo_lance3b.yaml"):
        cfg = load_grpo_config(read_yaml(ROOT / "jobs" / "configs" / name))
        assert cfg.rollout.sampler.steps < cfg.eval.steps  # fewer steps in rollout than in evaluation
