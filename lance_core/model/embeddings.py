"""Embeddings of VAE latent tokens: timestep embedder and the fixed 3D sin-cos latent position table."""

from __future__ import annotations

import math

import torch
from torch import nn


def latent_table_blocks(hidden: int) -> tuple[int, int, int]:
    """Channels of the t, h and w blocks of a latent position row: t and h get ``hidden // 3`` rounded down
    to even, w the rest (hidden 2048 -> 682 / 682 / 684). Every block holds sin/cos pairs, so ``hidden``
    must be even and at least 6 (:class:`~lance_core.config.ModelConfig` refuses other sizes)."""
    if hidden % 2 or hidden < 6:
        raise ValueError(f"the latent position table needs an even hidden size >= 6, got {hidden}")
    side = hidden // 3 // 2 * 2
    return side, side, hidden - 2 * side


def sincos_block(length: int, dim: int) -> torch.Tensor:
    """(length, dim) float64 table of positions 0..length-1: ``[sin(p·ω_i) | cos(p·ω_i)]`` with
    ``ω_i = 10000^(-i / (dim/2))``, i < dim/2. Computed in float64 like the release, cast by the caller."""
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def latent_position_table(hidden: int, grid: int, frames: int) -> torch.Tensor:
    """The released fixed 3D sin-cos table of latent tokens, float32 of shape (frames·grid², hidden).

    Row ``t·grid² + h·grid + w`` is ``[t block | h block | w block]`` (sizes: :func:`latent_table_blocks`),
    each block the sin-cos of its own coordinate. Each block is computed in float64 and cast to float32
    once, so the values equal the release's float64 table stored as float32, bit for bit."""
    t_dim, h_dim, w_dim = latent_table_blocks(hidden)
    table = torch.empty(frames, grid, grid, hidden, dtype=torch.float32)
    table[..., :t_dim] = sincos_block(frames, t_dim).float()[:, None, None, :]
    table[..., t_dim:t_dim + h_dim] = sincos_block(grid, h_dim).float()[None, :, None, :]
    table[..., t_dim + h_dim:] = sincos_block(grid, w_dim).float()[None, None, :, :]
    return table.reshape(frames * grid * grid, hidden)


class TimestepEmbedder(nn.Module):
    """256-d sinusoid of the raw t in [0, 1], then Linear - SiLU - Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class LatentPositionTable(nn.Module):
    """Fixed 3D sin-cos positions of latent tokens, the release's ``latent_pos_embed``: one row per
    (frame, row, column) of a ``max_frames x grid x grid`` latent volume, channels split across t/h/w
    (:func:`latent_position_table`). Not trained; stored in checkpoints as the release does, rebuilt on load."""

    def __init__(self, hidden: int, grid: int, max_frames: int) -> None:
        super().__init__()
        latent_table_blocks(hidden)  # refuses a width the t/h/w blocks cannot share
        self.hidden, self.grid, self.max_frames = hidden, grid, max_frames
        self.pos_embed = nn.Parameter(torch.empty(max_frames * grid * grid, hidden), requires_grad=False)
        self.rebuild()

    def rebuild(self) -> None:
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(latent_position_table(self.hidden, self.grid, self.max_frames))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` (N, 3) = (frame, row, column) -> (N, hidden)."""
        frame, row, col = coords.unbind(1)
        if coords.numel() and (int(row.max()) >= self.grid or int(col.max()) >= self.grid):
            raise ValueError(f"latent grid exceeds the {self.grid}x{self.grid} position table")
        if coords.numel() and int(frame.max()) >= self.max_frames:
            raise ValueError(f"latent clip of {int(frame.max()) + 1} frames is longer than the {self.max_frames} "
                             f"latent frame(s) of the position table (model.max_latent_frames; video needs a "
                             f"video preset such as lance-3b-video)")
        return self.pos_embed[(frame * self.grid + row) * self.grid + col]
