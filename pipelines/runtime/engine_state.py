"""The DeepSpeed engine's training state in a layout that any number of ranks and any ZeRO stage can read back:
fp32 master weights and Adam moments as fragments addressed in each parameter's flattened tensor, plus the
optimizer step, learning rates, LR scheduler and engine counters as JSON.

Why not DeepSpeed's own files: they are pickles (a planted one runs code at ``torch.load``) and their ZeRO
partitions only load at the world size that wrote them; DeepSpeed's universal checkpoint converts them
offline, through pickles again. Torch Distributed Checkpoint would reshard too, but DeepSpeed keeps the
optimizer state in flat buffers it does not expose as a state dict. So each rank writes the fragments its
optimizer owns (the same addressing as the EMA, :mod:`pipelines.runtime.ema`) to
``state/rank_<r>.safetensors``, and a rank of any later run copies the overlap of every saved fragment with
the fragments it owns (safetensors reads only those bytes). The low-precision weights the model computes with
are then rebuilt from the restored masters (ZeRO-1/2: one all-reduce per parameter; ZeRO-3: each rank's
partition; ZeRO-0: the whole parameter on every rank).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .collectives import sum_over_ranks
from .ema import _rank_and_world, master_fragment

STATE_FOLDER = "state"
ENGINE_JSON = "engine.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner(engine) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def _trained(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)


# ----------------------------------------------------------------------------------------------- optimizer state
def _flat_partitions(engine) -> list[torch.Tensor]:
    """The fp32 tensors the inner optimizer steps (ZeRO's flat partitions, or the parameters themselves)."""
    optimizer = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return [p for group in _inner(engine).param_groups for p in group["params"]]


def ensure_optimizer_state(engine) -> None:
    """Adam's state (step, moments) created for every tensor the optimizer steps, as its first step would (a
    fresh engine has none), and linked to the parameters' fragments (ZeRO-1/2)."""
    inner = _inner(engine)
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    for flat in _flat_partitions(engine):
        state = inner.state[flat]
        if "exp_avg" in state:
            continue
        group = group_of.get(id(flat), inner.param_groups[0])
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
        for key in MOMENTS:
            state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    for _, param in _trained(engine):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None and getattr(mapping, "optim_fragment", None) is None:
            flat = _flat_partitions(engine)[mapping.param_group_index]
            mapping.set_optim_state_fragment(flat, inner.state[flat])


def _moment_fragment(engine, param: torch.nn.Parameter, key: str) -> tuple[int, torch.Tensor]:
    """(start, 1-D view) of Adam's ``key`` for the elements of ``param`` this rank's optimizer holds."""
    start, master = master_fragment(param)
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_optimizer_state

        return start, safe_get_local_optimizer_state(param, key).reshape(-1)[:master.numel()]
    mapping = getattr(param, "_hp_mapping", None)
    if hasattr(param, "_hp_mapping"):
        if mapping is None:
            return 0, master
        return start, mapping.get_optim_state_fragment(key).reshape(-1)[:master.numel()]
    moment = _inner(engine).state[param][key].reshape(-1)
    return start, moment[start:start + master.numel()]


def reshardable(engine) -> bool:
    """Whether the engine's optimizer keeps its fp32 masters where this layout finds them: ZeRO-1/2/3 in any
    precision, ZeRO-0 in fp32 (not DeepSpeed's bf16 wrapper of ZeRO-0, whose fp32 copies are not linked to the
    parameters)."""
    return not hasattr(engine.optimizer, "fp32_groups") or any(
        hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in engine.module.parameters())


def _whole_param_on_every_rank(param: torch.nn.Parameter) -> bool:
    """ZeRO-0 with a plain optimizer: every rank steps the whole parameter."""
    return not hasattr(param, "ds_id") and not hasattr(param, "_hp_mapping")


def _loading_views(engine, param: torch.nn.Parameter) -> dict[str, tuple[int, torch.Tensor]]:
    """What this rank must fill at load: master and moments, each (start, 1-D view)."""
    if _whole_param_on_every_rank(param):
        state = _inner(engine).state[param]
        return {"master": (0, param.data.reshape(-1)), **{k: (0, state[k].reshape(-1)) for k in MOMENTS}}
    return {"master": master_fragment(param), **{k: _moment_fragment(engine, param, k) for k in MOMENTS}}


def _optimizer_step(engine) -> int:
    steps = [int(s["step"]) for s in _inner(engine).state.values() if "step" in s]
    return max(steps, default=0)


# ----------------------------------------------------------------------------------------------- save
def shard_path(folder: Path, rank: int) -> Path:
    return Path(folder) / STATE_FOLDER / f"rank_{rank:05d}.safetensors"


def engine_state_snapshot(engine, extra: dict | None = None) -> Callable[[Path], None]:
    """This rank's fragments copied to host memory now; the returned function writes them into
    ``state/rank_<r>.safetensors`` of a folder (rank 0 also ``state/engine.json``), at any later time (a
    background thread: the optimizer may step meanwhile)."""
    rank, world = _rank_and_world()
    ensure_optimizer_state(engine)
    tensors, addresses = {}, {}
    for name, param in _trained(engine):
        start, master = master_fragment(param)
        if not master.numel():
            continue
        addresses[name] = [start, list(_shape(param))]
        tensors[f"master/{name}"] = _host_copy(master)
        for key in MOMENTS:
            tensors[f"{key}/{name}"] = _host_copy(_moment_fragment(engine, param, key)[1])
    meta = None
    if rank == 0:
        scheduler = engine.lr_scheduler
        meta = {"world_size": world, "zero_stage": engine.zero_optimization_stage(),
                "optimizer_step": _optimizer_step(engine), "lrs": [g["lr"] for g in _inner(engine).param_groups],
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                "skipped_steps": engine.skipped_steps, "client_state": extra or {}}
        meta = json.loads(json.dumps(meta))  # a copy of the values as they are now

    def write(folder: Path) -> None:
        path = shard_path(folder, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"addresses": json.dumps(addresses)})
        if meta is not None:
            (path.parent / ENGINE_JSON).write_text(json.dumps(meta, indent=1))

    return write


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """An fp32 copy in host memory (always a copy: the optimizer goes on updating ``tensor``)."""
    return tensor.detach().to("cpu", torch.float32, copy=True).contiguous()


