"""The precompute pipeline on Ray Data: plan -> (read + decode + filter + bucket) -> scoring pool -> VAE pool
-> ViT pool -> per-partition shard writer, as one streaming execution: the actor pools start once, and
Ray Data's backpressure bounds memory whatever the dataset size.

First the paths are checked, the rerun is decided (``config.json`` of the output against this config, see
pipelines/runtime/run_folder.py) and the plan is read back, or made (inputs listed here, their records
counted in Ray tasks: pipelines/data/plan.py); an output whose partitions are all committed returns its
recorded figures without starting Ray. The manifest and stats.json are brought up to date from the commit
records as they arrive (pipelines/data/manifest.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from lance_core.encoder_identity import encoder_identity, identity_mismatch
from pipelines.runtime.preflight import check_paths
from pipelines.runtime.ray_session import ensure_ray
from pipelines.runtime.run_folder import CONFIG_FILE, RunFolder, RunMode
from pipelines.runtime.storage import filesystem, is_environment_failure, join_uri, with_retries

from .config import PrecomputeConfig
from .dedup import MAX_RESTARTS, DedupIndex, DedupIndexLost
from .encode import VAEEncoder, ViTEncoder
from .manifest import MANIFEST_FILE, MANIFEST_FOLDER, ManifestWriter
from .media import SLOTS
from .plan import PLAN_FILE, PLAN_FOLDER, Plan, load_plan
from .records import ROW_DEFAULTS, dropped, record_rows, to_arrow
from .report import PartitionProgress
from .scores import ScoreFilter
from .sources import InputFile, read_segment
from .writer import (
    COMMITS,
    OUTPUT_FOLDERS,
    PIECES,
    TMP_PREFIX,
    DamagedFileError,
    assemble_partition,
    read_commits,
    read_json,
    remove_temporary_files,
    write_blocks,
)

log = logging.getLogger("lance.precompute")


PRECOMPUTE_RESUMABLE = (
    "manifest_every", "plan_files_per_task", "storage", "filters.score_actors", "encoders.vae_actors",
    "encoders.vit_actors", "encoders.batch_size", "encoders.num_gpus_per_actor", "encoders.cpus_per_actor", "encoders.threads_per_actor",
    "encoders.cpus_per_task", "encoders.memory_per_task_gb", "encoders.max_decode_tasks", "encoders.block_mb",
    "filters.dedup_actors", "filters.semantic_dedup_threshold", "filters.semantic_dedup_clusters",
)
"""Fields a resumed precompute may change: where, how fast and in what chunks it runs, not what it writes."""
PRECOMPUTE_OUTPUTS = ("shards", "quarantine", "filtered", COMMITS, PIECES, PLAN_FILE, PLAN_FOLDER,
                      MANIFEST_FILE, MANIFEST_FOLDER, "stats.json", CONFIG_FILE, "semantic_drop.parquet",
                      f"{TMP_PREFIX}*")
"""What ``--overwrite`` removes from the output folder; nothing else in it is touched."""


def _partition_rows(items, plan: Plan, cfg_json: str, dedup=None):
    """Partition numbers -> Arrow tables of their rows (segments looked up in ``plan``), yielded as they fill
    (``encoders.block_mb``), so a task holds one block of a partition's decoded clips, not all of them. Each
    row carries its number within the
    partition (``row_seq``); the rows of the partition's last table also carry the partition's row count
    (``partition_rows``), which lets the writer know when it has them all. The partition's content hashes are
    registered with the dedup index before that last table leaves."""
    cfg = PrecomputeConfig.model_validate_json(cfg_json)
    block_bytes = int(cfg.encoders.block_mb * 2**20)
    for partition in items["partition"]:
        partition = int(partition)
        files, segments = plan.segments(partition, cfg.storage)
        first_hashes: dict[int, tuple[str, str]] = {}
        block = _BlockBuilder(block_bytes)
        seq = 0
        for row in _rows_of_partition(partition, segments, files, cfg):
            row["row_seq"] = seq
            seq += 1
            if row.get("status") == "ok":
                first_hashes.setdefault(row["record_index"], (row["content_sha256"], row["near_hash"]))
            if block.full_with(row):
                yield block.take()
            block.add(row)
        if dedup is not None:
            dedup.register(partition, first_hashes)
        yield block.take(partition_rows=seq)


class _BlockBuilder:
    """Rows into an Arrow block of about ``block_bytes`` of pixels. Rows are moved into Arrow every eighth
    of a block (a video clip at once), so the task holds a block and a little more, never a block twice."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.tables: list = []
        self.rows: list[dict] = []
        self.table_bytes = self.row_bytes = 0

    def full_with(self, row: dict) -> bool:
        held = self.table_bytes + self.row_bytes
        return held > 0 and held + _row_bytes(row) > self.block_bytes

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.row_bytes += _row_bytes(row)
        if self.row_bytes >= self.block_bytes / 8:
            self._convert()

    def _convert(self) -> None:
        if self.rows:
            self.tables.append(_rows_table(self.rows))
            self.table_bytes += self.row_bytes
            self.rows, self.row_bytes = [], 0

    def take(self, partition_rows: int = -1):
        if partition_rows >= 0:
            for row in self.rows:
                row["partition_rows"] = partition_rows
            self.tables = [t.set_column(t.schema.get_field_index("partition_rows"), "partition_rows",
                                        pa.array([partition_rows] * t.num_rows, pa.int64()))
                           for t in self.tables]
        self._convert()
        table = pa.concat_tables(self.tables)
        self.tables, self.table_bytes = [], 0
        return table


