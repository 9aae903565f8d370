"""Multimodal rotary embedding (3D mRoPE).

The head_dim/2 rotary frequencies are split into sections (t, h, w) = mrope_section; frequency j takes
its angle from the position id of its section's axis. cos/sin are duplicated over the two halves of the
head (the rotate-half convention of Qwen).
"""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def mrope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: tuple[int, int, int],
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``position_ids`` (3, L) -> cos, sin of shape (L, head_dim)."""
    inv_freq = inverse_frequencies(head_dim, theta).to(position_ids.device)
    axis_of_freq = torch.repeat_interleave(
        torch.arange(3, device=position_ids.device), torch.tensor(mrope_section, device=position_ids.device)
    )
    positions = position_ids.float()[axis_of_freq]  # (head_dim/2, L): each frequency's own axis
    angles = positions.transpose(0, 1) * inv_freq  # (L, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (heads, L, head_dim); cos/sin (L, head_dim)."""
    return x * cos + rotate_half(x) * sin
