"""The cluster's stage chain, pretrain -> continual -> SFT -> GRPO, walked through the shipped configs.

Every path of the shipped configs (``/mnt/...`` volumes, ``s3://`` data) is moved under a temporary root,
written relative to it (the test runs from that folder, as a user from theirs: relative paths must reach the
Ray Train workers, whose working directory differs), and the model shrunk to the tiny preset; nothing else
of the stage configs changes. Each training stage runs for real (one step), and the next stage must find the
previous stage's export where its own config says, on the volume the RayJob manifests mount on every pod.
The last stage is then rerun: a finished run is reported and starts no trainer (tests/test_reruns.py has the
decisions without Ray).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from jobs.config_io import read_yaml
from lance_core.config import model_preset
from pipelines.rl.config import GRPOConfig
from pipelines.rl.policy import check_checkpoint, load_initial_weights
from pipelines.train.config import load_train_config
from pipelines.train.driver import run_training, storage_and_log_dir
from tests.qwen_tiny import save_random_qwen

pytestmark = pytest.mark.deepspeed

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
STAGES = ("pretrain", "continual", "sft")
TASKS_IN_LATENTS = ("t2i", "t2v", "i2i", "v2v", "i2t", "v2t")


def _moved(value, root: Path, latents: Path):
    """Volumes under ``root``; every latent dataset of the shipped configs -> the test's tiny shards; both
    relative to ``root``."""
    if isinstance(value, dict):
        return {k: _moved(v, root, latents) for k, v in value.items()}
    if isinstance(value, list):
        moved = [_moved(v, root, latents) for v in value]
        return list(dict.fromkeys(moved)) if all(isinstance(v, str) for v in moved) else moved
    if isinstance(value, str) and value.startswith("/mnt/"):
        return value.lstrip("/")
    if isinstance(value, str) and value.startswith("s3://") and "/latents/" in value:
        return os.path.relpath(latents, root)
    return value


def _stage_config(stage: str, root: Path, latents: Path) -> dict:
    data = _moved(read_yaml(CONFIGS / f"train_{stage}.yaml"), root, latents)
    weights = data["mixture"]["weights"]
    data["mixture"]["weights"] = {t: w for t, w in weights.items() if t in TASKS_IN_LATENTS}
    data["mixture"].pop("capability", None)
    data["model"]["preset"] = "tiny"
    data["model"]["overrides"] = {}
    # the latents were made by the tiny preset's random encoders: name no VAE / ViT weights
    data["model"]["weights"] = {k: v for k, v in data["model"]["weights"].items() if k in ("lance", "qwen")}
    data.update(steps=1, max_failures=0, freeze=[t for t in data.get("freeze", []) if t != "lm_head"])
    data["scaling"] = {"workers": 1, "cpus_per_worker": 1}
    data["deepspeed"] = {"zero_stage": 0}
    data["data"].update(token_budget=2048, holdout_per_task=1)
    data["checkpoint"] = {"every_steps": 1, "keep_last": 1}
    data["eval"] = {"samples": False}
    data.pop("ema", None)
    return data


def _mounted_volumes() -> set[str]:
    """Mount paths the training and GRPO RayJobs give to the head and to every worker group."""
    mounts = set()
    for name in ("rayjob-train.yaml", "rayjob-grpo.yaml"):
        spec = yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())["spec"]["rayClusterSpec"]
        groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
        per_group = [{m["mountPath"] for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
                     for g in groups]
        mounts |= set.intersection(*per_group)
    return mounts


@pytest.mark.slow
def test_stage_chain_through_the_shipped_configs(latents, tmp_path, monkeypatch):
    from pipelines.runtime.run_folder import RunFolderError
    from pipelines.train import driver
    from pipelines.train.preflight import settle_rerun

    root = tmp_path / "cluster"
    root.mkdir()
    monkeypatch.chdir(root)
    save_random_qwen(root / "mnt" / "weights" / "Qwen2.5-VL-3B-Instruct", model_preset("tiny"))
    volumes = _mounted_volumes()
    exports = {}
    for stage in STAGES:
        cfg = load_train_config(_stage_config(stage, root, latents))
        assert cfg.data.uris == (str(latents),) and Path(cfg.output).is_relative_to(root)
        init = cfg.model.weights.lance or cfg.model.weights.qwen
        assert init is not None and Path(init).exists(), f"{stage} cannot find its input {init}"
        if stage != "pretrain":
            assert Path(init) == exports[STAGES[STAGES.index(stage) - 1]]
        result = run_training(cfg)
        assert result.export is not None and result.export == storage_and_log_dir(cfg)[1] / "model.safetensors"
        # the export lives on a volume every pod of the RayJob mounts (it outlives the cluster)
        relative = "/" + str(result.export.relative_to(root))
        assert any(relative.startswith(v.rstrip("/") + "/") for v in volumes), (relative, volumes)
        exports[stage] = result.export

    grpo = _moved(read_yaml(CONFIGS / "grpo_lance3b.yaml"), root, latents)
    assert Path(grpo["model"]["weights"]["lance"]).resolve() == exports["sft"]

    grpo["model"] = {"preset": "tiny", "weights": {"lance": grpo["model"]["weights"]["lance"]}}
    cfg = GRPOConfig.model_validate(grpo)
    check_checkpoint(cfg, cfg.model.weights.lance)
    from lance_core.model import build_model

    load_initial_weights(build_model(model_preset("tiny")), cfg.model.weights.lance, "tiny")

    # the finished SFT run again: reported, no trainer started, its figures kept
    sft = _stage_config("sft", root, latents)
    metrics = (result.run_dir / "metrics.jsonl").read_bytes()

    def no_trainer(*args, **kwargs):
        raise AssertionError("a complete run must not start Ray Train")

    monkeypatch.setattr(driver, "build_trainer", no_trainer)
    again = run_training(load_train_config(sft))
    assert again.complete_before and again.metrics == result.metrics and again.export == result.export
    assert (result.run_dir / "metrics.jsonl").read_bytes() == metrics
    # more steps continue the run; another learning rate is refused, naming it; --overwrite removes the run
    assert settle_rerun(load_train_config({**sft, "steps": 4})) is None
    other_lr = {**sft, "optim": {**sft["optim"], "lr": sft["optim"]["lr"] / 2}}
    with pytest.raises(RunFolderError, match=r"optim.lr: ") as err:
        settle_rerun(load_train_config(other_lr))
    assert "--output or --name" in str(err.value)
    assert settle_rerun(load_train_config(other_lr), "overwrite") is None and not result.run_dir.exists()
