"""Packed attention for the generalized 3D causal mask of Lance, with interchangeable backends.

The mask rule and the per-token span structure it reads are in ``layout.py`` (:func:`mask_rule`,
:class:`AttentionLayout`). Backends:

- ``sdpa``: the rule on the full L x L grid, one dense SDPA call (cost L^2; the reference).
- ``per_sample``: dense SDPA inside each packed sample (cost sum of len^2; CPU training default).
- ``flex``: the rule evaluated block-wise, fully masked 128 x 128 blocks skipped (GPU default without
  flash-attn or for float32; on CPU torch runs it forward only). It runs at a bucketed length
  (:func:`flex_bucket_length`), so the compiled kernel is built once per bucket, not once per length.
- ``flash``: CUDA with flash-attn installed and fp16/bf16 inputs; the mask as variable-length segments
  (``varlen.py``).

Which one ``auto`` picks, and why, is :func:`describe_backend`; :func:`resolve_backend` logs it.
"""

from __future__ import annotations

import functools
import inspect
import logging

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


log = logging.getLogger("lance.model")

FLASH_DTYPES = (torch.float16, torch.bfloat16)
"""Input dtypes flash-attention's kernels run; anything else (float32) raises inside flash-attn."""

FLEX_EXACT_BLOCKS = 8
FLEX_STEPS_PER_DOUBLING = 4

FLEX_RECOMPILE_LIMIT = 64
"""Compiles of the flex kernel before torch gives up on compiling it: one per length bucket
(:func:`flex_bucket_length`; 32 up to 65,536 tokens at 128-token blocks), grad mode and head shape. torch's
default (8) would send every further length to eager flex attention, which materialises the H x L x L
scores."""


def flex_bucket_length(length: int, block_size: int) -> int:
    """The padded length flex attention runs ``length`` tokens at, so that it compiles once per bucket.

    In whole blocks ``n = ceil(length / block_size)``: up to ``FLEX_EXACT_BLOCKS`` blocks, ``n`` itself; above
    (2^k < n <= 2^(k+1)), ``n`` rounded up to a multiple of 2^k / ``FLEX_STEPS_PER_DOUBLING`` blocks, i.e. one
    of 4 evenly spaced lengths per doubling. Up to L tokens that is 8 + 4 log2(L / (8 blocks)) lengths (32 at
    L = 65,536 and 128-token blocks); padding stays under one block up to 8 blocks and under 25% above, and
    the padding tokens cost flex one diagonal block per block row. Whole blocks up to 8 and a power of two
    of blocks (the 65,536-token budget of ``pad_to_budget`` at 128-token blocks) map to themselves."""
    blocks = -(-length // block_size)
    if blocks > FLEX_EXACT_BLOCKS:
        step = (1 << ((blocks - 1).bit_length() - 1)) // FLEX_STEPS_PER_DOUBLING
        blocks = -(-blocks // step) * step
    return blocks * block_size


@functools.cache
def _compiled_flex():
    options = {}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # older torch: the global limit
        options["recompile_limit"] = FLEX_RECOMPILE_LIMIT
    return torch.compile(flex_attention, dynamic=False, **options)


def describe_backend(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, reason): the backend that runs attention for ``requested`` on ``device`` with inputs of
    ``dtype``. ``auto``: flash-attention's varlen kernel on CUDA when installed and the inputs are fp16/bf16,
    else flex on CUDA; per-sample SDPA on CPU (torch's flex attention has no CPU backward). A backend that
    cannot run is a clear error naming what to set instead."""
    on_cuda = device.type == "cuda"
    flash_dtype = dtype in FLASH_DTYPES
    dtype_name = _dtype_name(dtype)
    if requested == "auto":
        if not on_cuda:
            return "per_sample", f"{device.type} device: flex attention has no backward pass off CUDA"
        if flash_attn_func is not None and flash_dtype:
            return "flash", f"CUDA, flash-attn installed, {dtype_name} inputs"
        why = ("flash-attn is not installed" if flash_attn_func is None
               else f"flash-attn runs float16/bfloat16 only, the inputs are {dtype_name}")
        if flex_attention is not None:
            return "flex", f"CUDA, {why}"
        return "per_sample", f"CUDA, {why} and this torch has no flex attention"
    if requested == "flex" and flex_attention is None:
        raise RuntimeError("attention_backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention); "
                           "set attention_backend: per_sample or auto")
    if requested == "flash":
        if flash_attn_func is None:
            raise RuntimeError("attention_backend='flash' needs the flash-attn package (extra 'gpu'); "
                               "set attention_backend: flex or auto")
        if not on_cuda:
            raise RuntimeError(f"attention_backend='flash' needs a CUDA device, the model runs on {device.type}; "
                               "set attention_backend: auto (per-sample SDPA off CUDA) or per_sample")
        if not flash_dtype:
            raise RuntimeError(f"attention_backend='flash' runs float16/bfloat16 only, the model computes in "
                               f"{dtype_name}; run it in bf16 or set attention_backend: flex (or auto, which picks "
                               "flex for float32)")
    return requested, "requested"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_announced: set[tuple[str, str, str, torch.dtype]] = set()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend of :func:`describe_backend`, logged (``lance.model``, INFO) once per distinct choice."""
    backend, reason = describe_backend(name, device, dtype)
    key = (name, backend, device.type, dtype)
    if key not in _announced:
        _announced.add(key)
        log.info("attention backend %s (attention_backend=%s, %s, %s): %s", backend, name, device.type,
                 _dtype_name(dtype), reason)
    return backend


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

    The flex block mask is built for the layout padded to its :func:`flex_bucket_length` with isolated
    tokens (each sees only itself, none is seen). Returns (backend, prepared)."""
    if backend == "per_sample":
        return backend, sample_blocks(layout)
    if backend == "flash":
        return backend, varlen_plan(layout)
    if backend == "flex":
        return backend, layout.padded(flex_bucket_length(len(layout), block_size)).block_mask(block_size)
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
        return _flex(q, k, v, prepared)
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


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """Flex attention at the block mask's (bucketed) length: q/k/v padded with zeros, the output cut back."""
    length, padded = q.shape[1], block_mask.shape[-2]
    if padded != length:
        q, k, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (q, k, v))
    compiled = q.device.type in ("cuda", "cpu") and not torch.compiler.is_compiling()
    run = _compiled_flex() if compiled else flex_attention
    return run(q[None], k[None], v[None], block_mask=block_mask, enable_gqa=True)[0, :, :length]


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = flash_attn_func(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=False)
    return out[0].transpose(0, 1)
