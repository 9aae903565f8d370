"""The data plan, made once on the driver before any worker starts: which shards exist and are readable,
how many trainable rows each holds per task, and which rows are held out.

The plan is made from the manifests: each root's shard entries count their rows per task and per resolution
class (pipelines/runtime/shard_manifest.py), which is enough to apply ``data.resolution``, and each shard
folder is listed once (in parallel) to find the shards that are missing. Rows are read only from the few
shards that hold the held-out rows or rows the semantic dedup pass dropped, in batches. A shard whose entry
has no counts (precomputed before they were recorded, or listed by hand) or whose size is not the one its
entry records has its task and target shape columns read instead. The driver's memory follows the shards,
not the rows.

Bad inputs become counts and messages here (a shard listed in the manifest but missing, a shard whose
schema is not the latent shard schema, rows of an unknown task, rows over the resolution limits); an
empty dataset after all of that is a :class:`DataError` whose message says why, before training starts.

Workers read the plan from the run folder (:meth:`DataPlan.save`, :meth:`DataPlan.load`).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq

from lance_core.encoder_identity import identity_mismatch
from lance_core.packing import TASKS
from lance_core.shards import SEMANTIC_DROP_FILE, check_schema
from pipelines.runtime.shard_manifest import (
    CLASS_COLUMNS,
    iter_entries,
    parse_class,
    resolution_class,
    target_is_video,
)
from pipelines.runtime.storage import StorageError, filesystem, join_uri, open_input, with_retries

from .config import DataSection, ResolutionFilter

SCAN_THREADS = 16
LIST_THREADS = 16
BATCH_ROWS = 65_536
"""Rows read at once from a shard's plan columns."""
PLAN_FORMAT = "lance-train-plan/1"
T = TypeVar("T")


class DataError(ValueError):
    """The training data cannot be used; the message names the shard, the task or the limit."""


@dataclass
class ShardEntry:
    uri: str
    rows: int
    trainable: dict[str, int]
    """Task -> rows that pass the filters and are not held out."""
    sha256: str | None = None
    """The digest the manifest records (checked when the shard fails to read)."""


