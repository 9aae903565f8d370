"""Reruns into an output that holds a run (pipelines/runtime/run_folder.py): the same config resumes (a finished
run is reported, nothing runs, its figures stay), another config is refused naming the fields,
``--resume`` needs a run, ``--overwrite`` removes the previous run's outputs. One real precompute; the real
training rerun (a finished run reported without starting Ray Train, relative paths) is the last step of
tests/test_stage_chain.py; GRPO, tune and the demo by their decisions on prepared run folders, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.runtime.run_folder import RunFolder, RunFolderError, config_differences, rerun_action

ROOT = Path(__file__).resolve().parents[1]
TINY_PRECOMPUTE = {"partition_size": 4, "buckets": {"image_area": 64 * 64, "video_area": 64 * 96, "vit_area": 56 * 56},
                   "video": {"max_seconds": 1.0}, "filters": {"dedup": False}}


# ---------------------------------------------------------------------------------------------- the decision
def test_config_differences_leave_out_resumable_fields():
    recorded = {"steps": 2, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "scaling": {"workers": 1, "cpus": 1}}
    current = {"steps": 5, "optim": {"lr": 2e-3, "betas": (0.9, 0.95)}, "scaling": {"workers": 1, "cpus": 2},
               "new": 1}
    assert config_differences(recorded, current, ("steps", "scaling.cpus")) == [
        "optim.lr: 0.001 -> 0.002", "new: (absent) -> 1"]  # changed values first, then added / removed fields
    assert config_differences(recorded, recorded) == []


@pytest.mark.parametrize("mode,recorded,holds,current,expected", [
    ("auto", None, False, {"a": 1}, "new"),
    ("auto", {"a": 1}, True, {"a": 1}, "resume"),
    ("auto", {"a": 1}, False, {"a": 1}, "new"),  # recorded but nothing to continue from (died early)
    ("auto", None, True, {"a": 1}, "resume"),  # a run from before configs were recorded
    ("auto", {"a": 1}, True, {"a": 2}, "refuse"),
    ("resume", {"a": 1}, True, {"a": 1}, "resume"),
    ("resume", None, False, {"a": 1}, "refuse"),
    ("resume", {"a": 1}, True, {"a": 2}, "refuse"),
    ("overwrite", {"a": 1}, True, {"a": 2}, "overwrite"),
    ("overwrite", None, False, {"a": 1}, "new"),
])
def test_rerun_action(mode, recorded, holds, current, expected):
    if expected == "refuse":
        with pytest.raises(RunFolderError) as err:
            rerun_action("job", "/out", recorded, holds, current, (), mode)
        assert ("a: 1 -> 2" in str(err.value) and "--overwrite" in str(err.value)) or "holds no job run" in str(err.value)
    else:
        assert rerun_action("job", "/out", recorded, holds, current, (), mode) == expected


def test_a_field_added_since_the_run_was_recorded_counts_as_its_default(tmp_path):
    from pipelines.rl.config import GRPOConfig

    folder = RunFolder("grpo", str(tmp_path))
    current = GRPOConfig().model_dump(mode="json")
    older = json.loads(json.dumps(current))
    del older["rollout"]["async"], older["rewards"]["call_timeout_s"]  # fields a later version added
    folder.record_config(older)
    assert folder.settle(current, (), "auto", holds_run=True, schema=GRPOConfig) == "resume"
    changed = GRPOConfig.model_validate({"rollout": {"async": True}}).model_dump(mode="json")
    with pytest.raises(RunFolderError, match=r"rollout.async: \(absent\) -> true|rollout.async: false -> true"):
        folder.settle(changed, (), "auto", holds_run=True, schema=GRPOConfig)
    renamed = json.loads(json.dumps(current))
    renamed["learner"]["learning_rate"] = renamed.pop("optim")["lr"]  # the names of an older version
    folder.record_config(renamed)
    with pytest.raises(RunFolderError, match=r"learner.learning_rate"):
        folder.settle(current, (), "auto", holds_run=True, schema=GRPOConfig)


def test_overwrite_removes_only_the_runs_outputs(tmp_path):
    from pipelines.data.pipeline import PRECOMPUTE_OUTPUTS

    out = tmp_path / "out"
    for name in ("shards/part-00000.parquet", "_commits/part-00000.json", "quarantine/part-00000.parquet",
                 "plan.json", "manifest.json", "stats.json", ".tmp-dead.json", "notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    folder = RunFolder("precompute", str(out))
    folder.record_config({"a": 1})
    assert folder.settle({"a": 2}, (), "overwrite", holds_run=True, remove=PRECOMPUTE_OUTPUTS) == "new"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- precompute
@pytest.mark.slow
def test_precompute_rerun_keeps_the_first_runs_figures(ray_local, tmp_path, capsys):
    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.pipeline import run_precompute
    from pipelines.data.report import print_summary
    from pipelines.data.synth import write_release_parquet

    source = write_release_parquet(tmp_path / "in" / "part-0.parquet", "t2i", 4, seed=5)
    cfg = PrecomputeConfig(input=str(source), output=str(tmp_path / "out"), **TINY_PRECOMPUTE)
    first = run_precompute(cfg, progress=False)
    assert first.committed_now == 1 and not first.complete_before and first.stats["wall_seconds"] > 0
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["schema"] == "lance-plan/2"
    assert (tmp_path / "out" / "plan" / "inputs.parquet").is_file()
    stats = (tmp_path / "out" / "stats.json").read_bytes()

    again = run_precompute(cfg, progress=False)
    assert again.complete_before and (again.committed_now, again.skipped) == (0, 1)
    assert again.stats == first.stats and (tmp_path / "out" / "stats.json").read_bytes() == stats
    capsys.readouterr()
    print_summary(again)
    printed = capsys.readouterr().out
    assert "nothing ran now and the figures below are that run's" in printed
    assert f"wall {first.stats['wall_seconds']:.1f} s" in printed and "samples/s" in printed

    # resource fields may change on a resume; what is written may not
    resumed = cfg.model_copy(update={"manifest_every": 3})
    assert run_precompute(resumed, progress=False).complete_before
    other = PrecomputeConfig(**{**cfg.model_dump(), "latent_dtype": "fp32"})
    with pytest.raises(RunFolderError, match=r'latent_dtype: "bf16" -> "fp32"'):
        run_precompute(other, progress=False)
    assert (tmp_path / "out" / "stats.json").read_bytes() == stats
    with pytest.raises(RunFolderError, match="holds no precompute run to resume"):
        run_precompute(cfg.model_copy(update={"output": str(tmp_path / "empty")}), progress=False, mode="resume")


# ---------------------------------------------------------------------------------------------- train
def test_train_resume_needs_a_run(tmp_path, monkeypatch):
    from pipelines.train.config import load_train_config
    from pipelines.train.preflight import settle_rerun

    monkeypatch.chdir(tmp_path)
    (tmp_path / "latents").mkdir()
    with pytest.raises(RunFolderError, match="holds no train run to resume"):
        settle_rerun(load_train_config({"data": {"uris": ["latents"]}, "output": "runs"}), "resume")


# ---------------------------------------------------------------------------------------------- GRPO
def _finished_grpo(run_dir: Path, cfg, epochs_done: int) -> dict:
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    (run_dir / "checkpoints" / f"epoch_{epochs_done - 1:04d}").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text(f"epoch_{epochs_done - 1:04d}")
    summary = {"epochs": epochs_done, "reward_first": 0.1, "reward_last": 0.2, "last": {"epoch": epochs_done - 1}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def test_grpo_rerun_reports_a_finished_run_and_refuses_another_config(tmp_path, monkeypatch):
    """``lance grpo`` with the default output no longer resumes an older run of another config silently."""
    from jobs.cli import main
    from pipelines.rl import loop
    from pipelines.rl.config import load_grpo_config

    def no_ray(*args, **kwargs):
        raise AssertionError("a settled rerun must not start Ray")

    monkeypatch.setattr(loop, "ensure_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    cfg = load_grpo_config({"epochs": 2})
    summary = _finished_grpo(tmp_path / "runs" / "grpo", cfg, 2)
    assert loop.run_grpo(cfg, "runs/grpo") == summary | {"complete_before": True}
    assert loop.run_grpo(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": 1})}),
                         "runs/grpo")["complete_before"]
    with pytest.raises(RunFolderError, match=r"optim.lr: 1e-05 -> 0.001"):
        loop.run_grpo(load_grpo_config({"epochs": 2, "optim": {"lr": 1e-3}}), "runs/grpo")
    assert main(["grpo", "--steps", "2", "--config", str(ROOT / "jobs" / "configs" / "grpo_tiny.yaml")]) == 2
    with pytest.raises(RunFolderError, match="holds no grpo run to resume"):
        loop.run_grpo(cfg, "runs/other", mode="resume")


# ---------------------------------------------------------------------------------------------- tune, demo
def test_tune_rerun_of_a_finished_sweep_runs_nothing(tmp_path, monkeypatch, capsys):
    from jobs import tune as tune_job
    from pipelines.train.config import load_train_config
    from pipelines.train.tune import sweep_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "latents").mkdir()
    base = load_train_config({"name": "s-tune", "output": "runs", "steps": 8, "data": {"uris": ["latents"]},
                              "scaling": {"workers": 1}})
    sweep_dir = tmp_path / "runs" / "s-tune"
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "config.json").write_text(json.dumps(sweep_config(base).model_dump(mode="json")))
    best = {"params": {"optim.lr": 0.001}, "heldout_total": 1.5, "step": 8, "trials": 4}
    (sweep_dir / "best_trial.json").write_text(json.dumps(best))
    (sweep_dir / "best_config.yaml").write_text(yaml.safe_dump({"name": "s-best"}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "steps": 40}))
    args = ["--config", "s.yaml", "--data", "latents", "--output", "runs", "--steps", "8"]
    assert tune_job.main(args) == 0
    out = capsys.readouterr()
    assert "best trial (found from an earlier run): " + json.dumps(best) in out.out
    assert "is complete; nothing ran now" in out.err
    assert tune_job.main([*args[:-1], "4"]) == 2
    assert "steps: 8 -> 4" in capsys.readouterr().err


def test_demo_rerun_with_other_settings_is_refused(tmp_path, capsys):
    from jobs.cli import main

    run = tmp_path / "demo"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"demo": {"steps": 24}}))
    assert main(["demo", "--output", str(run), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "demo.steps: 24 -> 3" in err and "--overwrite" in err
