"""Embeddings of VAE latent tokens: timestep embedder and the fixed sin-cos latent position table."""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim): [sin(p·ω_i), cos(p·ω_i)] with ω_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d_table(grid: int, dim: int) -> torch.Tensor:
    """(grid·grid, dim) table, row r = h·grid + w; half of the channels encode h, half encode w."""
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(h.reshape(-1), dim // 2), sincos_1d(w.reshape(-1), dim // 2)], dim=1)


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
    """Fixed 3D sin-cos positions of latent tokens: the stored 2D (row, column) table of the released
    checkpoint (grid x grid rows, not trained, rebuilt on load) plus a 1D sin-cos of the latent frame."""

    def __init__(self, hidden: int, grid: int, max_frames: int) -> None:
        super().__init__()
        self.hidden, self.grid, self.max_frames = hidden, grid, max_frames
        self.pos_embed = nn.Parameter(torch.empty(grid * grid, hidden), requires_grad=False)
        self.rebuild()

    def rebuild(self) -> None:
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d_table(self.grid, self.hidden))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` (N, 3) = (frame, row, column) -> (N, hidden)."""
        frame, row, col = coords.unbind(1)
        if coords.numel() and (int(row.max()) >= self.grid or int(col.max()) >= self.grid):
            raise ValueError(f"latent grid exceeds the {self.grid}x{self.grid} position table")
        if coords.numel() and int(frame.max()) >= self.max_frames:
            raise ValueError(f"latent clip longer than {self.max_frames} latent frames")
        spatial = self.pos_embed[row * self.grid + col]
        return spatial + sincos_1d(frame, self.hidden).to(spatial.dtype)
