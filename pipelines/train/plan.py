"""The data plan, made once on the driver before any worker starts: which shards exist and are readable,
how many trainable rows each holds per task, and which rows are held out.

Bad inputs become counts and messages here (a shard listed in the manifest but missing, a shard whose
schema is not the latent shard schema, rows of an unknown task, rows over the resolution limits); an
empty dataset after all of that is a :class:`DataError` whose message says why, before training starts.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow.parquet as pq

from lance_core.encoder_identity import identity_mismatch
from lance_core.packing import TASKS
from lance_core.shards import SEMANTIC_DROP_FILE, check_schema
from pipelines.runtime.shard_manifest import manifest_entries
from pipelines.runtime.storage import StorageError, filesystem, join_uri, open_input, with_retries

from .config import DataSection, ResolutionFilter

PLAN_COLUMNS = ["sample_id", "task", "target_vae_shape", "target_fps"]
SCAN_THREADS = 16


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

    def to_json(self) -> str:
        return json.dumps({"shards": [asdict(s) for s in self.shards], "holdout": self.holdout,
                           "issues": dict(self.issues), "messages": self.messages,
                           "excluded": {str(k): v for k, v in self.excluded.items()}})

    @classmethod
    def from_json(cls, text: str) -> DataPlan:
        data = json.loads(text)
        return cls([ShardEntry(**s) for s in data["shards"]],
                   {t: [tuple(x) for x in rows] for t, rows in data["holdout"].items()},
                   Counter(data["issues"]), data["messages"],
                   {int(k): rows for k, rows in data.get("excluded", {}).items()})


def target_tokens(shape) -> int:
    frames, height, width = (int(x) for x in shape[:3])
    return frames * height * width


def passes_resolution(task: str, shape, fps, limits: ResolutionFilter) -> bool:
    """Understanding rows (no VAE target) always pass; generation targets are held to the limits."""
    if shape is None:
        return True
    tokens = target_tokens(shape)
    is_video = int(shape[0]) > 1 or (fps is not None and fps > 0)
    if is_video:
        if limits.max_video_tokens is not None and tokens > limits.max_video_tokens:
            return False
        return limits.max_video_latent_frames is None or int(shape[0]) <= limits.max_video_latent_frames
    return limits.max_image_tokens is None or tokens <= limits.max_image_tokens


def _check_encoder(root: str, manifest: dict, encoder: dict | None, plan: DataPlan) -> None:
    """DataError when the shards under ``root`` were encoded by another VAE or ViT than the model's."""
    if encoder is None:
        return
    made_by = manifest.get("encoder")
    if made_by is None:
        plan.messages.append(f"{root}: the manifest does not record which encoders made the latents; not checked")
        return
    differences = identity_mismatch(made_by, encoder)
    if differences:
        raise DataError(f"{root}: the latents were made by other encoders than the model's "
                        f"({'; '.join(differences[:4])}); train with the VAE and ViT weights that made them "
                        "(model.weights.vae / vit) or precompute again with the model's")


def _manifest_shards(root: str, cfg: DataSection, plan: DataPlan, encoder: dict | None) -> list[str]:
    fs = filesystem(root, cfg.storage)
    manifest = join_uri(root, "manifest.json")
    if not with_retries(f"reading {root}", cfg.storage, lambda: fs.exists(manifest)):
        raise DataError(f"{root}: no manifest.json (a latent shard root written by `lance precompute`)")
    data = json.loads(with_retries(f"reading {manifest}", cfg.storage, lambda: fs.cat_file(manifest)))
    _check_encoder(root, data, encoder, plan)
    try:
        entries = manifest_entries(root, data, cfg.storage)
    except ValueError as err:
        raise DataError(str(err)) from None
    uris = []
    for entry in entries:
        uri = join_uri(root, entry["shard"])
        if not with_retries(f"reading {root}", cfg.storage, lambda uri=uri: fs.exists(uri)):
            plan.issues["missing_shards"] += 1
            plan.messages.append(f"{uri}: listed in the manifest but missing; skipped")
            continue
        uris.append((uri, entry.get("sha256")))
    return uris


def _plan_columns(uri: str, cfg: DataSection) -> list[dict]:
    with open_input(uri, cfg.storage) as fh:
        pf = pq.ParquetFile(fh)
        check_schema(pf.schema_arrow, uri)  # a column no row of the shard fills is not written: None here
        rows = pf.read(columns=[c for c in PLAN_COLUMNS if c in pf.schema_arrow.names]).to_pylist()
        return [{name: row.get(name) for name in PLAN_COLUMNS} for row in rows]


