"""The training job: data plan and bad inputs, streaming + packing state, mixture schedules (fast), and
real 2-worker Ray Train + DeepSpeed runs on CPU (slow): ZeRO-2 and ZeRO-3, non-finite loss skipped,
exact resume after a rerun and after a killed worker, the exported safetensors loading and sampling."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lance_core.config import ConfigError, model_preset
from lance_core.tokenizer import ByteTokenizer
from pipelines.train.config import DataSection, MixtureSection, load_train_config
from pipelines.train.data import PackLoader
from pipelines.train.mixture import MixtureSchedule
from pipelines.train.plan import DataError, make_plan

ROOT = Path(__file__).resolve().parents[1]
TASKS_IN_DATA = {"t2i": 1.0, "t2v": 1.0, "i2i": 1.0, "v2v": 1.0, "i2t": 1.0, "v2t": 1.0}


def _data(latents: Path, **overrides) -> DataSection:
    return DataSection(uris=(str(latents),), **{"token_budget": 1024, **overrides})


def _loader(latents: Path, rank: int = 0, world: int = 1, **overrides) -> PackLoader:
    data = _data(latents, **overrides)
    plan = make_plan(data, TASKS_IN_DATA)
    return PackLoader(plan, data, model_preset("tiny"), ByteTokenizer(), rank, world, seed=0, need_generation=True)


WEIGHTS = {t: 1 / 6 for t in TASKS_IN_DATA}


# ---------------------------------------------------------------------------------------------- configs
def test_config_names_unknown_stage_task_and_field():
    with pytest.raises(ConfigError) as err:
        load_train_config({"stage": "warmup", "mixture": {"weights": {"t2x": 1.0}}, "optim": {"lrr": 1}})
    message = str(err.value)
    assert "train.stage" in message and "'t2x'" in message and "train.optim.lrr" in message


def test_stage_presets_load():
    from jobs.config_io import read_yaml

    stages = {}
    for name in ("pretrain", "continual", "sft", "tiny"):
        stages[name] = load_train_config(read_yaml(ROOT / "jobs" / "configs" / f"train_{name}.yaml"))
    sft = stages["sft"]
    assert sft.stage == "sft" and set(sft.freeze) == {"embed_tokens", "lm_head"}
    assert (sft.optim.lr, sft.optim.betas, sft.optim.eps, sft.optim.weight_decay, sft.optim.warmup_steps,
            sft.optim.grad_clip) == (1e-4, (0.9, 0.95), 1e-15, 0.0, 500, 1.0)
    assert stages["continual"].mixture.progressive.enabled and stages["continual"].mixture.capability.enabled
    assert stages["pretrain"].deepspeed.zero_stage == 3


def test_cli_rejects_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nmixture:\n  weights: {t2q: 1.0}\n")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "t2q" in out.stderr


def test_deepspeed_config_built_from_typed_config():
    from pipelines.train.deepspeed_config import build_deepspeed_config

    cfg = load_train_config({"deepspeed": {"zero_stage": 3}})
    ds = build_deepspeed_config(cfg, on_gpu=True)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-4, "warmup_num_steps": 500,
                                         "warmup_type": "linear"}
    assert not build_deepspeed_config(cfg, on_gpu=False)["bf16"]["enabled"]
    no_warmup = load_train_config({"optim": {"warmup_steps": 0}})
    assert "scheduler" not in build_deepspeed_config(no_warmup, on_gpu=False)  # WarmupLR refuses 0 steps
    # gradients are reduced in fp32 unless asked otherwise, also in a bf16 run
    assert ds["communication_data_type"] == "fp32"
    halved = load_train_config({"deepspeed": {"communication_dtype": "bf16"}})
    assert build_deepspeed_config(halved, on_gpu=True)["communication_data_type"] == "bf16"
    with pytest.raises(ConfigError, match="communication_dtype"):
        load_train_config({"deepspeed": {"communication_dtype": "fp8"}})
    # the fp32 EMA is sharded like the optimizer's master weights: ZeRO-3 keeps one too
    assert load_train_config({"deepspeed": {"zero_stage": 3, "ema_decay": 0.9999}}).deepspeed.ema_decay == 0.9999


def test_warmup_stable_decay_schedule():
    """``optim.decay: wsd``: DeepSpeed's own WarmupLR during the warm-up, the peak until the last
    ``decay_fraction`` of the steps, then linear to 0 at the last step; its state is the step alone, and a run
    resumed with more steps stays at the peak where the shorter run had begun to decay."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    from pipelines.train.deepspeed_config import (
        WarmupStableDecayLR,
        build_deepspeed_config,
        lr_scheduler_factory,
    )

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    cfg = load_train_config({"steps": 100, "optim": {"lr": 1e-3, "warmup_steps": 10, "decay": "wsd",
                                                      "decay_fraction": 0.25}})
    assert "scheduler" not in build_deepspeed_config(cfg, on_gpu=False)
    ours = lr_scheduler_factory(cfg)(optimizer())
    theirs = WarmupLR(optimizer(), warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type="linear")
    lrs = []
    for step in range(100):
        ours.step()
        theirs.step()
        lrs.append(ours.get_last_lr()[0])
        assert ours.optimizer.param_groups[0]["lr"] == lrs[-1]
        if step < 75:
            assert lrs[-1] == pytest.approx(theirs.get_last_lr()[0]), step
    assert lrs[9] < lrs[10] == lrs[74] == 1e-3 and lrs[75] == pytest.approx(1e-3 * 25 / 25)
    assert lrs[80] == pytest.approx(1e-3 * 20 / 25) and lrs[99] == pytest.approx(1e-3 / 25)
    again = WarmupStableDecayLR(optimizer(), 1e-3, 10, 100, 25)
    again.load_state_dict(json.loads(json.dumps(ours.state_dict())))
    assert again.get_last_lr() == ours.get_last_lr()
    longer = lr_scheduler_factory(load_train_config({**cfg.model_dump(mode="json"), "steps": 200}))(optimizer())
    longer.load_state_dict({"last_batch_iteration": 80})
    assert longer.get_last_lr()[0] == 1e-3
    assert lr_scheduler_factory(load_train_config({"optim": {"decay": "linear"}})) is None
    with pytest.raises(ConfigError, match="decay_fraction"):
        load_train_config({"optim": {"decay": "wsd", "decay_fraction": 0}})


