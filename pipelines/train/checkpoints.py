"""Checkpoints of a training run.

A checkpoint folder holds, from every rank: its DeepSpeed shard (``ds/``: model states on rank 0 or
partitioned under ZeRO-3, optimizer partitions, LR scheduler), its data position
(``data/rank_<r>.pt``: stream cursors, random states, waiting samples, the next packs' mixture weights),
and from rank 0 ``train_state.json`` (step, mixture schedule state, counters) and the EMA weights.
All ranks write into their own local folder and report it to Ray Train, which merges them into one
checkpoint in the run's storage. ``model.safetensors`` (released Lance names) goes with the last one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from lance_core.checkpoint import save_lance_checkpoint

DS_TAG = "ds"
TRAIN_STATE = "train_state.json"
EMA_FILE = "ema.pt"
EXPORT_FILE = "model.safetensors"


def data_state_path(folder: Path, rank: int) -> Path:
    return folder / "data" / f"rank_{rank:05d}.pt"


def save_checkpoint(engine, folder: Path, rank: int, train_state: dict, data_state: dict,
                    ema: dict[str, torch.Tensor] | None) -> None:
    """Collective: every rank calls it with its own (local) ``folder``."""
    engine.save_checkpoint(str(folder), tag=DS_TAG)
    path = data_state_path(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data_state, path)
    if rank == 0:
        (folder / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
        if ema is not None:
            torch.save(ema, folder / EMA_FILE)


def load_checkpoint(engine, folder: Path, rank: int, world: int) -> tuple[dict, dict, dict | None]:
    """Restore the engine (weights, optimizer, scheduler) and return (train state, data state, EMA)."""
    train_state = json.loads((folder / TRAIN_STATE).read_text())
    if train_state["world_size"] != world:
        raise RuntimeError(f"checkpoint {folder} was written by {train_state['world_size']} workers; this run has "
                           f"{world}: the data position of each rank cannot be carried over exactly")
    load_path, _ = engine.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {folder}/{DS_TAG}")
    data_state = torch.load(data_state_path(folder, rank), weights_only=False)
    ema = torch.load(folder / EMA_FILE, weights_only=True) if (folder / EMA_FILE).is_file() else None
    return train_state, data_state, ema


@contextmanager
def full_weights(engine, zero_stage: int):
    """Inside: ``engine.module`` holds the whole weights on every rank (gathered under ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module


@contextmanager
def ema_weights(model: torch.nn.Module, ema: dict[str, torch.Tensor] | None):
    """Inside: the model's trainable weights are the EMA weights (restored on exit)."""
    if not ema:
        yield model
        return
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in ema}
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def export_safetensors(engine, zero_stage: int, folder: Path, rank: int, ema, metadata: dict) -> Path | None:
    """Collective under ZeRO-3. Rank 0 writes ``folder/model.safetensors`` with the Lance key names."""
    with full_weights(engine, zero_stage) as model, ema_weights(model, ema):
        if rank == 0:
            return save_lance_checkpoint(model, folder / EXPORT_FILE, {k: str(v) for k, v in metadata.items()})
    return None


def new_local_folder(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_local_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def kill_once(marker: Path) -> None:
    """Fault injection: kill this process with SIGKILL unless ``marker`` exists (then it already happened)."""
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