def _scan_shard(uri: str, cfg: DataSection) -> tuple[list[dict] | None, str | None, str | None]:
    """(plan columns as rows, issue, message): only the footer and four small columns are read. A damaged or
    foreign shard is skipped and counted; a storage failure (timeout, access denied, no credentials) stops
    the plan instead of silently leaving the shard out of training."""
    try:
        return with_retries(f"reading {uri}", cfg.storage, lambda: _plan_columns(uri, cfg)), None, None
    except FileNotFoundError as err:
        return None, "missing_shards", f"{err}; skipped"
    except StorageError as err:
        if err.kind not in ("corrupt", "io_error"):
            raise
        return None, "unreadable_shards", f"{err}; skipped"
    except ValueError as err:
        return None, "bad_schema_shards", f"{err}; skipped"


def _semantic_drops(cfg: DataSection, plan: DataPlan) -> set[str]:
    """Sample ids of the rows the semantic dedup pass dropped (``semantic_drop.parquet`` of each root)."""
    dropped: set[str] = set()
    for root in cfg.uris:
        fs = filesystem(root, cfg.storage)
        path = join_uri(root, SEMANTIC_DROP_FILE)
        if not with_retries(f"reading {root}", cfg.storage, lambda fs=fs, path=path: fs.exists(path)):
            continue

        def read(path=path):
            with open_input(path, cfg.storage) as fh:
                return pq.read_table(fh, columns=["sample_id"]).column(0).to_pylist()

        ids = with_retries(f"reading {path}", cfg.storage, read)
        dropped.update(ids)
        plan.messages.append(f"{path}: {len(ids)} rows near-identical to earlier ones (semantic dedup) are "
                             "left out")
    return dropped


def make_plan(cfg: DataSection, tasks_wanted: dict[str, float], encoder: dict | None = None) -> DataPlan:
    """Scan every shard's plan columns (task, target shape) and decide trainable and held-out rows. With
    ``encoder`` (the model's :func:`encoder_identity`), shard roots made by other encoders are refused."""
    if not cfg.uris:
        raise DataError("data.uris is empty: give latent shard roots (`--data URI`)")
    plan = DataPlan()
    scanned: list[tuple[str, list[dict]]] = []
    listed = [entry for root in cfg.uris for entry in _manifest_shards(root, cfg, plan, encoder)]
    digests = dict(listed)
    uris = [uri for uri, _ in listed]
    semantic_drops = _semantic_drops(cfg, plan)
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        for uri, (rows, issue, message) in zip(uris, pool.map(lambda u: _scan_shard(u, cfg), uris)):
            if rows is not None:
                scanned.append((uri, rows))
            else:
                plan.issues[issue] += 1
                plan.messages.append(message)
    keep: list[list[tuple[int, str]]] = []
    per_task: dict[str, list[tuple[int, int]]] = {}
    for index, (uri, rows) in enumerate(scanned):
        kept = []
        for row_no, row in enumerate(rows):
            task = row["task"]
            if row["sample_id"] in semantic_drops:
                plan.issues["semantic_duplicate_rows"] += 1
                plan.excluded.setdefault(index, []).append(row_no)
                continue
            if task not in TASKS:
                plan.issues["unknown_task_rows"] += 1
                continue
            if not passes_resolution(task, row["target_vae_shape"], row["target_fps"], cfg.resolution):
                plan.issues["filtered_resolution_rows"] += 1
                continue
            kept.append((row_no, task))
            per_task.setdefault(task, []).append((index, row_no))
        keep.append(kept)
    if plan.issues["unknown_task_rows"]:
        plan.messages.append(f"{plan.issues['unknown_task_rows']} rows name a task outside {', '.join(TASKS)}; "
                             "skipped")
    for task, rows in per_task.items():
        count = min(cfg.holdout_per_task, len(rows) // 4)
        plan.holdout[task] = rows[:count]
    held = {(s, r) for rows in plan.holdout.values() for s, r in rows}
    for index, (uri, rows) in enumerate(scanned):
        trainable = Counter(task for row_no, task in keep[index] if (index, row_no) not in held)
        plan.shards.append(ShardEntry(uri, len(rows), dict(trainable), digests.get(uri)))
    wanted = {t for t, w in tasks_wanted.items() if w > 0}
    available = set(plan.task_rows)
    if not available & wanted:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(plan.issues.items())) or "no rows"
        raise DataError(f"empty dataset after filtering: no trainable rows for the mixture tasks "
                        f"{sorted(wanted)} in {list(cfg.uris)} ({reasons}; rows per task: {plan.task_rows})")
    for task in sorted(wanted - available):
        plan.messages.append(f"task {task!r} has weight but no trainable rows; left out of the mixture")
    return plan
