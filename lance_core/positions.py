"""3D mRoPE position ids (Qwen2.5-VL rules) and MaPE, the modality-aware temporal offsets of Lance.

Step 1 gives every token a (t, h, w) id: a text run advances all three axes together; a visual span with
grid (T', H', W') starting at base b gets t = b + step·k, h = b + i, w = b + j; the next run starts one
past the largest id so far. A visual span is bracketed by ``<|vision_start|>`` (numbered as text, just
before the grid) and ``<|vision_end|>`` (numbered as text, one past the grid's largest id).

Step 2 (MaPE) moves only the temporal id, per sample: all ViT tokens of the sample (their markers
included) by one offset that puts the first of them at t = 1000; all subject-reference latents likewise
to t = 2000; edit sources never move; the edit target takes the source's (t, h, w) ids when both hold
the same number of tokens. Text keeps its own running index from step 1, so gaps stay where spans were
shifted. The same function serves training and inference; the released code's measured ids for twelve
layouts are the tests' golden values.
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
    bracketed: bool = False
    """The span's first and last tokens are ``<|vision_start|>`` / ``<|vision_end|>`` around the grid."""

    def __post_init__(self) -> None:
        markers = 2 if self.bracketed else 0
        if self.grid is not None and self.grid[0] * self.grid[1] * self.grid[2] + markers != self.length:
            raise ValueError(f"span grid {self.grid} with {markers} markers does not hold {self.length} tokens")
        if self.grid is None and self.role != "text":
            raise ValueError(f"a {self.role} span needs a grid")
        if self.grid is None and self.bracketed:
            raise ValueError("only visual spans carry vision markers")


def grid_position_ids(base: int, grid: tuple[int, int, int], temporal_step: float) -> torch.Tensor:
    frames, height, width = grid
    t = (torch.arange(frames) * temporal_step).long() + base
    h = torch.arange(height) + base
    w = torch.arange(width) + base
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])


def _visual_span_ids(cursor: int, span: SpanPosition) -> torch.Tensor:
    if not span.bracketed:
        return grid_position_ids(cursor, span.grid, span.temporal_step)
    grid = grid_position_ids(cursor + 1, span.grid, span.temporal_step)
    end = int(grid.max()) + 1 if grid.numel() else cursor + 1
    start_marker = torch.full((3, 1), cursor)
    end_marker = torch.full((3, 1), end)
    return torch.cat([start_marker, grid, end_marker], dim=1)


def base_position_ids(spans: list[SpanPosition], start: int = 0) -> tuple[torch.Tensor, int]:
    """Qwen2.5-VL 3D ids for a sequence of spans; returns (3, L) ids and the next running index."""
    pieces = []
    cursor = start
    for span in spans:
        if span.grid is None:
            ids = torch.arange(cursor, cursor + span.length).expand(3, -1)
        else:
            ids = _visual_span_ids(cursor, span)
        pieces.append(ids)
        if span.length:
            cursor = int(ids.max()) + 1
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long), cursor
    return torch.cat(pieces, dim=1), cursor


def _role_tokens(spans: list[SpanPosition], role: Role) -> torch.Tensor:
    """Token indexes of every span of ``role``, in sequence order."""
    pieces, offset = [], 0
    for span in spans:
        if span.role == role:
            pieces.append(torch.arange(offset, offset + span.length))
        offset += span.length
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def apply_mape(spans: list[SpanPosition], ids: torch.Tensor) -> torch.Tensor:
    """MaPE offsets on top of :func:`base_position_ids` (returns a new tensor)."""
    out = ids.clone()
    for role, first_t in (("vit", VIT_TEMPORAL_START), ("reference", REFERENCE_TEMPORAL_START)):
        tokens = _role_tokens(spans, role)
        if tokens.numel():
            out[0, tokens] += first_t - out[0, tokens[0]]
    source, target = _role_tokens(spans, "source"), _role_tokens(spans, "target")
    if source.numel() and source.numel() == target.numel():
        out[:, target] = out[:, source]
    return out


def position_ids(spans: list[SpanPosition], mape: bool = True, start: int = 0) -> torch.Tensor:
    """(3, L) position ids for one sample's spans, with MaPE when ``mape``."""
    ids, _ = base_position_ids(spans, start)
    return apply_mape(spans, ids) if mape else ids
