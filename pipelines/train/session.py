"""What the training worker needs from whoever launched it: its rank, the checkpoint to resume from, where to
write a new one and how to hand it in. Two launchers, one ``Trainer``:

- :class:`RayTrainSession`: a Ray Train worker (``lance train``): Ray set up the process group, keeps the
  checkpoints under ``<output>/<name>`` (local or s3://) and restarts the group on failure. Each rank writes
  its share into a local folder and ``ray.train.report`` merges them.
- :class:`TorchSession`: a process started by ``torchrun`` (or a single process): the process group comes
  from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), and every rank writes into one folder
  of a filesystem they all see, ``<output>/<name>/partial_checkpoint_<step>``, which rank 0 renames to
  ``checkpoint_<step>`` once every rank is done (a checkpoint cut short by a crash is never taken for one).
  The same layout as Ray Train's: either launcher resumes the other's run.

Each share of a checkpoint ends with its manifest (pipelines/runtime/checkpointing.py); the trainer resumes
from the newest checkpoint whose manifests check out (``resume_candidates`` lists them, newest first).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from pipelines.runtime.checkpointing import write_manifest
from pipelines.runtime.collectives import all_ranks_true

from .checkpoints import TRAIN_STATE

CHECKPOINT_PREFIX = "checkpoint_"
PARTIAL_PREFIX = "partial_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


class TrainSession(Protocol):
    rank: int
    world: int
    local_rank: int

    def resume_candidates(self) -> Iterator[Iterator[Path]]:
        """Context manager: the folders of the run's checkpoints, newest first (every rank the same list)."""

    def checkpoint_folder(self, step: int) -> Path:
        """Where this rank writes its share of the checkpoint of ``step``."""

    def report(self, metrics: dict, step: int, folder: Path | None = None) -> None:
        """Hand in the step's metrics, and the checkpoint every rank wrote into ``folder`` (collective then)."""


class RayTrainSession:
    def __init__(self, async_upload: bool = False) -> None:
        import ray.train

        self.async_upload = async_upload
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()

    @contextmanager
    def resume_candidates(self) -> Iterator[Iterator[Path]]:
        """Ray Train's latest checkpoint, then the older ones beside it in the run's storage."""
        import ray.train

        latest = ray.train.get_checkpoint()
        yield self._materialised(latest) if latest is not None else iter(())

    def _materialised(self, latest) -> Iterator[Path]:
        import ray.train
        from pyarrow import fs as pafs

        with latest.as_directory() as folder:
            yield Path(folder)
        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
        older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name.startswith(CHECKPOINT_PREFIX) and i.path.rstrip("/") != latest.path.rstrip("/")),
                       reverse=True)
        for path in older:
            with ray.train.Checkpoint(path, filesystem=latest.filesystem).as_directory() as folder:
                yield Path(folder)

    def checkpoint_folder(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"lance-ckpt-{self.rank}-"))

    def report(self, metrics: dict, step: int, folder: Path | None = None) -> None:
        import ray.train

        if folder is None:
            ray.train.report(metrics)
            return
        write_manifest(folder, f"rank_{self.rank:05d}", [self.rank])  # last: the share is complete
        if self.async_upload:
            from ray.train import CheckpointUploadMode

            # uploaded by Ray in the background, the local folder removed after it
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=checkpoint_name(step),
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=checkpoint_name(step))
        shutil.rmtree(folder, ignore_errors=True)


def complete_checkpoints(run_root: Path) -> list[Path]:
    """The run's complete checkpoints (renamed from partial, holding the train state), oldest first."""
    if not run_root.is_dir():
        return []
    found = [p for p in run_root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


class TorchSession:
    """``run_root``: ``<output>/<name>``, on a filesystem every rank sees; the newest ``keep_last`` checkpoints
    are kept."""

    def __init__(self, run_root: Path, keep_last: int) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchSession needs the process group (init_torch_group) first")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.run_root, self.keep_last = Path(run_root), keep_last

    @contextmanager
    def resume_candidates(self) -> Iterator[Iterator[Path]]:
        yield iter(reversed(complete_checkpoints(self.run_root)))

    def checkpoint_folder(self, step: int) -> Path:
        folder = self.run_root / f"{PARTIAL_PREFIX}{checkpoint_name(step)}"
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # what a crash left of the same step
            folder.mkdir(parents=True)
        all_ranks_true(True)  # the folder exists before any rank writes into it
        return folder

    def report(self, metrics: dict, step: int, folder: Path | None = None) -> None:
        if folder is None:
            return
        all_ranks_true(True)  # every rank has written its share
        if self.rank == 0:
            write_manifest(folder, "all", range(self.world))
            final = self.run_root / checkpoint_name(step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(folder, final)
            for old in complete_checkpoints(self.run_root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        all_ranks_true(True)


def init_torch_group(use_gpu: bool) -> torch.device:
    """The process group of a ``torchrun`` launch (its environment), or of one process when there is none:
    NCCL on GPUs, gloo on CPUs. Returns this rank's device."""
    from pipelines.runtime.devices import pick_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(1 if use_gpu else 0, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:  # one process, no torchrun
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
