"""The precompute job on real Ray (local): every input format, the bad-input corpus, resume after a kill."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lance_core.shards import REQUIRED_COLUMNS, check_schema, shard_rows
from pipelines.data.buckets import bucket_for
from pipelines.data.config import PrecomputeConfig
from pipelines.data.synth import synth_all

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = dict(partition_size=4, buckets=dict(image_area=64 * 64, video_area=64 * 96, vit_area=56 * 56),
            video=dict(max_seconds=1.0), filters=dict(dedup=False))


def _run(input_uri, output, **overrides):
    from pipelines.data.pipeline import run_precompute

    cfg = PrecomputeConfig(input=str(input_uri), output=str(output), **{**TINY, **overrides})
    return run_precompute(cfg, progress=False)


def _shard_rows(output: Path) -> list[dict]:
    from pipelines.data.manifest import read_manifest

    rows = []
    for shard in read_manifest(str(output))[1]:
        table = pq.read_table(output / shard["shard"])
        assert check_schema(table.schema, shard["shard"]) == 2
        assert table.num_rows == shard["rows"]
        rows += shard_rows(table)
    return rows


def _check_manifest(output: Path, stats: dict) -> None:
    """The manifest lists every committed shard once; its totals and stats.json's equal those recomputed from
    the commit records; training's planner reads it."""
    from lance_core.packing import TASKS
    from pipelines.data.manifest import read_manifest, totals_of
    from pipelines.data.writer import read_commits
    from pipelines.train.config import DataSection
    from pipelines.train.plan import make_plan

    commits = read_commits(str(output), PrecomputeConfig(output=str(output)))
    index, entries = read_manifest(str(output))
    assert [e["partition"] for e in entries] == sorted(commits)
    assert index["schema"] == "lance-latent-shards/3" and index["partitions_committed"] == len(commits)
    for key, value in totals_of(commits.values()).items():
        if key == "stage_seconds":
            assert index["totals"][key] == pytest.approx(value) and stats[key] == pytest.approx(value)
        else:
            assert index["totals"][key] == stats[key] == value, key
    if stats["samples_written"]:
        plan = make_plan(DataSection(uris=(str(output),), holdout_per_task=0), dict.fromkeys(TASKS, 1.0))
        assert [s.uri for s in plan.shards] == [f"{output}/{e['shard']}" for e in entries]


def _check_invariant(output: Path) -> dict:
    stats = json.loads((output / "stats.json").read_text())
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"]
    rows = _shard_rows(output)
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a sample was written twice"
    _check_manifest(output, stats)
    return stats


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synth_all(tmp_path_factory.mktemp("synth"), count=6, seed=1)


FORMATS = {"parquet_t2i": "t2i", "parquet_t2v": "t2v", "parquet_i2i": "i2i", "parquet_v2v": "v2v",
           "parquet_i2t": "i2t", "parquet_v2t": "v2t", "webdataset_images": "t2i", "webdataset_videos": "t2v",
           "jsonl": "t2i", "csv": "t2i"}


def _dataset_of(source_uri: str, synth: dict) -> str:
    """The synth dataset a row came from: the one whose file (or, for a manifest, whose folder) holds it."""
    for name, path in synth.items():
        root = str(path.parent if name in ("jsonl", "csv") else path)
        if source_uri.startswith(root):
            return name
    raise AssertionError(f"{source_uri} is in no synth dataset")


