"""Checkpoints of a training run.

A checkpoint folder holds, from every rank: its share of the engine state (``state/rank_<r>.safetensors``:
fp32 masters and Adam moments, readable at any world size and ZeRO stage, :mod:`pipelines.runtime.engine_state`),
the data position of each of its pack slots (``data/slot_<s>.json`` + ``data/slot_<s>.safetensors``: stream
cursors, random states, waiting samples, the next packs' mixture weights; a slot is one pack of the global
batch, so the position does not depend on the worker count), and from rank 0 ``train_state.json`` (step,
global batch, mixture schedule state, counters), and every rank its fp32 EMA shard (``ema/rank_<r>.safetensors``).

The data position is plain JSON plus a safetensors file of its tensors, so that loading it cannot run code
(a pickle can: anyone able to write the checkpoint store would run code on every worker at resume). The
JSON marks tuples, tensors and the few dataclasses of a waiting sample (:data:`STATE_CLASSES`); nothing
else is rebuilt from it.
All ranks write into their own local folder and report it to Ray Train, which merges them into one
checkpoint in the run's storage. ``model.safetensors`` (released Lance names) goes with the last one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lance_core.checkpoint import save_lance_checkpoint
from lance_core.packing import Sample, Span, VisualInput
from pipelines.runtime.checkpointing import export_weights, load_training_state, snapshot_training_state
from pipelines.runtime.ema import ShardedEMA

TRAIN_STATE = "train_state.json"
EXPORT_FILE = "model.safetensors"


STATE_CLASSES = {cls.__name__: cls for cls in (Sample, Span, VisualInput)}
"""The only classes a data state may hold (the packer's waiting samples)."""
TUPLE, TENSOR, ITEMS, OBJECT = "__tuple__", "__tensor__", "__items__", "__object__"


def data_state_path(folder: Path, slot: int, legacy: bool = False) -> Path:
    """The JSON part of a pack slot's data state; its tensors sit beside it (:func:`data_tensors_path`).
    ``legacy``: the per-rank name of checkpoints written before pack slots (one slot per rank)."""
    return folder / "data" / f"{'rank' if legacy else 'slot'}_{slot:05d}.json"


def data_tensors_path(folder: Path, slot: int, legacy: bool = False) -> Path:
    return data_state_path(folder, slot, legacy).with_suffix(".safetensors")


def encode_state(value, tensors: dict[str, torch.Tensor]):
    """``value`` as JSON data; its tensors go into ``tensors`` (by the name the JSON refers to)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {TENSOR: name}
    if isinstance(value, list):
        return [encode_state(v, tensors) for v in value]
    if isinstance(value, tuple):
        return {TUPLE: [encode_state(v, tensors) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, tensors) for k, v in value.items()}
        return {ITEMS: [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and STATE_CLASSES.get(type(value).__name__) is type(value):
        return {OBJECT: type(value).__name__,
                "fields": {f.name: encode_state(getattr(value, f.name), tensors) for f in dataclasses.fields(value)}}
    raise TypeError(f"a data state cannot hold a {type(value).__name__}: only JSON values, tuples, tensors and "
                    f"{', '.join(STATE_CLASSES)}")


def decode_state(value, tensors: dict[str, torch.Tensor], where: str = "data state"):
    """The inverse of :func:`encode_state`; anything it did not write is refused, naming ``where``."""
    if isinstance(value, list):
        return [decode_state(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        if value[TENSOR] not in tensors:
            raise ValueError(f"{where}: tensor {value[TENSOR]!r} is missing from its safetensors file")
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(decode_state(v, tensors, where) for v in value[TUPLE])
    if ITEMS in value:
        return {decode_state(k, tensors, where): decode_state(v, tensors, where) for k, v in value[ITEMS]}
    if OBJECT in value:
        cls = STATE_CLASSES.get(value[OBJECT])
        if cls is None:
            raise ValueError(f"{where}: {value[OBJECT]!r} is not a class a data state may hold")
        return cls(**{k: decode_state(v, tensors, where) for k, v in value["fields"].items()})
    return {k: decode_state(v, tensors, where) for k, v in value.items()}


def save_data_state(folder: Path, slot: int, data_state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(data_state, tensors)
    path = data_state_path(folder, slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(data_tensors_path(folder, slot)))
    path.write_text(json.dumps(encoded))


def load_data_state(folder: Path, slot: int) -> dict:
    path, tensors_path = data_state_path(folder, slot), data_tensors_path(folder, slot)
    if not path.is_file() and data_state_path(folder, slot, legacy=True).is_file():
        path, tensors_path = data_state_path(folder, slot, legacy=True), data_tensors_path(folder, slot, legacy=True)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} holds no data state of pack slot {slot} ({path.name}); a "
                                "checkpoint of an older format cannot be resumed exactly")
    tensors = load_file(str(tensors_path)) if tensors_path.is_file() else {}
    return decode_state(json.loads(path.read_text()), tensors, str(path))


def snapshot_checkpoint(engine, folder: Path, rank: int, train_state: dict, data_states: dict[int, dict],
                        ema: ShardedEMA | None) -> Callable[[], None]:
    """Collective: every rank calls it with its (local) ``folder`` and the data states of its pack slots. The
    engine state and EMA are copied to host memory now; the returned function writes the checkpoint's files
    (on a background thread while training goes on, or at once)."""
    write_training_state = snapshot_training_state(engine, folder, ema)
    train_state, data_states = json.loads(json.dumps(train_state)), dict(data_states)

    def write() -> None:
        write_training_state()
        for slot, data_state in data_states.items():
            save_data_state(folder, slot, data_state)
        if rank == 0:
            (folder / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))

    return write


def save_checkpoint(engine, folder: Path, rank: int, train_state: dict, data_states: dict[int, dict],
                    ema: ShardedEMA | None) -> None:
    """:func:`snapshot_checkpoint` written at once."""
    snapshot_checkpoint(engine, folder, rank, train_state, data_states, ema)()


class BackgroundSave:
    """A checkpoint's files written on a thread of their own; :meth:`finished` says (without waiting, or
    waiting) whether they are all written, and raises what the writing raised."""

    def __init__(self, step: int, folder: Path, metrics: dict, write: Callable[[], None]) -> None:
        self.step, self.folder, self.metrics = step, folder, metrics
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as err:  # noqa: BLE001 - raised on the training thread by finished()
            self.error = err

    def finished(self, wait: bool) -> bool:
        if wait:
            self._thread.join()
        return not self._thread.is_alive()


class GlobalBatchChangedError(RuntimeError):
    """A run resumed with another global batch (pack slot count) than the checkpoint's."""


