"""The precompute's plan: the input files in a deterministic order with their record counts, cut into
partitions of ``partition_size`` records (one partition becomes one shard).

It is made once per output folder. The driver lists the input (names only, never opening a file); Ray tasks
count the records, ``plan_files_per_task`` files each (a tar's headers are read, its members' data seeked
over); the driver streams the counts, in order, into ``plan/inputs.parquet``: one row per file in plan order
(``uri``, ``format``, ``records``, ``first_record``: the records of the files before it). ``plan.json``,
written last, records the totals, so a plan whose ``plan.json`` is readable is whole.

Partition p holds records [p * partition_size, (p + 1) * partition_size) of the files concatenated in plan
order. A rerun reads ``plan.json`` alone; each read task finds its partition's segments in the row groups of
the inputs table that hold them. Output folders planned by earlier versions (one ``plan.json`` holding every
input and partition) are read as they are (:class:`FilesPlan`).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.runtime.storage import (
    StorageConfig,
    StorageError,
    filesystem,
    join_uri,
    open_input,
    path_exists,
    with_retries,
)

from .config import PrecomputeConfig
from .sources import InputFile, count_batch, list_input_files, plan_partitions
from .writer import DamagedFileError, _is_local, read_json, write_json

PLAN_SCHEMA = "lance-plan/2"
PLAN_FILE = "plan.json"
PLAN_FOLDER = "plan"
INPUTS_TABLE = f"{PLAN_FOLDER}/inputs.parquet"
INPUTS_SCHEMA = pa.schema([("uri", pa.string()), ("format", pa.string()), ("records", pa.int64()),
                           ("first_record", pa.int64())])
log = logging.getLogger("lance.precompute")
Segments = tuple[list[InputFile], list[tuple[int, int, int]]]
"""A partition's files and its segments (index into those files, first record, stop record)."""


def rows_per_group(files: int) -> int:
    """Rows per row group of the inputs table of ``files`` files."""
    # A read task reads the footer (an entry per row group, about as large as 16 rows) and the row group of
    # its partition: 16 g + n / g rows' worth for g groups of n files, least at n / g = sqrt(16 n).
    return max(1024, math.isqrt(16 * files))


def _cut(rows: list[dict], start: int, stop: int) -> Segments:
    """The segments of records [start, stop) in ``rows`` of the inputs table (in plan order)."""
    files, segments = [], []
    for row in rows:
        first, count = row["first_record"], row["records"]
        low, high = max(start, first), min(stop, first + count)
        if low < high:
            segments.append((len(files), low - first, high - first))
            files.append(InputFile(row["uri"], row["format"], count))
    return files, segments


def _group_first_records(metadata) -> list[int] | None:
    """``first_record`` of each row group's first row (its minimum), None where a group has no statistics."""
    column = INPUTS_SCHEMA.get_field_index("first_record")
    firsts = []
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        firsts.append(stats.min)
    return firsts


def _inputs_between(path: str, start: int, stop: int, storage: StorageConfig) -> list[dict]:
    """Rows of the inputs table at ``path`` whose records overlap [start, stop); only the row groups that can
    hold them are read (group g spans records [first of g, first of g + 1))."""
    def read() -> pa.Table:
        with open_input(path, storage) as fh:
            parquet = pq.ParquetFile(fh)
            firsts = _group_first_records(parquet.metadata)
            groups = list(range(parquet.num_row_groups)) if firsts is None else [
                g for g, first in enumerate(firsts)
                if first < stop and (g + 1 == len(firsts) or firsts[g + 1] > start)]
            return parquet.read_row_groups(groups)

    table = with_retries(f"reading {path}", storage, read)
    first = table.column("first_record")
    overlapping = pc.and_(pc.less(first, stop), pc.greater(pc.add(first, table.column("records")), start))
    return table.filter(overlapping).to_pylist()


