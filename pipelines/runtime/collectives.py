"""Every collective call of the trainers, on the device the process group's backend works on.

NCCL has no CPU backend: a CPU tensor handed to an NCCL group fails with "No backend type associated with
device type cpu". Gloo works on CPU tensors only. So no trainer calls ``torch.distributed`` itself: the
helpers here move each tensor to :func:`collective_device` of the group, run the collective there and hand
the result back where the caller wants it.

- :func:`all_reduce_named`: a dict of sums, maxes and mins in at most two ``all_reduce`` calls (one SUM,
  one MAX), back under the same names; numbers come back as Python floats, tensors in float64 with their
  shape. Everything travels in float64, which holds integer counts up to 2**53 exactly.
- :func:`all_ranks_true`: whether a flag holds on every rank (one MIN).
- :func:`sum_over_ranks`, :func:`broadcast_from`, :func:`reduce_to`: one tensor, on the caller's device.

:func:`check_collective_devices` is the test double of an NCCL group on a CPU machine: inside it, a
collective that gets a tensor off the group's device, or that is called from project code other than this
module, raises.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

Value = float | int | torch.Tensor
Layout = list[tuple[str, torch.Size | None]]
"""Each name with its tensor's shape, or None for a plain number, in the order they are packed."""

CPU_BACKENDS = ("gloo", "mpi", "ccl")


def collective_device(group=None) -> torch.device:
    """The device the collectives of ``group`` (default: the world group) take tensors on: the current CUDA
    device under NCCL (also when gloo serves the CPU beside it: the GPU path is the fast one), else the CPU."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if any(name in backend for name in CPU_BACKENDS) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _on_group(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` on the group's device (no copy when it is already there)."""
    return tensor.to(collective_device(group), non_blocking=True)


# ----------------------------------------------------------------------------------------------- one tensor
def sum_over_ranks(local: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``local`` over the ranks, on ``local``'s device (``local`` itself is left unchanged)."""
    total = _on_group(local.detach(), group).clone()
    dist.all_reduce(total, group=group)
    return total.to(local.device)


def all_ranks_true(flag: bool, group=None) -> bool:
    """Whether ``flag`` holds on every rank of ``group``."""
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item() > 0)


def broadcast_from(tensor: torch.Tensor, src: int = 0, group=None) -> None:
    """``tensor`` (in place, on any device) takes rank ``src``'s values."""
    wire = _on_group(tensor.detach(), group)
    dist.broadcast(wire, src=src, group=group)
    if wire.data_ptr() != tensor.data_ptr():
        with torch.no_grad():
            tensor.copy_(wire)


