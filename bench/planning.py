"""Planning a precompute (pipelines/data/plan.py): record counts in Ray tasks, the plan stored as Parquet.

    python bench/planning.py [--quick] [--out FILE]

Sources of input files:
- ``jsonl``: tiny JSONL manifests on the local disk (10^3 and 10^4 files), each opened and counted by a task;
  the listing is the real one (``list_input_files``);
- ``fabricated``: a listing made in memory and a count function that makes the counts up (no file is read),
  10^3 to 10^5 files: the planning machinery (tasks, the ordered window, the streamed table) without storage;
- ``latency``: made-up counts that each wait ``LATENCY_S``, as counting on an object store does (a request
  per file, or several for a tar).

Figures per point (Ray started and warm before): the listing's seconds and the Python heap it holds; the
plan's seconds (least of ``REPS``) and the driver process's CPU seconds per file (its threads; the tasks'
work excluded: steadier than wall time on a shared host); the driver's peak while planning, beyond the
listing it is given (tracemalloc: Python objects; Arrow's buffers are one row group of the table), and the
growth of its resident set; the plan on disk per input file; a rerun reading the plan back (``plan.json``,
then one partition's segments from its row groups): seconds and peak. Ratios are against the smallest point
of the same series, measured in the same run. Two more rows keep the file count and change the records per
file (10 vs 10^4): the driver's memory must not follow the record count. For the ``jsonl`` and ``latency``
points, the same files counted one after another on the driver (what planning did before) give a baseline
(``tasks/driver``).

A second table: commit records through the manifest writer (pipelines/data/manifest.py) at 10^4 and 10^5
shards (quick: 500 and 10^3): flush time, the index and its segments, the driver's peak, a reader's
time, and the size of the layout before it (every shard listed in manifest.json, rewritten every 64 commits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, peak_rss_increase, print_table, write_json  # noqa: E402

LATENCY_S = 0.005
"""Seconds per file of the ``latency`` source."""
REPS = 3
"""Plans timed per point; the least is reported (other jobs share the host and only slow a run down)."""


def fabricated_counter(records_per_file: int):
    """A count function of the planning tasks that makes ``records_per_file`` up for every file."""

    def count(batch, storage, manifest) -> list[int]:
        return [records_per_file] * len(batch)

    return count


def latency_counter(seconds: float):
    """A count function that waits ``seconds`` per file, as a request to an object store does (an S3 GET
    answers in about 10-50 ms), and counts one record."""

    def count(batch, storage, manifest) -> list[int]:
        time.sleep(seconds * len(batch))
        return [1] * len(batch)

    return count


def write_jsonl_files(folder: Path, files: int) -> None:
    folder.mkdir(parents=True)
    for index in range(files):
        lines = "".join(f'{{"uri": "m/{index}-{k}.jpg", "caption": "a caption"}}\n' for k in range(1 + index % 5))
        (folder / f"part-{index:07d}.jsonl").write_text(lines)


def _python_peak(fn) -> tuple[object, int]:
    """(fn(), peak Python heap above what was held when it started); tracemalloc runs already (it is started
    once and never stopped: starting and stopping it while Ray's threads allocate can crash the process)."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    return result, tracemalloc.get_traced_memory()[1] - base


def _plan_bytes(output: Path) -> int:
    return (output / "plan.json").stat().st_size + (output / "plan" / "inputs.parquet").stat().st_size


class Point:
    """One source at one number of files: its listing, count function and fresh output folders."""

    def __init__(self, source: str, files: int, workdir: Path, records_per_file: int = 100) -> None:
        from pipelines.data.sources import count_batch

        self.source, self.files, self.workdir, self.records_per_file = source, files, workdir, records_per_file
        self.folder = workdir / f"{source}-{files}"
        self.runs = 0
        if source == "jsonl":
            if not self.folder.exists():
                write_jsonl_files(self.folder, files)
            self.count = count_batch
        elif source == "latency":
            self.count = latency_counter(LATENCY_S)
        else:
            self.count = fabricated_counter(records_per_file)

    def listing(self) -> list[tuple[str, str]]:
        from pipelines.data.config import PrecomputeConfig
        from pipelines.data.sources import list_input_files

        if self.source == "jsonl":
            return list_input_files(PrecomputeConfig(input=str(self.folder)))
        return [(f"s3://bucket/raw/part-{index:09d}.jsonl", "jsonl") for index in range(self.files)]

    def cfg(self):
        from pipelines.data.config import PrecomputeConfig

        self.runs += 1
        output = self.workdir / f"out-{self.source}-{self.files}-{self.records_per_file}-{self.runs}"
        shutil.rmtree(output, ignore_errors=True)
        return PrecomputeConfig(input=str(self.folder), output=str(output))

    def plan(self, listed, cfg=None):
        from pipelines.data.plan import make_plan

        return make_plan(cfg or self.cfg(), listed, self.count)

    @staticmethod
    def reread(cfg):
        from pipelines.data.plan import stored_plan

        plan = stored_plan(cfg)
        return plan.segments(plan.partitions // 2, cfg.storage)

    def timings(self) -> dict:
        started = time.perf_counter()
        listed = self.listing()
        listing_seconds = time.perf_counter() - started
        seconds, cpu = [], []
        for _ in range(REPS):
            cfg = self.cfg()
            started, cpu_started = time.perf_counter(), time.process_time()
            plan = self.plan(listed, cfg)
            seconds.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
        plan_seconds = min(seconds)
        started = time.perf_counter()
        self.reread(cfg)
        reread_seconds = time.perf_counter() - started
        rss = peak_rss_increase(lambda: self.plan(listed))
        driver = None
        if self.source != "fabricated":  # what planning did before: every file counted in turn on the driver
            started = time.perf_counter()
            self.count(listed, cfg.storage, cfg.manifest)
            driver = time.perf_counter() - started
        return {"source": self.source, "files": self.files, "records": plan.records, "listing_s": listing_seconds,
                "plan_s": plan_seconds, "us_per_file": plan_seconds / self.files * 1e6, "rss_mib": rss / 2**20,
                "driver_cpu_us_per_file": min(cpu) / self.files * 1e6,
                "plan_bytes_per_file": _plan_bytes(Path(cfg.output)) / self.files,
                "reread_ms": reread_seconds * 1e3, "driver_count_s": driver}

    def memory(self) -> dict:
        listed, listing_bytes = _python_peak(self.listing)
        cfg = self.cfg()
        _, plan_peak = _python_peak(lambda: self.plan(listed, cfg))
        _, reread_peak = _python_peak(lambda: self.reread(cfg))
        return {"listing_mib": listing_bytes / 2**20, "plan_peak_mib": plan_peak / 2**20,
                "reread_peak_kib": reread_peak / 2**10}


def commit_record(partition: int) -> dict:
    """A commit record of the shape the writer makes (pipelines/data/writer.py ``write_partition``)."""
    return {"partition": partition, "shard": f"shards/part-{partition:05d}.parquet", "rows": 1000,
            "bytes": 221_000_000 + partition, "sha256": hashlib.sha256(b"%d" % partition).hexdigest(),
            "inputs": 1000,
            "inputs_written": 990, "filtered": {"size:too_small": 6, "caption:missing_caption": 2},
            "quarantined": {"decode:undecodable_image": 2}, "filtered_inputs": 8, "quarantined_inputs": 2,
            "seconds": {"decode": 41.5, "vae": 7.9, "vit": 3.1}, "committed_at": 1.8e9 + partition}


def bookkeeping(shards: int, workdir: Path, traced: bool) -> dict:
    """``shards`` commit records through the manifest writer (``manifest_every`` 64): flush times, the index
    and segments on disk, the driver's peak, a reader's time; the layout before it (every entry in
    manifest.json, rewritten whole every 64 commits) by the size of its entries."""
    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.manifest import ManifestWriter, read_manifest

    output = workdir / f"manifest-{shards}-{traced}"
    cfg = PrecomputeConfig(output=str(output), manifest_every=64)
    encoder = {"vae": {"digest": "0" * 64}, "vit": {"digest": "1" * 64}}

    def run() -> list[float]:
        writer = ManifestWriter(cfg, encoder, shards, {})
        flushes = []
        for partition in range(shards):
            if writer.add(commit_record(partition)):
                started = time.perf_counter()
                writer.flush(1.0)
                flushes.append(time.perf_counter() - started)
        writer.flush(1.0)
        return flushes

    if traced:
        _, peak = _python_peak(run)
        return {"peak_mib": peak / 2**20}
    flushes = run()
    started = time.perf_counter()
    index, entries = read_manifest(str(output))
    read_seconds = time.perf_counter() - started
    fields = ("partition", "shard", "rows", "bytes", "sha256", "inputs")
    entry_bytes = sum(len(json.dumps({k: commit_record(p)[k] for k in fields}, indent=2)) + 4
                      for p in range(64)) / 64
    rewrites = shards // 64
    return {"shards": len(entries), "flush_ms": statistics.mean(flushes) * 1e3, "flush_max_ms": max(flushes) * 1e3,
            "index_kib": (output / "manifest.json").stat().st_size / 2**10, "segments": len(index["segments"]),
            "segment_bytes_per_shard": sum(f.stat().st_size for f in (output / "manifest").iterdir()) / shards,
            "read_s": read_seconds, "before_index_kib": entry_bytes * shards / 2**10,
            "before_written_mib": entry_bytes * 64 * rewrites * (rewrites + 1) / 2 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^2 and 10^3 files: seconds")
    parser.add_argument("--out")
    args = parser.parse_args()
    from pipelines.runtime.ray_session import ensure_ray, repo_pythonpath

    sizes = {"jsonl": [100], "fabricated": [100, 1000], "latency": [256]} if args.quick else \
        {"jsonl": [1000, 10_000], "fabricated": [1000, 10_000, 100_000], "latency": [256, 1024]}
    records_at = sizes["fabricated"][1]
    sizes["shards"] = [500, 1000] if args.quick else [10_000, 100_000]
    ensure_ray(local_env=repo_pythonpath())
    workdir = Path(tempfile.mkdtemp(prefix="plan-bench-"))
    try:
        Point("fabricated", 200, workdir).timings()  # warm: the first tasks start the worker processes
        points = [(Point(source, files, workdir), source) for source in ("jsonl", "fabricated", "latency")
                  for files in sizes[source]]
        per_file = (10, 1000 if args.quick else 10_000)
        points += [(Point("fabricated", records_at, workdir, n), "records per file") for n in per_file]
        rows = [point.timings() | {"series": series} for point, series in points]
        ledger = [bookkeeping(n, workdir, traced=False) for n in sizes["shards"]]
        tracemalloc.start()
        for row, (point, _) in zip(rows, points):
            row.update(point.memory())
        for row, n in zip(ledger, sizes["shards"]):
            row.update(bookkeeping(n, workdir, traced=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for row in rows:
        base = next(r for r in rows if r["series"] == row["series"])  # the smallest point of its series
        row["baseline"] = f"{base['source']} {base['files']} x {base['records'] // base['files']}"
        row["files_ratio"] = row["files"] / base["files"]
        row["records_ratio"] = row["records"] / base["records"]
        row["time_ratio"] = row["plan_s"] / base["plan_s"]
        row["peak_ratio"] = row["plan_peak_mib"] / base["plan_peak_mib"]
        row["tasks_over_driver"] = row["plan_s"] / row["driver_count_s"] if row["driver_count_s"] else None
    print(f"{os.cpu_count()} CPUs, load {load_average():.1f}")
    print_table(rows, [("source", "source", "s"), ("files", "files", "d"), ("records", "records", "d"),
                       ("listing_s", "list s", ".3f"), ("plan_s", "plan s", ".2f"),
                       ("us_per_file", "us/file", ".0f"), ("driver_cpu_us_per_file", "driver CPU us/file", ".0f"),
                       ("files_ratio", "files x", ".0f"), ("records_ratio", "records x", ".0f"),
                       ("time_ratio", "time x", ".2f"),
                       ("listing_mib", "listing MiB", ".2f"), ("plan_peak_mib", "plan peak MiB", ".2f"),
                       ("peak_ratio", "peak x", ".2f"), ("rss_mib", "RSS+ MiB", ".1f"),
                       ("plan_bytes_per_file", "plan B/file", ".1f"), ("reread_ms", "reread ms", ".1f"),
                       ("reread_peak_kib", "reread KiB", ".0f"), ("driver_count_s", "driver count s", ".2f"),
                       ("tasks_over_driver", "tasks/driver", ".2f"), ("baseline", "ratios vs", "s")])
    for row in ledger:
        row["flush_ratio"] = row["flush_ms"] / ledger[0]["flush_ms"]
        row["peak_ratio"] = row["peak_mib"] / ledger[0]["peak_mib"]
    print("\nmanifest from commit records (manifest_every 64), against the smallest point; 'before': every entry "
          "in manifest.json, rewritten whole every 64 commits")
    print_table(ledger, [("shards", "shards", "d"), ("flush_ms", "flush ms", ".1f"),
                         ("flush_max_ms", "max ms", ".1f"),
                         ("flush_ratio", "flush x", ".2f"), ("index_kib", "index KiB", ".1f"),
                         ("segments", "segments", "d"), ("segment_bytes_per_shard", "segment B/shard", ".1f"),
                         ("peak_mib", "peak MiB", ".2f"), ("peak_ratio", "peak x", ".2f"),
                         ("read_s", "read s", ".3f"), ("before_index_kib", "before: index KiB", ".0f"),
                         ("before_written_mib", "before: MiB rewritten", ".0f")])
    write_json("planning", {"quick": args.quick, "cpus": os.cpu_count(), "load": load_average(), "rows": rows,
                            "manifest": ledger}, args.out)


if __name__ == "__main__":
    main()
