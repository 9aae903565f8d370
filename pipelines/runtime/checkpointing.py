"""The checkpoint parts both trainers share (the supervised ``Trainer`` and the GRPO learner): the DeepSpeed
engine's state (fp32 masters, Adam moments, LR scheduler) under ``<folder>/state`` in a layout any world size
and ZeRO stage reads back (:mod:`pipelines.runtime.engine_state`; DeepSpeed's own ``<folder>/ds`` for bf16
without ZeRO, and from older checkpoints), the fp32 EMA shards
under ``<folder>/ema`` (:mod:`pipelines.runtime.ema`), the exported model with the EMA's weights in place of
the trained ones, and a manifest of every file (size, and sha256 up to ``DIGEST_LIMIT`` bytes) written last.

Loading never runs code: DeepSpeed's files are read with ``torch.load(weights_only=True)`` and the three
plain classes its optimizer state holds allow-listed (:func:`weights_only_loading`); a file holding anything
else is refused. A checkpoint is trusted only once its manifest checks out (:func:`verify_checkpoint`).
The save, load and export functions are collective: every rank calls them, in the same order."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from .collectives import all_ranks_true
from .ema import ShardedEMA, master_fragment
from .engine_state import (
    STATE_FOLDER,
    engine_state_snapshot,
    has_engine_state,
    load_engine_state,
    reshardable,
)

ENGINE_TAG = "ds"
MANIFEST_FOLDER = "manifest"
DIGEST_LIMIT = 64 << 20
"""Files up to this size get a sha256 in the manifest; larger ones are checked by size (a truncated or
missing file is the damage a crash or a failed upload leaves)."""
log = logging.getLogger("lance.checkpoint")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds more than tensors and plain training state: it was replaced or damaged."""


class NonFiniteWeightsError(RuntimeError):
    """The weights (or their average) hold NaN or ±inf: no checkpoint is written from them."""


