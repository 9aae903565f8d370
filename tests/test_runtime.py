"""The parts every pipeline shares (pipelines/runtime, lance_core/safetensors_files.py): URI joining, the Ray
session, the device, the safetensors lookup and latents -> uint8 frames. Fast, CPU, no Ray started."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lance_core.encoders.vae import pixels_to_uint8
from lance_core.safetensors_files import read_safetensors_dir, safetensors_key_files, safetensors_shapes
from pipelines.runtime.devices import pick_device
from pipelines.runtime.ray_session import REPO_ROOT, ensure_ray, repo_pythonpath
from pipelines.runtime.storage import join_uri, with_protocol


def test_join_uri_and_with_protocol():
    assert join_uri("s3://b/run/", "shards", "part-00000.parquet") == "s3://b/run/shards/part-00000.parquet"
    assert join_uri("/tmp/out", "") == join_uri("/tmp/out/") == "/tmp/out"
    assert join_uri("runs/x", "_commits", "a.json") == "runs/x/_commits/a.json"
    assert with_protocol("s3://bucket/in", "bucket/in/a.tar") == "s3://bucket/in/a.tar"
    assert with_protocol("/data/in", "/data/in/a.tar") == "/data/in/a.tar"


@pytest.fixture
def ray_inits(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``ray.init`` call (none is made for real)."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_ensure_ray_starts_a_local_ray_or_joins_ray_address(ray_inits, monkeypatch):
    assert ensure_ray(num_cpus=3, local_env={"A": "1"}, cluster_env={"B": "2"})
    assert ray_inits.pop() == {"address": "local", "num_cpus": 3, "include_dashboard": False,
                               "log_to_driver": False, "runtime_env": {"env_vars": {"A": "1"}}}
    assert ensure_ray() and ray_inits.pop() == {"address": "local", "num_cpus": None, "include_dashboard": False,
                                                "log_to_driver": False}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ensure_ray(local_env={"A": "1"}, cluster_env={"B": "2"})
    assert ray_inits.pop() == {"address": "10.0.0.1:6379", "log_to_driver": False,
                               "runtime_env": {"env_vars": {"B": "2"}}}
    ensure_ray("head:6379")  # an address of the config goes before RAY_ADDRESS
    assert ray_inits.pop() == {"address": "head:6379", "log_to_driver": False}


def test_ensure_ray_leaves_a_running_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init called"))
    assert ensure_ray() is False


def test_repo_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert repo_pythonpath() == {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}/elsewhere"}
    assert repo_pythonpath(keep_existing=False) == {"PYTHONPATH": str(REPO_ROOT)}
    monkeypatch.delenv("PYTHONPATH")
    assert repo_pythonpath() == {"PYTHONPATH": str(REPO_ROOT)}


def test_pick_device(monkeypatch):
    assert pick_device(0) == pick_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(0.5) == torch.device("cuda") and pick_device(True, 3) == torch.device("cuda:3")
    assert pick_device(0.0, 1) == torch.device("cpu")


def test_safetensors_lookup_honours_the_index(tmp_path):
    save_file({"a": torch.ones(2), "c": torch.ones(1, 4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"a": torch.ones(5)}, str(tmp_path / "ema.safetensors"))  # beside the model, not of it
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors"}}))
    assert safetensors_shapes(tmp_path) == {"a": (2,), "b": (3,), "c": (1, 4)}
    assert set(safetensors_key_files(tmp_path, select=lambda k: k == "b").values()) == {
        tmp_path / "model-00002-of-00002.safetensors"}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert set(read_safetensors_dir(tmp_path, select=lambda k: k != "b")) == {"a", "c"}  # its shard is not needed
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        safetensors_key_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    save_file({"x": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    assert safetensors_shapes(tmp_path) == {"x": (1,)}  # model.safetensors before any other file


def test_pixels_to_uint8():
    pixels = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert pixels_to_uint8(pixels).tolist() == [0, 0, 128, 191, 255, 255]


def test_both_trainers_build_their_deepspeed_config_from_the_shared_engine_config():
    from pipelines.rl.config import GRPOConfig
    from pipelines.rl.learner import deepspeed_config
    from pipelines.train.config import load_train_config
    from pipelines.train.deepspeed_config import build_deepspeed_config

    train = build_deepspeed_config(load_train_config({"deepspeed": {"zero_stage": 3}}), on_gpu=False)
    assert train["zero_optimization"]["stage"] == 3 and "stage3_prefetch_bucket_size" in train["zero_optimization"]
    assert train["train_micro_batch_size_per_gpu"] == 1 and train["zero_allow_untested_optimizer"]
    grpo_cfg = GRPOConfig()
    grpo = deepspeed_config(grpo_cfg, accumulation=4)
    assert grpo["train_micro_batch_size_per_gpu"] == grpo_cfg.rollout.group_size
    assert grpo["gradient_accumulation_steps"] == 4 and grpo["optimizer"]["type"] == "AdamW"
    assert grpo["zero_optimization"] == {"stage": grpo_cfg.deepspeed.zero_stage}
    shared = {"gradient_clipping", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown"}
    assert shared <= set(train) and shared <= set(grpo)
