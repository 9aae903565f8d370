from .vae import (
    WanVAE,
    convert_wan_vae_state_dict,
    latents_to_tokens,
    to_original_wan_state_dict,
    tokens_to_latents,
)
from .vit import QwenViT

__all__ = [
    "QwenViT",
    "WanVAE",
    "convert_wan_vae_state_dict",
    "latents_to_tokens",
    "to_original_wan_state_dict",
    "tokens_to_latents",
]
