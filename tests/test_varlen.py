import torch

from lance_core.model import AttentionLayout, packed_attention
from lance_core.model.varlen import varlen_attention_reference, varlen_plan
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_mix


def test_varlen_segments_reproduce_the_dense_mask(tokenizer, tiny_cfg):
    batch = pack_samples(synthetic_mix(tokenizer, tiny_cfg, per_task=1), pad_to=1500)
    layout = AttentionLayout.from_batch(batch)
    plan = varlen_plan(layout)
    assert plan is not None
    n = len(batch)
    q, k, v = torch.randn(4, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 16)
    dense = packed_attention(q, k, v, layout, "sdpa")
    assert torch.allclose(varlen_attention_reference(q, k, v, plan), dense, atol=1e-5)


def test_span_after_noise_is_not_expressible():
    layout = AttentionLayout(torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1, 1, 2, 2]),
                             torch.tensor([False, False, True, True, False, False]),
                             torch.tensor([False, False, True, True, False, False]))
    assert varlen_plan(layout) is None
