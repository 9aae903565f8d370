"""Named values reduced across the ranks of the training group: a dict of sums, maxes and mins goes out in
at most two ``all_reduce`` calls (one SUM, one MAX), and comes back under the same names.

A value is a number (returned as a Python float) or a tensor (reduced elementwise, returned in float64
with its shape). All values travel in float64, which holds integer counts up to 2**53 exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

Value = float | int | torch.Tensor
Layout = list[tuple[str, torch.Size | None]]
"""Each name with its tensor's shape, or None for a plain number, in the order they are packed."""


def pack_named(values: Mapping[str, Value]) -> tuple[torch.Tensor, Layout]:
    """One flat float64 tensor of ``values`` in their insertion order, and the layout to unpack it."""
    parts, layout = [], []
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            parts.append(value.detach().to("cpu", torch.float64).flatten())
            layout.append((name, value.shape))
        else:
            parts.append(torch.tensor([value], dtype=torch.float64))
            layout.append((name, None))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return flat, layout


def unpack_named(flat: torch.Tensor, layout: Layout) -> dict[str, float | torch.Tensor]:
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


def _all_reduce(values: Mapping[str, Value], op) -> dict[str, float | torch.Tensor]:
    flat, layout = pack_named(values)
    dist.all_reduce(flat, op=op)
    return unpack_named(flat, layout)


def all_reduce_named(sums: Mapping[str, Value] | None = None, maxes: Mapping[str, Value] | None = None,
                     mins: Mapping[str, Value] | None = None) -> dict[str, float | torch.Tensor]:
    """Every name of ``sums``, ``maxes`` and ``mins`` with its sum, max or min over all ranks. Names must
    not repeat across the three groups. Every rank must pass the same names in the same order."""
    sums, maxes, mins = dict(sums or {}), dict(maxes or {}), dict(mins or {})
    repeated = (sums.keys() & maxes.keys()) | (sums.keys() & mins.keys()) | (maxes.keys() & mins.keys())
    if repeated:
        raise ValueError(f"names reduced in more than one way: {sorted(repeated)}")
    out: dict[str, float | torch.Tensor] = {}
    if sums:
        out.update(_all_reduce(sums, dist.ReduceOp.SUM))
    if maxes or mins:
        # MIN as MAX of the negated values, so the maxes and the mins share one call: min(x) = -max(-x),
        # exact in floating point (negation only flips the sign bit).
        negated = {name: -_as_float64(value) for name, value in mins.items()}
        reduced = _all_reduce({**maxes, **negated}, dist.ReduceOp.MAX)
        out.update({name: reduced[name] for name in maxes})
        out.update({name: -reduced[name] for name in mins})
    return {name: out[name] for name in (*sums, *maxes, *mins)}


def _as_float64(value: Value) -> float | torch.Tensor:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
