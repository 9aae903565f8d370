"""Training without Ray: the same ``Trainer`` under ``torchrun``, or in this one process.

    torchrun --nproc-per-node 8 -m jobs.train --launcher torch --config train_sft.yaml   # one box, 8 GPUs
    lance train --launcher torch --config train_tiny.yaml                               # one process

Every rank runs this; rank 0 settles the rerun and plans the data (as the Ray driver does), the others read
its plan. Checkpoints go to ``<output>/<name>/checkpoint_<step>`` (pipelines/train/session.py:
``TorchSession``), the same layout as under Ray Train, so either launcher resumes the other's run. The
output must be a filesystem every rank sees. There is no restart on failure: rerun the command to resume.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch.distributed as dist

from lance_core.config import ConfigError
from pipelines.runtime.collectives import all_ranks_true
from pipelines.runtime.run_folder import RunMode
from pipelines.runtime.run_log import worker_logging

from .config import TrainConfig
from .driver import PLAN_FILE, TrainResult, prepare_run, storage_and_log_dir
from .metrics import read_metrics
from .plan import DataPlan
from .preflight import settle_rerun
from .session import TorchSession, complete_checkpoints, init_torch_group

log = logging.getLogger("lance.train")


class RankZeroFailed(RuntimeError):
    """Rank 0 could not prepare the run (its own error says why)."""


def _settle_on_rank0(cfg: TrainConfig, mode: RunMode, rank: int):
    """(finished checkpoint or None, plan or None) on rank 0; every rank learns whether rank 0 failed or
    found the run complete."""
    finished, plan, error = None, None, None
    if rank == 0:
        try:
            finished = settle_rerun(cfg, mode)
            if finished is None:
                plan, _ = prepare_run(cfg)
        except Exception as err:  # noqa: BLE001 - raised below on rank 0, after the others learnt of it
            error = err
    if not all_ranks_true(error is None):
        if error is not None:
            raise error
        raise RankZeroFailed("rank 0 could not prepare the run: see its output")
    complete = not all_ranks_true(finished is None)
    return finished, plan, complete


def run_torch_training(cfg: TrainConfig, mode: RunMode = "auto") -> TrainResult:
    """Train (or resume) ``cfg`` as this rank of the ``torchrun`` launch (or as the only rank)."""
    from .trainer import Trainer

    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    storage, run_dir = storage_and_log_dir(cfg)
    if "://" in storage:
        raise ConfigError(f"output {storage!r}: the torch launcher writes checkpoints into a filesystem every rank "
                          "sees (a local or shared path); use the Ray launcher for object storage")
    init_torch_group(cfg.scaling.use_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"workers": world})})
    finished, plan, complete = _settle_on_rank0(cfg, mode, rank)
    run_root = Path(storage) / cfg.name
    if complete:
        export = run_dir / "model.safetensors"
        return TrainResult(run_dir, plan or DataPlan(), read_metrics(run_dir), finished.uri if finished else None,
                           export if export.is_file() else None, complete_before=True)
    if plan is None:
        plan = DataPlan.load(run_dir / PLAN_FILE)
    if rank == 0:
        log.info(f"training on {world} rank(s) launched by torch.distributed; checkpoints in {run_root}")
    config = {"cfg": cfg.model_dump_json(), "plan": str(run_dir / PLAN_FILE), "run_dir": str(run_dir)}
    logs = worker_logging(run_dir / "logs" / f"rank-{rank}.log") if rank else nullcontext()
    with logs:
        Trainer(config, TorchSession(run_root, cfg.checkpoint.keep_last)).run()
    found = complete_checkpoints(run_root)
    export = run_dir / "model.safetensors"
    return TrainResult(run_dir, plan, read_metrics(run_dir), str(found[-1]) if found else None,
                       export if export.is_file() else None)
