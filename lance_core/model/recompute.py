"""Activation checkpointing policies: what a decoder layer keeps for the backward pass.

- ``none``: every activation is kept (fastest, most memory).
- ``layer``: only each layer's input is kept; the whole layer runs again in the backward pass (least memory,
  one more forward).
- ``selective``: the outputs of the matmuls and of attention are kept, the cheap element-wise work between
  them (norms, rotary, SiLU gate, products, residual adds) runs again. It keeps most of ``none``'s speed and
  drops the element-wise intermediates, which at long sequence lengths are most of a layer's activations.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RecomputePolicy = Literal["none", "layer", "selective"]

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
"""Operations whose outputs ``selective`` keeps: the ones whose recomputation would cost real FLOPs."""
try:
    SAVED_OPS.add(torch.ops.higher_order.flex_attention)
except AttributeError:
    pass

FLASH_ATTN_OPS = ("_flash_attn_forward", "_flash_attn_varlen_forward")
"""The forward ops flash-attn (>= 2.6) registers as ``torch.ops.flash_attn.*`` when it is imported."""


def registered_ops(namespace: str, names: tuple[str, ...]) -> set:
    """The OpOverloads of ``torch.ops.<namespace>.<name>`` that exist (all overloads of each), others skipped."""
    ops = set()
    for name in names:
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            continue
        ops.update(getattr(packet, overload) for overload in packet.overloads())
    return ops


def flash_attention_ops(namespace: str = "flash_attn") -> set:
    """flash-attn's forward ops when it is installed and registers them (importing it does), else none.
    ``namespace``: where they are registered (flash-attn's own; tests register stand-ins elsewhere)."""
    try:  # only installed with the extra "gpu"
        import flash_attn  # noqa: F401
    except ImportError:
        return set()
    return registered_ops(namespace, FLASH_ATTN_OPS)


SAVED_OPS |= flash_attention_ops()


def _keep_costly(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_layer(layer, policy: RecomputePolicy, training: bool, h: torch.Tensor, *args):
    """``layer(h, *args)`` under ``policy`` (recomputation applies only while training)."""
    if policy == "none" or not training or not torch.is_grad_enabled():
        return layer(h, *args)
    if policy == "layer":
        return checkpoint(layer, h, *args, use_reentrant=False)
    return checkpoint(layer, h, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_costly))