def _row_bytes(row: dict) -> int:
    return sum(len(row.get(f"{slot}{kind}") or b"") for slot in SLOTS
               for kind in ("_pixels", "_vit_pixels"))


def _rows_table(rows: list[dict]):
    return to_arrow({name: [row.get(name, ROW_DEFAULTS.get(name)) for row in rows]
                     for name in [*ROW_DEFAULTS, "decode_seconds"]})


TEXT_FIELDS = ("source_uri", "task", "caption", "system", "question", "answer")
def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _record_rows(record: dict, partition: int, index: int, cfg: PrecomputeConfig) -> Iterator[dict]:
    """``record_rows`` of one record; any exception quarantines that record (with the exception's type and
    message) instead of failing the partition."""
    started = time.perf_counter()
    source = ({"source_uri": str(record.get("source_uri", "")), "media": str(record.get("media") or "")}
              if isinstance(record, dict) else {})
    try:
        for row in record_rows(record, partition, index, cfg):
            for name in TEXT_FIELDS:
                if not isinstance(row[name], str):
                    raise TypeError(f"{name} is {type(row[name]).__name__}, expected a string")
            now = time.perf_counter()
            row["decode_seconds"], started = now - started, now
            yield row
    except Exception as err:  # noqa: BLE001 - one record's failure of any kind must not stop the partition
        if is_environment_failure(err):
            raise
        row = dropped(source, partition, index, "quarantined", "read", "record_error", _error_text(err))
        row["decode_seconds"] = time.perf_counter() - started
        yield row


def _rows_of_partition(partition: int, segments, files: list[InputFile], cfg: PrecomputeConfig) -> Iterator[dict]:
    """The rows of every planned record of the partition, one at a time. Records a segment cannot deliver
    (the file cannot be parsed past some point, or holds fewer records than planned) are quarantined, so
    that each planned record has an outcome."""
    index = 0
    for file_index, start, stop in segments:
        file = files[file_index]
        records = read_segment(file, start, stop, cfg)
        for position in range(start, stop):
            try:
                record = next(records, None)
            except Exception as err:  # parsers of every format raise their own types
                if is_environment_failure(err):
                    raise
                reason, detail = "unreadable_input", _error_text(err)
            else:
                if record is not None:
                    yield from _record_rows(record, partition, index, cfg)
                    index += 1
                    continue
                reason, detail = "missing_record", f"{file.uri} holds fewer records than planned ({stop})"
            for missing in range(position, stop):
                row = dropped({"source_uri": f"{file.uri}#{missing}"}, partition, index, "quarantined", "read",
                              reason, detail)
                row["decode_seconds"] = 0.0
                yield row
                index += 1
            break


class PiecesByPartition:
    """The driver's count of the pieces written for partitions that reached the writer in several blocks."""

    def __init__(self) -> None:
        self.pieces: dict[int, list[dict]] = {}

    def add(self, partition: int, piece: dict) -> list[str] | None:
        """Note a piece; the paths of all the partition's pieces once they hold every row of it."""
        held = self.pieces.setdefault(partition, [])
        held.append(piece)
        total = max(p["total"] for p in held)
        if total > 0 and sum(p["rows"] for p in held) == total:
            del self.pieces[partition]
            return [p["path"] for p in held]
        return None

    def incomplete(self) -> list[int]:
        return sorted(self.pieces)


@dataclass
class PrecomputeResult:
    output: str
    partitions: int
    committed_now: int
    skipped: int
    stats: dict
    complete_before: bool = False
    """Every partition was committed by earlier runs: nothing ran, ``stats`` are theirs."""


