"""The training worker without Ray (pipelines/train/torch_launch.py), as ``torchrun`` or one process runs it,
on synthetic shards: bf16 training keeps its EMA in fp32 (equal to an fp32 reference average of DeepSpeed's
master weights, where the bf16 average of before hardly moved), under ZeRO-2 and ZeRO-3; every collective
of the project's code goes through pipelines/runtime/collectives.py with tensors on the group's device; a run
resumes from its checkpoint and ignores a checkpoint cut short."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lance_core.config import model_preset
from pipelines.runtime.ema import ShardedEMA
from pipelines.train.config import load_train_config
from pipelines.train.synthetic_shards import write_synthetic_shards
from tests.torch_runs import in_child, record_run, run_expecting_error

ROOT = Path(__file__).resolve().parents[1]
DECAY = 0.999


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("synthetic") / "latents", model_preset("tiny"),
                                  rows_per_task=6)


def _config(shards: Path, output: Path, name: str, steps: int, **deepspeed):
    from jobs.config_io import read_yaml

    data = read_yaml(ROOT / "jobs" / "configs" / "train_tiny.yaml")
    data.pop("tune")
    data.update(name=name, output=str(output), steps=steps)
    data["data"] = {**data["data"], "uris": [str(shards)]}
    data["mixture"]["capability"]["enabled"] = False
    data["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    data["eval"] = {**data["eval"], "samples": False}
    data["deepspeed"] = {"zero_stage": 2, "precision": "bf16", "ema_decay": DECAY, **deepspeed}
    data["scaling"] = {"workers": 1, "cpus_per_worker": 1}
    return load_train_config(data)


def _ema_shards(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 EMA the checkpoint holds, whole (one rank's shard)."""
    return load_file(str(ShardedEMA.shard_path(checkpoint, 0)))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_run_keeps_an_fp32_ema_equal_to_the_reference(shards, tmp_path, zero_stage):
    cfg = _config(shards, tmp_path / "out", f"z{zero_stage}", steps=6, zero_stage=zero_stage)
    in_child(record_run, cfg.model_dump_json(), str(tmp_path))
    record = torch.load(tmp_path / "masters.pt", weights_only=True)
    masters, initial = record["masters"], record["initial"]
    assert len(masters) == 6  # one EMA update per optimizer step
    saved = _ema_shards(Path(json.loads((tmp_path / "collectives.json").read_text())["checkpoint"]))
    names = list(initial)
    assert set(saved) == set(names)
    worst_new, worst_bf16, moved = 0.0, 0.0, 0.0
    for name in names:
        reference = initial[name].clone()
        # the average as it was kept before: a copy of the bf16 weights (the masters rounded), lerp_ in bf16
        old = initial[name].to(torch.bfloat16)
        for step in masters:
            reference += (1 - DECAY) * (step[name] - reference)
            old.lerp_(step[name].to(torch.bfloat16), 1 - DECAY)
        worst_new = max(worst_new, float((saved[name].double().view_as(reference) - reference).abs().max()))
        worst_bf16 = max(worst_bf16, float((old.double() - reference).abs().max()))
        moved = max(moved, float((reference - initial[name]).abs().max()))
    assert moved > 1e-5  # the average did move
    assert worst_new < 1e-6, worst_new  # fp32 EMA = the fp32 reference
    assert worst_bf16 > 50 * worst_new  # what bf16 kept was far off
    seen = json.loads((tmp_path / "collectives.json").read_text())["seen"]
    ours = [caller for _, _, caller in seen if "/pipelines/" in caller or "/lance_core/" in caller]
    assert ours and all(c.endswith("pipelines/runtime/collectives.py") for c in ours)
    assert {device for _, device, _ in seen} == {"cpu"}