# ---------------------------------------------------------------------------------------------- mixture
def test_progressive_schedule_raises_editing_share():
    cfg = MixtureSection(weights={"t2i": 1.0, "i2i": 1.0},
                         progressive=dict(enabled=True, tasks=("i2i",), start_step=10, end_step=110,
                                          final_multiplier=3.0))
    schedule = MixtureSchedule(cfg, ["t2i", "i2i"])
    assert schedule.weights(0)["i2i"] == pytest.approx(0.5)
    assert schedule.weights(60)["i2i"] == pytest.approx(2 / 3)
    assert schedule.weights(500)["i2i"] == pytest.approx(0.75)


def test_capability_rule_raises_the_task_that_improves_least():
    cfg = MixtureSection(weights={"t2i": 1.0, "i2t": 1.0}, capability=dict(enabled=True, strength=2.0))
    schedule = MixtureSchedule(cfg, ["t2i", "i2t"])
    schedule.update_capability({"t2i": 1.0, "i2t": 6.0})
    schedule.update_capability({"t2i": 0.5, "i2t": 5.7})
    weights = schedule.weights(1)
    assert weights["i2t"] > 0.5 > weights["t2i"]
    restored = MixtureSchedule(cfg, ["t2i", "i2t"])
    restored.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert restored.weights(1) == weights