def _prepare_output(cfg: PrecomputeConfig) -> None:
    fs = filesystem(cfg.output, cfg.storage)
    for sub in OUTPUT_FOLDERS:
        with_retries(f"writing {cfg.output}", cfg.storage,
                     lambda sub=sub: fs.makedirs(join_uri(cfg.output, sub), exist_ok=True))


def reserved_cpus(cfg: PrecomputeConfig) -> float:
    """CPUs held by the actor pools for the whole run, plus one read/decode or writer task."""
    enc = cfg.encoders
    actors = enc.vae_actors + enc.vit_actors + (cfg.filters.score_actors if cfg.filters.scoring else 0)
    return actors * enc.cpus_per_actor + enc.cpus_per_task


def check_cpu_budget(cfg: PrecomputeConfig, cluster_cpus: float, autoscaling: bool) -> None:
    """Actor pools that leave no room for a read or writer task would wait forever: say so up front."""
    needed = reserved_cpus(cfg)
    if needed <= cluster_cpus:
        return
    message = (f"the actor pools and one task reserve {needed:g} CPUs (encoders.cpus_per_actor x actors + "
               f"encoders.cpus_per_task) but the cluster has {cluster_cpus:g}; lower encoders.cpus_per_actor, "
               "encoders.cpus_per_task or the actor counts")
    if not autoscaling:
        raise ValueError(message)
    log.warning(f"{message} (waiting for the autoscaler to add nodes)")


def check_precompute_paths(cfg: PrecomputeConfig) -> None:
    """ConfigError naming each path field (and flag) that cannot serve: no input, a missing local input or
    weights file, an output that is a file."""
    missing = {} if cfg.input else {"input": "no input given: pass --input URI or set input: in the config"}
    check_paths(cfg, "precompute", flags={"input": "--input", "output": "--output"}, missing=missing)


def _recorded_stats(cfg: PrecomputeConfig) -> dict | None:
    try:
        return read_json(cfg.output, "stats.json", cfg)
    except DamagedFileError as err:
        log.warning(f"{err}; it is written again from the commit records")
        return None


def run_precompute(cfg: PrecomputeConfig, progress: bool = True, mode: RunMode = "auto") -> PrecomputeResult:
    """Run (or resume) the precompute of ``cfg`` into ``cfg.output``; ``mode`` as ``--resume`` /
    ``--overwrite`` (RunFolderError when the output holds a run of another config). ``progress``: Ray Data's
    progress bars; without them a log line every few committed partitions (:class:`PartitionProgress`)."""
    check_precompute_paths(cfg)
    config = cfg.model_dump(mode="json")
    folder = RunFolder("precompute", cfg.output, cfg.storage)
    folder.settle(config, PRECOMPUTE_RESUMABLE, mode, schema=PrecomputeConfig, holds_run=folder.holds("plan.json", f"{COMMITS}/*.json"),
                  remove=PRECOMPUTE_OUTPUTS)
    for path in remove_temporary_files(cfg.output, cfg):
        log.info(f"removed {path}, left by an attempt that did not finish")
    commits = read_commits(cfg.output, cfg)
    encoder = encoder_identity(cfg.model.build())
    if commits:
        check_same_encoder(cfg, encoder)
    plan = load_plan(cfg, committed=bool(commits))
    todo = [p for p in range(plan.partitions) if p not in commits]
    skipped = plan.partitions - len(todo)
    recorded = _recorded_stats(cfg)
    earlier_seconds = (recorded or {}).get("wall_seconds", 0.0) if commits else 0.0
    if not todo:
        if recorded is None or recorded.get("partitions_committed") != plan.partitions:
            recorded = ManifestWriter(cfg, encoder, plan.partitions, commits).flush(earlier_seconds)
        return PrecomputeResult(cfg.output, plan.partitions, 0, skipped, recorded, complete_before=True)
    folder.record_config(config)
    _prepare_output(cfg)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    ensure_ray()  # RAY_ADDRESS (a submitted job) joins its cluster; otherwise a new local Ray
    check_cpu_budget(cfg, ray.cluster_resources().get("CPU", 0.0), autoscaling=joined)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.target_max_block_size = int(cfg.encoders.block_mb * 2**20)
    dedup = DedupIndex.start(cfg, commits, todo)
    started = time.perf_counter()
    manifest = ManifestWriter(cfg, encoder, plan.partitions, commits)
    lines = None if progress else PartitionProgress(len(todo), plan.partitions)

    def committed(record: dict) -> None:
        commits[record["partition"]] = record
        if lines is not None and (line := lines.note(record)):
            log.info(line)
        if manifest.add(record):
            manifest.flush(earlier_seconds + time.perf_counter() - started)

    pieces = PiecesByPartition()
    assemble = ray.remote(assemble_partition).options(num_cpus=cfg.encoders.cpus_per_task)
    assembling = []
    cfg_json = cfg.model_dump_json()
    rows = iter(_build_dataset(cfg, plan, todo, dedup).iter_rows())
    lost: list[int] = []
    try:
        for row in rows:
            if row["commit"]:
                committed(json.loads(row["commit"]))
            elif paths := pieces.add(int(row["partition"]), json.loads(row["piece"])):
                assembling.append(assemble.remote(cfg_json, cfg.output, int(row["partition"]), paths, dedup))
            if assembling:
                done, assembling = ray.wait(assembling, num_returns=len(assembling), timeout=0)
                for record in ray.get(done):
                    committed(json.loads(record))
        for record in ray.get(assembling):
            committed(json.loads(record))
    except Exception:
        if dedup is None or not (lost := dedup.lost()):
            raise
    finally:
        # A run that ends early stops its Ray Data executor now (the dataset shuts it down when collected):
        # kept alive by a traceback, its encoder actors would hold their CPUs from the next run.
        rows.close()
        rows = None
        gc.collect()
    if lost:
        manifest.flush(earlier_seconds + time.perf_counter() - started)
        raise DedupIndexLost(
            f"the duplicate index of the run lost actor {', '.join(map(str, lost))} of "
            f"{len(dedup.actors)} (filters.dedup_actors) for good: it died, and {MAX_RESTARTS} restarts from the "
            f"committed shards did not bring it back (its node gone, or out of memory). The "
            f"{len(commits)} of {plan.partitions} partitions committed so far are kept; run the same command "
            "again to resume: the index is rebuilt from the committed shards and only the other partitions "
            "are redone.")
    if dedup is not None and (rebuilt := dedup.rebuilt()):
        log.warning(f"dedup actor {', '.join(map(str, rebuilt))} of {len(dedup.actors)} died and was restarted from "
                    "the committed shards; records of partitions in flight at that moment keep the copy of a "
                    "duplicate claimed first, not necessarily the first in plan order (each content is written once)")
    if pieces.incomplete():
        raise RuntimeError(f"partitions {pieces.incomplete()} did not reach the writer whole; rerun to redo them")
    stats = manifest.flush(earlier_seconds + time.perf_counter() - started)
    return PrecomputeResult(cfg.output, plan.partitions, len(todo), skipped, stats)


