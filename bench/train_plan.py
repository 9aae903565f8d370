"""Training's data plan (pipelines/train/plan.py) from manifests of 10^6 to 10^9 rows in 10^3 to 10^5 shards.

    python bench/train_plan.py [--quick] [--out FILE]

Each point is a fabricated latent shard root: a /3 manifest whose segments count every shard's rows per
task and per resolution class (image and video buckets, a few classes per shard, one of them over the
resolution limit the plan applies), and ``shards/`` holding one hard link per shard to a small real shard
(the rows the held-out pick reads; the manifest counts ``rows / shards`` rows for each). The plan is made in
a fresh Python process per point, which reports its seconds, its peak resident set (``ru_maxrss``) and the
resident set before planning (the imports), the plan file the workers load (size, and seconds to load it).

Plan time and memory must follow the shards, not the rows: the two 10^5-shard points (10^8 and 10^9 rows)
should match, as should the two 10^3-shard points of ``--quick``. Before, the plan read four columns of every
row into Python objects (about 400 bytes a row: 370 GiB at 10^9 rows) and checked each shard with a request.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, print_table, write_json

POINTS = [(10**6, 10**3), (10**7, 10**4), (10**8, 10**5), (10**9, 10**5)]
QUICK_POINTS = [(10**6, 10**3), (10**7, 10**3)]
CLASSES = {  # resolution class -> share of a shard's rows
    "t2i|1x48x48|0": 0.20, "t2i|1x42x56|0": 0.10, "t2i|1x56x42|0": 0.10, "i2i|1x48x48|0": 0.10,
    "t2v|21x30x53|1": 0.10, "t2v|5x30x53|1": 0.10, "i2t||0": 0.20, "v2t||0": 0.10,
}
RESOLUTION = {"max_video_tokens": 20_000}
"""Leaves out the 21x30x53 (33,390-token) video class: the limit is applied from the counts."""
TEMPLATE_ROWS_PER_CLASS = 4
SEGMENT_ROWS = 2**15
"""Shard entries per manifest segment; the shards of a segment link to one copy of the template (a file has
at most 65,000 links on ext4)."""


def _template_shard(path: Path) -> None:
    """A real shard of the plan's columns: a few rows of every class."""
    import pyarrow.parquet as pq

    from lance_core.shards import shard_table
    from pipelines.runtime.shard_manifest import parse_class

    rows = []
    for key in CLASSES:
        task, shape, video = parse_class(key)
        for k in range(TEMPLATE_ROWS_PER_CLASS):
            rows.append({"sample_id": f"{len(rows):032x}", "source_uri": f"bench://{key}/{k}",
                         "content_sha256": "0" * 64, "task": task, "caption": "a caption", "clip_index": 0,
                         "target_vae_shape": [*shape, 16] if shape else None,
                         "target_fps": (16.0 if video else 0.0) if shape else None})
    pq.write_table(shard_table(rows), path)


def _counts(rows: int) -> tuple[dict[str, int], dict[str, int]]:
    """(task_rows, classes) of a shard of ``rows`` rows split by :data:`CLASSES`."""
    keys = list(CLASSES)
    classes = {key: int(rows * CLASSES[key]) for key in keys}
    classes[keys[0]] += rows - sum(classes.values())
    tasks: dict[str, int] = {}
    for key, count in classes.items():
        task = key.split("|", 1)[0]
        tasks[task] = tasks.get(task, 0) + count
    return tasks, classes