# ---------------------------------------------------------------------------------------------- data
@pytest.mark.slow
def test_plan_counts_missing_and_foreign_shards(latents, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(latents, root)
    from pipelines.data.manifest import read_manifest

    index, shards = read_manifest(str(root))
    pq.write_table(pa.table({"id": [1, 2], "pixels": [b"a", b"b"]}), root / "shards" / "foreign.parquet")
    shards += [{"partition": 98, "shard": "shards/part-00098.parquet", "rows": 3},
               {"partition": 99, "shard": "shards/foreign.parquet", "rows": 2}]
    # the manifest of earlier versions (schema /1: every shard listed in manifest.json) is read too
    manifest = {"schema": "lance-latent-shards/1", "encoder": index["encoder"], "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    plan = make_plan(_data(root), TASKS_IN_DATA)
    assert plan.issues["missing_shards"] == 1 and plan.issues["bad_schema_shards"] == 1
    assert any("part-00098.parquet" in m and "missing" in m for m in plan.messages)
    assert any("foreign.parquet" in m and "not a latent shard" in m for m in plan.messages)
    assert set(plan.task_rows) == set(TASKS_IN_DATA)


@pytest.mark.slow
def test_empty_dataset_after_filtering_is_a_clear_error(latents, tmp_path):
    with pytest.raises(DataError, match="empty dataset after filtering"):
        make_plan(_data(latents, resolution=dict(max_image_tokens=1, max_video_tokens=1)), {"t2i": 1.0, "t2v": 1.0})
    with pytest.raises(DataError, match="no trainable rows for the mixture tasks"):
        make_plan(_data(latents), {"subject": 1.0})
    with pytest.raises(DataError, match="no manifest.json"):
        make_plan(_data(tmp_path), {"t2i": 1.0})


@pytest.mark.slow
def test_samples_over_the_budget_are_counted_or_fail_clearly(latents):
    loader = _loader(latents, token_budget=300)
    for _ in range(4):
        pack = loader.build_pack(WEIGHTS)
        assert pack.batch.num_real_tokens <= 300
    assert loader.packer.skipped > 0  # t2v / v2v / v2t samples are longer than 300 tokens
    tiny_budget = _loader(latents, token_budget=40)
    with pytest.raises(DataError, match="exceed the token budget of 40"):
        tiny_budget.build_pack(WEIGHTS)


@pytest.mark.slow
def test_packs_fill_the_budget_and_always_hold_generation(latents):
    loader = _loader(latents)
    fills = []
    for _ in range(8):
        pack = loader.build_pack(WEIGHTS)
        assert bool(pack.batch.is_gen.any()) and bool((~pack.batch.is_gen).any())
        fills.append(pack.batch.num_real_tokens / 1024)
    assert sum(fills) / len(fills) >= 0.9
    only_understanding = loader.build_pack({"i2t": 1.0})
    assert only_understanding.batch.is_gen.any()  # the pack opened with a generation sample


@pytest.mark.slow
def test_loader_state_resumes_the_same_packs(latents):
    first = _loader(latents, rank=1, world=2)
    keys, state = [], None
    for step in range(7):
        pack = first.build_pack(WEIGHTS)
        keys.append(pack.keys)
        if step == 2:
            state = pack.state
    second = _loader(latents, rank=1, world=2)
    second.load_state_dict(state)
    assert [second.build_pack(WEIGHTS).keys for _ in range(4)] == keys[3:]
    other_rank = _loader(latents, rank=0, world=2).build_pack(WEIGHTS)
    assert other_rank.keys != keys[0]


@pytest.mark.slow
def test_loader_thread_hands_errors_to_the_training_thread(latents):
    loader = _loader(latents, token_budget=40)
    loader.submit(WEIGHTS)
    with pytest.raises(DataError, match="token budget"):
        loader.next()
    loader.close()


@pytest.mark.slow
def test_shards_stream_from_s3_like_from_local_disk(latents, tmp_path):
    """The same packs from an S3 copy of the shards (moto's S3 server on loopback) as from local disk."""
    import socket
    import time

    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("lance-train")
        fs.put(str(latents / "manifest.json"), "lance-train/latents/manifest.json")
        fs.put(str(latents / "manifest"), "lance-train/latents/manifest", recursive=True)
        fs.put(str(latents / "shards"), "lance-train/latents/shards", recursive=True)
        remote_data = _data(latents, storage={"endpoint_url": endpoint}).model_copy(
            update={"uris": ("s3://lance-train/latents",)})
        remote = PackLoader(make_plan(remote_data, TASKS_IN_DATA), remote_data, model_preset("tiny"), ByteTokenizer(),
                            0, 1, seed=0, need_generation=True)
        assert remote.plan.shards[0].uri.startswith("s3://lance-train/latents/shards/")
        local = _loader(latents)
        for _ in range(3):
            assert remote.build_pack(WEIGHTS).keys == local.build_pack(WEIGHTS).keys
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- Ray Train + DeepSpeed
def _train_config(latents: Path, output: Path, name: str, **overrides) -> dict:
    from jobs.config_io import read_yaml

    data = read_yaml(ROOT / "jobs" / "configs" / "train_tiny.yaml")
    data.update(name=name, output=str(output), steps=8)
    data["data"] = {**data["data"], "uris": [str(latents)]}
    data["checkpoint"] = {"every_steps": 4, "keep_last": 1}
    data["mixture"]["capability"]["every_steps"] = 4
    data["deepspeed"] = {"zero_stage": 2, "activation_checkpointing": True}
    data["debug"] = {"nan_rank": 1, "nan_at_step": 3}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def _run(data: dict):
    from pipelines.train.driver import run_training

    return run_training(load_train_config(data))


@dataclass
class CliRun:
    run_dir: Path
    metrics: list[dict]
    export: Path | None
    output: str
    """What the driver printed (stdout and stderr)."""


def _run_cli(data: dict, config: Path) -> CliRun:
    """``lance train --config`` in its own driver process, as a user runs it, joined to the session's Ray."""
    import ray
    import yaml

    from pipelines.train.metrics import read_metrics

    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--config", str(config)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(data["output"]) / data["name"]
    export = run_dir / "model.safetensors"
    return CliRun(run_dir, read_metrics(run_dir), export if export.is_file() else None, out.stdout + out.stderr)


def _losses(rows):
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def zero2_run(latents, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return _run_cli(_train_config(latents, out, "zero2", deepspeed={"ema_decay": 0.5}), out / "zero2.yaml")


@pytest.mark.slow
def test_zero2_two_workers_learn_and_skip_a_nan_step(zero2_run):
    rows = zero2_run.metrics
    assert [r["step"] for r in rows] == list(range(1, 9))
    nan_row = rows[2]
    assert nan_row["loss"] is None and nan_row["skipped_steps"] == 1 and rows[-1]["skipped_steps"] == 1
    # learning, on the same held-out rows and noise (a step's own loss swings with the tasks it drew)
    assert rows[7]["heldout_total"] < rows[3]["heldout_total"], [(r.get("heldout_total"), r["loss"]) for r in rows]
    for row in rows:
        if row["step"] != 3:
            assert row["und_grad_min"] > 0 and row["gen_grad_min"] > 0, row
        assert set(row["mixture"]) == set(TASKS_IN_DATA) and math.isclose(sum(row["mixture"].values()), 1, rel_tol=1e-4)
        assert row["pack_fill"] > 0.8 and row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["lr"] >= 0
    assert rows[-1]["mixture"]["i2i"] > rows[0]["mixture"]["i2i"]  # progressive schedule
    assert any(k.startswith("heldout/") for k in rows[3])  # capability rule evaluated at step 4
    run = zero2_run.run_dir
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_0000008"]  # keep_last 1
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "samples" / "step0000008_image.png").stat().st_size > 0
    assert (run / "samples" / "step0000008_video_frames.png").stat().st_size > 0


@pytest.mark.slow
def test_driver_prints_a_progress_line_per_logging_step_and_workers_log_to_files(zero2_run):
    """One line per logging step (train_tiny.yaml: report_every 4) in the one log format; Ray's per-rank
    report dicts and the workers' own output stay in <run>/logs/rank-N.log."""
    output = zero2_run.output
    progress = [line for line in output.splitlines() if " lance.train: step " in line and "/8 (" in line]
    assert [re.search(r"step (\d+)/8", line).group(1) for line in progress] == ["4", "8"], output[-3000:]
    for line in progress:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO lance\.train: step \d/8 \(\d+%\) \| loss [\d.]+ \| "
                        r"\d+ tok/s \| MFU [\d.]+% \| data wait [\d.]+% \| lr .* \| ETA \d+:\d\d:\d\d$", line), line
    rows = zero2_run.metrics
    first_interval = [r["loss"] for r in rows[:4] if r["loss"] is not None]  # step 3 was skipped (non-finite)
    assert float(re.search(r"loss ([\d.]+)", progress[0]).group(1)) == pytest.approx(
        sum(first_interval) / len(first_interval), abs=1e-4)
    assert "skipped steps 1" in progress[0]
    assert "WARNING lance.train: step 3: non-finite loss on a rank" in output  # rank 0's lines reach the driver
    assert "TrainingReport(" not in output and "RayTrainWorker" not in output
    logs = zero2_run.run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank-0.log", "rank-1.log"]
    rank0, rank1 = (logs / "rank-0.log").read_text(), (logs / "rank-1.log").read_text()
    assert "Reporting training result 1: TrainingReport(" in rank0 and "lance.train: step 8/8" in rank0
    assert "from rank 1" in rank1 and "lance.train" not in rank1


@pytest.mark.slow
def test_exported_safetensors_loads_and_samples(zero2_run):
    from lance_core.checkpoint import load_lance_checkpoint
    from lance_core.model import build_model
    from lance_core.packing import VisualInput, build_understanding_sample
    from lance_core.sampling import SamplingConfig, generate_latents, generate_text

    assert zero2_run.export is not None
    model = build_model(model_preset("tiny")).eval()
    report = load_lance_checkpoint(model, zero2_run.export)
    assert report.loaded == len(model.state_dict())
    tok = ByteTokenizer()
    latents = generate_latents(model, tok, "t2i", "a red sign", (1, 3, 5), SamplingConfig(steps=3),
                               generator=torch.Generator().manual_seed(0))
    assert latents.shape == (1, 3, 5, 48) and torch.isfinite(latents).all()
    media = VisualInput(vit_features=torch.randn(4, 64), vit_grid=(1, 2, 2))
    ids = generate_text(model, tok, build_understanding_sample(tok, "i2t", media, "What is shown?", None),
                        max_new_tokens=4)
    assert len(ids) <= 4


@pytest.mark.slow
def test_zero3_resume_and_killed_worker_give_the_same_run(zero2_run, latents, tmp_path):
    """ZeRO-3: 4 steps, then a rerun of the same run name to 8 steps in which rank 1 is killed at step 6;
    the group restarts from the step-4 checkpoint. Losses and data order equal the uninterrupted ZeRO-2
    run (same data, seeds and non-finite step; only the reduction order of the sharding differs)."""
    base = dict(deepspeed={"zero_stage": 3, "activation_checkpointing": True}, max_failures=1)
    first = _run(_train_config(latents, tmp_path, "zero3", steps=4, **base))
    assert [r["step"] for r in first.metrics] == [1, 2, 3, 4]
    second = _run(_train_config(latents, tmp_path, "zero3", debug={"kill_rank": 1, "kill_at_step": 6}, **base))
    assert (second.run_dir / "debug" / "killed-rank1-step6").exists()
    rows, reference = second.metrics, zero2_run.metrics
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["data_hash"] for r in rows] == [r["data_hash"] for r in reference]
    for got, want in zip(_losses(rows), _losses(reference)):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-4)
    for row in rows:
        if row["step"] != 3:
            assert row["und_grad_min"] > 0 and row["gen_grad_min"] > 0, row
    assert rows[7]["heldout_total"] < rows[3]["heldout_total"]
    assert second.export is not None and second.export.stat().st_size > 0