def _build_dataset(cfg: PrecomputeConfig, plan: Plan, todo: list[int], dedup):
    """All stages over the partitions still to do; each yielded row is one partition's commit record."""
    cfg_json = cfg.model_dump_json()
    enc = cfg.encoders
    gpu = enc.num_gpus_per_actor or None
    items = [{"partition": p} for p in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(todo))
    # The memory reservation also keeps decode in its own tasks: Ray Data fuses a task stage into the
    # next actor stage when their remote args match, which would run decode and encode one after the other.
    ds = ds.map_batches(_partition_rows, fn_args=(plan, cfg_json, dedup), batch_size=1, batch_format="numpy",
                        num_cpus=enc.cpus_per_task, memory=int(enc.memory_per_task_gb * 2**30),
                        concurrency=enc.max_decode_tasks)
    # A partition reaches the writer in one block or in several (a long video's clips, ``block_mb``); the
    # writer commits a whole one at once and keeps the others' blocks as pieces until the last arrives.
    stages = [(ScoreFilter, cfg.filters.score_actors)] if cfg.filters.scoring else []
    stages += [(VAEEncoder, enc.vae_actors), (ViTEncoder, enc.vit_actors)]
    for stage, actors in stages:
        ds = ds.map_batches(stage, fn_constructor_args=(cfg_json,), batch_size=None, batch_format="pandas",
                            compute=ActorPoolStrategy(size=actors), num_cpus=enc.cpus_per_actor, num_gpus=gpu)
    return ds.map_batches(write_blocks, fn_args=(cfg_json, cfg.output, dedup), batch_size=None,
                          batch_format="pandas", num_cpus=enc.cpus_per_task)


def check_same_encoder(cfg: PrecomputeConfig, encoder: dict) -> None:
    """A resumed run must encode with the encoders that made its committed shards (the same paths may hold
    other weights by now)."""
    try:
        recorded = (read_json(cfg.output, "manifest.json", cfg) or {}).get("encoder")
    except DamagedFileError:
        return
    if recorded is not None and (differences := identity_mismatch(recorded, encoder)):
        raise ValueError(f"{cfg.output}: its committed shards were encoded by other encoders than model.weights "
                         f"names now ({'; '.join(differences[:3])}); give the same weights, or --overwrite")
