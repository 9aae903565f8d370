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


def _spans(layout: AttentionLayout) -> tuple[torch.Tensor, ...]:
    """(start, stop, first span of the sample, causal, noise) of every span: the runs of equal span ids. A
    sample opens at a span whose first token has another sample than the token before it; a span's mode is
    that of its first token."""
    span = layout.span
    opens = torch.ones(len(layout), dtype=torch.bool, device=span.device)
    opens[1:] = span[1:] != span[:-1]
    start = opens.nonzero().squeeze(1)
    stop = torch.cat([start[1:], start.new_tensor([len(layout)])])
    opens_sample = torch.ones_like(opens[start])
    opens_sample[1:] = layout.sample[start[1:]] != layout.sample[start[1:] - 1]
    index = torch.arange(len(start), device=span.device)
    sample_first = torch.where(opens_sample, index, 0).cummax(0).values
    return start, stop, sample_first, ~layout.bidirectional[start], layout.noise[start]


def _concat_ranges(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` for lengths >= 1, in one cumulative sum:
    steps of 1, and at the first slot of each range the jump from the previous range's last value."""
    jumps = starts - F.pad((starts + lengths - 1)[:-1], (1, 0))
    steps = torch.ones(total, dtype=starts.dtype, device=starts.device)
    steps[lengths.cumsum(0) - lengths] = jumps
    return steps.cumsum_(0)


def varlen_plan(layout: AttentionLayout) -> list[SegmentGroup]:
    """One segment per span, grouped by causal flag (causal first), spans in order within a group.

    The keys of span j are the spans from the first of its sample up to j, less the noise spans before j:
    a list of index ranges per segment, so every group's key indices are one :func:`_concat_ranges`."""
    if len(layout) == 0:
        return []
    start, stop, sample_first, causal_span, noise = _spans(layout)
    length = stop - start
    clean_before = F.pad(torch.where(noise, 0, length).cumsum(0), (1, 0))  # clean tokens of the spans before
    plan = []
    for causal in (True, False):
        segments = (causal_span == causal).nonzero().squeeze(1)
        if not len(segments):
            continue
        first = sample_first[segments]
        q_lens = length[segments]
        k_lens = clean_before[segments] - clean_before[first] + q_lens
        candidates = segments - first + 1  # spans first..j of segment j
        max_q, max_k, total_q, total_k, total_c = torch.stack(
            [q_lens.max(), k_lens.max(), q_lens.sum(), k_lens.sum(), candidates.sum()]).tolist()
        key_spans = _concat_ranges(first, candidates, total_c)
        own = torch.zeros(total_c, dtype=torch.bool, device=start.device)
        own[candidates.cumsum(0) - 1] = True
        key_spans = key_spans[own | ~noise[key_spans]]
        plan.append(SegmentGroup(
            causal, _concat_ranges(start[segments], q_lens, total_q),
            _concat_ranges(start[key_spans], length[key_spans], total_k),
            F.pad(q_lens.cumsum(0), (1, 0)).to(torch.int32), F.pad(k_lens.cumsum(0), (1, 0)).to(torch.int32),
            max_q, max_k))
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
