import random

import pytest
import torch
import torch.nn.functional as F

from lance_core.model import AttentionLayout, packed_attention
from lance_core.model.varlen import SegmentGroup, varlen_attention_reference, varlen_plan
from lance_core.packing import TASKS, pack_samples
from lance_core.synthetic import synthetic_mix
from tests.test_attention_backends import random_layout


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


# The plan as first written, span by span and token by token in Python: the reference of the vectorised one.
def _loop_span_bounds(layout):
    span, sample = layout.span.tolist(), layout.sample.tolist()
    bidir, noise = layout.bidirectional.tolist(), layout.noise.tolist()
    bounds, sample_start, start = [], 0, 0
    for i in range(1, len(span) + 1):
        if i == len(span) or span[i] != span[start]:
            if start == 0 or sample[start] != sample[start - 1]:
                sample_start = start
            bounds.append((start, i, sample_start, bidir[start], noise[start]))
            start = i
    return bounds


def _loop_keys(stop, sample_start, noise_spans):
    pieces, cursor = [], sample_start
    for noise_start, noise_stop in noise_spans:
        pieces.append(torch.arange(cursor, noise_start))
        cursor = noise_stop
    pieces.append(torch.arange(cursor, stop))
    return torch.cat(pieces)


def loop_varlen_plan(layout):
    noise_spans, groups = {}, {True: [], False: []}
    for start, stop, sample_start, bidirectional, noise in _loop_span_bounds(layout):
        earlier_noise = noise_spans.setdefault(sample_start, [])
        keys = _loop_keys(stop, sample_start, earlier_noise)
        if noise:
            earlier_noise.append((start, stop))
        groups[not bidirectional].append((torch.arange(start, stop), keys))
    plan = []
    for causal, segments in groups.items():
        if not segments:
            continue
        q_lens = torch.tensor([len(q) for q, _ in segments])
        k_lens = torch.tensor([len(k) for _, k in segments])
        plan.append(SegmentGroup(causal, torch.cat([q for q, _ in segments]), torch.cat([k for _, k in segments]),
                                 F.pad(q_lens.cumsum(0), (1, 0)).to(torch.int32),
                                 F.pad(k_lens.cumsum(0), (1, 0)).to(torch.int32),
                                 int(q_lens.max()), int(k_lens.max())))
    return plan


def token_noise_layout(seed: int, length: int = 300) -> AttentionLayout:
    """Per-token random runs: span ids that come back, sample edges inside spans, modes that change inside a
    span. Not a layout packing makes; the two plans must still agree token for token."""
    rng = random.Random(seed)
    fields = [[], [], [], []]
    values = [0, 0, False, False]
    while min(map(len, fields)) < length:
        for i, choices in enumerate((range(4), range(6), (False, True), (False, True))):
            if rng.random() < 0.3:
                values[i] = rng.choice(choices)
        for field, value in zip(fields, values):
            field += [value] * rng.randint(1, 7)
    return AttentionLayout(*(torch.tensor(f[:length]) for f in fields))


def _assert_same_plan(layout):
    got, expected = varlen_plan(layout), loop_varlen_plan(layout)
    assert [g.causal for g in got] == [e.causal for e in expected]
    for g, e in zip(got, expected):
        for name in ("q_index", "k_index", "cu_q", "cu_k"):
            a, b = getattr(g, name), getattr(e, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert (g.max_q, g.max_k) == (e.max_q, e.max_k)
        assert isinstance(g.max_q, int) and isinstance(g.max_k, int)


@pytest.mark.parametrize("tasks", [(task,) for task in TASKS] + [TASKS])
@pytest.mark.parametrize("per_task", [1, 3])
def test_vectorised_plan_equals_the_loop_on_packs(tokenizer, tiny_cfg, tasks, per_task):
    samples = synthetic_mix(tokenizer, tiny_cfg, seed=per_task, per_task=per_task, tasks=tasks)
    for pad in (None, sum(s.num_tokens for s in samples) + 37):
        _assert_same_plan(AttentionLayout.from_batch(pack_samples(samples, tiny_cfg, pad_to=pad)))


def test_vectorised_plan_equals_the_loop_on_random_layouts():
    for seed in range(40):
        _assert_same_plan(random_layout(seed, samples=1 + seed % 9))
        _assert_same_plan(token_noise_layout(seed, length=1 + 17 * seed))


def test_plan_of_an_empty_layout_is_empty():
    empty = torch.zeros(0, dtype=torch.long)
    assert varlen_plan(AttentionLayout(empty, empty, empty.bool(), empty.bool())) == []
