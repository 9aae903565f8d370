from .clip import ClipScorer
from .vae import (
    WanVAE,
    convert_wan_vae_state_dict,
    latents_to_tokens,
    sample_posterior,
    to_original_wan_state_dict,
    tokens_to_latents,
)
from .vit import QwenViT

__all__ = [
    "ClipScorer",
    "QwenViT",
    "WanVAE",
    "convert_wan_vae_state_dict",
    "latents_to_tokens",
    "sample_posterior",
    "to_original_wan_state_dict",
    "tokens_to_latents",
]
