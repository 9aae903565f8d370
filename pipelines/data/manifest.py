"""The manifest of a latent shard root, compacted from the commit records (``_commits/``, the truth) as they
arrive, so that no step rereads or rewrites all of them:

- ``manifest/seg-NNNNNN.parquet``: the shard entries (partition, shard, rows, bytes, sha256, inputs, and the
  rows per task and per resolution class that training's plan reads instead of the rows) of a batch of new
  commit records, one segment per ``manifest_every`` of them. Whenever ``MERGE_SEGMENTS``
  segments of one level follow each other they are merged, row group by row group, into one segment of the
  next level, so a manifest of n shards has O(log n) segments.
- ``manifest.json``: schema ``lance-latent-shards/3``, the ``encoder`` record, partitions planned and
  committed, the running totals of the commit records (``totals``: the figures of stats.json, each batch of
  new records added to them), the partitions it covers as [start, stop) ranges, and its segment files.
- ``stats.json``: the totals, the partition counts and the wall time of the runs.

A segment is written before the index that names it, and removed only once an index that no longer names it
is written: a segment no index names (a driver killed in between) is removed by a later flush. A run starts
from the recorded index and adds the commit records it does not cover; an index that covers a partition
without a readable commit record (one damaged since), or names a missing segment, is made again from the
commit records. Manifests of schema /1 (every shard listed in ``manifest.json``) and /2 (segments without the
counts) are read as well; a run that finds one makes its index again from the commit records (commit records
written before the counts give entries without them).
"""

from __future__ import annotations

import bisect
import io
import logging
import math

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.runtime.shard_manifest import (  # noqa: F401 - the read side, re-exported
    ENTRY_SCHEMA,
    MANIFEST_FILE,
    MANIFEST_FOLDER,
    SCHEMA,
    manifest_entries,
    read_manifest,
)
from pipelines.runtime.storage import filesystem, join_uri, open_input, with_retries

from .config import PrecomputeConfig
from .writer import DamagedFileError, _is_local, put_whole, read_json, write_json

log = logging.getLogger("lance.precompute")
MERGE_SEGMENTS = 16
REBUILD_SEGMENT_ROWS = 2**16
"""Shard entries per segment when a manifest is made again from every commit record."""
SUMS = {"inputs": "inputs", "inputs_written": "inputs_written", "inputs_filtered": "filtered_inputs",
        "inputs_quarantined": "quarantined_inputs", "samples_written": "rows", "bytes_written": "bytes"}
"""Totals that sum one field of the commit records: total -> field."""
COUNTERS = {"filtered_by_reason": "filtered", "quarantined_by_reason": "quarantined", "stage_seconds": "seconds"}
"""Totals that add up one counter field (reason or stage -> number) of the commit records: total -> field."""


# ------------------------------------------------------------------------------------------------ totals
def empty_totals() -> dict:
    return {**dict.fromkeys(SUMS, 0), **{total: {} for total in COUNTERS}}


def add_to_totals(totals: dict, record: dict) -> None:
    for total, name in SUMS.items():
        totals[total] += record[name]
    for total, name in COUNTERS.items():
        counts = totals[total]
        for key, value in record.get(name, {}).items():
            counts[key] = counts.get(key, 0) + value


def totals_of(records) -> dict:
    """The totals of ``records`` computed afresh (what the running totals must equal)."""
    totals = empty_totals()
    for record in records:
        add_to_totals(totals, record)
    return totals


def stats_of(totals: dict, planned: int, committed: int, seconds: float) -> dict:
    """stats.json: ``seconds`` is the wall time of every run that committed partitions."""
    copied = {key: dict(value) if isinstance(value, dict) else value for key, value in totals.items()}
    return {"partitions_planned": planned, "partitions_committed": committed, **copied, "wall_seconds": seconds}


