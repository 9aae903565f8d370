"""GRPO maths on the tiny model: SDE log-probs, exact ratio with unchanged weights, advantages, clipping."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lance_core.flow import shift_timesteps
from lance_core.model import build_model
from lance_core.packing import build_generation_sample
from lance_core.rl import (
    SDESamplerConfig,
    clipped_policy_loss,
    group_advantages,
    kl_to_reference,
    repeat_noisy,
    replay_step,
    sample_group,
    sde_mean,
    sde_sigma,
    sde_step,
    sde_window,
    step_std,
)
from lance_core.sampling import SamplingConfig, euler_sample, inference_timesteps, prepare_prefix


def _prefix(model, tokenizer, caption, groups, grid=(1, 3, 3)):
    blank_target = torch.zeros(*grid, model.cfg.latent_channels)
    sample = build_generation_sample(tokenizer, "t2i", caption, blank_target)
    return repeat_noisy(prepare_prefix(model, sample, "cpu"), groups)


def test_step_log_prob_matches_independent_gaussian():
    x = torch.randn(3, 5, 4)
    v = torch.randn(3, 5, 4)
    t, t_next, a = 0.8, 0.6, 0.7
    out = sde_step(x, v, t, t_next, a, torch.Generator().manual_seed(1))
    g = a * math.sqrt(t / (1 - t))
    delta = t_next - t
    mean = x + delta * (v + g * g / (2 * t) * (x + (1 - t) * v))
    std = g * math.sqrt(-delta)
    reference = torch.distributions.Normal(mean.double(), std).log_prob(out.sample.double()).mean(dim=(1, 2))
    assert torch.allclose(out.mean, mean.float(), atol=1e-6)
    assert torch.allclose(out.log_prob.double(), reference, atol=1e-5)
    # at t = 1 the next grid point stands in the denominator
    assert sde_sigma(1.0, 0.9, a) == pytest.approx(a * math.sqrt(1.0 / 0.1))
    # a = 0: the mean is the Euler step
    assert torch.allclose(sde_mean(x, v, t, t_next, 0.0), x + delta * v)


def _first_step_std(steps: int, shift: float, a: float) -> float:
    t = inference_timesteps(steps, shift).tolist()
    return step_std(t[0], t[1], sde_sigma(t[0], t[1], a))


def test_first_sde_step_is_bounded_for_every_shift():
    """At t = 1, g = a·sqrt(1 / (1 - t₁)) and the std g·sqrt(1 - t₁) is exactly a, whatever the shift."""
    a = 0.7
    shifts = [round(0.5 + 0.01 * k, 2) for k in range(951)]
    for steps in (6, 10, 40):
        for shift in shifts:
            grid = inference_timesteps(steps, shift)
            assert grid[0].item() == 1.0 and grid[-1].item() == 0.0, (steps, shift)
            std = _first_step_std(steps, shift, a)
            assert math.isfinite(std) and std == pytest.approx(a, rel=1e-6), (steps, shift, std)
    # one float step below 1 was the failure: std a·sqrt(t / 2⁻²⁴)·sqrt(t - t₁) ≈ 800
    raw = shift_timesteps(torch.linspace(1.0, 0.0, 11), 0.58).tolist()
    assert raw[0] < 1.0 and step_std(raw[0], raw[1], sde_sigma(raw[0], raw[1], a)) > 100


def test_exact_grid_is_unchanged():
    """For a shift whose float32 grid already ends exactly at 1 and 0 nothing moves (golden values)."""
    grid = inference_timesteps(10, 3.5)
    assert torch.equal(grid, shift_timesteps(torch.linspace(1.0, 0.0, 11), 3.5))
    assert grid[1].item() == pytest.approx(3.15 / 3.25, abs=1e-7)
    x, v = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    t, t_next = grid[0].item(), grid[1].item()
    out = sde_step(x.unsqueeze(0), v.unsqueeze(0), t, t_next, 0.7, torch.Generator().manual_seed(1))
    g = 0.7 * math.sqrt(1.0 / (1.0 - t_next))
    assert out.g == g and out.std == g * math.sqrt(1.0 - t_next)
    assert torch.equal(out.mean, sde_mean(x.unsqueeze(0), v.unsqueeze(0), 1.0, t_next, g))


def test_rollout_at_an_inexact_shift_stays_bounded(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg).eval()
    cfg = SDESamplerConfig(steps=4, shift=0.58, window_size=1, window_range=(0, 1))
    cond = _prefix(model, tokenizer, 'a sign that reads "hi"', 2)
    trajectory = sample_group(model, cond, None, cfg, 2, [0], torch.Generator().manual_seed(0))
    assert trajectory.timesteps[0] == 1.0
    assert torch.isfinite(trajectory.log_probs).all()
    assert trajectory.states[1].abs().max() < 20


def test_ratio_is_exactly_one_with_unchanged_weights(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg).eval()
    cfg = SDESamplerConfig(steps=6, window_size=3, window_range=(0, 5), cfg_scale=2.0)
    groups = 4
    cond = _prefix(model, tokenizer, 'a sign that reads "hi"', groups)
    uncond = _prefix(model, tokenizer, "", groups)
    window = sde_window(cfg, random.Random(0))
    trajectory = sample_group(model, cond, uncond, cfg, groups, window, torch.Generator().manual_seed(0))
    assert trajectory.states.shape == (4, groups, 9, tiny_cfg.latent_channels)
    assert trajectory.log_probs.shape == (3, groups)
    model.train()
    for position in range(len(window)):
        replayed = replay_step(model, cond, uncond, cfg, trajectory, position)
        ratio = torch.exp(replayed.log_prob - trajectory.log_probs[position])
        assert torch.equal(ratio, torch.ones_like(ratio))
        assert replayed.log_prob.requires_grad


def test_group_rollout_matches_single_ode_sampler(tiny_cfg, tokenizer):
    """Outside the window the group sampler is the library's Euler sampler, sample by sample."""
    model = build_model(tiny_cfg).eval()
    cfg = SDESamplerConfig(steps=4)
    cond = _prefix(model, tokenizer, "a red circle", 2)
    trajectory = sample_group(model, cond, None, cfg, 2, [], torch.Generator().manual_seed(3))
    single = prepare_prefix(model, build_generation_sample(tokenizer, "t2i", "a red circle",
                                                           torch.zeros(1, 3, 3, tiny_cfg.latent_channels)), "cpu")
    generator = torch.Generator().manual_seed(3)
    for k in range(2):  # the group's noise is the two single draws in a row
        expected = euler_sample(model, single, None, SamplingConfig(steps=4, cfg_scale=1.0), generator)
        assert torch.allclose(trajectory.final[k], expected, atol=1e-5)


