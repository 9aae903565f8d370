"""The driver side of a training run: plan the data, start (or join) Ray, run the ``TorchTrainer``.

Ray Train keeps the run's checkpoints (the last ``checkpoint.keep_last``) under ``<output>/<name>``
(local or s3://). Rank 0 writes ``metrics.jsonl``, TensorBoard events (``tb/``), generated samples
(``samples/``) and the exported ``model.safetensors`` into the log folder (``log_dir``, by default the
same ``<output>/<name>``); the driver writes ``config.json`` and ``plan.json`` there, and every worker reads
the data plan from that file (the run folder is one every worker sees: each writes its log there). Running
again with the same output and name resumes from the last checkpoint when the config is the same (a complete
run is reported and nothing starts), and is refused when it differs (pipelines/train/preflight.py).

What the driver says goes through the ``lance.train`` logger: one progress line per logging step, made by
rank 0 and carried to the driver. Everything a worker process prints (DeepSpeed, torch, Ray's own lines)
goes to ``<log_dir>/logs/rank-N.log``, not to the driver.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lance_core.encoder_identity import encoder_identity
from pipelines.runtime.ray_session import ensure_ray, repo_pythonpath
from pipelines.runtime.run_folder import RunMode
from pipelines.runtime.run_log import follow_worker_logs, new_log_sink

from .config import TrainConfig
from .metrics import read_metrics
from .plan import DataPlan, make_plan
from .preflight import repair_ray_snapshot, settle_rerun

log = logging.getLogger("lance.train")

PLAN_FILE = "plan.json"
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Read by Ray Train's controller, which takes it from the process that calls ``fit``."""


@dataclass
class TrainResult:
    run_dir: Path
    plan: DataPlan
    metrics: list[dict]
    checkpoint: str | None
    export: Path | None
    complete_before: bool = False
    """The run was already complete: nothing trained now; metrics and export are the earlier run's."""


def ensure_train_ray() -> bool:
    """Join the cluster named by RAY_ADDRESS, else start a Ray of our own on this machine (:func:`ensure_ray`);
    either way the workers find this repository on their PYTHONPATH."""
    env = repo_pythonpath()
    return ensure_ray(local_env=env, cluster_env=env)


RETAINED_MEMORY_BYTES = 1 << 30
RETAIN_FREED_MEMORY_ENV = {
    # Read by glibc when the worker process starts. One arena: Ray Train runs the training function in a
    # thread, and a thread's own arena cannot hold blocks larger than 64 MiB, so those would be mapped anew.
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(RETAINED_MEMORY_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(RETAINED_MEMORY_BYTES),
}


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    env = repo_pythonpath()
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if cfg.scaling.retain_freed_memory:
        env.update(RETAIN_FREED_MEMORY_ENV)
    return env


def storage_and_log_dir(cfg: TrainConfig) -> tuple[str, Path]:
    """Where Ray Train keeps the run (``<storage>/<name>``) and where rank 0 writes its files."""
    if "://" in cfg.output:
        return cfg.output, Path(cfg.log_dir).resolve()
    storage = Path(cfg.output).resolve()
    return str(storage), Path(cfg.log_dir).resolve() if cfg.log_dir else storage / cfg.name


def build_trainer(cfg: TrainConfig, plan_path: Path, run_dir: Path, callbacks: list | None = None,
                  log_sink=None):
    """``plan_path``: the plan :func:`prepare_run` saved, which each worker loads; ``log_sink``: the actor that
    carries rank 0's log lines to the driver (``run_log.new_log_sink``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .trainer import train_func

    os.environ.setdefault(WORKER_START_TIMEOUT_ENV, str(cfg.scaling.worker_start_timeout_s))
    scaling = ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                  **({"GPU": 1} if cfg.scaling.use_gpu else {})})
    run_config = RunConfig(
        name=cfg.name, storage_path=storage_and_log_dir(cfg)[0],
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        worker_runtime_env={"env_vars": worker_env(cfg)}, callbacks=callbacks,
    )
    loop_config = {"cfg": cfg.model_dump_json(), "plan": str(plan_path), "run_dir": str(run_dir),
                   "log_sink": log_sink}
    return TorchTrainer(train_func, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)


def prepare_run(cfg: TrainConfig) -> tuple[DataPlan, Path]:
    """Plan the data (raises DataError with the reason) and write the run's config and plan."""
    plan = make_plan(cfg.data, cfg.mixture.weights, encoder_identity(cfg.model.build()))
    for message in plan.messages:
        log.info(f"data: {message}")
    run_dir = storage_and_log_dir(cfg)[1]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    plan.save(run_dir / PLAN_FILE)
    return plan, run_dir


def run_training(cfg: TrainConfig, callbacks: list | None = None, mode: RunMode = "auto") -> TrainResult:
    """Train (or resume) ``cfg``; ``mode`` as ``--resume`` / ``--overwrite``. Paths and the rerun are settled
    before the data is planned and before Ray starts."""
    finished = settle_rerun(cfg, mode)
    if finished is not None:
        run_dir = storage_and_log_dir(cfg)[1]
        plan = DataPlan.load(run_dir / PLAN_FILE) if (run_dir / PLAN_FILE).is_file() else DataPlan()
        export = run_dir / "model.safetensors"
        return TrainResult(run_dir, plan, read_metrics(run_dir), finished.uri, export if export.is_file() else None,
                           complete_before=True)
    plan, run_dir = prepare_run(cfg)
    repair_ray_snapshot(cfg)
    ensure_train_ray()
    scaling = cfg.scaling
    log.info(f"starting {scaling.workers} Ray Train worker(s) with {scaling.cpus_per_worker:g} CPU"
             f"{' and 1 GPU' if scaling.use_gpu else ''} each for {cfg.steps} steps; "
             f"worker logs in {run_dir / 'logs'}/rank-N.log")
    sink = new_log_sink()
    with follow_worker_logs(sink):
        result = build_trainer(cfg, run_dir / PLAN_FILE, run_dir, callbacks, log_sink=sink).fit()
    export = run_dir / "model.safetensors"
    return TrainResult(run_dir, plan, read_metrics(run_dir), result.checkpoint.path if result.checkpoint else None,
                       export if export.is_file() else None)
