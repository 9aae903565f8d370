import torch

from lance_core.model import AttentionLayout, TokenInputs, build_model
from lance_core.packing import build_generation_sample, pack_samples
from lance_core.synthetic import synthetic_mix


def _layout(spans):
    """spans: list of (sample, mode, length)."""
    sample, span, bidir, noise = [], [], [], []
    for index, (s, mode, n) in enumerate(spans):
        sample += [s] * n
        span += [index] * n
        bidir += [mode != "causal"] * n
        noise += [mode == "noise"] * n
    return AttentionLayout(torch.tensor(sample), torch.tensor(span), torch.tensor(bidir), torch.tensor(noise))


def test_dense_mask_worked_example():
    layout = _layout([(0, "causal", 2), (0, "full", 2), (0, "noise", 2), (1, "causal", 2)])
    m = layout.dense_mask().int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_text_after_noise_span_does_not_see_it():
    layout = _layout([(0, "causal", 1), (0, "noise", 2), (0, "causal", 2)])
    m = layout.dense_mask()
    assert not m[3:, 1:3].any()
    assert m[3:, 0].all()


def _run(model, batch, values):
    with torch.no_grad():
        return model.backbone(TokenInputs.from_batch(batch, values, torch.full((values.shape[0],), 0.5)))[0]


def test_changing_noisy_tokens_changes_nothing_outside_their_span(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=1)
    batch = pack_samples(samples, tiny_cfg)
    values = batch.vae_latents.clone()
    out_a = _run(model, batch, values)
    noisy_rows = batch.span_noise[batch.vae_positions]
    values[noisy_rows] = torch.randn_like(values[noisy_rows]) * 3
    out_b = _run(model, batch, values)
    outside = ~batch.span_noise
    assert torch.allclose(out_a[outside], out_b[outside], atol=1e-6)
    assert not torch.allclose(out_a[batch.span_noise], out_b[batch.span_noise], atol=1e-3)


def test_packed_samples_do_not_see_each_other(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    a, b, c = synthetic_mix(tokenizer, tiny_cfg, per_task=1, tasks=("t2i", "i2t", "v2v"))
    packed = pack_samples([a, b, c], tiny_cfg)
    alone = pack_samples([b], tiny_cfg)
    out_packed = _run(model, packed, packed.vae_latents)
    out_alone = _run(model, alone, alone.vae_latents)
    start = a.num_tokens
    assert torch.allclose(out_packed[start:start + b.num_tokens], out_alone, atol=1e-5)


def test_causal_text_token_does_not_see_later_tokens(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    sample = build_generation_sample(tokenizer, "t2i", "a red circle on a table", torch.randn(1, 2, 2, 48))
    batch = pack_samples([sample], tiny_cfg)
    ids_b = batch.input_ids.clone()
    first_text_span_end = int((batch.span_index == 0).sum())
    ids_b[first_text_span_end - 1] = (ids_b[first_text_span_end - 1] + 1) % 256
    out_a = _run(model, batch, batch.vae_latents)
    batch.input_ids = ids_b
    out_b = _run(model, batch, batch.vae_latents)
    assert torch.allclose(out_a[: first_text_span_end - 1], out_b[: first_text_span_end - 1], atol=1e-6)
    assert not torch.allclose(out_a[first_text_span_end - 1:], out_b[first_text_span_end - 1:], atol=1e-4)
