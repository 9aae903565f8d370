"""Flow matching: timestep sampling, interpolation and the joint CE + MSE training loss.

Convention (MODEL.md): x_t = (1 - t)·x0 + t·ε, t = 1 is pure noise, the model predicts v = ε - x0.
Training draws one t per target clip: u ~ N(0, 1), t = sigmoid(u), then the shift
t <- s·t / (1 + (s - 1)·t) with s = 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from .config import StrictModel
from .model import AttentionLayout, LanceModel, TokenInputs
from .model.sequence_parallel import SequenceParallel
from .packing import IGNORE_INDEX, TASKS, PackedBatch


class LossConfig(StrictModel):
    ce_weight: float = Field(0.25, ge=0)
    """Weight of next-token cross-entropy (released SFT: 0.25)."""
    mse_weight: float = Field(1.0, ge=0)
    """Weight of the flow-matching MSE (released SFT: 1.0)."""
    timestep_shift: float = Field(4.0, gt=0)
    """Shift s applied to training timesteps."""
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, cfg: LossConfig, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit-normal timesteps with the training shift, one per target clip."""
    u = torch.randn(n, generator=generator, device="cpu") * cfg.logit_std + cfg.logit_mean
    return shift_timesteps(torch.sigmoid(u), cfg.timestep_shift).to(device)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


@dataclass
class NoisedLatents:
    values: torch.Tensor
    """(V, C) model input of every VAE token: x_t for target tokens, x0 for clean ones."""
    timesteps: torch.Tensor
    """(V,) t of every VAE token (0 for clean ones)."""
    target_velocity: torch.Tensor
    """(V, C) ε - x0 (meaningful at target tokens only)."""
    clip_timesteps: torch.Tensor
    """(num_targets,) the t drawn for each target clip."""