def save_engine_state(engine, folder: Path, extra: dict | None = None) -> None:
    """:func:`engine_state_snapshot` written at once."""
    engine_state_snapshot(engine, extra)(folder)


def has_engine_state(folder: Path) -> bool:
    return (Path(folder) / STATE_FOLDER / ENGINE_JSON).is_file()


# ----------------------------------------------------------------------------------------------- load
def _copy_overlap(view_start: int, view: torch.Tensor, start: int, piece) -> int:
    length = piece.get_shape()[0]
    lo, hi = max(start, view_start), min(start + length, view_start + view.numel())
    if hi <= lo:
        return 0
    view[lo - view_start:hi - view_start].copy_(torch.as_tensor(piece[lo - start:hi - start]).to(view.dtype))
    return hi - lo


def load_engine_state(engine, folder: Path) -> dict:
    """Fill this rank's masters, moments and low-precision weights from ``state/`` written by any number of
    ranks at any ZeRO stage, and restore the step, learning rates, scheduler and counters. Collective.
    Returns the client state saved with it. Raises when the saved fragments do not cover this rank's."""
    folder = Path(folder) / STATE_FOLDER
    meta = json.loads((folder / ENGINE_JSON).read_text())
    ensure_optimizer_state(engine)
    params = dict(_trained(engine))
    views = {name: _loading_views(engine, param) for name, param in params.items()}
    covered = {(name, key): 0 for name in views for key in views[name]}
    for path in sorted(folder.glob("rank_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name, (start, shape) in json.loads(handle.metadata()["addresses"]).items():
                if name not in views:
                    continue
                if tuple(shape) != _shape(params[name]):
                    raise ValueError(f"{path}: {name} has shape {tuple(shape)}, the model {_shape(params[name])}")
                for key, (view_start, view) in views[name].items():
                    with torch.no_grad():
                        covered[(name, key)] += _copy_overlap(view_start, view, start,
                                                              handle.get_slice(f"{key}/{name}"))
    missing = [f"{key} of {name}" for (name, key), count in covered.items() if count != views[name][key][1].numel()]
    if missing:
        raise ValueError(f"{folder}: the saved state does not cover {len(missing)} fragments of this rank (e.g. "
                         f"{missing[0]}): shards missing or written by another model")
    _rebuild_low_precision(engine, params)
    _restore_scalars(engine, meta)
    return meta.get("client_state", {})


def _rebuild_low_precision(engine, params: dict[str, torch.nn.Parameter]) -> None:
    """The weights the model computes with, from the restored fp32 masters."""
    with torch.no_grad():
        for param in params.values():
            if _whole_param_on_every_rank(param):
                continue
            start, master = master_fragment(param)
            if hasattr(param, "ds_id"):
                param.ds_tensor.data.reshape(-1)[:master.numel()].copy_(master.to(param.ds_tensor.dtype))
                continue
            whole = torch.zeros(param.numel(), dtype=torch.float32, device=master.device)
            whole[start:start + master.numel()] = master
            if dist.is_initialized() and dist.get_world_size() > 1:
                whole = sum_over_ranks(whole)
            param.data.copy_(whole.view_as(param).to(param.dtype))


def _restore_scalars(engine, meta: dict) -> None:
    inner = _inner(engine)
    for state in inner.state.values():
        if "step" in state:
            state["step"].fill_(meta["optimizer_step"])
    for group, lr in zip(inner.param_groups, meta["lrs"]):
        group["lr"] = lr
    if engine.lr_scheduler is not None and meta.get("scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["scheduler"])
    engine.global_steps, engine.global_samples = meta["global_steps"], meta["global_samples"]
    engine.skipped_steps = meta["skipped_steps"]
