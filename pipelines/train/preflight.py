"""Before a training run (or a sweep) does any work: its paths checked, and what a rerun does with the run
folder decided (pipelines/runtime/run_folder.py). A run whose newest checkpoint already holds ``steps`` is
complete: a rerun says so and where, and starts nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from lance_core.config import path_fields
from pipelines.runtime.preflight import check_paths
from pipelines.runtime.run_folder import RunFolder, RunMode
from pipelines.runtime.storage import filesystem, with_retries

from .config import TrainConfig

log = logging.getLogger("lance.train")

TRAIN_RESUMABLE = (
    "steps", "max_failures", "debug", "tune", "metrics", "eval", "checkpoint", "deepspeed.activation_checkpointing",
    "scaling.cpus_per_worker", "scaling.threads_per_worker", "scaling.retain_freed_memory",
    "scaling.worker_start_timeout_s", "data.prefetch", "data.read_batch_rows", "data.storage",
    "scaling.workers", "scaling.sequence_parallel", "deepspeed.zero_stage", "deepspeed.reduce_bucket_size",
)
"""Fields a resumed run may change: the steps to train to (a higher ``steps`` continues a finished run),
restarts, fault injection, what is reported, evaluated and checkpointed, recomputation, threads and memory
of the workers, how shards are read, and the worker count, sequence-parallel width and ZeRO stage (the engine
state reshards and the data position is per pack slot; the global batch, ``data.global_packs``, must stay).
Everything else that decides the data, the model and the optimisation must stay the same."""
STATE_FILE = "train_state.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the run's checkpoints, in ``<output>/<name>``."""


@dataclass
class Checkpoint:
    step: int
    uri: str


def check_train_paths(cfg: TrainConfig) -> None:
    """ConfigError naming each path field (and flag) that cannot serve: no data, a missing local shard
    root, initial weights or tokenizer folder, an output or log folder that is a file."""
    fields = list(path_fields(cfg))
    missing = {} if cfg.data.uris else {"data.uris": "no training data given: pass --data URI or set data.uris"}
    check_paths(fields, "train", flags={"data.uris": "--data", "output": "--output"}, missing=missing)


def run_uri(cfg: TrainConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``<output>/<name>``."""
    from .driver import storage_and_log_dir

    return f"{storage_and_log_dir(cfg)[0].rstrip('/')}/{cfg.name}"


def latest_checkpoint(cfg: TrainConfig) -> Checkpoint | None:
    """The run's newest checkpoint that holds its train state (``checkpoint_<step>/train_state.json``)."""
    uri = run_uri(cfg)
    fs = filesystem(uri, cfg.data.storage)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    found = with_retries(f"listing {uri}", cfg.data.storage, lambda: fs.glob(f"{uri}/checkpoint_*"))
    for path in sorted(found, reverse=True):  # checkpoint_<7-digit step>: newest first
        path = path if path.startswith(scheme) else scheme + path
        state = f"{path}/{STATE_FILE}"
        if with_retries(f"reading {uri}", cfg.data.storage, lambda state=state: fs.exists(state)):
            data = with_retries(f"reading {state}", cfg.data.storage, lambda state=state: fs.cat_file(state))
            return Checkpoint(int(json.loads(data)["step"]), path)
    return None


def settle_rerun(cfg: TrainConfig, mode: RunMode = "auto") -> Checkpoint | None:
    """Check the paths, then resume / start afresh / refuse (RunFolderError) by the run folder's recorded
    config; returns the final checkpoint when the run is already complete (nothing is to be trained)."""
    from .driver import storage_and_log_dir

    check_train_paths(cfg)
    log_dir = str(storage_and_log_dir(cfg)[1])
    folder = RunFolder("train", log_dir, other="--output or --name")
    storage = RunFolder("train", run_uri(cfg), cfg.data.storage)
    latest = latest_checkpoint(cfg)
    others = [storage] if storage.uri != folder.uri else []
    action = folder.settle(cfg.model_dump(mode="json"), TRAIN_RESUMABLE, mode, holds_run=latest is not None,
                           schema=type(cfg),
                           others=others)
    if action == "resume" and latest is not None and latest.step >= cfg.steps:
        log.info(f"run {cfg.name!r} is complete: its checkpoint at step {latest.step} (steps: {cfg.steps}) is "
                 f"{latest.uri}; nothing to train (a higher --steps continues it, --overwrite starts afresh)")
        return latest
    return None


def repair_ray_snapshot(cfg: TrainConfig) -> list[str]:
    """Drop from Ray Train's snapshot the checkpoints whose folders are gone (a user removed a damaged one):
    Ray Train refuses to start a run whose snapshot names a missing checkpoint. Returns the names dropped."""
    uri = run_uri(cfg)
    fs = filesystem(uri, cfg.data.storage)
    path = f"{uri}/{RAY_SNAPSHOT}"
    if not with_retries(f"reading {uri}", cfg.data.storage, lambda: fs.exists(path)):
        return []
    snapshot = json.loads(with_retries(f"reading {path}", cfg.data.storage, lambda: fs.cat_file(path)))
    results = snapshot.get("checkpoint_results") or []
    gone = [r["checkpoint_dir_name"] for r in results
            if not with_retries(f"reading {uri}", cfg.data.storage,
                                lambda r=r: fs.exists(f"{uri}/{r['checkpoint_dir_name']}"))]
    if not gone:
        return []
    kept = [(r, i) for r, i in zip(results, snapshot.get("checkpoint_report_indices") or [None] * len(results))
            if r["checkpoint_dir_name"] not in gone]
    snapshot["checkpoint_results"] = [r for r, _ in kept]
    if "checkpoint_report_indices" in snapshot:
        snapshot["checkpoint_report_indices"] = [i for _, i in kept]
    latest = snapshot.get("latest_checkpoint_result")
    if latest is not None and latest["checkpoint_dir_name"] in gone:
        snapshot["latest_checkpoint_result"] = kept[-1][0] if kept else None
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snapshot:
            snapshot[key] = [name for name in snapshot[key] if name not in gone]
    with_retries(f"writing {path}", cfg.data.storage, lambda: fs.pipe_file(path, json.dumps(snapshot).encode()))
    log.warning(f"{uri}: Ray Train's snapshot named checkpoint(s) no longer there ({', '.join(gone)}); dropped them "
                f"from it, the run resumes from {kept[-1][0]['checkpoint_dir_name'] if kept else 'the start'}")
    return gone
