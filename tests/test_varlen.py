import torch

from lance_core.model import AttentionLayout, packed_attention
from lance_core.model.varlen import varlen_attention_reference, varlen_plan
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_mix


def test_varlen_segments_reproduce_the_dense_mask(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=1)
    batch = pack_samples(samples, tiny_cfg, pad_to=sum(s.num_tokens for s in samples) + 40)
    layout = AttentionLayout.from_batch(batch)
    plan = varlen_plan(layout)
    assert plan is not None
    n = len(batch)
    q, k, v = torch.randn(4, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 16)
    dense = packed_attention(q, k, v, layout, "sdpa")
    assert torch.allclose(varlen_attention_reference(q, k, v, plan), dense, atol=1e-5)


def test_span_after_noise_gathers_keys_around_it():
    """A causal span after a noisy span (the closing <|im_end|> of a generation sample) and a second sample."""
    layout = AttentionLayout(torch.tensor([0] * 8 + [1] * 3), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5]),
                             torch.tensor([False, False, True, True, False, False, True, True, False, True, True]),
                             torch.tensor([False, False, True, True, False, False, True, True, False, False, True]))
    plan = varlen_plan(layout)
    q, k, v = torch.randn(2, 11, 8), torch.randn(1, 11, 8), torch.randn(1, 11, 8)
    dense = packed_attention(q, k, v, layout, "sdpa")
    assert torch.allclose(varlen_attention_reference(q, k, v, plan), dense, atol=1e-5)