def test_window_choice():
    cfg = SDESamplerConfig(steps=10, window_size=2, window_range=(0, 6))
    for seed in range(20):
        window = sde_window(cfg, random.Random(seed))
        assert len(window) == 2 and window[0] >= 0 and window[-1] < 6 and window[1] == window[0] + 1
    assert sde_window(SDESamplerConfig(steps=4), random.Random(0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="window"):
        SDESamplerConfig(steps=4, window_size=5)


def test_group_advantages_hand_made():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards)
    assert adv.zero_spread.tolist() == [False, True, False]
    assert torch.allclose(adv.values[0], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (0.5 + 1e-4), atol=1e-6)
    assert torch.equal(adv.values[1], torch.zeros(4))
    std = torch.tensor([3.0, 1.0, 2.0, 2.0]).std(unbiased=False)
    assert torch.allclose(adv.values[2], (torch.tensor([1.0, -1.0, 0.0, 0.0]) / (std + 1e-4)), atol=1e-6)
    # batch-wide std and the ±5 clip
    skewed = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    assert group_advantages(skewed).values.max() == pytest.approx(5.0)
    batch = group_advantages(torch.tensor([[0.0, 2.0], [0.0, 0.2]]), std_scope="batch")
    batch_std = torch.tensor([0.0, 2.0, 0.0, 0.2]).std(unbiased=False)
    assert torch.allclose(batch.values[1], torch.tensor([-0.1, 0.1]) / (batch_std + 1e-4), atol=1e-6)


def test_clipped_loss_hand_made():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.05, 0.95]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = clipped_policy_loss(new, old, adv, clip_range=0.2)
    # per sample max(-A·ρ, -A·clip(ρ)): [-1.2, -0.5, 1.05, 0.95]
    assert out.policy.item() == pytest.approx((-1.2 - 0.5 + 1.05 + 0.95) / 4, abs=1e-6)
    assert out.clipped.tolist() == [True, True, False, False]
    assert torch.allclose(out.ratio, torch.tensor([1.5, 0.5, 1.05, 0.95]))
    # gradient: zero where the clipped branch is active
    new = new.clone().requires_grad_(True)
    clipped_policy_loss(new, old, adv, clip_range=0.2).loss.backward()
    assert new.grad[0] == 0 and new.grad[1] != 0 and new.grad[2] != 0
    kl = kl_to_reference(torch.ones(2, 3), torch.zeros(2, 3), g=0.5)
    assert torch.allclose(kl, torch.full((2,), 1.0 / (2 * 0.25)))
    with_kl = clipped_policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.2, kl, kl_weight=0.04)
    assert with_kl.loss.item() == pytest.approx(0.04 * 2.0)


def test_lora_targets_only_the_generation_expert(tiny_cfg):
    from lance_core.rl import LoRAAdapters

    model = build_model(tiny_cfg)
    adapters = LoRAAdapters(model, rank=2, alpha=4.0)
    names = {key.replace("__", ".") for key in adapters.targets}
    assert len(names) == tiny_cfg.num_layers * 7
    assert all("_moe_gen" in name for name in names)
