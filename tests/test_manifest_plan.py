"""Training's data plan made from the manifest's row counts (pipelines/train/plan.py): the same trainable
counts, held-out rows and issues as a plan that reads every row; manifests without counts (older
precomputes) planned from the rows; a shard listed but missing counted; semantic drops resolved from the
shards that hold them; the plan saved to a file and loaded back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lance_core.config import model_preset
from pipelines.runtime.shard_manifest import COUNTS, ENTRY_SCHEMA, SCHEMA, read_manifest
from pipelines.train import plan as planning
from pipelines.train.config import DataSection
from pipelines.train.plan import DataPlan, make_plan
from pipelines.train.synthetic_shards import write_synthetic_shards

TASKS_IN_DATA = {"t2i": 1.0, "t2v": 1.0, "i2i": 1.0, "v2v": 1.0, "i2t": 1.0, "v2t": 1.0}
LIMITS = ({}, {"max_image_tokens": 20, "max_video_tokens": 50})
"""No limit, and limits that leave some of the tiny precompute's image and video buckets out."""


def _data(root: Path, **overrides) -> DataSection:
    return DataSection(uris=(str(root),), **{"token_budget": 1024, **overrides})


def _uncounted_copy(root: Path, to: Path, layout: str = "/1") -> Path:
    """A copy of ``root`` whose manifest has no row counts, as precomputes before them wrote it: every entry in
    manifest.json (``/1``) or segments of the /2 entry columns (``/2``)."""
    shutil.copytree(root, to)
    index, entries = read_manifest(str(root))
    entries = [{key: value for key, value in entry.items() if key not in COUNTS} for entry in entries]
    shutil.rmtree(to / "manifest", ignore_errors=True)
    manifest = {key: value for key, value in index.items() if key != "segments"}
    if layout == "/1":
        manifest.update(schema="lance-latent-shards/1", shards=entries)
    else:
        (to / "manifest").mkdir()
        old_schema = pa.schema([field for field in ENTRY_SCHEMA if field.name not in COUNTS])
        pq.write_table(pa.Table.from_pylist(entries, schema=old_schema), to / "manifest" / "seg-000000.parquet")
        manifest.update(schema="lance-latent-shards/2", segments=[{"file": "manifest/seg-000000.parquet",
                                                                   "level": 0, "shards": len(entries)}])
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def _same_plan(counted: DataPlan, scanned: DataPlan) -> None:
    assert [(s.rows, s.trainable, s.sha256) for s in counted.shards] == \
        [(s.rows, s.trainable, s.sha256) for s in scanned.shards]
    assert [Path(s.uri).name for s in counted.shards] == [Path(s.uri).name for s in scanned.shards]
    assert counted.task_rows == scanned.task_rows and counted.holdout == scanned.holdout
    assert counted.issues == scanned.issues and counted.excluded == scanned.excluded


def _shard_reads(monkeypatch) -> list[tuple[str, tuple[str, ...]]]:
    """(shard file name, columns) of each shard the plan reads rows of, from then on."""
    reads: list[tuple[str, tuple[str, ...]]] = []
    read_rows = planning._read_rows

    def counting(uri, cfg, columns, consume):
        reads.append((Path(uri).name, columns))
        return read_rows(uri, cfg, columns, consume)

    monkeypatch.setattr(planning, "_read_rows", counting)
    return reads


@pytest.mark.slow
@pytest.mark.parametrize("limits", LIMITS)
def test_plan_from_the_manifest_counts_equals_the_plan_from_the_rows(latents, tmp_path, monkeypatch, limits):
    index, entries = read_manifest(str(latents))
    assert index["schema"] == SCHEMA and entries
    assert all(sum(entry["classes"].values()) == sum(entry["task_rows"].values()) == entry["rows"]
               for entry in entries)
    reads = _shard_reads(monkeypatch)
    counted = make_plan(_data(latents, resolution=limits), TASKS_IN_DATA)
    read_for_holdout = len(reads)
    assert 0 < read_for_holdout < len(entries), "only the shards that hold the held-out rows are read"
    assert not any("count" in message for message in counted.messages)
    for layout in ("/1", "/2"):
        old = _uncounted_copy(latents, tmp_path / f"old{layout[1]}", layout)
        scanned = make_plan(_data(old, resolution=limits), TASKS_IN_DATA)
        _same_plan(counted, scanned)
        assert any("does not count the rows" in message for message in scanned.messages)
    if limits:
        assert counted.issues["filtered_resolution_rows"] > 0
    reads.clear()
    make_plan(_data(latents, holdout_per_task=0, resolution=limits), TASKS_IN_DATA)
    assert reads == [], "no row is read when nothing is held out"