class DamagedCheckpointError(RuntimeError):
    """No intact checkpoint to resume from; the message names each damaged one and why."""


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's optimizer states hold besides tensors and builtins (ZeRO stage, loss scaler,
    fragment addresses): plain data, safe to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None):
    """``torch.load`` that refuses anything but tensors, builtins and :func:`deepspeed_safe_globals`."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), str(err)[:200])
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it holds more than tensors and training state ({reason}). This project "
                "never writes such a file: it was replaced or damaged; loading it could run code") from None


@contextmanager
def weights_only_loading(engine):
    """Inside: the engine reads its checkpoint files through :func:`safe_torch_load`."""
    checkpoint_engine = engine.checkpoint_engine
    had_own = "load" in vars(checkpoint_engine)
    original = checkpoint_engine.load
    checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    try:
        yield
    finally:
        if had_own:
            checkpoint_engine.load = original
        else:
            del checkpoint_engine.load


# ----------------------------------------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, name: str, ranks: Iterable[int], files: Iterable[Path] | None = None) -> Path:
    """``manifest/<name>.json``: the size (and small files' sha256) of ``files`` (default: every file under
    ``folder`` but the manifests), and the ranks whose share they are. Written last, by rename: a checkpoint
    whose manifests do not cover every rank was cut short."""
    folder = Path(folder)
    paths = sorted(files) if files is not None else sorted(
        p for p in folder.rglob("*") if p.is_file() and MANIFEST_FOLDER not in p.relative_to(folder).parts)
    entries = {}
    for path in paths:
        size = path.stat().st_size
        entries[str(path.relative_to(folder))] = {"bytes": size, **({"sha256": _sha256(path)}
                                                                    if size <= DIGEST_LIMIT else {})}
    out = folder / MANIFEST_FOLDER / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"ranks": sorted(ranks), "files": entries}, indent=1))
    os.replace(tmp, out)
    return out


def verify_checkpoint(folder: Path, world_size: int | None) -> str | None:
    """None when the manifests under ``folder`` cover ranks 0..world_size-1 and every file they list is there
    with its size and digest; otherwise what is wrong. A checkpoint from before manifests passes unchecked."""
    folder = Path(folder)
    manifests = sorted((folder / MANIFEST_FOLDER).glob("*.json"))
    if not manifests:
        return None if not (folder / MANIFEST_FOLDER).exists() else "its manifest folder is empty"
    ranks: set[int] = set()
    for manifest in manifests:
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            return f"{manifest.name} unreadable ({err})"
        ranks.update(data["ranks"])
        for name, entry in data["files"].items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written"
            if "sha256" in entry and _sha256(path) != entry["sha256"]:
                return f"{name} differs from what was written (sha256)"
    if world_size is not None and not set(range(world_size)) <= ranks:
        return f"no manifest of rank(s) {sorted(set(range(world_size)) - ranks)}: the save was cut short"
    return None


def nonfinite_weights(engine, ema: ShardedEMA | None) -> list[str]:
    """Names of the parameters whose master values this rank holds (or their EMA) have a NaN or ±inf."""
    bad = []
    for name, param in engine.module.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(master_fragment(param)[1]).all()):
            bad.append(name)
    if ema is not None:
        bad += [f"ema:{name}" for name, fragment in ema.fragments.items()
                if not bool(torch.isfinite(fragment.value).all())]
    return bad


def snapshot_training_state(engine, folder: Path, ema: ShardedEMA | None,
                            client_state: dict | None = None) -> Callable[[], None]:
    """Collective: this rank's share of the engine state and of the EMA copied to host memory; the returned
    function writes it into ``folder`` (one folder per rank, or one shared folder: the file names differ by
    rank) at any later time. Raises :class:`NonFiniteWeightsError`, copying nothing, when some rank's master
    weights or EMA hold a non-finite value. (bf16 without ZeRO keeps DeepSpeed's own layout, written now.)"""
    bad = nonfinite_weights(engine, ema)
    if not all_ranks_true(not bad):
        raise NonFiniteWeightsError(f"{folder}: not written: non-finite weights "
                                    f"({', '.join(bad[:5]) or 'on another rank'}); the last checkpoint stays the newest")
    if reshardable(engine):
        write_engine = engine_state_snapshot(engine, client_state)
    else:
        engine.save_checkpoint(str(folder), tag=ENGINE_TAG, client_state=client_state or {})
        write_engine = None
    write_ema = ema.snapshot() if ema is not None else None

    def write() -> None:
        if write_engine is not None:
            write_engine(folder)
        if write_ema is not None:
            write_ema(folder)

    return write


def save_training_state(engine, folder: Path, ema: ShardedEMA | None, client_state: dict | None = None) -> None:
    """:func:`snapshot_training_state` written at once."""
    snapshot_training_state(engine, folder, ema, client_state)()


def load_training_state(engine, folder: Path, ema: ShardedEMA | None) -> dict:
    """Restore the engine (and the EMA when one is kept) from ``folder``; returns the client state saved with
    it. A checkpoint without an EMA leaves the EMA at the current weights, with a warning."""
    if has_engine_state(folder):
        client_state = load_engine_state(engine, folder)
    else:
        with weights_only_loading(engine):
            load_path, client_state = engine.load_checkpoint(str(folder), tag=ENGINE_TAG,
                                                             load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"no engine state under {folder} ({STATE_FOLDER}/ or DeepSpeed's {ENGINE_TAG}/)")
    if ema is not None:
        ema.restart()  # its first values were read before the engine was restored
        if not ema.load(folder):
            log.warning(f"checkpoint {folder} holds no EMA: the average starts again from the restored weights")
    return client_state or {}


@contextmanager
def full_weights(engine, zero_stage: int):
    """Inside: ``engine.module`` holds the whole weights on every rank (gathered under ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module


def export_weights(engine, zero_stage: int, ema: ShardedEMA | None, rank: int,
                   write: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Path]) -> Path | None:
    """Rank 0 calls ``write(module, replace)`` with the whole weights in ``module`` and, in ``replace``, the
    EMA's weights (whole, on the CPU, in each parameter's dtype) by parameter name; returns its path there,
    None on the other ranks."""
    replace = ema.full_state(dst=0) if ema is not None else {}
    with full_weights(engine, zero_stage) as module:
        if rank != 0:
            return None
        params = dict(module.named_parameters())
        replace = {name: value.to(params[name].dtype) for name, value in (replace or {}).items()}
        return write(module, replace)
