"""Inference: Euler ODE generation with text CFG and a KV-cached prefix; text decoding with a KV cache.

Generation (MODEL.md "Inference"): everything before the noisy span is prefilled once; each Euler step
reruns only the noisy span against the cached keys and values. Timesteps go 1 -> 0 on a linspace
shifted with s; x <- x - v·(t_i - t_{i+1}). Text CFG with scale w acts only while t is inside the
interval (lo, hi]: v = v_u + w·(v_c - v_u), then rescaled so that ||v|| <= ||v_c||. The unconditional
branch is the same sequence without the caption tokens, its positions recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from pydantic import Field

from .config import StrictModel
from .flow import shift_timesteps
from .model import LanceModel, LayerCache, TokenInputs
from .packing import VAE_CLEAN, PackedBatch, Sample, VisualInput, build_generation_sample, pack_samples
from .tokenizer import TextTokenizer


class SamplingConfig(StrictModel):
    steps: int = Field(30, gt=0)
    shift: float = Field(3.5, gt=0)
    """Timestep shift at inference (3.5 images; 3.0 for video benchmarks)."""
    cfg_scale: float = Field(4.0, ge=1.0)
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    """CFG is applied while lo < t <= hi."""
    cfg_rescale: bool = True


def inference_timesteps(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` shifted points from exactly 1 to exactly 0.

    The shift s·t / (1 + (s - 1)·t) maps 0 and 1 to themselves, but in float32 t = 1 can land one rounding
    step off (1 ± 2⁻²⁴ for s = 0.58, 1.18, 2.07, ...). Below 1, g_t = a·sqrt(t / (1 - t)) of the first
    SDE step blows up (std ≈ 800 instead of a); above 1, t leaves the CFG interval (lo, 1]. The end
    points are therefore pinned."""
    t = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift)
    t[0], t[-1] = 1.0, 0.0
    return t


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, rescale: bool) -> torch.Tensor:
    v = v_uncond + scale * (v_cond - v_uncond)
    if rescale:
        ratio = v_cond.norm() / v.norm().clamp(min=1e-12)
        v = v * ratio.clamp(max=1.0)
    return v


@dataclass
class PrefixState:
    """A prefilled prefix: per-layer KV cache plus the noisy span (with its markers) to run each step."""

    cache: list[LayerCache]
    noisy: PackedBatch


def _noisy_range(batch: PackedBatch) -> tuple[int, int]:
    """[start, stop) of the noisy target span, its vision markers included."""
    noisy = torch.nonzero(batch.span_noise).squeeze(1)
    if noisy.numel() == 0:
        raise ValueError("the sample has no noisy target span")
    return int(noisy[0]), int(noisy[-1]) + 1


@torch.no_grad()
def prefill(model: LanceModel, batch: PackedBatch) -> list[LayerCache]:
    _, cache = model.backbone(TokenInputs.from_batch(batch), keep_cache=True)
    return cache


def prepare_prefix(model: LanceModel, sample: Sample, device: torch.device | str) -> PrefixState:
    batch = pack_samples([sample], model.cfg).to(device)
    start, stop = _noisy_range(batch)
    return PrefixState(prefill(model, batch.token_slice(0, start)), batch.token_slice(start, stop))


@torch.no_grad()
def predict_velocity(model: LanceModel, state: PrefixState, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    inputs = TokenInputs.from_batch(state.noisy, x, t)
    hidden, _ = model.backbone(inputs, cache=state.cache)
    return model.velocity(hidden[state.noisy.vae_positions]).float()


@torch.no_grad()
def euler_sample(
    model: LanceModel,
    cond: PrefixState,
    uncond: PrefixState | None,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    clean_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate the ODE from noise; returns the (N, C) latents of the noisy span.

    Tokens of the span marked clean (the i2v first frame) stay at ``clean_values`` with t = 0."""
    noisy = cond.noisy
    n, channels = noisy.vae_latents.shape
    device = noisy.vae_latents.device
    clean = (noisy.token_kind[noisy.vae_positions] == VAE_CLEAN)
    x = torch.randn(n, channels, generator=generator).to(device)
    if clean.any():
        if clean_values is None:
            raise ValueError("the target has clean frames but no clean_values were given")
        x[clean] = clean_values.to(x)
    timesteps = inference_timesteps(cfg.steps, cfg.shift).tolist()
    lo, hi = cfg.cfg_interval
    for t_now, t_next in zip(timesteps[:-1], timesteps[1:]):
        t = torch.where(clean, 0.0, t_now).to(x)
        v = predict_velocity(model, cond, x, t)
        if uncond is not None and cfg.cfg_scale > 1.0 and lo < t_now <= hi:
            v = cfg_combine(v, predict_velocity(model, uncond, x, t), cfg.cfg_scale, cfg.cfg_rescale)
        x = torch.where(clean[:, None], x, x - v * (t_now - t_next))
    return x


@torch.no_grad()
def generate_latents(
    model: LanceModel,
    tokenizer: TextTokenizer,
    task: str,
    caption: str,
    grid: tuple[int, int, int],
    cfg: SamplingConfig = SamplingConfig(),
    *,
    source: VisualInput | None = None,
    references: Iterable[VisualInput] = (),
    first_frame: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t2i / t2v / i2v / i2i / v2v / subject generation; returns latents (T', H', W', C).

    ``first_frame`` (1, H', W', C) makes an i2v sample whose first latent frame is kept clean."""
    device = next(model.parameters()).device
    frames, height, width = grid
    placeholder = torch.zeros(frames, height, width, model.cfg.latent_channels)
    references = list(references)

    def build(text: str) -> Sample:
        return build_generation_sample(tokenizer, task, text, placeholder, source=source, references=references,
                                       first_frame_clean=first_frame is not None)

    cond = prepare_prefix(model, build(caption), device)
    uncond = prepare_prefix(model, build(""), device) if cfg.cfg_scale > 1.0 else None
    clean_values = None
    if first_frame is not None:
        clean_values = first_frame.reshape(-1, model.cfg.latent_channels)
    x = euler_sample(model, cond, uncond, cfg, generator, clean_values)
    return x.reshape(frames, height, width, -1).cpu()


@torch.no_grad()
def generate_text(
    model: LanceModel,
    tokenizer: TextTokenizer,
    prompt: Sample,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Greedy (``temperature=0``) or sampled decoding with UND weights; stops at ``<|im_end|>``."""
    device = next(model.parameters()).device
    batch = pack_samples([prompt], model.cfg).to(device)
    hidden, cache = model.backbone(TokenInputs.from_batch(batch), keep_cache=True)
    logits = model.text_logits(hidden[-1], len(tokenizer))
    next_position = batch.position_ids[:, -1:] + 1
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = _choose_token(logits.float(), temperature, top_p, generator)
        if token == tokenizer.special.im_end:
            break
        out.append(token)
        step = _single_token_batch(batch, token, next_position)
        hidden, cache = model.backbone(TokenInputs.from_batch(step), cache=cache, keep_cache=True)
        logits = model.text_logits(hidden[-1], len(tokenizer))
        next_position = next_position + 1
    return out


def _choose_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _single_token_batch(template: PackedBatch, token: int, position: torch.Tensor) -> PackedBatch:
    one = template.token_slice(len(template) - 1, len(template))
    one.input_ids = torch.tensor([token], device=template.input_ids.device)
    one.position_ids = position
    return one