@pytest.mark.slow
def test_a_shard_listed_but_missing_or_replaced_is_counted(latents, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(latents, root)
    _, entries = read_manifest(str(root))
    (root / entries[1]["shard"]).unlink()
    pq.write_table(pa.table({"id": [1, 2], "pixels": [b"a", b"b"]}), root / entries[2]["shard"])
    plan = make_plan(_data(root), TASKS_IN_DATA)
    assert plan.issues["missing_shards"] == 1 and plan.issues["bad_schema_shards"] == 1
    assert any(entries[1]["shard"] in m and "listed in the manifest but missing" in m for m in plan.messages)
    assert any(entries[2]["shard"] in m and "where the manifest records" in m for m in plan.messages)
    assert any(entries[2]["shard"] in m and "not a latent shard" in m for m in plan.messages)
    assert len(plan.shards) == len(entries) - 2
    scanned = make_plan(_data(_uncounted_copy(root, tmp_path / "old")), TASKS_IN_DATA)
    _same_plan(plan, scanned)


def test_semantic_drops_are_resolved_in_the_shards_that_hold_them(tmp_path, monkeypatch):
    """The drop list names each row's partition: only those shards are read; a list without partitions (an
    earlier pass) has every shard's sample ids read. Either way the plan is the one made from the rows."""
    root = write_synthetic_shards(tmp_path / "latents", model_preset("tiny"), rows_per_task=6, rows_per_shard=5)
    shards = sorted((root / "shards").iterdir())
    ids = [pq.read_table(path, columns=["sample_id"]).column(0).to_pylist() for path in shards]
    drops = [(ids[0][1], 0), (ids[0][3], 0), (ids[4][2], 4)]
    _uncounted_copy(root, tmp_path / "old")
    for partitioned in (True, False):
        columns = {"sample_id": [sample for sample, _ in drops]}
        if partitioned:
            columns["partition"] = [partition for _, partition in drops]
        for folder in (root, tmp_path / "old"):
            pq.write_table(pa.table(columns), folder / "semantic_drop.parquet")
        scanned = make_plan(_data(tmp_path / "old", holdout_per_task=2), TASKS_IN_DATA)
        reads = _shard_reads(monkeypatch)
        counted = make_plan(_data(root, holdout_per_task=2), TASKS_IN_DATA)
        _same_plan(counted, scanned)
        assert counted.issues["semantic_duplicate_rows"] == 3 and counted.excluded == {0: [1, 3], 4: [2]}
        read_for_drops = {name for name, columns in reads if "sample_id" in columns}
        assert read_for_drops == ({shards[0].name, shards[4].name} if partitioned else {s.name for s in shards})


def test_the_plan_file_round_trips_and_reads_the_earlier_layout(tmp_path):
    root = write_synthetic_shards(tmp_path / "latents", model_preset("tiny"), rows_per_task=6, rows_per_shard=5)
    plan = make_plan(_data(root, holdout_per_task=1), TASKS_IN_DATA)
    plan.excluded = {1: [0, 2]}
    loaded = DataPlan.load(plan.save(tmp_path / "plan.json"))
    assert json.loads(loaded.to_json()) == json.loads(plan.to_json())
    assert loaded.task_shards("t2i") == plan.task_shards("t2i") and loaded.excluded_rows() == {(1, 0), (1, 2)}
    (tmp_path / "before.json").write_text(plan.to_json())  # an earlier run's plan.json: one object per shard
    assert json.loads(DataPlan.load(tmp_path / "before.json").to_json()) == json.loads(plan.to_json())
    assert json.loads((tmp_path / "plan.json").read_text())["task_rows"] == plan.task_rows


def test_the_manifest_writer_records_the_counts_and_remakes_a_schema_2_index(tmp_path):
    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.manifest import ManifestWriter

    out = tmp_path / "out"
    cfg = PrecomputeConfig(output=str(out), manifest_every=2)

    def record(partition: int, counted: bool) -> dict:
        counts = {"task_rows": {"t2i": 3}, "classes": {"t2i|1x4x4|0": 2, "t2i|1x8x8|0": 1}} if counted else {}
        return {"partition": partition, "shard": f"shards/part-{partition:05d}.parquet", "rows": 3, "bytes": 10,
                "sha256": "0" * 64, "inputs": 3, "inputs_written": 3, "filtered": {}, "quarantined": {},
                "filtered_inputs": 0, "quarantined_inputs": 0, "seconds": {}, "committed_at": 0.0, **counts}

    commits = {0: record(0, counted=False), 1: record(1, counted=True)}
    writer = ManifestWriter(cfg, {}, 2, {})
    for commit in commits.values():
        writer.add(commit)
    writer.flush(1.0)
    index, entries = read_manifest(str(out))
    assert index["schema"] == SCHEMA
    assert "classes" not in entries[0] and entries[1]["classes"] == {"t2i|1x4x4|0": 2, "t2i|1x8x8|0": 1}
    assert entries[1]["task_rows"] == {"t2i": 3}
    (out / "manifest.json").write_text(json.dumps({**index, "schema": "lance-latent-shards/2"}))
    ManifestWriter(cfg, {}, 2, commits).flush(1.0)
    assert read_manifest(str(out)) == (json.loads((out / "manifest.json").read_text()), entries)
    assert json.loads((out / "manifest.json").read_text())["schema"] == SCHEMA
