"""Flow-GRPO mathematics: the reverse SDE sampler with per-step log-probabilities, group advantages, the
clipped objective and the KL to a frozen reference (GRPO.md).

Notation: x_t = (1 - t)·x0 + t·ε, the model predicts v = ε - x0, a step goes from t to s < t with
Δ = s - t < 0. The SDE arithmetic runs in float32 whatever the model's dtype. A group is G samples of one
prompt; they share the prompt's KV-cached prefix and run as G packed samples in one forward.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace

import torch
from pydantic import Field, model_validator
from torch import nn

from .config import StrictModel
from .model import LanceModel, TokenInputs
from .sampling import PrefixState, inference_timesteps

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SDESamplerConfig(StrictModel):
    """The rollout sampler: SDE steps inside a window, Euler ODE steps elsewhere."""

    steps: int = Field(10, gt=0)
    """Sampling steps of a rollout (evaluation uses more, with the ODE)."""
    shift: float = Field(3.5, gt=0)
    noise_level: float = Field(0.7, ge=0)
    """a in g_t = a·sqrt(t / (1 - t)); 0 gives the deterministic ODE."""
    window_size: int = Field(0, ge=0)
    """SDE steps per trajectory (the trained ones); 0 = every step is an SDE step."""
    window_range: tuple[int, int] | None = None
    """[lo, hi): the window lies inside these step indices; its start is drawn per group. None = all steps."""
    cfg_scale: float = Field(1.0, ge=1.0)
    """Text CFG during rollout and training; 1.0 switches it off (no unconditional branch)."""
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_rescale: bool = True

    @model_validator(mode="after")
    def _check_window(self) -> SDESamplerConfig:
        lo, hi = self.window_range or (0, self.steps)
        if not 0 <= lo < hi <= self.steps:
            raise ValueError(f"window_range {self.window_range} must satisfy 0 <= lo < hi <= steps ({self.steps})")
        if self.window_size > hi - lo:
            raise ValueError(f"window_size {self.window_size} does not fit window_range [{lo}, {hi})")
        return self


# ------------------------------------------------------------------------------------------ SDE step
def sde_sigma(t: float, t_next: float, noise_level: float) -> float:
    """g_t = a·sqrt(t / (1 - t)); at t = 1 the next grid point stands in the denominator."""
    denominator = 1.0 - (t_next if t >= 1.0 else t)
    return noise_level * math.sqrt(t / denominator)


def sde_mean(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, g: float) -> torch.Tensor:
    """μ = x_t + Δ·[v + (g_t² / (2t))·(x_t + (1 - t)·v)] in float32."""
    x, v = x.float(), v.float()
    delta = t_next - t
    return x + delta * (v + (g * g / (2 * t)) * (x + (1 - t) * v))


def step_std(t: float, t_next: float, g: float) -> float:
    """Standard deviation g_t·sqrt(-Δ) of x_s given x_t."""
    return g * math.sqrt(t - t_next)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std²) per element, averaged over every dim but the first: one scalar per sample."""
    diff = x.float() - mean
    per_element = -(diff * diff) / (2 * std * std) - math.log(std) - LOG_SQRT_2PI
    return per_element.flatten(1).mean(dim=1)


@dataclass
class StepOutput:
    sample: torch.Tensor
    """x_s (float32)."""
    log_prob: torch.Tensor
    """(G,) mean per-element log-density of ``sample`` under the step's Gaussian."""
    mean: torch.Tensor
    std: float
    g: float


def sde_step(
    x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, noise_level: float,
    generator: torch.Generator | None = None, sample: torch.Tensor | None = None,
) -> StepOutput:
    """One reverse-SDE step from t to t_next. With ``sample`` given (training replay) its log-prob is
    computed instead of drawing a new one."""
    g = sde_sigma(t, t_next, noise_level)
    mean = sde_mean(x, v, t, t_next, g)
    std = step_std(t, t_next, g)
    if sample is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        sample = mean + std * noise
    return StepOutput(sample.float(), gaussian_log_prob(sample, mean, std), mean, std, g)


# ------------------------------------------------------------------------------------------ window
def sde_window(cfg: SDESamplerConfig, rng: random.Random) -> list[int]:
    """Step indices that run the SDE (and are trained): a window of ``window_size`` steps at a start drawn
    from ``window_range``; every step when ``window_size`` is 0."""
    lo, hi = cfg.window_range or (0, cfg.steps)
    if cfg.window_size == 0:
        return list(range(lo, hi))
    start = rng.randint(lo, hi - cfg.window_size)
    return list(range(start, start + cfg.window_size))