def noise_latents(batch: PackedBatch, cfg: LossConfig, generator: torch.Generator | None = None) -> NoisedLatents:
    x0 = batch.vae_latents
    clip_t = sample_timesteps(batch.num_targets, cfg, generator, x0.device).to(x0.dtype)
    target = batch.target_index[batch.vae_positions]
    is_target = target >= 0
    t = torch.where(is_target, clip_t[target.clamp(min=0)] if batch.num_targets else 0.0, 0.0).to(x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
    values = torch.where(is_target[:, None], interpolate(x0, noise, t), x0)
    return NoisedLatents(values, t, noise - x0, clip_t)


def _local_chunk(batch: PackedBatch, noised: NoisedLatents,
                 sp: SequenceParallel) -> tuple[PackedBatch, NoisedLatents, AttentionLayout]:
    """This rank's chunk of the padded pack and of its noised latents, and the whole pack's layout."""
    padded = sp.pad(batch)
    start, stop = sp.bounds(len(padded))
    keep = (padded.vae_positions >= start) & (padded.vae_positions < stop)
    local = NoisedLatents(noised.values[keep], noised.timesteps[keep], noised.target_velocity[keep],
                          noised.clip_timesteps)
    return padded.token_slice(start, stop), local, AttentionLayout.from_batch(padded)


CountReducer = Callable[[torch.Tensor], torch.Tensor]
"""Maps local token counts [ce_tokens, mse_tokens] to global ones (an all-reduce across ranks)."""


@dataclass
class LossOutput:
    total: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    ce_tokens: int
    mse_tokens: int
    per_task: dict[str, float] = field(default_factory=dict)


def _per_task(values: torch.Tensor, task_of_token: torch.Tensor, prefix: str) -> dict[str, float]:
    out = {}
    for index, name in enumerate(TASKS):
        chosen = task_of_token == index
        if chosen.any():
            out[f"{prefix}/{name}"] = float(values[chosen].mean())
    return out


def loss_token_counts(batch: PackedBatch, logit_rows: int) -> torch.Tensor:
    """[CE tokens, MSE tokens] of a whole pack, float32 on the batch's device: what ``compute_losses`` divides
    by, summed over the packs of a global batch before any of them is computed (gradient accumulation)."""
    labels = batch.ce_labels
    ce = ((labels != IGNORE_INDEX) & (labels >= 0) & (labels < logit_rows)).sum()
    return torch.stack([ce, batch.mse_mask.sum()]).float()


def compute_losses(
    model: LanceModel,
    batch: PackedBatch,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
    count_reducer: CountReducer | None = None,
    noised: NoisedLatents | None = None,
    run_all_heads: bool = False,
    sequence_parallel: SequenceParallel | None = None,
) -> LossOutput:
    """Total = ce_weight·CE + mse_weight·MSE.

    MSE: per token the mean over latent channels, summed over target tokens and divided by the global
    target-token count; CE: summed over answer tokens and divided by the global CE-token count. With
    ``count_reducer`` the counts are global across ranks; the caller then multiplies by the world size
    when its gradient reduction averages over ranks. ``run_all_heads`` runs lm_head and the velocity head
    on every call (on one token, weighted 0, when a head has no target here), so that every rank calls the
    same modules in the same order whatever its pack holds (ZeRO-3 gathers weights module by module).

    With ``sequence_parallel`` every rank of the group passes the same ``batch`` and the same noise (the same
    ``generator`` state, or ``noised``); each computes the loss terms of its own chunk of tokens, divided
    by the global counts (``count_reducer`` must sum over the group's ranks too), so that the terms of the
    group's ranks add up to the pack's loss.
    """
    noised = noised or noise_latents(batch, cfg, generator)
    if sequence_parallel is not None:
        batch, noised, layout = _local_chunk(batch, noised, sequence_parallel)
    inputs = TokenInputs.from_batch(batch, noised.values, noised.timesteps)
    if sequence_parallel is not None:
        inputs = replace(inputs, layout=layout, sequence_parallel=sequence_parallel)
    hidden, _ = model.backbone(inputs)

    # CE over the tokenizer's length (cfg.text_vocab): targets outside it are ignored, as in the release.
    labels = batch.ce_labels
    ce_valid = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < model.cfg.logit_rows)
    ce_positions = torch.nonzero(ce_valid).squeeze(1)
    mse_positions = torch.nonzero(batch.mse_mask).squeeze(1)
    counts = torch.tensor([ce_positions.numel(), mse_positions.numel()], dtype=torch.float32, device=hidden.device)
    global_counts = count_reducer(counts) if count_reducer is not None else counts
    ce_norm, mse_norm = global_counts.clamp(min=1).unbind()

    zero = hidden.sum() * 0.0
    ce_sum = mse_sum = zero
    per_task: dict[str, float] = {}
    if ce_positions.numel():
        logits = model.text_logits(hidden.index_select(0, ce_positions)).float()
        ce_tok = F.cross_entropy(logits, labels[ce_positions], reduction="none")
        ce_sum = ce_tok.sum()
        per_task |= _per_task(ce_tok.detach(), batch.task_index[ce_positions], "ce")
    elif run_all_heads:
        ce_sum = ce_sum + model.text_logits(hidden[:1]).float().sum() * 0.0
    if mse_positions.numel():
        pred = model.velocity(hidden.index_select(0, mse_positions)).float()
        vae_row = torch.full((len(batch),), -1, dtype=torch.long, device=hidden.device)
        vae_row[batch.vae_positions] = torch.arange(batch.vae_positions.numel(), device=hidden.device)
        target = noised.target_velocity[vae_row[mse_positions]].float()
        mse_tok = (pred - target).pow(2).mean(dim=1)
        mse_sum = mse_tok.sum()
        per_task |= _per_task(mse_tok.detach(), batch.task_index[mse_positions], "mse")
    elif run_all_heads:
        mse_sum = mse_sum + model.velocity(hidden[:1]).float().sum() * 0.0
    ce = ce_sum / ce_norm
    mse = mse_sum / mse_norm
    total = cfg.ce_weight * ce + cfg.mse_weight * mse
    return LossOutput(total, ce, mse, int(ce_positions.numel()), int(mse_positions.numel()), per_task)