def test_tune_trial_sets_searched_fields_and_understanding_share():
    from pipelines.train.tune import trial_config

    base = load_train_config({"mixture": {"weights": {"t2i": 2.0, "t2v": 1.0, "i2t": 1.0}}})
    cfg = trial_config(base, {"optim.lr": 1e-3, "loss.ce_weight": 0.5, "mixture.understanding_share": 0.4,
                              "optim.warmup_steps": 7, "name": "trial-1"})
    assert cfg.optim.lr == 1e-3 and cfg.loss.ce_weight == 0.5 and cfg.name == "trial-1"
    assert cfg.optim.warmup_steps == 7
    assert cfg.mixture.weights == pytest.approx({"t2i": 0.4, "t2v": 0.2, "i2t": 0.4})


def test_tune_section_search_space_is_validated_with_the_config():
    cfg = load_train_config({"tune": {"num_samples": 3, "scheduler": {"kind": "fifo"},
                                      "search_space": {"optim.warmup_steps": {"choice": [0, 5]}}}})
    assert cfg.tune.num_samples == 3 and set(cfg.tune.search_space) == {"optim.warmup_steps"}
    with pytest.raises(ConfigError, match="'optim.lrr' is not a field"):
        load_train_config({"tune": {"search_space": {"optim.lrr": {"uniform": [0.1, 0.2]}}}})
    with pytest.raises(ConfigError, match="exactly one of"):
        load_train_config({"tune": {"search_space": {"optim.lr": {"uniform": [0.1, 0.2], "choice": [1]}}}})
    with pytest.raises(ConfigError, match="does not accept"):
        load_train_config({"tune": {"search_space": {"optim.lr": {"uniform": [-1.0, 0.2]}}}})