@dataclass(frozen=True)
class StoredPlan:
    """A plan stored in an output folder: what ``plan.json`` says; the inputs table stays where it is."""

    output: str
    input: str
    partition_size: int
    files: int
    records: int

    @property
    def partitions(self) -> int:
        return -(-self.records // self.partition_size)

    def segments(self, partition: int, storage: StorageConfig) -> Segments:
        start = partition * self.partition_size
        stop = min(start + self.partition_size, self.records)
        return _cut(_inputs_between(join_uri(self.output, INPUTS_TABLE), start, stop, storage), start, stop)


@dataclass(frozen=True)
class FilesPlan:
    """A plan held in memory: its files and their partitions (``plan_partitions``). For small inputs (tests,
    benches) and output folders planned before the inputs table (their ``plan.json`` holds both)."""

    files: list[InputFile]
    partition_size: int
    cut: list | None = None
    input: str = ""

    def __post_init__(self) -> None:
        if self.cut is None:
            object.__setattr__(self, "cut", plan_partitions(self.files, self.partition_size))

    @property
    def partitions(self) -> int:
        return len(self.cut)

    def segments(self, partition: int, storage: StorageConfig | None = None) -> Segments:
        used = sorted({f for f, _, _ in self.cut[partition]})
        local = {f: i for i, f in enumerate(used)}
        return [self.files[f] for f in used], [(local[f], start, stop) for f, start, stop in self.cut[partition]]


Plan = StoredPlan | FilesPlan


class _InputsTable:
    """Rows (uri, format, records) streamed into the inputs table a row group at a time, ``first_record``
    added as they come."""

    def __init__(self, fh, group_rows: int) -> None:
        self.writer = pq.ParquetWriter(fh, INPUTS_SCHEMA, compression="zstd")
        self.group_rows = group_rows
        self.columns: dict[str, list] = {name: [] for name in INPUTS_SCHEMA.names}
        self.files = self.records = 0

    def add(self, uri: str, fmt: str, records: int) -> None:
        for name, value in (("uri", uri), ("format", fmt), ("records", records), ("first_record", self.records)):
            self.columns[name].append(value)
        self.files += 1
        self.records += records
        if len(self.columns["uri"]) >= self.group_rows:
            self._write()

    def _write(self) -> None:
        if self.columns["uri"]:
            self.writer.write_table(pa.table(self.columns, schema=INPUTS_SCHEMA), row_group_size=self.group_rows)
            self.columns = {name: [] for name in INPUTS_SCHEMA.names}

    def close(self) -> None:
        self._write()
        self.writer.close()


def _counted(files: list[tuple[str, str]], cfg: PrecomputeConfig, count: Callable):
    """(uri, format, records) of ``files`` in order, counted by Ray tasks of ``plan_files_per_task`` files; at
    most about twice as many tasks in flight as the cluster runs at once, so the driver holds a bounded number
    of results whatever the number of files."""
    import ray

    task = ray.remote(count).options(num_cpus=cfg.encoders.cpus_per_task)
    window = max(8, math.ceil(2 * ray.cluster_resources().get("CPU", 1.0) / cfg.encoders.cpus_per_task))
    step = cfg.plan_files_per_task
    in_flight: deque = deque()

    def oldest():
        batch, ref = in_flight.popleft()
        try:
            counts = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None  # the task's own error (a missing file, a manifest without a URI column)
        return zip(batch, counts)

    for begin in range(0, len(files), step):
        batch = files[begin:begin + step]
        in_flight.append((batch, task.remote(batch, cfg.storage, cfg.manifest)))
        if len(in_flight) >= window:
            for (uri, fmt), records in oldest():
                yield uri, fmt, records
    while in_flight:
        for (uri, fmt), records in oldest():
            yield uri, fmt, records


def make_plan(cfg: PrecomputeConfig, files: list[tuple[str, str]], count: Callable = count_batch) -> StoredPlan:
    """Count the records of ``files`` ((URI, format) in plan order) in Ray tasks and store the plan in
    ``cfg.output``. ``count(batch, storage, manifest)`` returns a batch's record counts in order (the planning
    bench passes one that makes them up). Should counting fail, the partial plan is removed (and the output
    folder, if this call made it)."""
    from pipelines.runtime.ray_session import ensure_ray

    ensure_ray()
    fs = filesystem(cfg.output, cfg.storage)
    had_output = with_retries(f"reading {cfg.output}", cfg.storage, lambda: path_exists(fs, cfg.output))
    path = join_uri(cfg.output, INPUTS_TABLE)
    try:
        if _is_local(fs):
            fs.makedirs(join_uri(cfg.output, PLAN_FOLDER), exist_ok=True)
        with fs.open(path, "wb") as fh:
            table = _InputsTable(fh, rows_per_group(len(files)))
            try:
                for uri, fmt, records in _counted(files, cfg, count):
                    table.add(uri, fmt, records)
            finally:
                table.close()
    except BaseException:
        _remove_partial_plan(fs, cfg.output, had_output)
        raise
    plan = StoredPlan(cfg.output, cfg.input, cfg.partition_size, table.files, table.records)
    write_json(cfg.output, PLAN_FILE, {
        "schema": PLAN_SCHEMA, "input": plan.input, "partition_size": plan.partition_size, "files": plan.files,
        "records": plan.records, "partitions": plan.partitions, "inputs_table": INPUTS_TABLE}, cfg)
    return plan


def _remove_partial_plan(fs, output: str, had_output: bool) -> None:
    folder = join_uri(output, PLAN_FOLDER)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    if not had_output and _is_local(fs) and fs.exists(output) and not fs.ls(output):
        fs.rmdir(output)


def stored_plan(cfg: PrecomputeConfig) -> Plan | None:
    """The plan stored in ``cfg.output``, None if there is none; DamagedFileError naming the file if damaged."""
    stored = read_json(cfg.output, PLAN_FILE, cfg)
    if stored is None:
        return None
    where = join_uri(cfg.output, PLAN_FILE)
    try:
        if stored.get("schema") == PLAN_SCHEMA:
            plan = StoredPlan(cfg.output, stored["input"], int(stored["partition_size"]), int(stored["files"]),
                              int(stored["records"]))
        else:
            files = [InputFile(**f) for f in stored["inputs"]]
            partitions = [[tuple(int(x) for x in s) for s in p] for p in stored["partitions"]]
            return FilesPlan(files, int(stored["partition_size"]), partitions, stored["input"])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise DamagedFileError(f"{where} is damaged ({type(err).__name__}: {err})") from None
    table = join_uri(cfg.output, INPUTS_TABLE)

    def table_rows() -> int:
        with open_input(table, cfg.storage) as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    try:
        rows = with_retries(f"reading {table}", cfg.storage, table_rows)
    except FileNotFoundError:
        raise DamagedFileError(f"{where} is damaged: {table} is missing") from None
    except StorageError as err:
        if err.kind not in ("corrupt", "io_error"):
            raise
        raise DamagedFileError(f"{table} is damaged ({err})") from None
    if rows != plan.files:
        raise DamagedFileError(f"{table} is damaged: {rows} rows, {where} says {plan.files} files")
    return plan


def load_plan(cfg: PrecomputeConfig, committed: bool = False) -> Plan:
    """The stored plan of the output folder, or a new one; a rerun with other inputs is refused. A damaged
    plan is made again while no partition is committed (``committed``), else refused with its file named."""
    try:
        plan = stored_plan(cfg)
    except DamagedFileError as err:
        if committed:
            raise DamagedFileError(f"{err}; partitions are committed against it: restore it, or use a new "
                                   "output folder") from None
        log.warning(f"{err}; no partition is committed yet, planning again")
        plan = None
    if plan is not None:
        if (plan.input, plan.partition_size) != (cfg.input, cfg.partition_size):
            raise ValueError(f"output {cfg.output!r} was planned for input {plan.input!r} with partition_size "
                             f"{plan.partition_size}; use a new output folder for other inputs")
        return plan
    return make_plan(cfg, list_input_files(cfg))