def load_checkpoint(engine, folder: Path, slots: list[int], global_packs: int,
                    ema: ShardedEMA | None) -> tuple[dict, list[dict]]:
    """Restore the engine (weights, optimizer, scheduler) and the EMA, at any worker count; return (train
    state, the data states of ``slots``)."""
    train_state = json.loads((folder / TRAIN_STATE).read_text())
    saved = train_state.get("global_packs", train_state["world_size"])
    if saved != global_packs:
        raise GlobalBatchChangedError(
            f"checkpoint {folder} was written with a global batch of {saved} packs; this run has {global_packs}. "
            f"Set data.global_packs: {saved} to resume it (any worker count that divides it), or start a new run")
    load_training_state(engine, folder, ema)
    return train_state, [load_data_state(folder, slot) for slot in slots]


def export_safetensors(engine, zero_stage: int, folder: Path, rank: int, ema: ShardedEMA | None,
                       metadata: dict) -> Path | None:
    """Collective under ZeRO-3 and with an EMA. Rank 0 writes ``folder/model.safetensors`` with the Lance key
    names, the EMA's weights in place of the trained ones."""
    meta = {k: str(v) for k, v in metadata.items()}
    return export_weights(engine, zero_stage, ema, rank,
                          lambda model, replace: save_lance_checkpoint(model, folder / EXPORT_FILE, meta,
                                                                       replace=replace))


def kill_once(marker: Path) -> None:
    """Fault injection: kill this process with SIGKILL unless ``marker`` exists (then it already happened)."""
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