# ------------------------------------------------------------------------------------------ model calls
def repeat_noisy(state: PrefixState, copies: int) -> PrefixState:
    """The prompt's noisy span repeated as ``copies`` packed samples after one shared prefix cache.

    Each copy is its own sample in the layout, so copies never attend to each other; positions repeat
    because every copy continues the same prefix."""
    noisy = state.noisy
    n = len(noisy)
    per_token = {}
    for name in ("input_ids", "is_gen", "token_kind", "position_ids", "span_index", "span_bidirectional",
                 "span_noise", "ce_labels", "mse_mask", "target_index", "task_index"):
        value = getattr(noisy, name)
        per_token[name] = torch.cat([value] * copies, dim=-1)
    sample = torch.cat([torch.full_like(noisy.sample_index, k) for k in range(copies)])
    vae_positions = torch.cat([noisy.vae_positions + k * n for k in range(copies)])
    vit_positions = torch.cat([noisy.vit_positions + k * n for k in range(copies)])
    batch = replace(
        noisy, **per_token, sample_index=sample, vae_positions=vae_positions,
        vae_latents=noisy.vae_latents.repeat(copies, 1), vae_grid=noisy.vae_grid.repeat(copies, 1),
        vit_positions=vit_positions, vit_features=noisy.vit_features.repeat(copies, 1),
        num_samples=copies, num_real_tokens=noisy.num_real_tokens * copies,
    )
    return PrefixState(state.cache, batch)


def group_velocity(model: LanceModel, state: PrefixState, x: torch.Tensor, t: float) -> torch.Tensor:
    """v for a group: ``state`` from :func:`repeat_noisy`, x (G, N, C) -> (G, N, C) float32. Gradients
    flow when enabled (training); the prefix cache is a constant."""
    groups, tokens, channels = x.shape
    dtype = next(model.parameters()).dtype
    values = x.reshape(groups * tokens, channels).to(dtype)
    times = torch.full((groups * tokens,), t, device=x.device, dtype=dtype)
    hidden, _ = model.backbone(TokenInputs.from_batch(state.noisy, values, times), cache=state.cache)
    return model.velocity(hidden[state.noisy.vae_positions]).float().reshape(groups, tokens, channels)


def guided_velocity(
    model: LanceModel, cond: PrefixState, uncond: PrefixState | None, x: torch.Tensor, t: float,
    cfg: SDESamplerConfig,
) -> torch.Tensor:
    """Text CFG per sample inside ``cfg_interval``: v = v_u + w·(v_c - v_u), rescaled so ‖v‖ <= ‖v_c‖."""
    v_cond = group_velocity(model, cond, x, t)
    lo, hi = cfg.cfg_interval
    if uncond is None or cfg.cfg_scale <= 1.0 or not lo < t <= hi:
        return v_cond
    v_uncond = group_velocity(model, uncond, x, t)
    v = v_uncond + cfg.cfg_scale * (v_cond - v_uncond)
    if cfg.cfg_rescale:
        ratio = v_cond.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1).clamp(min=1e-12)
        v = v * ratio.clamp(max=1.0)[:, None, None]
    return v


@dataclass
class GroupTrajectory:
    """What training needs from one group's rollout: the states around every SDE step and their old
    log-probs; ``final`` is x_0 (G, N, C) for decoding."""

    timesteps: list[float]
    window: list[int]
    states: torch.Tensor
    """(W + 1, G, N, C): x before the first window step, then after each window step."""
    log_probs: torch.Tensor
    """(W, G) log-probs recorded at rollout."""
    final: torch.Tensor
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def sample_group(
    model: LanceModel, cond: PrefixState, uncond: PrefixState | None, cfg: SDESamplerConfig, groups: int,
    window: list[int], generator: torch.Generator | None = None,
) -> GroupTrajectory:
    """Roll out G samples from noise: SDE steps at ``window`` indices (log-probs recorded), ODE elsewhere.

    ``cond``/``uncond`` come from :func:`repeat_noisy` with ``groups`` copies; ``window`` holds consecutive
    step indices (the recorded states chain one SDE step to the next)."""
    if window and list(window) != list(range(window[0], window[0] + len(window))):
        raise ValueError(f"the SDE window must be consecutive steps, got {window}")
    tokens, channels = cond.noisy.vae_latents.shape[0] // groups, cond.noisy.vae_latents.shape[1]
    device = cond.noisy.vae_latents.device
    timesteps = inference_timesteps(cfg.steps, cfg.shift).tolist()
    x = torch.randn(groups, tokens, channels, generator=generator, dtype=torch.float32).to(device)
    in_window = set(window)
    states, log_probs = [], []
    for index, (t, t_next) in enumerate(itertools.pairwise(timesteps)):
        v = guided_velocity(model, cond, uncond, x, t, cfg)
        if index in in_window:
            if not states:
                states.append(x)
            out = sde_step(x, v, t, t_next, cfg.noise_level, generator)
            x = out.sample
            states.append(x)
            log_probs.append(out.log_prob)
        else:
            x = x.float() + (t_next - t) * v
    states_t = torch.stack(states) if states else x.new_zeros(0, groups, tokens, channels)
    log_probs_t = torch.stack(log_probs) if log_probs else x.new_zeros(0, groups)
    return GroupTrajectory(timesteps, list(window), states_t, log_probs_t, x)


