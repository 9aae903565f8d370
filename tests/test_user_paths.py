"""Paths a user gives (CLI or YAML) are resolved against the user's working directory when the config is
loaded, before any Ray work, and checked before any work: every path field of every config, each job's
config loading from another folder, early errors that name the field and flag, and one real
``lance precompute`` run with relative paths from a folder other than the project's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lance_core.config import ConfigError, path_fields, resolve_user_path

ROOT = Path(__file__).resolve().parents[1]
TINY_PRECOMPUTE = {"partition_size": 4, "buckets": {"image_area": 64 * 64, "video_area": 64 * 96, "vit_area": 56 * 56},
                   "video": {"max_seconds": 1.0}, "filters": {"dedup": False}}


def _lance(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _all_absolute(model) -> list[tuple[str, str]]:
    """Path values of a config that are neither absolute nor a URI."""
    return [(name, value) for name, value, _ in path_fields(model) if not (value.startswith("/") or "://" in value)]


# ---------------------------------------------------------------------------------------------- the type
def test_relative_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_user_path("runs/latents") == str(tmp_path / "runs" / "latents")
    assert resolve_user_path("./a/../b") == str(tmp_path / "b")
    assert resolve_user_path("~/weights") == str(Path.home() / "weights")
    assert resolve_user_path("/abs/x") == "/abs/x"
    for uri in ("s3://bucket/latents/", "gs://b/x", "file:///data/x", "hf://org/model"):
        assert resolve_user_path(uri) == uri
    assert resolve_user_path("") == ""  # "not given" stays "not given"


def test_every_path_like_field_of_every_config_is_a_user_path():
    """A guard for new fields: a string field whose name says it holds a path must be an InputPath /
    OutputPath (or be listed here as a name, not a path)."""
    import re

    from lance_core import config as core
    from lance_core import model_section
    from lance_core.rewards import config as rewards
    from pipelines.data import config as data
    from pipelines.rl import config as rl
    from pipelines.train import config as train

    names_not_paths = {("FilterConfig", "clip_model"), ("CLIPConfig", "model_name"),
                       ("RewardSpec", "callable"),
                       ("MixtureSection", "weights"),  # task -> mixture weight
                       ("ManifestConfig", "uri_column")}  # a manifest's column name
    pattern = re.compile(r"(path|dir|uri|weights|checkpoint|^input$|^output$|^init_|tokenizer|_model$|pretrained)")
    unmarked = []
    for module in (core, model_section, rewards, data, rl, train):
        for cls in vars(module).values():
            if not (isinstance(cls, type) and issubclass(cls, core.StrictModel)) or cls.__module__ != module.__name__:
                continue
            for name, info in cls.model_fields.items():
                if not pattern.search(name) or (cls.__name__, name) in names_not_paths:
                    continue
                if "str" not in str(info.annotation):
                    continue
                if core.field_path_role(info) is None:
                    unmarked.append(f"{cls.__name__}.{name}")
    assert not unmarked, f"path fields typed as plain str: {unmarked}"


# ---------------------------------------------------------------------------------------------- each job's config
def test_precompute_config_resolves_input_output_and_weights(tmp_path, monkeypatch):
    from pipelines.data.config import PrecomputeConfig

    monkeypatch.chdir(tmp_path)
    cfg = PrecomputeConfig.model_validate({"input": "raw/t2i.parquet", "model": {"weights": {
        "vae": "w/vae", "vit": "w/vit"}}, "filters": {"clip_weights": "w/clip.bin"}})
    assert cfg.input == str(tmp_path / "raw" / "t2i.parquet")
    assert cfg.output == str(tmp_path / "runs" / "latents")  # the default is resolved too
    assert cfg.model.weights.vae == str(tmp_path / "w" / "vae") and cfg.model.weights.vit == str(tmp_path / "w" / "vit")
    assert cfg.model.build().vit.path == str(tmp_path / "w" / "vit")
    assert cfg.filters.clip_weights == str(tmp_path / "w" / "clip.bin")
    assert not _all_absolute(cfg)
    s3 = PrecomputeConfig(input="s3://bucket/raw/", output="s3://bucket/latents/")
    assert (s3.input, s3.output) == ("s3://bucket/raw/", "s3://bucket/latents/")


def test_train_config_of_the_readme_command_is_resolved_before_ray(tmp_path, monkeypatch):
    """``lance train --config jobs/configs/train_tiny.yaml --data runs/latents`` as loaded on the driver;
    the dump a worker loads (in another working directory) gives the same absolute paths."""
    from pydantic import TypeAdapter

    from jobs.config_io import read_yaml
    from lance_core.tokenizer import TokenizerRef
    from pipelines.train.config import TrainConfig, load_train_config

    monkeypatch.chdir(tmp_path)
    data = read_yaml(ROOT / "jobs" / "configs" / "train_tiny.yaml")
    data["data"]["uris"] = ["runs/latents", "s3://bucket/latents"]
    data["log_dir"] = "logs/tiny"
    data["model"] = {**data.get("model", {}), "tokenizer": "tok",
                     "weights": {"lance": "w/lance.safetensors", "vae": "w/vae"}}
    cfg = load_train_config(data)
    assert cfg.data.uris == (str(tmp_path / "runs" / "latents"), "s3://bucket/latents")
    assert cfg.output == str(tmp_path / "runs" / "train") and cfg.log_dir == str(tmp_path / "logs" / "tiny")
    assert cfg.model.weights.lance == str(tmp_path / "w" / "lance.safetensors")
    assert cfg.model.tokenizer == str(tmp_path / "tok")
    assert cfg.model.build().vae.path == str(tmp_path / "w" / "vae")
    assert load_train_config({**data, "model": {"tokenizer": "byte"}}).model.tokenizer == "byte"  # a name
    assert TypeAdapter(TokenizerRef).validate_python("qwen2.5") == "qwen2.5"
    assert TypeAdapter(TokenizerRef).validate_python("./byte") == str(tmp_path / "byte")  # a folder named byte
    monkeypatch.chdir(ROOT)  # a Ray Train worker: another working directory
    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_grpo_config_resolves_prompts_checkpoint_and_reward_models(tmp_path, monkeypatch):
    from pipelines.rl.config import load_grpo_config
    from pipelines.rl.preflight import with_initial_checkpoint

    monkeypatch.chdir(tmp_path)
    cfg = load_grpo_config({
        "prompts": {"path": "prompts.txt"}, "model": {"tokenizer": "byte", "weights": {"vit": "w/vit"}},
        "rewards": {"terms": [
            {"name": "ocr", "kind": "ocr", "ocr": {"det_model": "ocr/det.onnx", "rec_model": "ocr/rec.onnx",
                                                   "cls_model": "ocr/cls.onnx"}},
            {"name": "clip", "kind": "clip", "clip": {"pretrained": "w/clip.bin"}}]}})
    assert cfg.prompts.path == str(tmp_path / "prompts.txt") and cfg.model.tokenizer == "byte"
    assert cfg.model.weights.vit == str(tmp_path / "w" / "vit")
    ocr, clip = (spec.ocr or spec.clip for spec in cfg.rewards.terms)
    assert (ocr.det_model, ocr.rec_model, ocr.cls_model) == tuple(str(tmp_path / "ocr" / f"{k}.onnx")
                                                                  for k in ("det", "rec", "cls"))
    assert clip.pretrained == str(tmp_path / "w" / "clip.bin")
    assert not _all_absolute(cfg)
    assert with_initial_checkpoint(cfg, "init/model.safetensors").model.weights.lance == str(
        tmp_path / "init" / "model.safetensors")


def test_tune_best_config_keeps_absolute_paths(tmp_path, monkeypatch):
    """The sweep's base config and the best config it writes hold the user's paths resolved, so that
    ``lance train --config best_config.yaml`` from any folder reads the same data."""
    from pipelines.train.config import load_train_config
    from pipelines.train.tune import best_config_data, sweep_config

    monkeypatch.chdir(tmp_path)
    base = load_train_config({"name": "s-tune", "data": {"uris": ["runs/latents"]}})
    swept = sweep_config(base)
    assert swept.data.uris == (str(tmp_path / "runs" / "latents"),) and swept.output == str(tmp_path / "runs/train")
    best = best_config_data(base, {"optim.lr": 1e-3, "loss.ce_weight": 0.5, "mixture.understanding_share": 0.3},
                            "s-best")
    monkeypatch.chdir(ROOT)
    again = load_train_config(yaml.safe_load(yaml.safe_dump(best)))
    assert again.data.uris == (str(tmp_path / "runs" / "latents"),) and again.output == str(tmp_path / "runs/train")


# ---------------------------------------------------------------------------------------------- errors before work
def test_missing_paths_are_named_before_any_work(tmp_path):
    """No Ray, no output folder: each job names the field (and flag) and the absolute path it looked for."""
    out = _lance(["precompute", "--no-progress"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "precompute.input (--input): no input given" in out.stderr
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"weights": {"vae": "weights/vae"}}}))
    out = _lance(["precompute", "--config", "cfg.yaml", "--input", "raw", "--output", "latents"], tmp_path)
    assert out.returncode == 2
    assert f"precompute.input (--input): {tmp_path / 'raw'} does not exist" in out.stderr
    assert f"precompute.model.weights.vae: {tmp_path / 'weights' / 'vae'} does not exist" in out.stderr
    assert not (tmp_path / "latents").exists() and not (tmp_path / "runs").exists()

    out = _lance(["train", "--config", str(ROOT / "jobs" / "configs" / "train_tiny.yaml"), "--data",
                  "runs/latents"], tmp_path)
    assert out.returncode == 2
    assert f"train.data.uris[0] (--data): {tmp_path / 'runs' / 'latents'} does not exist" in out.stderr
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "shards").mkdir()
    out = _lance(["tune", "--config", str(ROOT / "jobs" / "configs" / "train_tiny.yaml"), "--data", "shards",
                  "--output", "file"], tmp_path)
    assert out.returncode == 2 and f"train.output (--output): {tmp_path / 'file'} exists and is not a folder" \
        in out.stderr

    out = _lance(["grpo", "--prompts", "prompts.txt", "--checkpoint", "w/model.safetensors"], tmp_path)
    assert out.returncode == 2
    assert f"grpo.prompts.path (--prompts): {tmp_path / 'prompts.txt'} does not exist" in out.stderr
    assert f"grpo.model.weights.lance (--checkpoint): {tmp_path / 'w' / 'model.safetensors'} does not exist" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_reward_and_model_weights_are_checked(tmp_path, monkeypatch):
    from pipelines.rl.config import load_grpo_config
    from pipelines.rl.preflight import check_grpo_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_grpo_config({"model": {"weights": {"vae": "w/vae"}}, "rewards": {"terms": [
        {"name": "ocr", "kind": "ocr", "ocr": {"det_model": "det.onnx"}}]}})
    with pytest.raises(ConfigError) as err:
        check_grpo_paths(cfg, tmp_path / "run")
    assert f"grpo.model.weights.vae: {tmp_path / 'w' / 'vae'} does not exist" in str(err.value)
    assert f"grpo.rewards.terms[0].ocr.det_model: {tmp_path / 'det.onnx'} does not exist" in str(err.value)


# ---------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_precompute_with_relative_paths_from_another_folder(tmp_path):
    """``lance precompute --config cfg.yaml --input data/t2i --output latents`` run in a folder that is not the
    project's: the shards land there, the recorded config holds absolute paths; a rerun reports the
    finished output, runs nothing and keeps the first run's figures."""
    from pipelines.data.synth import write_release_parquet

    write_release_parquet(tmp_path / "data" / "t2i" / "part-0.parquet", "t2i", 4, seed=3)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(TINY_PRECOMPUTE))
    args = ["precompute", "--config", "cfg.yaml", "--input", "data/t2i", "--output", "latents", "--no-progress"]
    first = _lance(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = json.loads((tmp_path / "latents" / "config.json").read_text())
    assert recorded["input"] == str(tmp_path / "data" / "t2i") and recorded["output"] == str(tmp_path / "latents")
    from pipelines.data.manifest import read_manifest

    manifest, shards = read_manifest(str(tmp_path / "latents"))
    assert manifest["partitions_committed"] == 1 and (tmp_path / "latents" / shards[0]["shard"]).is_file()
    stats = (tmp_path / "latents" / "stats.json").read_bytes()
    assert json.loads(stats)["inputs_written"] == 4 and json.loads(stats)["wall_seconds"] > 0

    again = _lance(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "complete: all 1 partitions were committed by an earlier run; nothing ran now" in again.stdout
    assert "this run 0, skipped as already committed 1" in again.stdout
    assert (tmp_path / "latents" / "stats.json").read_bytes() == stats  # the first run's figures stay
    wall = json.loads(stats)["wall_seconds"]
    assert f"wall {wall:.1f} s" in again.stdout