@dataclass
class DataPlan:
    shards: list[ShardEntry] = field(default_factory=list)
    holdout: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Task -> (shard index, row) of its held-out rows."""
    issues: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    excluded: dict[int, list[int]] = field(default_factory=dict)
    """Shard index -> its rows left out of training (listed in their root's semantic_drop.parquet)."""

    def excluded_rows(self) -> set[tuple[int, int]]:
        return {(shard, row) for shard, rows in self.excluded.items() for row in rows}

    @property
    def task_rows(self) -> dict[str, int]:
        totals: Counter = Counter()
        for shard in self.shards:
            totals.update(shard.trainable)
        return {t: totals[t] for t in TASKS if totals[t] > 0}

    def task_shards(self, task: str) -> list[int]:
        return [i for i, s in enumerate(self.shards) if s.trainable.get(task, 0) > 0]

    def _fields(self) -> dict:
        return {"holdout": self.holdout, "issues": dict(self.issues), "messages": self.messages,
                "excluded": {str(k): v for k, v in self.excluded.items()}}

    def to_json(self) -> str:
        return json.dumps({"shards": [asdict(s) for s in self.shards], **self._fields()})

    @classmethod
    def from_json(cls, text: str) -> DataPlan:
        return cls._from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path`` whole (a temporary file, then renamed), each field on one line: the
        shard table as columns (:func:`_shard_columns`)."""
        path = Path(path)
        payload = {"format": PLAN_FORMAT, "task_rows": self.task_rows, **self._fields(),
                   "shards": _shard_columns(self.shards)}
        text = ",\n".join(f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}"
                          for key, value in payload.items())
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text("{\n" + text + "\n}\n")
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DataPlan:
        """The plan :meth:`save` wrote (or an earlier run's ``plan.json``, one object per shard)."""
        return cls._from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def _from_dict(cls, data: dict) -> DataPlan:
        shards = data["shards"]
        entries = _shard_entries(shards) if isinstance(shards, dict) else [ShardEntry(**s) for s in shards]
        return cls(entries, {t: [tuple(x) for x in rows] for t, rows in data["holdout"].items()},
                   Counter(data["issues"]), data["messages"],
                   {int(k): rows for k, rows in data.get("excluded", {}).items()})


def _shard_columns(shards: list[ShardEntry]) -> dict:
    """The shard table as columns: each URI as its folder (an index into ``folders``) and its name; the
    trainable rows as one column per task."""
    folders: dict[str, int] = {}
    folder, name = [], []
    for shard in shards:
        cut = shard.uri.rfind("/") + 1
        folder.append(folders.setdefault(shard.uri[:cut], len(folders)))
        name.append(shard.uri[cut:])
    present = {task for shard in shards for task in shard.trainable}
    tasks = [task for task in TASKS if task in present]
    return {"folders": list(folders), "folder": folder, "name": name, "rows": [s.rows for s in shards],
            "sha256": [s.sha256 for s in shards],
            "trainable": {task: [s.trainable.get(task, 0) for s in shards] for task in tasks}}


def _shard_entries(columns: dict) -> list[ShardEntry]:
    folders, trainable = columns["folders"], columns["trainable"]
    return [ShardEntry(folders[folder] + name, rows, {task: counts[i] for task, counts in trainable.items()
                                                      if counts[i] > 0}, sha256)
            for i, (folder, name, rows, sha256) in enumerate(zip(columns["folder"], columns["name"],
                                                                   columns["rows"], columns["sha256"]))]


def target_tokens(shape) -> int:
    frames, height, width = (int(x) for x in shape[:3])
    return frames * height * width


def passes_resolution(task: str, shape, fps, limits: ResolutionFilter) -> bool:
    """Understanding rows (no VAE target) always pass; generation targets are held to the limits."""
    if shape is None:
        return True
    tokens = target_tokens(shape)
    if target_is_video(shape, fps):
        if limits.max_video_tokens is not None and tokens > limits.max_video_tokens:
            return False
        return limits.max_video_latent_frames is None or int(shape[0]) <= limits.max_video_latent_frames
    return limits.max_image_tokens is None or tokens <= limits.max_image_tokens


# ------------------------------------------------------------------------------------------------ manifests
@dataclass
class _Listed:
    """A shard that its root's manifest lists and its folder holds."""
    uri: str
    partition: int
    rows: int
    sha256: str | None
    classes: dict[str, int] | None
    """Resolution class -> rows, as the manifest counts them; None: counted from the shard's rows."""
    dropped: set[str] | frozenset[str] = frozenset()
    """Sample ids of rows the semantic dedup pass dropped that this shard may hold."""


def _check_encoder(root: str, manifest: dict, encoder: dict | None, notes: DataPlan) -> None:
    """DataError when the shards under ``root`` were encoded by another VAE or ViT than the model's."""
    if encoder is None:
        return
    made_by = manifest.get("encoder")
    if made_by is None:
        notes.messages.append(f"{root}: the manifest does not record which encoders made the latents; not checked")
        return
    differences = identity_mismatch(made_by, encoder)
    if differences:
        raise DataError(f"{root}: the latents were made by other encoders than the model's "
                        f"({'; '.join(differences[:4])}); train with the VAE and ViT weights that made them "
                        "(model.weights.vae / vit) or precompute again with the model's")


def _manifest_entries(root: str, cfg: DataSection, notes: DataPlan, encoder: dict | None) -> Iterator[dict]:
    fs = filesystem(root, cfg.storage)
    manifest = join_uri(root, "manifest.json")
    if not with_retries(f"reading {root}", cfg.storage, lambda: fs.exists(manifest)):
        raise DataError(f"{root}: no manifest.json (a latent shard root written by `lance precompute`)")
    data = json.loads(with_retries(f"reading {manifest}", cfg.storage, lambda: fs.cat_file(manifest)))
    _check_encoder(root, data, encoder, notes)
    try:
        return iter_entries(root, data, cfg.storage)
    except ValueError as err:
        raise DataError(str(err)) from None


def _list_folder(folder: str, cfg: DataSection) -> dict[str, int | None]:
    """File name -> size of the files directly in ``folder`` (none when there is no such folder)."""
    fs = filesystem(folder, cfg.storage)

    def ls() -> list[dict]:
        fs.invalidate_cache(folder)
        return fs.ls(folder, detail=True)

    try:
        found = with_retries(f"listing {folder}", cfg.storage, ls)
    except FileNotFoundError:
        return {}
    finally:
        fs.invalidate_cache(folder)  # an object store's filesystem keeps listings: not this one's
    return {item["name"].rstrip("/").rsplit("/", 1)[-1]: item.get("size")
            for item in found if item.get("type") != "directory"}


def _root_shards(root: str, cfg: DataSection, encoder: dict | None) -> tuple[list[_Listed], DataPlan]:
    """The shards of ``root``'s manifest that its folders hold, in partition order, each folder listed once;
    and the issues and messages about them (a plan of their own). A shard listed but absent is counted and
    named."""
    notes = DataPlan()
    listings: dict[str, dict[str, int | None]] = {}
    shards: list[_Listed] = []
    named: list[tuple[int, str]] = []
    entries = uncounted = 0
    for entry in _manifest_entries(root, cfg, notes, encoder):
        entries += 1
        uri = join_uri(root, entry["shard"])
        folder, name = uri.rsplit("/", 1)
        if folder not in listings:
            listings[folder] = _list_folder(folder, cfg)
        if name not in listings[folder]:
            notes.issues["missing_shards"] += 1
            named.append((entry["partition"], f"{uri}: listed in the manifest but missing; skipped"))
            continue
        classes = entry.get("classes")
        size, recorded = listings[folder][name], entry.get("bytes")
        if classes is None:
            uncounted += 1
        elif None not in (size, recorded) and size != recorded:
            message = f"{uri}: {size} bytes where the manifest records {recorded}; its rows are counted from the file"
            named.append((entry["partition"], message))
            classes = None
        else:
            classes = {sys.intern(key): count for key, count in classes.items()}
        shards.append(_Listed(uri, entry["partition"], entry["rows"], entry.get("sha256"), classes))
    shards.sort(key=lambda shard: shard.partition)
    notes.messages += [message for _, message in sorted(named, key=lambda item: item[0])]
    if uncounted:
        notes.messages.append(f"{root}: the manifest does not count the rows of {uncounted} of its {entries} "
                              "shards (written before it did); their task and target shape columns are read")
    _assign_drops(root, shards, cfg, notes)
    return shards, notes


def _listed_shards(cfg: DataSection, plan: DataPlan, encoder: dict | None) -> list[_Listed]:
    """The shards of every root (in parallel over the roots), in root then partition order."""
    with ThreadPoolExecutor(max_workers=LIST_THREADS) as pool:
        roots = list(pool.map(lambda root: _root_shards(root, cfg, encoder), cfg.uris))
    listed = []
    for shards, notes in roots:
        listed += shards
        plan.issues.update(notes.issues)
        plan.messages += notes.messages
    return listed


# ------------------------------------------------------------------------------------------------ semantic drops
def _read_drops(path: str, cfg: DataSection) -> tuple[list[str], list[int] | None]:
    """(sample ids, the partition of each or None when the file does not record them) of a drop list."""
    def read() -> tuple[list[str], list[int] | None]:
        with open_input(path, cfg.storage) as fh:
            pf = pq.ParquetFile(fh)
            table = pf.read(columns=[n for n in ("sample_id", "partition") if n in pf.schema_arrow.names])
        partitions = table.column("partition").to_pylist() if "partition" in table.column_names else None
        return table.column("sample_id").to_pylist(), partitions

    return with_retries(f"reading {path}", cfg.storage, read)


def _assign_drops(root: str, shards: list[_Listed], cfg: DataSection, notes: DataPlan) -> None:
    """Give the shards of ``root`` the sample ids its ``semantic_drop.parquet`` lists (by partition; every
    shard gets them all when the file does not say which partition holds a row)."""
    fs = filesystem(root, cfg.storage)
    path = join_uri(root, SEMANTIC_DROP_FILE)
    if not with_retries(f"reading {root}", cfg.storage, lambda: fs.exists(path)):
        return
    ids, partitions = _read_drops(path, cfg)
    notes.messages.append(f"{path}: {len(ids)} rows near-identical to earlier ones (semantic dedup) are left out")
    if partitions is None:
        notes.messages.append(f"{path}: the list does not say which shards hold its rows (written before it "
                              "did); every shard's sample ids are read")
        everywhere = set(ids)
        for shard in shards:
            shard.dropped = everywhere
        return
    by_partition: dict[int, set[str]] = {}
    for sample, partition in zip(ids, partitions):
        by_partition.setdefault(partition, set()).add(sample)
    for shard in shards:
        shard.dropped = by_partition.get(shard.partition, frozenset())


# ------------------------------------------------------------------------------------------------ reading rows
def _rows(pf: pq.ParquetFile, columns: tuple[str, ...]) -> Iterator[tuple]:
    """The values of ``columns`` row by row (None for a column the shard does not have), a batch at a time."""
    present = [name for name in columns if name in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=present):
        data = batch.to_pydict()
        yield from zip(*(data[name] if name in data else repeat(None, batch.num_rows) for name in columns))


def _read_rows(uri: str, cfg: DataSection, columns: tuple[str, ...], consume: Callable[[Iterator[tuple]], T]) -> T:
    """``consume`` applied to the shard's rows of ``columns`` after its schema is checked; retried whole."""
    def read() -> T:
        with open_input(uri, cfg.storage) as fh:
            pf = pq.ParquetFile(fh)
            check_schema(pf.schema_arrow, uri)  # a column no row of the shard fills is not written: None here
            return consume(_rows(pf, columns))

    return with_retries(f"reading {uri}", cfg.storage, read)


def _guarded(read: Callable[[], T]) -> tuple[T | None, str | None, str | None]:
    """(result, issue, message) of reading a shard. A damaged or foreign shard is skipped and counted; a storage
    failure (timeout, access denied, no credentials) stops the plan instead of silently leaving the shard out
    of training."""
    try:
        return read(), None, None
    except FileNotFoundError as err:
        return None, "missing_shards", f"{err}; skipped"
    except StorageError as err:
        if err.kind not in ("corrupt", "io_error"):
            raise
        return None, "unreadable_shards", f"{err}; skipped"
    except ValueError as err:
        return None, "bad_schema_shards", f"{err}; skipped"


# ------------------------------------------------------------------------------------------------ counting
@dataclass
class _Counted:
    """A readable shard: its rows by resolution class, those the semantic dedup pass dropped left out."""
    uri: str
    rows: int
    sha256: str | None
    classes: dict[str, int]
    excluded: list[int]
    """Its rows the semantic dedup pass dropped."""


def _scan(shard: _Listed, rows: Iterator[tuple]) -> _Counted:
    """Count rows of (task, target shape, target fps[, sample id]) by class; the dropped ones apart."""
    classes: Counter = Counter()
    excluded = []
    count = 0
    for row_no, (task, shape, fps, *sample_id) in enumerate(rows):
        count += 1
        if sample_id and sample_id[0] in shard.dropped:
            excluded.append(row_no)
        else:
            classes[resolution_class(task, shape, fps)] += 1
    return _Counted(shard.uri, count, shard.sha256, dict(classes), excluded)


def _scan_shard(shard: _Listed, cfg: DataSection) -> tuple[_Counted | None, str | None, str | None]:
    """The shard's classes counted from its task and target shape columns (and its sample ids, when it may
    hold dropped rows)."""
    columns = (*CLASS_COLUMNS, "sample_id") if shard.dropped else CLASS_COLUMNS
    return _guarded(lambda: _read_rows(shard.uri, cfg, columns, partial(_scan, shard)))


def _counted_shards(listed: list[_Listed], cfg: DataSection, plan: DataPlan) -> list[_Counted]:
    """The readable shards with their counts: the manifest's, else read from the rows (in parallel)."""
    to_read = [i for i, shard in enumerate(listed) if shard.classes is None or shard.dropped]
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        read = dict(zip(to_read, pool.map(lambda i: _scan_shard(listed[i], cfg), to_read)))
    counted = []
    for index, shard in enumerate(listed):
        if index not in read:
            counted.append(_Counted(shard.uri, shard.rows, shard.sha256, shard.classes, []))
            continue
        result, issue, message = read[index]
        if result is None:
            plan.issues[issue] += 1
            plan.messages.append(message)
        else:
            counted.append(result)
    return counted


class _ClassFilter:
    """The task a resolution class's rows count for, or the issue that leaves them out (cached per class)."""

    def __init__(self, limits: ResolutionFilter) -> None:
        self.limits = limits
        self.verdicts: dict[str, tuple[str | None, str | None]] = {}

    def __call__(self, key: str) -> tuple[str | None, str | None]:
        if key not in self.verdicts:
            task, shape, video = parse_class(key)
            if task not in TASKS:
                self.verdicts[key] = None, "unknown_task_rows"
            elif not passes_resolution(task, shape, 1.0 if video else None, self.limits):
                self.verdicts[key] = None, "filtered_resolution_rows"
            else:
                self.verdicts[key] = task, None
        return self.verdicts[key]

    def row_task(self, task: str, shape, fps) -> str | None:
        return self(resolution_class(task, shape, fps))[0]


def _kept_rows(shard: _Counted, keep: _ClassFilter, issues: Counter) -> Counter:
    """Task -> the shard's rows that pass the filters; the others counted in ``issues``."""
    kept: Counter = Counter()
    for key, count in shard.classes.items():
        task, issue = keep(key)
        if task is None:
            issues[issue] += count
        else:
            kept[task] += count
    return kept


# ------------------------------------------------------------------------------------------------ holdout
def _held_rows(rows: Iterator[tuple], needed: dict[str, int], excluded: set[int],
               keep: _ClassFilter) -> dict[str, list[int]]:
    """Task -> the first ``needed[task]`` rows of the task that pass the filters."""
    found: dict[str, list[int]] = {task: [] for task in needed}
    wanting = sum(needed.values())
    for row_no, (task, shape, fps) in enumerate(rows):
        if task in found and len(found[task]) < needed[task] and row_no not in excluded \
                and keep.row_task(task, shape, fps) is not None:
            found[task].append(row_no)
            wanting -= 1
            if wanting == 0:
                break
    return found


def _pick_holdout(counted: list[_Counted], kept: list[Counter], cfg: DataSection,
                  plan: DataPlan, keep: _ClassFilter) -> set[int]:
    """Fill ``plan.holdout``: the first ``data.holdout_per_task`` trainable rows of each task (at most a
    quarter of them), read from as few shards as hold them. Returns the shards that failed to read."""
    totals: Counter = Counter()
    for rows in kept:
        totals.update(rows)
    wanted = {task: min(cfg.holdout_per_task, totals[task] // 4) for task in TASKS if totals[task] > 0}
    plan.holdout = {task: [] for task in wanted}
    unreadable = set()
    for index, shard in enumerate(counted):
        needed = {task: count - len(plan.holdout[task]) for task, count in wanted.items()
                  if count > len(plan.holdout[task]) and kept[index][task] > 0}
        if not needed:
            if all(len(plan.holdout[task]) == count for task, count in wanted.items()):
                break
            continue
        found, issue, message = _guarded(lambda shard=shard, needed=needed: _read_rows(
            shard.uri, cfg, CLASS_COLUMNS, lambda rows: _held_rows(rows, needed, set(shard.excluded), keep)))
        if found is None:
            plan.issues[issue] += 1
            plan.messages.append(message)
            unreadable.add(index)
            continue
        for task, row_numbers in found.items():
            plan.holdout[task] += [(index, row) for row in row_numbers]
    return unreadable


# ------------------------------------------------------------------------------------------------ the plan
def make_plan(cfg: DataSection, tasks_wanted: dict[str, float], encoder: dict | None = None) -> DataPlan:
    """Count every shard's trainable rows per task (from the manifests where they count them) and pick the
    held-out rows. With ``encoder`` (the model's :func:`encoder_identity`), shard roots made by other encoders
    are refused."""
    if not cfg.uris:
        raise DataError("data.uris is empty: give latent shard roots (`--data URI`)")
    plan = DataPlan()
    listed = _listed_shards(cfg, plan, encoder)
    counted = _counted_shards(listed, cfg, plan)
    del listed
    keep = _ClassFilter(cfg.resolution)
    kept = [_kept_rows(shard, keep, plan.issues) for shard in counted]
    for shard in counted:
        if shard.excluded:
            plan.issues["semantic_duplicate_rows"] += len(shard.excluded)
    if plan.issues["unknown_task_rows"]:
        plan.messages.append(f"{plan.issues['unknown_task_rows']} rows name a task outside {', '.join(TASKS)}; "
                             "skipped")
    unreadable = _pick_holdout(counted, kept, cfg, plan, keep)
    held = Counter((index, task) for task, refs in plan.holdout.items() for index, _ in refs)
    for index, (shard, rows) in enumerate(zip(counted, kept)):
        trainable = {} if index in unreadable else {
            task: count - held[index, task] for task, count in rows.items() if count > held[index, task]}
        plan.shards.append(ShardEntry(shard.uri, shard.rows, trainable, shard.sha256))
        if shard.excluded:
            plan.excluded[index] = shard.excluded
    _check_tasks(cfg, tasks_wanted, plan)
    return plan


def _check_tasks(cfg: DataSection, tasks_wanted: dict[str, float], plan: DataPlan) -> None:
    wanted = {t for t, w in tasks_wanted.items() if w > 0}
    available = set(plan.task_rows)
    if not available & wanted:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(plan.issues.items())) or "no rows"
        raise DataError(f"empty dataset after filtering: no trainable rows for the mixture tasks "
                        f"{sorted(wanted)} in {list(cfg.uris)} ({reasons}; rows per task: {plan.task_rows})")
    for task in sorted(wanted - available):
        plan.messages.append(f"task {task!r} has weight but no trainable rows; left out of the mixture")