# ------------------------------------------------------------------------------------------------ ranges
def add_ranges(ranges: list[list[int]], partitions: list[int]) -> list[list[int]]:
    """[start, stop) ranges covering ``ranges`` and ``partitions``, sorted and merged."""
    merged: list[list[int]] = []
    for start, stop in sorted([*map(tuple, ranges), *((p, p + 1) for p in partitions)]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def covers(ranges: list[list[int]], partition: int) -> bool:
    at = bisect.bisect_right([start for start, _ in ranges], partition) - 1
    return at >= 0 and partition < ranges[at][1]


# ------------------------------------------------------------------------------------------------ reading
# ------------------------------------------------------------------------------------------------ writing
def _level(shards: int, every: int) -> int:
    """The level of a segment of ``shards`` entries: level L holds about every x MERGE_SEGMENTS^L."""
    return max(0, math.floor(math.log(max(shards / every, 1), MERGE_SEGMENTS)))


class ManifestWriter:
    """The driver's side: ``add`` each new commit record; ``flush`` when ``add`` says a segment is full and at
    the end of a run (a segment, merges, the index, stats.json)."""

    def __init__(self, cfg: PrecomputeConfig, encoder: dict, planned: int, commits: dict[int, dict]) -> None:
        self.cfg, self.encoder, self.planned = cfg, encoder, planned
        self.fs = filesystem(cfg.output, cfg.storage)
        self.folder = join_uri(cfg.output, MANIFEST_FOLDER)
        if _is_local(self.fs):
            self.fs.makedirs(self.folder, exist_ok=True)
        self.index = self._recorded(commits) or self._fresh()
        self.pending = [commits[p] for p in sorted(commits) if not covers(self.index["partitions"], p)]

    def _fresh(self) -> dict:
        numbers = [int(name[4:10]) for name in self._files() if name.startswith("seg-")]
        return {"schema": SCHEMA, "partitions_planned": self.planned, "partitions_committed": 0,
                "encoder": self.encoder, "totals": empty_totals(), "partitions": [], "segments": [],
                "next_segment": max(numbers, default=-1) + 1}

    def _files(self) -> list[str]:
        names = with_retries(f"listing {self.folder}", self.cfg.storage,
                             lambda: self.fs.ls(self.folder, detail=False) if self.fs.exists(self.folder) else [])
        return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in names)

    def _recorded(self, commits: dict[int, dict]) -> dict | None:
        """The recorded index if it is one this writer continues: schema /3, covering only partitions that
        have a readable commit record, every segment present; else None (made again from the records)."""
        try:
            index = read_json(self.cfg.output, MANIFEST_FILE, self.cfg)
        except DamagedFileError as err:
            log.warning(f"{err}; it is made again from the commit records")
            return None
        if not isinstance(index, dict) or index.get("schema") != SCHEMA:
            return None
        present = set(self._files())
        try:
            covered = sum(1 for p in commits if covers(index["partitions"], p))
            whole = covered == index["partitions_committed"] and all(
                segment["file"].rsplit("/", 1)[-1] in present for segment in index["segments"])
        except (KeyError, TypeError, IndexError):
            whole = False
        if not whole:
            log.warning(f"{join_uri(self.cfg.output, MANIFEST_FILE)} does not match the commit records; it is "
                        "made again from them")
            return None
        return {**index, "partitions_planned": self.planned, "encoder": self.encoder}

    def add(self, record: dict) -> bool:
        """Note a new commit record; True when a segment's worth is waiting (time to ``flush``)."""
        self.pending.append(record)
        return len(self.pending) >= self.cfg.manifest_every

    def flush(self, seconds: float) -> dict:
        """Write the waiting records as segments, merge, then the index and stats.json; return the stats."""
        records = sorted(self.pending, key=lambda record: record["partition"])
        self.pending = []
        index = self.index
        segments = list(index["segments"])
        chunk = max(self.cfg.manifest_every, REBUILD_SEGMENT_ROWS)
        for begin in range(0, len(records), chunk):
            batch = records[begin:begin + chunk]
            segments.append(self._write_segment(batch, index))
            while len(segments) >= MERGE_SEGMENTS and len({s["level"] for s in segments[-MERGE_SEGMENTS:]}) == 1:
                segments[-MERGE_SEGMENTS:] = [self._merge(segments[-MERGE_SEGMENTS:], index)]
        for record in records:
            add_to_totals(index["totals"], record)
        index["partitions"] = add_ranges(index["partitions"], [record["partition"] for record in records])
        index["partitions_committed"] += len(records)
        index["segments"] = segments
        write_json(self.cfg.output, MANIFEST_FILE, index, self.cfg)
        stats = stats_of(index["totals"], self.planned, index["partitions_committed"], seconds)
        write_json(self.cfg.output, "stats.json", stats, self.cfg)
        listed = {segment["file"].rsplit("/", 1)[-1] for segment in segments}
        for name in self._files():
            if name not in listed:
                path = join_uri(self.folder, name)
                with_retries(f"writing {self.folder}", self.cfg.storage, lambda path=path: self.fs.rm_file(path))
        return stats

    def _next_name(self, index: dict) -> str:
        name = f"{MANIFEST_FOLDER}/seg-{index['next_segment']:06d}.parquet"
        index["next_segment"] += 1
        return name

    def _write_segment(self, records: list[dict], index: dict) -> dict:
        name = self._next_name(index)
        entries = [{key: record.get(key) for key in ENTRY_SCHEMA.names} for record in records]
        table = pa.Table.from_pylist(entries, schema=ENTRY_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        with_retries(f"writing {self.folder}", self.cfg.storage, lambda: put_whole(
            self.fs, join_uri(self.cfg.output, name), buffer.getvalue()))
        return {"file": name, "level": _level(len(records), self.cfg.manifest_every), "shards": len(records)}

    def _merge(self, segments: list[dict], index: dict) -> dict:
        """``segments`` copied, a record batch at a time, into one segment of the next level."""
        name = self._next_name(index)

        def copy() -> None:
            with self.fs.open(join_uri(self.cfg.output, name), "wb") as fh, \
                    pq.ParquetWriter(fh, ENTRY_SCHEMA, compression="zstd") as out:
                for segment in segments:
                    with open_input(join_uri(self.cfg.output, segment["file"]), self.cfg.storage) as source:
                        for batch in pq.ParquetFile(source).iter_batches(batch_size=REBUILD_SEGMENT_ROWS):
                            out.write_batch(batch)

        with_retries(f"writing {self.folder}", self.cfg.storage, copy)
        return {"file": name, "level": segments[-1]["level"] + 1, "shards": sum(s["shards"] for s in segments)}
