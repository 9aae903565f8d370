"""Flex attention runs at bucketed lengths: padding is isolated, outputs are unchanged, and a run over many
sequence lengths compiles once per bucket instead of once per length."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lance_core.model import AttentionLayout, packed_attention
from lance_core.model.attention import FLEX_EXACT_BLOCKS, flex_bucket_length, prepare_attention
from tests.test_attention_backends import random_layout

BLOCK = 16
"""Small flex blocks: cheap CPU compiles, and most sample and span edges fall inside a block."""


def _prefix(layout: AttentionLayout, n: int) -> AttentionLayout:
    """The first ``n`` tokens (the last span or sample cut short, as in a sampling prefix)."""
    return AttentionLayout(layout.sample[:n], layout.span[:n], layout.bidirectional[:n], layout.noise[:n])


def test_bucket_lengths():
    buckets = [flex_bucket_length(n, 128) for n in range(1, 65_537)]
    assert all(b >= n and b % 128 == 0 for n, b in enumerate(buckets, 1))
    assert buckets == sorted(buckets)
    assert len(set(buckets)) == 32  # 8 whole blocks, then 4 per doubling from 1,024 to 65,536
    assert all(b - n < 128 for n, b in enumerate(buckets[:FLEX_EXACT_BLOCKS * 128], 1))
    assert all(b < 1.25 * n for n, b in enumerate(buckets, 1) if n > FLEX_EXACT_BLOCKS * 128)
    assert [flex_bucket_length(2**k, 128) for k in range(7, 18)] == [2**k for k in range(7, 18)]
    assert [flex_bucket_length(n, 16) for n in (1, 16, 17, 129, 160, 161, 257, 400, 513)] == \
        [16, 16, 32, 160, 160, 192, 320, 448, 640]


def test_padding_tokens_see_only_themselves_and_are_seen_by_none():
    layout = random_layout(seed=3)
    n = len(layout)
    padded = layout.padded(n + 21)
    mask = padded.dense_mask()
    assert torch.equal(mask[:n, :n], layout.dense_mask())
    assert not mask[:n, n:].any() and not mask[n:, :n].any()
    assert torch.equal(mask[n:, n:], torch.eye(21, dtype=torch.bool))
    assert layout.padded(n) is layout


@pytest.mark.slow
@pytest.mark.parametrize("seed,samples,cut", [(0, 8, None), (1, 5, None), (2, 12, 201), (4, 3, 37)])
def test_padded_flex_matches_dense(seed, samples, cut):
    """Forward only: torch's flex attention has no CPU backward (the GPU runs it in test_attention_backends)."""
    layout = random_layout(seed, samples)
    layout = _prefix(layout, cut) if cut else layout
    torch.manual_seed(seed)
    q, k, v = torch.randn(4, len(layout), 16), torch.randn(2, len(layout), 16), torch.randn(2, len(layout), 16)
    backend, block_mask = prepare_attention(layout, "flex", BLOCK)
    assert block_mask.shape[-2] == flex_bucket_length(len(layout), BLOCK) > len(layout)
    flex = packed_attention(q, k, v, layout, backend, block_mask)
    assert flex.shape == q.shape
    torch.testing.assert_close(flex, packed_attention(q, k, v, layout, "sdpa"), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_compiles_once_per_bucket():
    """16 prefix lengths of one layout, 3 buckets: the flex kernel compiles 3 times (the block-mask builder
    twice more: static, then with a dynamic length), where it compiled once per length before, up to
    torch's recompile limit, and ran eager flex attention (the full score matrix) after it."""
    layout = random_layout(seed=5, samples=24)
    lengths = list(range(260, 452, 12))
    buckets = {flex_bucket_length(n, BLOCK) for n in lengths}
    assert len(buckets) == 3
    torch._dynamo.reset()
    counters.clear()
    for n in lengths:
        part = _prefix(layout, n)
        q, k, v = torch.randn(4, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 16)
        backend, block_mask = prepare_attention(part, "flex", BLOCK)
        flex = packed_attention(q, k, v, part, backend, block_mask)
        torch.testing.assert_close(flex, packed_attention(q, k, v, part, "sdpa"), atol=2e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] <= len(buckets) + 2 < len(lengths)
