"""Ulysses sequence parallelism: the S ranks of a sequence-parallel group share one packed sequence.

The pack is padded to a multiple of S and cut into S contiguous chunks; each rank runs everything but the
joint attention on its own chunk (embeddings, norms, the routed experts, RoPE with the chunk's own position
ids). Around the attention an all-to-all trades the chunk of all heads for the whole sequence of H/S heads,
so every attention backend sees the full packed mask; a second all-to-all trades back. With GQA the
key/value heads are repeated until each rank holds whole key/value heads for its query heads. Backward of
each all-to-all is the inverse all-to-all.

Gradients: rank r's parameter gradients are those of the loss terms of every rank of its group, for the
weights as applied to rank r's tokens; the data-parallel sum over all ranks therefore gives the gradient of
the whole pack's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..packing import PackedBatch, pad_batch
from .attention import packed_attention
from .layout import AttentionLayout


def kv_repeats(num_heads: int, num_kv_heads: int, size: int) -> int:
    """Copies of every key/value head so that S ranks each get whole key/value heads for their H/S query
    heads: the heads become lcm(H_kv, S), each rank takes lcm/S of them (H is a multiple of H_kv and of S,
    hence of their lcm, and rank r's query heads all map to its own key/value heads)."""
    if num_heads % size:
        raise ValueError(f"sequence_parallel {size} needs num_heads ({num_heads}) divisible by {size}")
    return math.lcm(num_kv_heads, size) // num_kv_heads


def check_sequence_parallel(cfg: ModelConfig, size: int) -> None:
    """Raise ValueError when ``cfg``'s heads cannot be shared by ``size`` ranks."""
    kv_repeats(cfg.num_heads, cfg.num_kv_heads, size)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` (S, ...): row j goes to rank j of ``group``; row j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    heads, chunk, dim = x.shape
    out = _all_to_all(x.reshape(size, heads // size, chunk, dim), group)  # out[j]: rank j's chunk, my heads
    return out.transpose(0, 1).reshape(heads // size, size * chunk, dim)


def _heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    heads, length, dim = x.shape
    out = _all_to_all(x.reshape(heads, size, length // size, dim).transpose(0, 1), group)  # out[j]: rank j's heads
    return out.reshape(size * heads, length // size, dim)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _seq_to_heads(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.size), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _heads_to_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.size), None, None


def seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(H, L/S, d) of this rank's chunk -> (H/S, L, d): the whole sequence of this rank's heads."""
    return _SeqToHeads.apply(x, group, size)


def heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """(H/S, L, d) -> (H, L/S, d): the inverse of :func:`seq_to_heads`."""
    return _HeadsToSeq.apply(x, group, size)


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group."""

    group: dist.ProcessGroup | None
    size: int
    rank: int

    def bounds(self, length: int) -> tuple[int, int]:
        """[start, stop) of this rank's chunk of a sequence of ``length`` tokens (a multiple of ``size``)."""
        chunk = length // self.size
        return self.rank * chunk, (self.rank + 1) * chunk

    def pad(self, batch: PackedBatch) -> PackedBatch:
        """``batch`` padded to a multiple of ``size`` tokens."""
        return pad_batch(batch, -(-len(batch) // self.size) * self.size)

    def local_batch(self, batch: PackedBatch) -> PackedBatch:
        """This rank's chunk of the (padded) ``batch``."""
        padded = self.pad(batch)
        return padded.token_slice(*self.bounds(len(padded)))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, backend: str,
                  prepared=None) -> torch.Tensor:
        """q (H, L/S, d), k/v (H_kv, L/S, d) of this rank's chunk -> (H, L/S, d), attending over the whole
        sequence described by ``layout`` (L tokens)."""
        repeats = kv_repeats(q.shape[0], k.shape[0], self.size)
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0)
        q, k, v = (seq_to_heads(t, self.group, self.size) for t in (q, k, v))
        return heads_to_seq(packed_attention(q, k, v, layout, backend, prepared), self.group, self.size)


def new_sequence_parallel(size: int) -> SequenceParallel | None:
    """Groups of ``size`` consecutive ranks of the default process group (every rank must call this, in the
    same order); this rank's group, or None when ``size`` is 1. Data-parallel rank = rank // size."""
    if size == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"sequence_parallel {size} does not divide the {world} ranks")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceParallel(mine, size, rank % size)