def fabricate(root: Path, rows: int, shards: int) -> None:
    """A latent shard root of ``shards`` shards and ``rows`` rows: segments, manifest.json, hard links."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.runtime.shard_manifest import ENTRY_SCHEMA, MANIFEST_FILE, MANIFEST_FOLDER, SCHEMA

    (root / "shards").mkdir(parents=True)
    (root / MANIFEST_FOLDER).mkdir()
    first = root / "template-0.parquet"
    _template_shard(first)
    size = first.stat().st_size
    per_shard = rows // shards
    task_rows, classes = _counts(per_shard)
    segments = []
    for start in range(0, shards, SEGMENT_ROWS):
        partitions = range(start, min(shards, start + SEGMENT_ROWS))
        template = root / f"template-{len(segments)}.parquet"
        if not template.exists():
            shutil.copyfile(first, template)
        for p in partitions:
            os.link(template, root / "shards" / f"part-{p:07d}.parquet")
        n = len(partitions)
        table = pa.table({"partition": list(partitions), "shard": [f"shards/part-{p:07d}.parquet" for p in partitions],
                          "rows": [per_shard] * n, "bytes": [size] * n, "sha256": [f"{p:064x}" for p in partitions],
                          "inputs": [per_shard] * n, "task_rows": [task_rows] * n, "classes": [classes] * n},
                         schema=ENTRY_SCHEMA)
        name = f"{MANIFEST_FOLDER}/seg-{len(segments):06d}.parquet"
        pq.write_table(table, root / name, compression="zstd")
        segments.append({"file": name, "level": 0, "shards": n})
    index = {"schema": SCHEMA, "partitions_planned": shards, "partitions_committed": shards,
             "partitions": [[0, shards]], "segments": segments}
    (root / MANIFEST_FILE).write_text(json.dumps(index))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def measure(root: str) -> dict:
    """In this (fresh) process: plan ``root``, save and load the plan; seconds and peak resident set."""
    from pipelines.train.config import DataSection
    from pipelines.train.plan import DataPlan, make_plan

    data = DataSection(uris=(root,), resolution=RESOLUTION)
    before = _rss_mib()
    started, cpu = time.perf_counter(), time.process_time()
    plan = make_plan(data, {"t2i": 1.0, "t2v": 1.0, "i2t": 1.0})
    plan_s, plan_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    peak = _rss_mib()
    path = plan.save(Path(root) / "plan.json")
    started = time.perf_counter()
    loaded = DataPlan.load(path)
    load_s = time.perf_counter() - started
    assert loaded.task_rows == plan.task_rows and len(loaded.shards) == len(plan.shards)
    return {"plan_s": plan_s, "plan_cpu_s": plan_cpu_s, "import_mib": before, "driver_peak_mib": peak,
            "plan_file_mib": path.stat().st_size / 2**20, "load_s": load_s, "trainable": sum(plan.task_rows.values()),
            "filtered": plan.issues["filtered_resolution_rows"], "held_out": sum(map(len, plan.holdout.values()))}


def run_point(rows: int, shards: int, workdir: Path) -> dict:
    root = workdir / f"root-{rows}-{shards}"
    started = time.perf_counter()
    fabricate(root, rows, shards)
    fabricate_s = time.perf_counter() - started
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    done = subprocess.run([sys.executable, __file__, "--measure", str(root)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"planning {root} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(root)
    return {"rows": rows, "shards": shards, "rows_per_shard": rows // shards, "fabricate_s": fabricate_s,
            **result, "us_per_shard": result["plan_s"] / shards * 1e6,
            "plan_mib": result["driver_peak_mib"] - result["import_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^6 and 10^7 rows in 10^3 shards: seconds")
    parser.add_argument("--out")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="train-plan-bench-"))
    try:
        rows = [run_point(n, shards, workdir) for n, shards in (QUICK_POINTS if args.quick else POINTS)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = rows[0]
    for row in rows:
        row["rows_ratio"] = row["rows"] / base["rows"]
        row["shards_ratio"] = row["shards"] / base["shards"]
        row["time_ratio"] = row["plan_s"] / base["plan_s"]
        row["memory_ratio"] = row["plan_mib"] / base["plan_mib"] if base["plan_mib"] > 0 else None
    print(f"{os.cpu_count()} CPUs, load {load_average():.1f}; driver peak = resident set of the planning process "
          "(imports included); plan MiB = its growth while planning")
    print_table(rows, [("rows", "rows", ".0e"), ("shards", "shards", "d"), ("rows_per_shard", "rows/shard", "d"),
                       ("plan_s", "plan s", ".2f"), ("plan_cpu_s", "CPU s", ".2f"), ("us_per_shard", "us/shard", ".0f"),
                       ("driver_peak_mib", "driver peak MiB", ".0f"), ("plan_mib", "plan MiB", ".0f"),
                       ("rows_ratio", "rows x", ".0f"), ("shards_ratio", "shards x", ".0f"),
                       ("time_ratio", "time x", ".1f"), ("memory_ratio", "memory x", ".1f"),
                       ("plan_file_mib", "plan file MiB", ".2f"), ("load_s", "load s", ".2f"),
                       ("fabricate_s", "fabricate s", ".1f")])
    write_json("train_plan", {"quick": args.quick, "cpus": os.cpu_count(), "load": load_average(),
                              "resolution": RESOLUTION, "classes": CLASSES, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
