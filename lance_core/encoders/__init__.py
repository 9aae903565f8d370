from .clip import ClipScorer
from .pixel import PixelCodec, load_vae
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
    "PixelCodec",
    "QwenViT",
    "WanVAE",
    "convert_wan_vae_state_dict",
    "latents_to_tokens",
    "load_vae",
    "sample_posterior",
    "to_original_wan_state_dict",
    "tokens_to_latents",
]