@pytest.mark.slow
def test_resume_skips_a_checkpoint_cut_short_and_continues(shards, tmp_path):
    from pipelines.train.metrics import read_metrics

    cfg = _config(shards, tmp_path / "out", "resume", steps=4, precision="fp32")
    in_child(record_run, cfg.model_dump_json(), str(tmp_path / "a"))
    run = tmp_path / "out" / "resume"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_0000002", "checkpoint_0000004"]
    (run / "partial_checkpoint_0000006").mkdir()  # what a crash in the middle of a save leaves
    longer = cfg.model_copy(update={"steps": 6})
    in_child(record_run, longer.model_dump_json(), str(tmp_path / "b"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert not (run / "partial_checkpoint_0000006").exists()
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_0000004", "checkpoint_0000006"]
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumes(shards, tmp_path):
    cfg = _config(shards, tmp_path / "out", "damaged", steps=4, precision="fp32", ema_decay=None)
    in_child(record_run, cfg.model_dump_json(), str(tmp_path / "a"))
    run = tmp_path / "out" / "damaged"
    optim = next((run / "checkpoint_0000004" / "state").glob("rank_*.safetensors"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])  # a crash or failed copy truncated it
    in_child(run_expecting_error, cfg.model_copy(update={"steps": 6}).model_dump_json(), str(tmp_path / "b"))
    assert (tmp_path / "b" / "error.txt").read_text() == "none"
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "checkpoint checkpoint_0000004 is damaged" in log and "rank_00000.safetensors has" in log
    assert "resuming from checkpoint_0000002" in log
    from pipelines.train.metrics import read_metrics

    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))  # steps 3 and 4 trained again


@pytest.mark.slow
def test_resume_never_runs_code_from_a_checkpoint(shards, tmp_path):
    """Anyone able to write the checkpoint store (and its manifest) must not run code on every worker."""
    from pipelines.runtime.checkpointing import write_manifest

    cfg = _config(shards, tmp_path / "out", "evil", steps=2, precision="fp32", ema_decay=None)
    in_child(record_run, cfg.model_dump_json(), str(tmp_path / "a"))
    checkpoint = tmp_path / "out" / "evil" / "checkpoint_0000002"
    assert {p.suffix for p in checkpoint.rglob("*") if p.is_file()} <= {".json", ".safetensors"}  # no pickle
    # a checkpoint in DeepSpeed's own layout (older runs, bf16 without ZeRO) with a planted pickle
    import shutil

    shutil.rmtree(checkpoint / "state")
    (checkpoint / "ds").mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"module": _Evil(str(marker))}, checkpoint / "ds" / "mp_rank_00_model_states.pt")
    (checkpoint / "latest").write_text("ds")
    write_manifest(checkpoint, "all", [0])  # the attacker rewrites the manifest too
    in_child(run_expecting_error, cfg.model_copy(update={"steps": 4}).model_dump_json(), str(tmp_path / "b"))
    error = (tmp_path / "b" / "error.txt").read_text()
    assert error.startswith("UnsafeCheckpointError") and "mp_rank_00_model_states.pt" in error, error
    assert not marker.exists()


class _Evil:
    """Unpickling it would create a file: what a planted pickle does with more harmful calls."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
def test_training_goes_on_while_a_checkpoint_is_written(shards, tmp_path):
    """checkpoint.async_save: the step-2 checkpoint's files are written while step 3 trains; it is complete
    (manifest, train state) and the run resumes from it; the last checkpoint is written before the run ends."""
    from tests.torch_runs import record_background_save

    cfg = _config(shards, tmp_path / "out", "background", steps=4, precision="fp32", ema_decay=None)
    in_child(record_background_save, cfg.model_dump_json(), str(tmp_path / "a"))
    events = json.loads((tmp_path / "a" / "events.json").read_text())
    end = next(t for kind, what, t in events if kind == "write_end" and "0000002" in what)
    step3 = next(t for kind, what, t in events if kind == "step" and what == 3)
    assert step3 < end, events  # step 3 began before the step-2 checkpoint was written
    run = tmp_path / "out" / "background"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_0000002", "checkpoint_0000004"]
    from pipelines.runtime.checkpointing import verify_checkpoint

    assert all(verify_checkpoint(run / name, 1) is None for name in ("checkpoint_0000002", "checkpoint_0000004"))
    assert not list(run.glob("partial_*"))
