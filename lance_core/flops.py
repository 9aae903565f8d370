"""Parameter counts and training FLOPs per token.

FLOPs per token (TRAINING.md): 6·N_active for the matmuls (forward 2, backward 4 per weight) plus the
attention scores and values, 12·L·H·d·T for a token attending over a context of T tokens (L layers,
H query heads of width d; 2 matmuls, x2 multiply-add, x3 forward+backward). N_active counts ONE expert
(a token runs through UND or GEN, never both) and the output head; the embedding table is a lookup,
and the fixed latent position table is not trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .config import ModelConfig

SHARED_PREFIXES = ("language_model.model.embed_tokens", "language_model.lm_head", "time_embedder", "vae2llm",
                   "llm2vae", "latent_pos_embed")


@dataclass
class ParameterCounts:
    total: int
    und_expert: int
    gen_expert: int
    shared: int
    active_per_token: int
    """One expert's layers + final norm + lm_head: the weights a text token multiplies through."""
    embedding: int
    vit: int = 0
    """The ViT tower the checkpoint carries under ``vit_model.*`` (``Lance_3B_Video``; frozen), in ``total``."""
    tensors: int = 0
    """Parameter tensors, the ViT's included: the checkpoint's tensor count."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_parameters(model: nn.Module, vit: nn.Module | None = None) -> ParameterCounts:
    """Counts of ``model``; with ``vit`` (the tower a video checkpoint carries) it joins total and tensors."""
    und = gen = shared = 0
    sizes = {}
    for name, param in model.named_parameters():
        n = param.numel()
        sizes[name] = n
        if name.startswith(SHARED_PREFIXES):
            shared += n
        elif "_moe_gen" in name:
            gen += n
        else:
            und += n
    vit_sizes = [p.numel() for p in vit.parameters()] if vit is not None else []
    total = und + gen + shared + sum(vit_sizes)
    lm_head = sizes.get("language_model.lm_head.weight", 0)
    embedding = sizes.get("language_model.model.embed_tokens.weight", 0)
    return ParameterCounts(total, und, gen, shared, und + lm_head, embedding, sum(vit_sizes),
                           len(sizes) + len(vit_sizes))


def attention_flops_per_token(cfg: ModelConfig, context: int) -> float:
    return 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def training_flops_per_token(cfg: ModelConfig, counts: ParameterCounts, context: int) -> float:
    """Training FLOPs of one token attending over ``context`` tokens of its own sample."""
    return 6.0 * counts.active_per_token + attention_flops_per_token(cfg, context)


def model_info(cfg: ModelConfig, model: nn.Module, context: int, vit: nn.Module | None = None) -> dict:
    counts = count_parameters(model, vit)
    return {
        "preset": cfg.preset,
        "parameters": counts.as_dict(),
        "context_tokens": context,
        "training_flops_per_token": training_flops_per_token(cfg, counts, context),
        "attention_flops_per_token": attention_flops_per_token(cfg, context),
    }
