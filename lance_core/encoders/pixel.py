"""The exact test codec in the VAE's slot (``vae.preset: pixel``): space-to-depth, no weights.

Each r x r block of RGB pixels becomes one latent token of 3·r² channels, so r = 4 gives the Wan2.2 VAE's 48
channels; values are the pixels in [-1, 1] (no normalisation). Images go through exactly: decoding what
was encoded gives back every pixel. Video keeps the Wan2.2 VAE's 4x temporal rate by keeping the first frame
and then every ``temporal_ratio``-th one, and decodes each kept frame ``temporal_ratio`` times (the frames in
between are dropped: lossy in time). It is the codec of the tiny presets that must show what a model learnt
(tests, the demo, bench/learning.py): generated latents decode to pictures, where a VAE with random weights
would decode to noise. Same interface as :class:`~lance_core.encoders.vae.WanVAE`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VAEConfig


class PixelCodec(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ratio = cfg.spatial_ratio
        if cfg.latent_channels != 3 * ratio * ratio:
            raise ValueError(f"vae.preset 'pixel' packs {ratio}x{ratio} RGB blocks into 3·{ratio}² = "
                             f"{3 * ratio * ratio} channels, but latent_channels is {cfg.latent_channels}: set "
                             f"vae.spatial_ratio to {int((cfg.latent_channels / 3) ** 0.5)} or latent_channels")
        self.cfg = cfg
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # carries the device and dtype

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> PixelCodec:
        return cls(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def latent_stats(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean 0 and std 1: the latents are the pixels themselves."""
        shape = (1, self.cfg.latent_channels, 1, 1, 1)
        return torch.zeros(shape, device=device), torch.ones(shape, device=device)

    def describe(self) -> dict:
        return {"encoder": "pixel codec (space-to-depth, exact)", "preset": "pixel",
                "channels": self.cfg.latent_channels,
                "compression": {"temporal": self.cfg.temporal_ratio, "spatial": self.cfg.spatial_ratio},
                "normalisation": "none: latents are the pixels in [-1, 1]"}

    def drop_decoder(self) -> None:
        """Nothing to free: the codec has no weights."""

    # ---------------------------------------------------------------------------------------- shapes
    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        r_t, r_s = self.cfg.temporal_ratio, self.cfg.spatial_ratio
        if frames < 1 or (frames - 1) % r_t:
            raise ValueError(f"a clip needs {r_t}k+1 frames (1 for an image), got {frames}")
        if height < r_s or width < r_s or height % r_s or width % r_s:
            raise ValueError(f"height and width must be positive multiples of {r_s}, got {height}x{width}")
        return (frames - 1) // r_t + 1, height // r_s, width // r_s

    def pixel_shape(self, latent_frames: int, latent_height: int, latent_width: int) -> tuple[int, int, int]:
        r_t, r_s = self.cfg.temporal_ratio, self.cfg.spatial_ratio
        return (latent_frames - 1) * r_t + 1, latent_height * r_s, latent_width * r_s

    # ---------------------------------------------------------------------------------------- codec
    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels on the codec's device in float32, in [-1, 1] (uint8 0..255 converted there)."""
        if pixels.dtype != torch.uint8:
            return pixels.to(self.device, torch.float32)
        return pixels.to(self.device, non_blocking=True).float().div_(255.0).mul_(2.0).sub_(1.0)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 3, T, H, W) uint8 or in [-1, 1] -> latents (B, 3·r², T', H/r, W/r); ``sample`` changes nothing
        (the codec has no noise)."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, T, H, W), got {tuple(pixels.shape)}")
        frames, height, width = self.latent_shape(*pixels.shape[2:])
        x = self.model_input(pixels)[:, :, ::self.cfg.temporal_ratio]
        r = self.cfg.spatial_ratio
        x = x.reshape(x.shape[0], 3, frames, height, r, width, r)
        x = x.permute(0, 4, 6, 1, 2, 3, 5).reshape(x.shape[0], 3 * r * r, frames, height, width)
        return x.to(dtype or self.dtype)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor, dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents and a std of 0 (the codec is deterministic)."""
        mean = self.encode(pixels, dtype=dtype)
        return mean, torch.zeros_like(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 3·r², T', H', W') -> pixels (B, 3, T, H, W) in [-1, 1]."""
        r, channels = self.cfg.spatial_ratio, self.cfg.latent_channels
        if latents.dim() != 5 or latents.shape[1] != channels:
            raise ValueError(f"latents must be (B, {channels}, T', H', W'), got {tuple(latents.shape)}")
        batch, _, frames, height, width = latents.shape
        x = latents.to(self.device).float().reshape(batch, r, r, 3, frames, height, width)
        x = x.permute(0, 3, 4, 5, 1, 6, 2).reshape(batch, 3, frames, height * r, width * r)
        if frames > 1:
            x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(self.cfg.temporal_ratio, dim=2)], dim=2)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, T', H', W') -> RGB frames (B, T, H, W, 3) uint8 on the CPU."""
        from .vae import pixels_to_uint8

        return pixels_to_uint8(self.decode(latents)).permute(0, 2, 3, 4, 1).cpu()


def load_vae(cfg: VAEConfig):
    """The codec of the VAE slot: :class:`PixelCodec` for ``preset: pixel``, else the Wan2.2 VAE."""
    if cfg.preset == "pixel":
        return PixelCodec(cfg)
    from .vae import WanVAE

    return WanVAE.from_config(cfg)
