import torch

from lance_core.model import TokenInputs, build_model
from lance_core.packing import VisualInput, build_generation_sample, build_understanding_sample, pack_samples
from lance_core.sampling import (
    SamplingConfig,
    cfg_combine,
    generate_latents,
    generate_text,
    inference_timesteps,
    predict_velocity,
    prepare_prefix,
)


def test_inference_timesteps_go_from_one_to_zero_shifted():
    t = inference_timesteps(30, 3.5)
    assert len(t) == 31 and t[0] == 1.0 and t[-1] == 0.0
    assert torch.all(t[1:] < t[:-1])
    assert abs(float(t[15]) - 3.5 * 0.5 / (1 + 2.5 * 0.5)) < 1e-6


def test_cfg_rescale_caps_norm_at_conditional():
    v_c, v_u = torch.randn(10, 4), torch.randn(10, 4)
    v = cfg_combine(v_c, v_u, 4.0, rescale=True)
    assert float(v.norm()) <= float(v_c.norm()) + 1e-5
    raw = cfg_combine(v_c, v_u, 4.0, rescale=False)
    assert torch.allclose(raw, v_u + 4 * (v_c - v_u))
    assert torch.allclose(v / v.norm(), raw / raw.norm(), atol=1e-6)


def test_kv_cached_step_equals_full_forward(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    source = VisualInput(latents=torch.randn(1, 2, 3, 48), vit_features=torch.randn(4, 64), vit_grid=(1, 2, 2))
    sample = build_generation_sample(tokenizer, "i2i", "make it blue", torch.zeros(1, 2, 3, 48), source=source)
    batch = pack_samples([sample], tiny_cfg)
    x = batch.vae_latents.clone()
    n = 6
    x[-n:] = torch.randn(n, 48)
    t = torch.zeros(len(x))
    t[-n:] = 0.6
    with torch.no_grad():
        hidden = model.backbone(TokenInputs.from_batch(batch, x, t))[0]
        full = model.velocity(hidden[batch.vae_positions[-n:]])
    state = prepare_prefix(model, sample, "cpu")
    assert len(state.noisy) == n + 2  # the target's latents between its two vision markers
    cached = predict_velocity(model, state, x[-n:], t[-n:])
    assert torch.allclose(full, cached, atol=1e-5)


def test_generation_shapes_and_i2v_keeps_first_frame(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    gen = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(steps=4)
    image = generate_latents(model, tokenizer, "t2i", "a cat", (1, 3, 4), cfg, generator=gen)
    assert image.shape == (1, 3, 4, 48) and torch.isfinite(image).all()
    first = torch.randn(1, 3, 4, 48)
    video = generate_latents(model, tokenizer, "i2v", "a cat runs", (3, 3, 4), cfg, first_frame=first, generator=gen)
    assert video.shape == (3, 3, 4, 48)
    assert torch.equal(video[:1], first)
    assert not torch.allclose(video[1:], torch.zeros_like(video[1:]))


def test_sampling_is_deterministic_with_a_seed(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    cfg = SamplingConfig(steps=3)
    a = generate_latents(model, tokenizer, "t2i", "x", (1, 2, 2), cfg, generator=torch.Generator().manual_seed(3))
    b = generate_latents(model, tokenizer, "t2i", "x", (1, 2, 2), cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _greedy_without_cache(model, tokenizer, prompt, steps):
    batch = pack_samples([prompt], model.cfg)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            hidden = model.backbone(TokenInputs.from_batch(batch))[0]
        token = int(model.text_logits(hidden[-1], len(tokenizer)).argmax())
        if token == tokenizer.special.im_end:
            break
        out.append(token)
        one = batch.token_slice(len(batch) - 1, len(batch))
        for name in ("input_ids", "is_gen", "token_kind", "sample_index", "span_index", "span_bidirectional",
                     "span_noise", "ce_labels", "mse_mask", "target_index", "task_index"):
            value = getattr(one, name).clone()
            if name == "input_ids":
                value[0] = token
            setattr(batch, name, torch.cat([getattr(batch, name), value]))
        batch.position_ids = torch.cat([batch.position_ids, batch.position_ids[:, -1:] + 1], dim=1)
    return out


def test_cached_text_decoding_matches_uncached(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    media = VisualInput(vit_features=torch.randn(8, 64), vit_grid=(2, 2, 2), is_video=True)
    prompt = build_understanding_sample(tokenizer, "v2t", media, "what happens?", None)
    cached = generate_text(model, tokenizer, prompt, max_new_tokens=8)
    assert cached == _greedy_without_cache(model, tokenizer, prompt, 8)
    sampled = generate_text(model, tokenizer, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9,
                            generator=torch.Generator().manual_seed(0))
    assert all(0 <= t < len(tokenizer) for t in sampled)


def test_editing_uses_source_conditions_and_pixel_aligned_positions(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg).eval()
    source = VisualInput(latents=torch.randn(1, 2, 3, 48), vit_features=torch.randn(4, 64), vit_grid=(1, 2, 2))
    sample = build_generation_sample(tokenizer, "i2i", "make it blue", torch.zeros(1, 2, 3, 48), source=source)
    state = prepare_prefix(model, sample, "cpu")
    batch = pack_samples([sample], tiny_cfg)
    source_span = batch.span_index[torch.nonzero(batch.token_kind == 2).squeeze(1)[0]]
    source_tokens = torch.nonzero(batch.span_index == source_span).squeeze(1)  # markers included
    assert torch.equal(state.noisy.position_ids, batch.position_ids[:, source_tokens])
    cfg = SamplingConfig(steps=3)
    a = generate_latents(model, tokenizer, "i2i", "make it blue", (1, 2, 3), cfg, source=source,
                         generator=torch.Generator().manual_seed(0))
    other = VisualInput(latents=torch.randn(1, 2, 3, 48), vit_features=torch.randn(4, 64), vit_grid=(1, 2, 2))
    b = generate_latents(model, tokenizer, "i2i", "make it blue", (1, 2, 3), cfg, source=other,
                         generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