def _check_latents(row: dict, task: str) -> None:
    latents = row["target_vae"]
    assert latents.dtype == np.float16 and list(latents.shape) == row["target_vae_shape"]
    frames, height, width, channels = latents.shape
    area = TINY["buckets"]["video_area" if row["target_fps"] else "image_area"]
    _, bucket_w, bucket_h = bucket_for(row["target_width"], row["target_height"], area)
    assert channels == 48 and (height, width) == (bucket_h // 16, bucket_w // 16)
    assert frames == (1 if task in ("t2i", "i2i", "i2t") else (row["target_frames"] - 1) // 4 + 1)
    if task in ("i2i", "v2v"):
        assert row["source_vae"] is not None and row["source_vit"] is not None
        assert row["source_vit_shape"][1] == 64
    if task in ("i2t", "v2t"):
        assert row["answer"] and row["question"] is not None and row["target_vit"] is not None
        feats = row["target_vit"]
        t, h, w = row["target_vit_grid"]
        assert feats.shape == (t * h * w, 64)


def test_every_input_format(ray_local, synth, tmp_path):
    """One run over a folder holding a dataset of every format (WebDataset images and videos, JSONL and CSV
    manifests, the release's Parquet of each task): every record written, each with its task's latents."""
    root = Path(os.path.commonpath([str(p) for p in synth.values()]))
    result = _run(root, tmp_path / "out")
    stats = _check_invariant(tmp_path / "out")
    assert stats["inputs_written"] == stats["inputs"] > 0 and result.partitions >= 1
    by_dataset: dict[str, int] = {}
    for row in _shard_rows(tmp_path / "out"):
        name = _dataset_of(row["source_uri"], synth)
        by_dataset[name] = by_dataset.get(name, 0) + 1
        assert row["task"] == FORMATS[name], (name, row["task"])
        _check_latents(row, FORMATS[name])
    assert set(by_dataset) == set(FORMATS), by_dataset


def test_shards_read_back_with_ray_data(ray_local, synth, tmp_path):
    _run(synth["parquet_t2i"], tmp_path / "out")
    ds = ray_local.data.read_parquet(str(tmp_path / "out" / "shards"))
    assert ds.count() == 6
    names = set(ds.schema().names)
    assert set(REQUIRED_COLUMNS) | {"target_vae", "target_vae_shape"} <= names
    never_filled = [n for n in names
                    if n.startswith("source_v") or n.endswith(("_vit", "_std")) or n == "answer"]
    assert not never_filled  # a t2i shard
    batch = ds.take_batch(2, batch_format="numpy")  # a numpy array per cell, as stored
    latents = np.asarray(batch["target_vae"][0]).reshape(batch["target_vae_shape"][0])
    assert latents.dtype == np.float16 and latents.shape[-1] == 48 and np.isfinite(latents).all()
    # shards whose columns differ (t2i and i2t) read together
    _run(synth["parquet_i2t"], tmp_path / "qa")
    both = ray_local.data.read_parquet([str(tmp_path / "out" / "shards"), str(tmp_path / "qa" / "shards")])
    rows = both.take_all()
    assert len(rows) == 12 and {"target_vit", "answer", "target_vae"} <= set(both.schema().names)
    for row in rows:
        if row["task"] == "i2t":
            t, h, w = row["target_vit_grid"]
            assert np.asarray(row["target_vit"]).reshape(row["target_vit_shape"]).shape == (t * h * w, 64)
        else:
            assert row.get("target_vit") is None and row.get("answer") is None


def test_bad_input_corpus_is_quarantined_and_the_run_goes_on(ray_local, tmp_path):
    from tests.data_corpus import build_corpus

    manifest, expected = build_corpus(tmp_path / "corpus")
    _run(manifest, tmp_path / "out", partition_size=5)
    stats = _check_invariant(tmp_path / "out")
    quarantine = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    by_name = {q["source_uri"]: q for q in quarantine}
    lines = [json.loads(l) for l in manifest.read_text().splitlines()]
    written = {r["source_uri"] for r in _shard_rows(tmp_path / "out")}
    for index, line in enumerate(lines):
        name = line["uri"].split("/")[-1]
        outcome, reason = expected[name]
        uri = f"{manifest}#{index}"
        if outcome == "quarantined":
            assert uri in by_name, name
            assert by_name[uri]["reason"] == reason, (name, by_name[uri])
            assert by_name[uri]["stage"] in ("read", "decode")
        elif outcome == "written":
            assert uri in written, name
        else:
            assert uri not in written and uri not in by_name, name
    assert stats["filtered_by_reason"].get("size:too_small") == 1
    assert stats["filtered_by_reason"].get("size:extreme_aspect") == 1
    assert stats["filtered_by_reason"].get("caption:missing_caption") == 1
    from pipelines.data.report import stage_rows

    rows = stage_rows(stats)
    assert rows[0][1] == stats["inputs"] and rows[-1][2] == stats["inputs_written"]
    assert all(prev[2] == nxt[1] and nxt[2] <= nxt[1] for prev, nxt in zip(rows, rows[1:]))


def test_non_utf8_caption_is_quarantined(ray_local, tmp_path, synth):
    tar_path = tmp_path / "bad.tar"
    jpeg = next(iter(tarfile.open(synth["webdataset_images"]).getmembers()))
    data = tarfile.open(synth["webdataset_images"]).extractfile(jpeg).read()
    with tarfile.open(tar_path, "w") as tar:
        for name, payload in (("a.jpg", data), ("a.txt", b"caf\xe9 \xff\xfe")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    _run(tar_path, tmp_path / "out")
    quarantine = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    assert [q["reason"] for q in quarantine] == ["caption_not_utf8"]


def test_exact_duplicates_are_dropped_once(ray_local, tmp_path):
    from pipelines.data.synth import write_manifest

    folder = tmp_path / "dup"
    write_manifest(folder, "jsonl", 3, seed=5)
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    (folder / "manifest.jsonl").write_text("\n".join(lines + lines) + "\n")
    _run(folder / "manifest.jsonl", tmp_path / "out", filters=dict(dedup=True), partition_size=2)
    stats = _check_invariant(tmp_path / "out")
    assert stats["inputs_written"] == 3 and stats["filtered_by_reason"]["dedup:exact_duplicate"] == 3


def _settled_commits(out: Path, quiet_seconds: float = 3.0) -> int:
    """Commit records once none has appeared for ``quiet_seconds``: a Ray worker of the killed run may finish
    the write it was in before it notices that its driver is gone."""
    count, since = -1, time.time()
    while time.time() - since < quiet_seconds:
        now = len(list((out / "_commits").glob("part-*.json")))
        if now != count:
            count, since = now, time.time()
        time.sleep(0.2)
    return count


KILL_ORDER = ["photo", "photo_q30", "chart", "photo_crop_top", "photo_resized", "chart", "photo_watermark",
              "chart_watermark"]
"""Real media and their variants (tests/near_media.py), one per partition: near duplicates before and after
the kill, an exact copy, another crop of the photo (kept)."""


def test_kill_and_resume_loses_and_duplicates_nothing(ray_local, tmp_path, shared_dir):
    """With exact and near dedup on, the index spread over two actors: the run killed after its first commit
    and resumed ends as one uninterrupted run would, each input once."""
    from tests.near_media import write_variant_parquet

    source = write_variant_parquet(tmp_path / "in" / "part-0.parquet", shared_dir / "media", KILL_ORDER)
    out = tmp_path / "out"
    config = tmp_path / "cfg.yaml"
    one_at_a_time = dict(partition_size=1, manifest_every=1, encoders=dict(max_decode_tasks=1),
                         filters=dict(dedup=True, dedup_actors=2, near_dedup=True))
    config.write_text(json.dumps({**TINY, **one_at_a_time}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.precompute", "--config", str(config), "--input",
                             str(source), "--output", str(out), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "_commits").glob("*.json")) if (out / "_commits").exists() \
            else time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed_before = _settled_commits(out)
    assert 1 <= committed_before < len(KILL_ORDER), "the kill should land mid-run"
    result = _run(source, out, **one_at_a_time)
    assert result.skipped == committed_before
    stats = _check_invariant(out)
    assert stats["partitions_committed"] == stats["inputs"] == len(KILL_ORDER)
    assert stats["filtered_by_reason"] == {"dedup:near_duplicate": 4, "dedup:exact_duplicate": 1}
    written = sorted(int(r["source_uri"].rsplit("#", 1)[1]) for r in _shard_rows(out))
    assert written == [0, 2, 3]  # photo, chart, the crop; every variant after its original is dropped


def _descendant_with(proc: subprocess.Popen, marker: str, deadline: float):
    import psutil

    while time.time() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if marker in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    return None


def test_killed_encoder_actor_is_restarted_and_nothing_is_lost(ray_local, tmp_path, synth):
    out = tmp_path / "out"
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({**TINY, "partition_size": 2}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.precompute", "--config", str(config), "--input",
                             str(synth["parquet_t2i"]), "--output", str(out), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        victim = _descendant_with(proc, "VAEEncoder", time.time() + 240)
        assert victim is not None, "the VAE encoder actor never started"
        victim.kill()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    stats = _check_invariant(out)
    assert stats["partitions_committed"] == 3 and stats["inputs_written"] == 6
    rerun = _run(synth["parquet_t2i"], out, partition_size=2)
    assert rerun.skipped == 3 and rerun.committed_now == 0
    assert _check_invariant(out)["inputs_written"] == 6


def test_bad_config_field_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition_size: 0\nlatent_dtype: fp8\n")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "precompute", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "precompute.partition_size" in out.stderr and "precompute.latent_dtype" in out.stderr


def test_decode_runs_in_its_own_tasks_not_fused_into_the_encoder_actors(ray_local, tmp_path, synth, capsys):
    from pipelines.data.pipeline import _build_dataset
    from pipelines.data.plan import FilesPlan
    from pipelines.data.sources import list_inputs

    cfg = PrecomputeConfig(input=str(synth["parquet_t2i"]), output=str(tmp_path / "out"), **TINY)
    plan = FilesPlan(list_inputs(cfg), cfg.partition_size)
    _build_dataset(cfg, plan, list(range(plan.partitions)), dedup=None).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(_partition_rows)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(VAEEncoder)]" in optimized


def test_posterior_std_is_stored_beside_the_mean(ray_local, synth, tmp_path):
    """``encoders.store_posterior_std``: every VAE slot gets its normalised std (same shape and dtype); the
    mean is what the default run writes."""
    _run(synth["parquet_v2v"], tmp_path / "mean")
    _run(synth["parquet_v2v"], tmp_path / "std", encoders=dict(store_posterior_std=True))
    plain = {r["sample_id"]: r for r in _shard_rows(tmp_path / "mean")}
    rows = _shard_rows(tmp_path / "std")
    assert rows and all("target_vae_std" not in r for r in plain.values())  # never filled: not written
    for row in rows:
        assert np.array_equal(row["target_vae"], plain[row["sample_id"]]["target_vae"])
        for slot in ("target", "source"):
            std = row[f"{slot}_vae_std"]
            assert std.shape == row[f"{slot}_vae"].shape and std.shape[-1] == 48 and bool((std > 0).all())
