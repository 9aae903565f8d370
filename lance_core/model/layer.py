"""One dual-stream decoder layer: every weight exists twice (UND and GEN, suffix ``_moe_gen``), the
attention itself is one joint attention over the whole packed sequence.

Routing is fixed by token type (Mixture-of-Transformers): :class:`Routing` holds the UND and GEN token
indices once per forward, and :func:`routed` applies the UND module to UND tokens and the GEN module to
GEN tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import cached_attention, packed_attention
from .layout import AttentionLayout
from .norms import RMSNorm
from .rotary import apply_rotary
from .sequence_parallel import SequenceParallel


@dataclass
class Routing:
    is_gen: torch.Tensor
    und: torch.Tensor
    gen: torch.Tensor
    every_expert: bool = False
    """Run both experts even when one has no token here (on zero rows): every rank then calls the same
    modules, as ZeRO and the gradient all-reduce need when a rank holds a chunk of a pack (sequence
    parallelism)."""

    @classmethod
    def from_mask(cls, is_gen: torch.Tensor, every_expert: bool = False) -> "Routing":
        return cls(is_gen, torch.nonzero(~is_gen).squeeze(1), torch.nonzero(is_gen).squeeze(1), every_expert)


def routed(x: torch.Tensor, und: Callable, gen: Callable, routing: Routing) -> torch.Tensor:
    """Apply ``und`` to UND tokens and ``gen`` to GEN tokens of ``x`` (tokens on dim 0)."""
    if routing.gen.numel() == 0 and not routing.every_expert:
        return und(x)
    if routing.und.numel() == 0 and not routing.every_expert:
        return gen(x)
    out_und = und(x.index_select(0, routing.und))
    out_gen = gen(x.index_select(0, routing.gen))
    out = out_und.new_empty((x.shape[0], *out_und.shape[1:]))
    out = out.index_copy(0, routing.und, out_und)
    return out.index_copy(0, routing.gen, out_gen)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class LayerCache:
    """Rotated keys and values of a prefix, per layer (KV cache)."""

    keys: torch.Tensor
    values: torch.Tensor


class DualStreamAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(cfg.hidden_size, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(cfg.hidden_size, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, cfg.hidden_size, bias=False))
            if cfg.qk_norm:
                setattr(self, f"q_norm{suffix}", RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
                setattr(self, f"k_norm{suffix}", RMSNorm(cfg.head_dim, cfg.rms_norm_eps))
        self.qk_norm = cfg.qk_norm

    def _project(self, x: torch.Tensor, name: str, heads: int, routing: Routing) -> torch.Tensor:
        y = routed(x, getattr(self, name), getattr(self, f"{name}_moe_gen"), routing)
        return y.view(x.shape[0], heads, self.head_dim)

    def qkv(self, x: torch.Tensor, routing: Routing, cos: torch.Tensor, sin: torch.Tensor):
        q = self._project(x, "q_proj", self.num_heads, routing)
        k = self._project(x, "k_proj", self.num_kv_heads, routing)
        v = self._project(x, "v_proj", self.num_kv_heads, routing)
        if self.qk_norm:
            q = routed(q, self.q_norm, self.q_norm_moe_gen, routing)
            k = routed(k, self.k_norm, self.k_norm_moe_gen, routing)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, L, d)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, routing, cos, sin, layout: AttentionLayout, backend: str, prepared=None,
                cache: LayerCache | None = None, keep_cache: bool = False,
                sequence_parallel: SequenceParallel | None = None):
        q, k, v = self.qkv(x, routing, cos, sin)
        if sequence_parallel is not None:
            out = sequence_parallel.attention(q, k, v, layout, backend, prepared)
        elif cache is None:
            out = packed_attention(q, k, v, layout, backend, prepared)
        else:
            out = cached_attention(q, k, v, cache.keys, cache.values, layout, backend)
        new_cache = None
        if keep_cache:
            new_cache = LayerCache(k, v) if cache is None else LayerCache(
                torch.cat([cache.keys, k], 1), torch.cat([cache.values, v], 1))
        out = out.transpose(0, 1).reshape(x.shape[0], self.num_heads * self.head_dim)
        return routed(out, self.o_proj, self.o_proj_moe_gen, routing), new_cache


class DualStreamLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = DualStreamAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, routing, cos, sin, layout, backend, prepared=None, cache=None, keep_cache=False,
                sequence_parallel=None):
        h = routed(x, self.input_layernorm, self.input_layernorm_moe_gen, routing)
        attn, new_cache = self.self_attn(h, routing, cos, sin, layout, backend, prepared, cache, keep_cache,
                                         sequence_parallel)
        x = x + attn
        h = routed(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, routing)
        return x + routed(h, self.mlp, self.mlp_moe_gen, routing), new_cache