@pytest.mark.slow
def test_tune_sweeps_the_config_space_and_writes_a_best_config(latents, tmp_path):
    """Two one-worker trials of two steps (FIFO) from a config's ``tune:`` section; the best config is a
    training config again, with the trial's values from the search space."""
    import yaml

    from jobs import tune as tune_job

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "sweep", "steps": 40, "model": {"preset": "tiny"},
        "data": {"token_budget": 1024, "holdout_per_task": 1},
        "mixture": {"weights": {"t2i": 1.0, "i2t": 1.0}},
        "deepspeed": {"zero_stage": 0},
        "tune": {"num_samples": 2, "max_concurrent": 2, "seed": 3, "scheduler": {"kind": "fifo"},
                 "search_space": {"optim.lr": {"loguniform": [1e-4, 1e-2]},
                                  "optim.warmup_steps": {"choice": [0, 1]}}},
    }))
    code = tune_job.main(["--config", str(config), "--data", str(latents), "--output", str(tmp_path / "runs"),
                          "--steps", "2", "--workers", "1"])
    assert code == 0
    best_file = tmp_path / "runs" / "sweep-tune" / "best_config.yaml"
    best = load_train_config(yaml.safe_load(best_file.read_text()))
    assert best.name == "sweep-best" and best.steps == 40
    assert 1e-4 <= best.optim.lr <= 1e-2 and best.optim.warmup_steps in (0, 1)
    assert best.mixture.weights == {"t2i": 1.0, "i2t": 1.0} and best.data.uris == (str(latents),)
