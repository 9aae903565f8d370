import math

import torch

from lance_core.flow import (
    LossConfig,
    compute_losses,
    interpolate,
    noise_latents,
    sample_timesteps,
    shift_timesteps,
)
from lance_core.model import build_model
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_mix


def test_shift_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_timesteps(t, 4.0), torch.tensor([0.0, 4 * 0.25 / (1 + 3 * 0.25), 0.8, 1.0]))


def test_logit_normal_timesteps_median_matches_shifted_half():
    t = sample_timesteps(20000, LossConfig(), torch.Generator().manual_seed(0))
    # median of sigmoid(N(0,1)) is 0.5, shifted with s = 4 -> 0.8
    assert abs(float(t.median()) - 0.8) < 0.01
    assert float(t.min()) > 0 and float(t.max()) < 1


def test_interpolation_endpoints():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.allclose(interpolate(x0, eps, torch.ones(3)), eps)


def test_noised_latents_clean_tokens_untouched_and_target_is_velocity(tokenizer, tiny_cfg):
    batch = pack_samples(synthetic_mix(tokenizer, tiny_cfg, per_task=1), tiny_cfg)
    noised = noise_latents(batch, LossConfig(), torch.Generator().manual_seed(1))
    is_target = batch.target_index[batch.vae_positions] >= 0
    assert torch.equal(noised.values[~is_target], batch.vae_latents[~is_target])
    assert (noised.timesteps[~is_target] == 0).all()
    t = noised.timesteps[is_target][:, None]
    x0 = batch.vae_latents[is_target]
    eps = noised.target_velocity[is_target] + x0
    assert torch.allclose(noised.values[is_target], (1 - t) * x0 + t * eps, atol=1e-6)
    # one timestep per target clip
    per_clip = {int(c): float(v) for c, v in zip(batch.target_index[batch.vae_positions][is_target], t[:, 0])}
    assert len(set(per_clip.values())) == batch.num_targets


def test_loss_normalisation_uses_global_counts(tokenizer, tiny_cfg):
    model = build_model(tiny_cfg)
    batch = pack_samples(synthetic_mix(tokenizer, tiny_cfg, per_task=1), tiny_cfg)
    noised = noise_latents(batch, LossConfig(), torch.Generator().manual_seed(0))
    local = compute_losses(model, batch, LossConfig(), noised=noised)
    doubled = compute_losses(model, batch, LossConfig(), noised=noised, count_reducer=lambda c: c * 2)
    assert math.isclose(float(doubled.mse), float(local.mse) / 2, rel_tol=1e-5)
    assert math.isclose(float(doubled.ce), float(local.ce) / 2, rel_tol=1e-5)
    assert math.isclose(float(local.total), 0.25 * float(local.ce) + float(local.mse), rel_tol=1e-6)
    assert {"mse/t2i", "mse/subject", "ce/i2t", "ce/v2t"} <= set(local.per_task)