def replay_step(
    model: LanceModel, cond: PrefixState, uncond: PrefixState | None, cfg: SDESamplerConfig,
    trajectory: GroupTrajectory, position: int,
) -> StepOutput:
    """Recompute the ``position``-th window step of a recorded trajectory under the current weights
    (same group batching as the rollout, so unchanged weights reproduce the old log-probs exactly)."""
    index = trajectory.window[position]
    t, t_next = trajectory.timesteps[index], trajectory.timesteps[index + 1]
    x = trajectory.states[position]
    v = guided_velocity(model, cond, uncond, x, t, cfg)
    return sde_step(x, v, t, t_next, cfg.noise_level, sample=trajectory.states[position + 1])


# ------------------------------------------------------------------------------------------ objective
@dataclass
class Advantages:
    values: torch.Tensor
    """(P, G) clipped normalised advantages."""
    zero_spread: torch.Tensor
    """(P,) True where every reward of the group is equal (no learning signal)."""


def group_advantages(rewards: torch.Tensor, std_scope: str = "group", clip: float = 5.0,
                     eps: float = 1e-4) -> Advantages:
    """A_i = (r_i - mean of its group) / (std + eps), std over the group or the whole batch, clipped to
    ±clip. ``rewards`` is (P, G): every group complete (gathered before normalising)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (prompts, group), got {tuple(rewards.shape)}")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if std_scope == "group":
        std = rewards.std(dim=1, unbiased=False, keepdim=True)
    elif std_scope == "batch":
        std = rewards.std(unbiased=False).expand(rewards.shape[0], 1)
    else:
        raise ValueError(f"std_scope must be 'group' or 'batch', got {std_scope!r}")
    zero_spread = (rewards.max(dim=1).values - rewards.min(dim=1).values) == 0
    values = (centred / (std + eps)).clamp(-clip, clip)
    values[zero_spread] = 0.0
    return Advantages(values.float(), zero_spread)


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    """(G,) True where ρ lies outside [1 - ε, 1 + ε]."""


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, g: float) -> torch.Tensor:
    """KL = ‖μ_θ - μ_ref‖² / (2·g_t²), the squared distance averaged per element; one value per sample."""
    diff = (mean - ref_mean).float()
    return (diff * diff).flatten(1).mean(dim=1) / (2 * g * g)


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    kl: torch.Tensor | None = None, kl_weight: float = 0.0,
) -> PolicyLoss:
    """L = mean(max(-A·ρ, -A·clip(ρ, 1 - ε, 1 + ε))) + β·mean(KL), ρ = exp(log p_θ - log p_old)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.mean() if kl is not None else policy.new_zeros(())
    loss = policy + kl_weight * kl_mean if kl is not None else policy
    return PolicyLoss(loss, policy, kl_mean, ratio.detach(), ((ratio - 1).abs() > clip_range).detach())


# ------------------------------------------------------------------------------------------ LoRA
def is_gen_linear(name: str) -> bool:
    """A linear layer of the GEN expert: its attention projections and its SwiGLU MLP."""
    parts = name.split(".")
    return parts[-1] in ("q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen") or (
        len(parts) > 1 and parts[-2] == "mlp_moe_gen")


class LoRAAdapters(nn.Module):
    """Low-rank adapters on the GEN expert's linear layers: y = W·x + (α / r)·B·A·x, B = 0 at start.

    Attached with forward hooks, so the model's own parameter names (and checkpoints) stay unchanged;
    ``enabled = False`` gives back the base model (the frozen reference)."""

    def __init__(self, model: LanceModel, rank: int, alpha: float) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.enabled = True
        self.targets: dict[str, nn.Linear] = {}
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and is_gen_linear(name):
                key = name.replace(".", "__")
                self.targets[key] = module
                weight = module.weight
                self.down[key] = nn.Parameter(torch.empty(rank, module.in_features, dtype=weight.dtype,
                                                          device=weight.device))
                self.up[key] = nn.Parameter(torch.zeros(module.out_features, rank, dtype=weight.dtype,
                                                        device=weight.device))
                nn.init.kaiming_uniform_(self.down[key], a=math.sqrt(5))
                module.register_forward_hook(self._hook(key))
        if not self.targets:
            raise ValueError("no generation-expert linear layers found for LoRA")

    def _hook(self, key: str):
        def add_low_rank(module: nn.Linear, args, output):
            if not self.enabled:
                return output
            x = args[0].to(self.down[key].dtype)
            return output + (self.scale * (x @ self.down[key].t()) @ self.up[key].t()).to(output.dtype)
        return add_low_rank

    @torch.no_grad()
    def merged_state(self, model: LanceModel) -> dict[str, torch.Tensor]:
        """The model's state dict with every adapter folded into its weight (W + (α / r)·B·A)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for key in self.targets:
            name = key.replace("__", ".") + ".weight"
            delta = self.scale * (self.up[key].float() @ self.down[key].float())
            state[name] = (state[name].float() + delta).to(state[name].dtype)
        return state
