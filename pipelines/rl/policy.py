"""The policy as rollout workers and the learner both hold it: the Lance model (random init with the
run's seed, or a checkpoint), the trained part (the generation expert, or LoRA adapters on it), weight
exchange, the frozen reference, and the KV-cached prompt prefixes a group samples from."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lance_core.checkpoint import POS_TABLE_KEY, load_lance_checkpoint
from lance_core.model import build_model
from lance_core.packing import build_generation_sample
from lance_core.rl import LoRAAdapters, repeat_noisy
from lance_core.safetensors_files import safetensors_shapes
from lance_core.sampling import PrefixState, prepare_prefix
from lance_core.tokenizer import load_tokenizer_for

from .config import GRPOConfig


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the configured model."""


def check_checkpoint(cfg: GRPOConfig, path: str) -> None:
    """Compare the checkpoint's tensor names and shapes with the configured model, reading headers only."""
    model_cfg = cfg.model.build()
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    shapes = safetensors_shapes(path)
    expected = {k: tuple(v.shape) for k, v in build_model(model_cfg, device="meta").state_dict().items()}
    wrong = [f"{k}: {shapes[k]} in the file, {v} in the model" for k, v in expected.items()
             if k in shapes and shapes[k] != v]
    missing = sorted(k for k in expected if k not in shapes and k != POS_TABLE_KEY)
    if wrong or missing:
        detail = "; ".join(wrong[:3]) or f"missing {missing[:3]}"
        raise CheckpointMismatchError(
            f"checkpoint {path!r} does not match the model config (preset {model_cfg.preset!r}, hidden "
            f"{model_cfg.hidden_size}, {model_cfg.num_layers} layers): {len(wrong)} tensors with other shapes, "
            f"{len(missing)} missing; {detail}")


def load_initial_weights(model: nn.Module, path: str, preset: str) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        load_lance_checkpoint(model, path)
    except (KeyError, ValueError) as err:
        raise CheckpointMismatchError(
            f"checkpoint {path!r} does not match the model config (preset {preset!r}): {err}") from None


class Policy(nn.Module):
    def __init__(self, cfg: GRPOConfig, device: torch.device, checkpoint: str | None = None,
                 keep_reference: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.model_cfg = cfg.model.build()
        dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32
        checkpoint = checkpoint or cfg.model.weights.lance
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            # seeded init on the CPU: identical in every actor whatever its device
            model = build_model(self.model_cfg).to(device=device, dtype=dtype)
            if checkpoint:
                load_initial_weights(model, checkpoint, self.model_cfg.preset)
            model.requires_grad_(False)
            self.adapters = None
            if cfg.learner.mode == "lora":
                self.adapters = LoRAAdapters(model, cfg.learner.lora_rank, cfg.learner.lora_alpha)
        self.model = model
        for param in self.trained().values():
            param.requires_grad_(True)
        self.reference: dict[str, torch.Tensor] | None = None
        if keep_reference and self.adapters is None:
            self.reference = {name: p.detach().clone() for name, p in self.trained().items()}
        self.tokenizer = load_tokenizer_for(self.model_cfg, cfg.model.tokenizer)
        self.device = device

    # ------------------------------------------------------------------------------------ weights
    def trained(self) -> dict[str, nn.Parameter]:
        if self.adapters is not None:
            return {f"adapters.{name}": p for name, p in self.adapters.named_parameters()}
        return {f"model.{name}": p for name, p in self.model.gen_parameters()}

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True) for name, p in self.trained().items()}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = self.trained()
        if set(weights) != set(params):
            missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
            raise KeyError(f"weight update does not match the trained parameters: missing {missing[:4]}, "
                           f"unexpected {extra[:4]}")
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))

    def export_state(self) -> dict[str, torch.Tensor]:
        """The full model state with LoRA merged: what a Lance checkpoint holds."""
        if self.adapters is not None:
            return self.adapters.merged_state(self.model)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    @contextmanager
    def as_reference(self):
        """The frozen reference in place of the policy: adapters off, or the initial GEN weights swapped in."""
        if self.adapters is not None:
            self.adapters.enabled = False
            try:
                yield
            finally:
                self.adapters.enabled = True
            return
        if self.reference is None:
            raise RuntimeError("this policy keeps no reference weights")
        params = self.trained()
        for name, value in self.reference.items():
            params[name].data, self.reference[name] = value, params[name].data
        try:
            yield
        finally:
            for name, value in self.reference.items():
                params[name].data, self.reference[name] = value, params[name].data

    # ------------------------------------------------------------------------------------ prompts
    def latent_grid(self) -> tuple[int, int, int]:
        side = self.cfg.rollout.image_size // self.model_cfg.vae.spatial_ratio
        return 1, side, side

    def group_prefixes(self, text: str, groups: int) -> tuple[PrefixState, PrefixState | None]:
        """Prefilled conditional (and, with CFG, unconditional) prefixes repeated for a group of G."""
        blank_target = torch.zeros(*self.latent_grid(), self.model_cfg.latent_channels)

        def prefix(caption: str) -> PrefixState:
            sample = build_generation_sample(self.tokenizer, "t2i", caption, blank_target)
            return repeat_noisy(prepare_prefix(self.model, sample, self.device), groups)

        cond = prefix(text)
        uncond = prefix("") if self.cfg.rollout.sampler.cfg_scale > 1.0 else None
        return cond, uncond
