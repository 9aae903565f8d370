"""Packed attention for the generalized 3D causal mask of Lance, with interchangeable backends.

The mask rule and the per-token span structure it reads are in ``layout.py`` (:func:`mask_rule`,
:class:`AttentionLayout`). Backends:

- ``sdpa``: the rule on the full L x L grid, one dense SDPA call (cost L^2; the reference).
- ``per_sample``: dense SDPA inside each packed sample (cost sum of len^2; CPU training default).
- ``flex``: the rule evaluated block-wise, fully masked 128 x 128 blocks skipped (GPU default; on CPU
  torch runs it forward only).
- ``flash``: CUDA with flash-attn installed; the mask as variable-length segments (``varlen.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .layout import AttentionLayout
from .varlen import flash_varlen_attention, varlen_plan

try:  # flex attention: torch >= 2.5
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - old torch
    flex_attention = None

try:  # flash-attention on CUDA, only when installed (extra "gpu")
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto``: flash-attention's varlen kernel on GPU when installed, else flex; per-sample SDPA on CPU
    (torch's flex attention has no CPU backward). An unavailable backend is a clear error."""
    if name == "auto":
        if device.type != "cuda":
            return "per_sample"
        if flash_attn_func is not None:
            return "flash"
        return "flex" if flex_attention is not None else "per_sample"
    if name == "flex" and flex_attention is None:
        raise RuntimeError("attention_backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    if name == "flash" and (flash_attn_func is None or device.type != "cuda"):
        raise RuntimeError("attention_backend='flash' needs the flash-attn package and a CUDA device")
    return name


def sample_blocks(layout: AttentionLayout) -> list[tuple[int, int, torch.Tensor]]:
    """(start, stop, mask) of every packed sample: samples are contiguous, so each gets its own dense mask."""
    _, counts = torch.unique_consecutive(layout.sample, return_counts=True)
    blocks = []
    start = 0
    for count in counts.tolist():
        stop = start + count
        part = AttentionLayout(layout.sample[start:stop], layout.span[start:stop],
                               layout.bidirectional[start:stop], layout.noise[start:stop])
        blocks.append((start, stop, part.dense_mask()))
        start = stop
    return blocks


def prepare_attention(layout: AttentionLayout, backend: str, block_size: int):
    """Work shared by all layers of one forward: per-sample masks, the flex block mask or the flash plan.

    Returns (backend, prepared)."""
    if backend == "per_sample":
        return backend, sample_blocks(layout)
    if backend == "flash":
        return backend, varlen_plan(layout)
    if backend == "flex":
        return backend, layout.block_mask(block_size)
    return backend, None


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, backend: str, prepared=None,
) -> torch.Tensor:
    """q (H, L, d), k/v (H_kv, L, d) -> (H, L, d) under the packed mask.

    ``prepared`` is what :func:`prepare_attention` returned for this layout (computed when None)."""
    if prepared is None and backend in ("flex", "flash", "per_sample"):
        backend, prepared = prepare_attention(layout, backend, 128)
    if backend == "per_sample":
        return torch.cat([
            F.scaled_dot_product_attention(q[None, :, a:b], k[None, :, a:b], v[None, :, a:b],
                                           attn_mask=mask[None, None], enable_gqa=True)[0]
            for a, b, mask in prepared], dim=1)
    if backend == "flex":
        run = _compiled_flex() if q.device.type in ("cuda", "cpu") else flex_attention
        return run(q[None], k[None], v[None], block_mask=prepared, enable_gqa=True)[0]
    if backend == "flash":
        return flash_varlen_attention(q, k, v, prepared)
    mask = layout.dense_mask()
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None, None], enable_gqa=True)[0]


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
    layout: AttentionLayout, backend: str,
) -> torch.Tensor:
    """New tokens (q, k, v) of one sample after a cached prefix: every query sees the whole prefix, and the
    new tokens among themselves follow ``layout``."""
    keys = torch.cat([k_prefix, k], dim=1)
    values = torch.cat([v_prefix, v], dim=1)
    if backend == "flash" and layout.is_single_bidirectional_span():
        return _flash(q, keys, values)
    prefix_visible = torch.ones(q.shape[1], k_prefix.shape[1], dtype=torch.bool, device=q.device)
    mask = torch.cat([prefix_visible, layout.dense_mask()], dim=1)
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask[None, None],
                                          enable_gqa=True)[0]


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = flash_attn_func(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=False)
    return out[0].transpose(0, 1)
