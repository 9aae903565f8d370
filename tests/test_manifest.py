"""The manifest compacted from commit records (pipelines/data/manifest.py), without Ray: segments per batch of
new commits and their merges, running totals equal to a recomputation, a driver killed between flushes, an
index that disagrees with the commit records, and the /1 layout read by training's reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipelines.data.config import PrecomputeConfig
from pipelines.data.manifest import MERGE_SEGMENTS, ManifestWriter, read_manifest, totals_of
from pipelines.data.writer import read_commits, write_json

ENCODER = {"vae": {"digest": "v"}, "vit": {"digest": "t"}}


def _record(partition: int, rng: random.Random) -> dict:
    inputs = rng.randint(1, 9)
    written = rng.randint(0, inputs)
    filtered = rng.randint(0, inputs - written)
    quarantined = inputs - written - filtered
    return {"partition": partition, "shard": f"shards/part-{partition:05d}.parquet", "rows": written + 1,
            "bytes": rng.randint(100, 10_000), "sha256": f"{partition:064x}", "inputs": inputs,
            "inputs_written": written, "filtered": {"size:too_small": filtered} if filtered else {},
            "quarantined": {"read:missing_file": quarantined} if quarantined else {},
            "filtered_inputs": filtered, "quarantined_inputs": quarantined,
            "seconds": {"decode": rng.random(), "vae": rng.random()}, "committed_at": 0.0}


def _commit(out: Path, record: dict) -> dict:
    (out / "_commits").mkdir(parents=True, exist_ok=True)
    (out / "_commits" / f"part-{record['partition']:05d}.json").write_text(json.dumps(record))
    return record


def _check(out: Path, cfg: PrecomputeConfig, planned: int) -> dict:
    """The manifest lists every committed shard once, in partition order, and its totals (and stats.json's)
    equal those recomputed from the commit records."""
    commits = read_commits(str(out), cfg)
    index, entries = read_manifest(str(out))
    assert [e["partition"] for e in entries] == sorted(commits)
    assert all(e == {k: commits[e["partition"]][k] for k in e} for e in entries)
    assert index["schema"] == "lance-latent-shards/3" and index["encoder"] == ENCODER
    assert (index["partitions_planned"], index["partitions_committed"]) == (planned, len(commits))
    expected = totals_of(commits[p] for p in sorted(commits))
    stats = json.loads((out / "stats.json").read_text())
    for totals in (index["totals"], stats):
        for key, value in expected.items():
            if key == "stage_seconds":
                assert totals[key] == pytest.approx(value)
            else:
                assert totals[key] == value, key
    listed = {Path(s["file"]).name for s in index["segments"]}
    assert {p.name for p in (out / "manifest").iterdir()} == listed, "a segment no index names was left"
    return index


def test_segments_merge_and_totals_stay_those_of_the_commit_records(tmp_path):
    out = tmp_path / "out"
    cfg = PrecomputeConfig(output=str(out), manifest_every=2)
    rng = random.Random(0)
    planned = 2 * MERGE_SEGMENTS * 2 + 5
    order = list(range(planned))
    rng.shuffle(order)  # commits arrive out of partition order
    writer = ManifestWriter(cfg, ENCODER, planned, {})
    for partition in order[:-5]:
        if writer.add(_commit(out, _record(partition, rng))):
            writer.flush(1.0)
    index = _check(out, cfg, planned)
    assert [s["level"] for s in index["segments"]] == [1, 1], "16 segments of level 0 merge into one of level 1"
    assert index["partitions_committed"] == planned - 5

    # A driver killed after three more commits, before its next flush: the next run adds them from the
    # commit records; then the run finishes.
    for partition in order[-5:-2]:
        writer.add(_commit(out, _record(partition, rng)))
    del writer
    commits = read_commits(str(out), cfg)
    resumed = ManifestWriter(cfg, ENCODER, planned, commits)
    assert sorted(r["partition"] for r in resumed.pending) == sorted(order[-5:-2])
    for partition in order[-2:]:
        resumed.add(_commit(out, _record(partition, rng)))
    stats = resumed.flush(2.5)
    index = _check(out, cfg, planned)
    assert index["partitions"] == [[0, planned]] and stats["wall_seconds"] == 2.5
    assert stats["partitions_committed"] == planned


def test_an_index_that_disagrees_with_the_commit_records_is_made_again(tmp_path, lance_log):
    out = tmp_path / "out"
    cfg = PrecomputeConfig(output=str(out), manifest_every=3)
    rng = random.Random(1)
    writer = ManifestWriter(cfg, ENCODER, 10, {})
    for partition in range(10):
        if writer.add(_commit(out, _record(partition, rng))):
            writer.flush(1.0)
    writer.flush(1.0)
    _check(out, cfg, 10)
    (out / "_commits" / "part-00004.json").write_text('{"partition": 4')  # damaged: not committed
    commits = read_commits(str(out), cfg)
    again = ManifestWriter(cfg, ENCODER, 10, commits)
    assert "does not match the commit records" in lance_log.getvalue()
    again.flush(1.0)
    index = _check(out, cfg, 10)
    assert index["partitions"] == [[0, 4], [5, 10]]

    # an index naming a missing segment, and a /1 manifest of an earlier version: made again likewise
    (out / index["segments"][0]["file"]).unlink()
    ManifestWriter(cfg, ENCODER, 10, commits).flush(1.0)
    _check(out, cfg, 10)
    entries = [{k: commits[p][k] for k in ("partition", "shard", "rows", "bytes", "sha256", "inputs")}
               for p in sorted(commits)]
    old = {"schema": "lance-latent-shards/1", "partitions_planned": 10, "partitions_committed": 9,
           "encoder": ENCODER, "shards": entries}
    write_json(str(out), "manifest.json", old, cfg)
    assert read_manifest(str(out))[1] == entries  # /1 is read as it is
    ManifestWriter(cfg, ENCODER, 10, commits).flush(1.0)
    _check(out, cfg, 10)