def reduce_to(tensor: torch.Tensor, dst: int = 0, group=None) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks on rank ``dst`` (other ranks get their partial), on ``tensor``'s
    device; ``tensor`` itself is left unchanged."""
    wire = _on_group(tensor.detach(), group).clone()
    dist.reduce(wire, dst=dst, group=group)
    return wire.to(tensor.device)


# ----------------------------------------------------------------------------------------------- named values
def pack_named(values: Mapping[str, Value], device: torch.device | str = "cpu") -> tuple[torch.Tensor, Layout]:
    """One flat float64 tensor of ``values`` on ``device`` in their insertion order, and the layout to unpack
    it. Numbers are gathered on the host and cross to the device in one copy."""
    numbers = [float(v) for v in values.values() if not isinstance(v, torch.Tensor)]
    number_iter = iter(torch.tensor(numbers, dtype=torch.float64).to(device, non_blocking=True)) if numbers \
        else iter(())
    parts, layout = [], []
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            parts.append(value.detach().to(device, torch.float64).flatten())
            layout.append((name, value.shape))
        else:
            parts.append(next(number_iter).reshape(1))
            layout.append((name, None))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    return flat, layout


def unpack_named(flat: torch.Tensor, layout: Layout) -> dict[str, float | torch.Tensor]:
    """The inverse of :func:`pack_named`; tensors come back on the CPU (one device-to-host copy)."""
    flat = flat.cpu()
    out: dict[str, float | torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        if shape is None:
            out[name] = flat[offset].item()
            offset += 1
        else:
            size = shape.numel()
            out[name] = flat[offset:offset + size].view(shape)
            offset += size
    assert offset == flat.numel(), (offset, flat.numel())
    return out


def _all_reduce(values: Mapping[str, Value], op, group) -> dict[str, float | torch.Tensor]:
    flat, layout = pack_named(values, collective_device(group))
    dist.all_reduce(flat, op=op, group=group)
    return unpack_named(flat, layout)


def all_reduce_named(sums: Mapping[str, Value] | None = None, maxes: Mapping[str, Value] | None = None,
                     mins: Mapping[str, Value] | None = None, group=None) -> dict[str, float | torch.Tensor]:
    """Every name of ``sums``, ``maxes`` and ``mins`` with its sum, max or min over all ranks. Names must
    not repeat across the three groups. Every rank must pass the same names in the same order."""
    sums, maxes, mins = dict(sums or {}), dict(maxes or {}), dict(mins or {})
    repeated = (sums.keys() & maxes.keys()) | (sums.keys() & mins.keys()) | (maxes.keys() & mins.keys())
    if repeated:
        raise ValueError(f"names reduced in more than one way: {sorted(repeated)}")
    out: dict[str, float | torch.Tensor] = {}
    if sums:
        out.update(_all_reduce(sums, dist.ReduceOp.SUM, group))
    if maxes or mins:
        # MIN as MAX of the negated values, so the maxes and the mins share one call: min(x) = -max(-x),
        # exact in floating point (negation only flips the sign bit).
        negated = {name: -_as_float64(value) for name, value in mins.items()}
        reduced = _all_reduce({**maxes, **negated}, dist.ReduceOp.MAX, group)
        out.update({name: reduced[name] for name in maxes})
        out.update({name: -reduced[name] for name in mins})
    return {name: out[name] for name in (*sums, *maxes, *mins)}


def _as_float64(value: Value) -> float | torch.Tensor:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)


# ----------------------------------------------------------------------------------------------- test double
CHECKED_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
                       "reduce_scatter_tensor", "all_to_all_single", "all_gather_object")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = tuple(str(PROJECT_ROOT / name) for name in ("pipelines", "lance_core", "jobs"))
ALLOWED_CALLERS = (str(Path(__file__).resolve()), str(PROJECT_ROOT / "lance_core" / "model" / "sequence_parallel.py"))
"""Project files allowed to call ``torch.distributed`` collectives: this module, and the all-to-all of
sequence parallelism (its tensors are the model's activations, always on the training device)."""


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor off the group's device, or was called around the helpers here."""


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _direct_caller() -> str:
    """The file that called the collective (two frames up: past the checking wrapper)."""
    return str(Path(sys._getframe(2).f_code.co_filename).resolve())


@contextmanager
def check_collective_devices(device: torch.device | str | None = None, project_paths: tuple[str, ...] = PROJECT_PACKAGES):
    """Inside: every ``torch.distributed`` collective checks that its tensors are on ``device`` (default:
    :func:`collective_device` of the group at the time of the call) and that code under ``project_paths``
    calls it only through this module. Yields the list of (collective, device type, caller) seen."""
    seen: list[tuple[str, str, str]] = []
    originals = {name: getattr(dist, name) for name in CHECKED_COLLECTIVES if hasattr(dist, name)}

    def wrap(name, original):
        def checked(*args, **kwargs):
            expected = torch.device(device) if device is not None else collective_device(kwargs.get("group"))
            caller = _direct_caller()
            for tensor in _tensors(list(args) + list(kwargs.values())):
                if tensor.device.type != expected.type:
                    raise CollectiveDeviceError(
                        f"torch.distributed.{name} got a tensor on {tensor.device}, the group works on "
                        f"{expected} (called from {caller})")
            if caller.startswith(project_paths) and caller not in ALLOWED_CALLERS:
                raise CollectiveDeviceError(f"torch.distributed.{name} called directly from {caller}: "
                                            "go through pipelines.runtime.collectives")
            seen.append((name, expected.type, caller))
            return original(*args, **kwargs)

        return checked

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
