"""Checkpoints and shards that went bad: a checkpoint is trusted only when its manifest (sizes and digests,
written last) checks out; Ray Train's snapshot is repaired when a checkpoint folder is gone; a shard whose
body fails to read is named, checked against its manifest digest, skipped and counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lance_core.config import model_preset
from lance_core.tokenizer import ByteTokenizer
from pipelines.runtime.checkpointing import verify_checkpoint, write_manifest
from pipelines.train.config import DataSection, load_train_config
from pipelines.train.data import PackLoader
from pipelines.train.plan import make_plan
from pipelines.train.preflight import RAY_SNAPSHOT, repair_ray_snapshot
from pipelines.train.synthetic_shards import write_synthetic_shards


def _checkpoint(folder: Path) -> Path:
    (folder / "ds").mkdir(parents=True)
    (folder / "ds" / "states.pt").write_bytes(b"x" * 1000)
    (folder / "train_state.json").write_text(json.dumps({"step": 4, "world_size": 2}))
    return folder


def test_a_checkpoint_is_trusted_only_when_its_manifests_check_out(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint_0000004")
    assert verify_checkpoint(folder, 2) is None  # written before manifests: not checked
    write_manifest(folder, "rank_00000", [0])
    assert "no manifest of rank(s) [1]" in verify_checkpoint(folder, 2)  # rank 1's share never finished
    write_manifest(folder, "rank_00001", [1], files=[])
    assert verify_checkpoint(folder, 2) is None
    (folder / "ds" / "states.pt").write_bytes(b"x" * 500)
    assert verify_checkpoint(folder, 2) == "ds/states.pt has 500 bytes, 1000 were written"
    (folder / "ds" / "states.pt").write_bytes(b"y" * 1000)
    assert verify_checkpoint(folder, 2) == "ds/states.pt differs from what was written (sha256)"
    (folder / "ds" / "states.pt").unlink()
    assert verify_checkpoint(folder, 2) == "ds/states.pt is missing"


def test_ray_snapshot_drops_checkpoints_whose_folders_are_gone(tmp_path, caplog):
    cfg = load_train_config({"output": str(tmp_path), "name": "run"})
    run = tmp_path / "run"
    for step in (2, 4):
        _checkpoint(run / f"checkpoint_{step:07d}")
    results = [{"version": 0, "checkpoint_dir_name": f"checkpoint_{s:07d}", "metrics": {"step": s}} for s in (2, 4)]
    (run / RAY_SNAPSHOT).write_text(json.dumps({
        "ray_version": "2.60.0", "checkpoint_results": results, "checkpoint_report_indices": [0, 1],
        "latest_checkpoint_result": results[1], "validated_checkpoint_dir_names": ["checkpoint_0000004"]}))
    assert repair_ray_snapshot(cfg) == []  # all there: untouched
    import shutil

    shutil.rmtree(run / "checkpoint_0000004")  # a user removed a damaged checkpoint
    with caplog.at_level(logging.WARNING, logger="lance"):
        assert repair_ray_snapshot(cfg) == ["checkpoint_0000004"]
    snapshot = json.loads((run / RAY_SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == ["checkpoint_0000002"]
    assert snapshot["checkpoint_report_indices"] == [0] and snapshot["validated_checkpoint_dir_names"] == []
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_0000002"
    assert "resumes from checkpoint_0000002" in caplog.text


def test_a_corrupt_shard_body_is_named_checked_skipped_and_counted(tmp_path, caplog):
    cfg = model_preset("tiny")
    root = write_synthetic_shards(tmp_path / "latents", cfg, tasks=("t2i",), rows_per_task=48, rows_per_shard=16)
    data = DataSection(uris=(str(root),), token_budget=1024, holdout_per_task=0)
    plan = make_plan(data, {"t2i": 1.0})
    assert len(plan.shards) == 3 and all(s.sha256 for s in plan.shards)
    bad = Path(plan.shards[1].uri)
    body = bytearray(bad.read_bytes())
    middle = len(body) // 2
    body[middle:middle + 2048] = bytes(2048)  # a damaged page: the footer (and so the plan) still reads
    bad.write_bytes(bytes(body))
    loader = PackLoader(plan, data, cfg, ByteTokenizer(), 0, 1, 0, True)
    with caplog.at_level(logging.ERROR, logger="lance"):
        packs = [loader.build_pack({"t2i": 1.0}) for _ in range(6)]  # more than one pass over the shards
    assert packs[-1].state["counters"]["unreadable_shards"] == 1
    assert f"shard {bad} cannot be read" in caplog.text
    assert "its sha256 differs from the manifest's: damaged since it was written" in caplog.text
    assert caplog.text.count("cannot be read") == 1  # skipped for the rest of the run, not retried
    resumed = PackLoader(plan, data, cfg, ByteTokenizer(), 0, 1, 0, True)
    resumed.load_state_dict(packs[-1].state)
    assert resumed.streams["t2i"].unreadable == {1}  # the skip survives a resume


def test_verify_refuses_an_unreadable_manifest(tmp_path):
    folder = _checkpoint(tmp_path / "c")
    (folder / "manifest").mkdir()
    (folder / "manifest" / "all.json").write_text("{not json")
    assert verify_checkpoint(folder, 2).startswith("all.json unreadable")
    write_manifest(folder, "all", [0, 1])  # rewritten whole
    assert verify_checkpoint(folder, 2) is None
