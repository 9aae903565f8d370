"""3D mRoPE position ids (Qwen2.5-VL rules) and MaPE, the modality-aware temporal offsets of Lance.

Step 1 gives every token a (t, h, w) id: a text run advances all three axes together; a visual span with
grid (T', H', W') starting at base b gets t = b + step·k, h = b + i, w = b + j; the next run starts one
past the largest id so far. Step 2 (MaPE) then moves whole spans: ViT spans to t = 1000, reference latents
to t = 2000, and an edit target copies the (t, h, w) ids of an equally sized clean source span. Text keeps
its own running index from step 1. The same function serves training and inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Role = Literal["text", "vit", "reference", "source", "target"]

VIT_TEMPORAL_START = 1000
REFERENCE_TEMPORAL_START = 2000


@dataclass(frozen=True)
class SpanPosition:
    """What positions need to know of a span: its token count, its grid and its role."""

    length: int
    role: Role
    grid: tuple[int, int, int] | None = None
    """(T', H', W') in tokens; None for text."""
    temporal_step: float = 2.0
    """Temporal id step per grid frame (tokens per second x seconds per grid)."""

    def __post_init__(self) -> None:
        if self.grid is not None and self.grid[0] * self.grid[1] * self.grid[2] != self.length:
            raise ValueError(f"span grid {self.grid} does not hold {self.length} tokens")
        if self.grid is None and self.role != "text":
            raise ValueError(f"a {self.role} span needs a grid")


def grid_position_ids(base: int, grid: tuple[int, int, int], temporal_step: float) -> torch.Tensor:
    frames, height, width = grid
    t = (torch.arange(frames) * temporal_step).long() + base
    h = torch.arange(height) + base
    w = torch.arange(width) + base
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])


def base_position_ids(spans: list[SpanPosition], start: int = 0) -> tuple[torch.Tensor, int]:
    """Qwen2.5-VL 3D ids for a sequence of spans; returns (3, L) ids and the next running index."""
    pieces = []
    cursor = start
    for span in spans:
        if span.grid is None:
            ids = torch.arange(cursor, cursor + span.length).expand(3, -1)
        else:
            ids = grid_position_ids(cursor, span.grid, span.temporal_step)
        pieces.append(ids)
        if span.length:
            cursor = int(ids.max()) + 1
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long), cursor
    return torch.cat(pieces, dim=1), cursor


def apply_mape(spans: list[SpanPosition], ids: torch.Tensor) -> torch.Tensor:
    """MaPE offsets on top of :func:`base_position_ids` (returns a new tensor)."""
    out = ids.clone()
    offsets = [0]
    for span in spans:
        offsets.append(offsets[-1] + span.length)
    source_slice: slice | None = None
    for index, span in enumerate(spans):
        span_slice = slice(offsets[index], offsets[index + 1])
        if span.length == 0:
            continue
        if span.role == "vit":
            out[0, span_slice] += VIT_TEMPORAL_START - out[0, span_slice.start]
        elif span.role == "reference":
            out[0, span_slice] += REFERENCE_TEMPORAL_START - out[0, span_slice.start]
        elif span.role == "source":
            source_slice = span_slice
        elif span.role == "target" and source_slice is not None:
            if source_slice.stop - source_slice.start == span.length:
                out[:, span_slice] = out[:, source_slice]
    return out


def position_ids(spans: list[SpanPosition], mape: bool = True, start: int = 0) -> torch.Tensor:
    """(3, L) position ids for one sample's spans, with MaPE when ``mape``."""
    ids, _ = base_position_ids(spans, start)
    return apply_mape(spans, ids) if mape else ids
