"""The span structure of a packed sequence and the generalized 3D causal mask of Lance it implies.

Mask rule (MODEL.md): a query sees a key only inside its own packed sample; inside one span it sees
everything when the span is ``full`` or ``noise`` and only earlier tokens when it is ``causal``; it sees
every token of earlier spans except those of a ``noise`` span (nothing outside a noisy target attends
to it). :func:`mask_rule` states this once; every attention backend evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # flex attention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # pragma: no cover - old torch
    BlockMask = create_block_mask = None


def mask_rule(sample, span, bidirectional, noise, q_idx, kv_idx):
    same_sample = sample[q_idx] == sample[kv_idx]
    same_span = span[q_idx] == span[kv_idx]
    inside = same_span & (bidirectional[q_idx] | (kv_idx <= q_idx))
    earlier = ~same_span & (kv_idx < q_idx) & ~noise[kv_idx]
    return same_sample & (inside | earlier)


@dataclass
class AttentionLayout:
    """Per-token span structure of a packed sequence (see ``PackedBatch``)."""

    sample: torch.Tensor
    span: torch.Tensor
    bidirectional: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def from_batch(cls, batch) -> AttentionLayout:
        return cls(batch.sample_index, batch.span_index, batch.span_bidirectional, batch.span_noise)

    def __len__(self) -> int:
        return int(self.sample.numel())

    def dense_mask(self) -> torch.Tensor:
        idx = torch.arange(len(self), device=self.sample.device)
        return mask_rule(self.sample, self.span, self.bidirectional, self.noise, idx[:, None], idx[None, :])

    def block_mask(self, block_size: int = 128) -> BlockMask:
        sample, span, bidir, noise = self.sample, self.span, self.bidirectional, self.noise

        def mask_mod(b, h, q_idx, kv_idx):
            return mask_rule(sample, span, bidir, noise, q_idx, kv_idx)

        n = len(self)
        # _compile: evaluate the mask rule block-wise in a compiled kernel instead of on the full L x L grid
        return create_block_mask(mask_mod, None, None, n, n, device=self.sample.device, BLOCK_SIZE=block_size,
                                 _compile=True)

    def padded(self, length: int) -> AttentionLayout:
        """This layout followed by isolated tokens up to ``length``: each its own sample and causal span,
        so a padding token sees only itself and no other token sees it."""
        missing = length - len(self)
        if missing <= 0:
            return self
        device = self.sample.device
        new = torch.arange(1, missing + 1, device=device)
        no = torch.zeros(missing, dtype=torch.bool, device=device)

        def after(ids: torch.Tensor) -> torch.Tensor:
            last = ids.max() if ids.numel() else -1
            return torch.cat([ids, (last + new).to(ids.dtype)])

        return AttentionLayout(after(self.sample), after(self.span), torch.cat([self.bidirectional, no]),
                               torch.cat([self.noise, no]))

    def is_single_bidirectional_span(self) -> bool:
        return bool((self.span == self.span[0]).all() and self.bidirectional.all())
