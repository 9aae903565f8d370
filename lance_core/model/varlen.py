"""The packed Lance mask as variable-length segments, for flash-attention's varlen kernel.

Every span becomes one segment: its queries attend the keys from the start of their sample up to the end
of the span, less the tokens of every other noise span of the sample (nothing outside a noisy target
attends to it; keys are gathered, so a gap costs nothing). Causal spans use the kernel's causal mode
(aligned to the bottom right, so query i of the span sees keys up to its own position), full and noise
spans the non-causal mode. This reproduces the mask exactly for every layout; the cost is the sum over
spans of span length x prefix length, never L^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import AttentionLayout


@dataclass
class SegmentGroup:
    """Segments that share one causal flag: gathered query and key indices with cumulative lengths."""

    causal: bool
    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _span_bounds(layout: AttentionLayout) -> list[tuple[int, int, int, bool, bool]]:
    """(start, stop, sample_start, bidirectional, noise) of every span, in order."""
    span = layout.span.tolist()
    sample = layout.sample.tolist()
    bidir = layout.bidirectional.tolist()
    noise = layout.noise.tolist()
    bounds = []
    sample_start = 0
    start = 0
    for i in range(1, len(span) + 1):
        if i == len(span) or span[i] != span[start]:
            if start == 0 or sample[start] != sample[start - 1]:
                sample_start = start
            bounds.append((start, i, sample_start, bidir[start], noise[start]))
            start = i
    return bounds


def _keys(stop: int, sample_start: int, noise_spans: list[tuple[int, int]]) -> torch.Tensor:
    """Keys of the span [start, stop): its sample's tokens up to ``stop`` less the earlier noise spans."""
    pieces, cursor = [], sample_start
    for noise_start, noise_stop in noise_spans:
        pieces.append(torch.arange(cursor, noise_start))
        cursor = noise_stop
    pieces.append(torch.arange(cursor, stop))
    return torch.cat(pieces)


def varlen_plan(layout: AttentionLayout) -> list[SegmentGroup]:
    bounds = _span_bounds(layout)
    device = layout.span.device
    noise_spans: dict[int, list[tuple[int, int]]] = {}
    groups: dict[bool, list[tuple[torch.Tensor, torch.Tensor]]] = {True: [], False: []}
    for start, stop, sample_start, bidirectional, noise in bounds:
        earlier_noise = noise_spans.setdefault(sample_start, [])
        keys = _keys(stop, sample_start, earlier_noise)
        if noise:
            earlier_noise.append((start, stop))
        groups[not bidirectional].append((torch.arange(start, stop), keys))
    plan = []
    for causal, segments in groups.items():
        if not segments:
            continue
        q_index = torch.cat([q for q, _ in segments]).to(device)
        k_index = torch.cat([k for _, k in segments]).to(device)
        q_lens = torch.tensor([len(q) for q, _ in segments])
        k_lens = torch.tensor([len(k) for _, k in segments])
        cu_q = F.pad(q_lens.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
        cu_k = F.pad(k_lens.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
        plan.append(SegmentGroup(causal, q_index, k_index, cu_q, cu_k, int(q_lens.max()), int(k_lens.max())))
    return plan


def bottom_right_causal(q_len: int, k_len: int, device) -> torch.Tensor:
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    return k <= q + (k_len - q_len)


def varlen_attention_reference(q, k, v, plan: list[SegmentGroup]) -> torch.Tensor:
    """Pure-PyTorch evaluation of a varlen plan (segment by segment); the CPU check of the flash path."""
    out = torch.empty_like(q)
    for group in plan:
        for i in range(len(group.cu_q) - 1):
            qs = group.q_index[group.cu_q[i]:group.cu_q[i + 1]]
            ks = group.k_index[group.cu_k[i]:group.cu_k[i + 1]]
            mask = bottom_right_causal(len(qs), len(ks), q.device) if group.causal else None
            out[:, qs] = F.scaled_dot_product_attention(
                q[None, :, qs], k[None, :, ks], v[None, :, ks], attn_mask=None if mask is None else mask[None, None],
                enable_gqa=True)[0]
    return out


def flash_varlen_attention(q, k, v, plan: list[SegmentGroup]) -> torch.Tensor:
    """q (H, L, d), k/v (H_kv, L, d) on CUDA through ``flash_attn_varlen_func`` (one call per causal flag)."""
    from flash_attn import flash_attn_varlen_func

    q_t, k_t, v_t = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (L, heads, d)
    out = torch.empty_like(q_t)
    for group in plan:
        out[group.q_index] = flash_attn_varlen_func(
            q_t[group.q_index], k_t[group.k_index], v_t[group.k_index], group.cu_q, group.cu_k,
            group.max_q, group.max_k, causal=group.causal)
    return out.transpose(0, 1)
