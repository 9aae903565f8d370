"""The Wan2.2 VAE through diffusers' ``AutoencoderKLWan``: 48 latent channels, 16x spatial, 4x causal
temporal compression (T frames -> (T - 1)/4 + 1 latent frames; T must be 4k + 1).

Latents leave :meth:`WanVAE.encode` normalised per channel, (z - mean) / std with the published Wan2.2
statistics; posterior samples draw z = mu + sigma·eps before that normalisation, so the noise is scaled
consistently with it. Weights load from a diffusers folder or from the original single-file checkpoint.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from ..config import VAEConfig
from ..state_dicts import load_state_dict_checked

# Per-channel statistics of Wan2.2 VAE latents (Wan2.2 release).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


def diffusers_config(cfg: VAEConfig) -> dict:
    """``AutoencoderKLWan`` kwargs: the Wan2.2 sizes for preset "wan2.2", the config's widths for "tiny".
    Both keep the Wan2.2 layout: 2x2 patchify (12 channels) + 3 spatial and 2 temporal halvings = 16x / 4x."""
    if (cfg.spatial_ratio, cfg.temporal_ratio) != (16, 4):
        raise ValueError(f"the Wan2.2 VAE compresses 16x spatially and 4x in time; got spatial_ratio="
                         f"{cfg.spatial_ratio}, temporal_ratio={cfg.temporal_ratio}")
    full = cfg.preset == "wan2.2"
    return dict(
        base_dim=160 if full else cfg.base_dim,
        decoder_base_dim=256 if full else cfg.decoder_base_dim,
        z_dim=cfg.latent_channels,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2 if full else cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=cfg.temporal_ratio,
        scale_factor_spatial=cfg.spatial_ratio,
        latents_mean=list(WAN22_LATENTS_MEAN),
        latents_std=list(WAN22_LATENTS_STD),
    )


# ------------------------------------------------------------------ original single-file checkpoint keys
_BLOCK_RENAMES = (  # inside residual blocks: original -> diffusers
    ("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."), ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_FIXED_RENAMES = (
    (r"^conv1\.", "quant_conv."), (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."), (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
)


def _original_to_diffusers_key(key: str) -> str:
    for pattern, replacement in _FIXED_RENAMES:
        if re.match(pattern, key):
            key = re.sub(pattern, replacement, key)
            break
    sampler = re.match(r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.\2\.(\d+)\.(.*)$", key)
    if sampler:
        side, _, block, _, rest = sampler.groups()
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        if rest.startswith(("resample.", "time_conv.")):
            return f"{side}.{blocks}.{block}.{'downsampler' if side == 'encoder' else 'upsampler'}.{rest}"
        key = f"{side}.{blocks}.{block}.resnets.{sampler.group(4)}.{rest}"
    if ".resnets." in key:
        for old, new in _BLOCK_RENAMES:
            key = key.replace("." + old, "." + new)
    return key


def convert_wan_vae_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan2.2 VAE keys (``encoder.downsamples.0.downsamples.1.residual.2.weight``, ...) -> diffusers."""
    return {_original_to_diffusers_key(k): v for k, v in original.items()}


def to_original_wan_state_dict(
    diffusers_sd: dict[str, torch.Tensor], num_res_blocks: int | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_wan_vae_state_dict`. In the original layout a block's resampler follows its
    resnets: index ``num_res_blocks`` in the encoder, ``num_res_blocks + 1`` in the decoder. ``None`` reads
    ``num_res_blocks`` off the encoder's first block."""
    if num_res_blocks is None:
        num_res_blocks = _count_encoder_resnets(diffusers_sd)
    structural = (
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{num_res_blocks}."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
        (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{num_res_blocks + 1}."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
    )
    out = {}
    for key, value in diffusers_sd.items():
        new = key
        if ".resnets." in new:
            for old, repl in _BLOCK_RENAMES:
                new = new.replace("." + repl, "." + old)
        for pattern, replacement in structural:
            if re.match(pattern, new):
                new = re.sub(pattern, replacement, new)
                break
        out[new] = value
    return out


def _count_encoder_resnets(diffusers_sd: dict[str, torch.Tensor]) -> int:
    found = {int(m.group(1)) for k in diffusers_sd if (m := re.match(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not found:
        raise KeyError("no encoder.down_blocks.0.resnets.* keys: not a diffusers AutoencoderKLWan state dict")
    return max(found) + 1


def _load_single_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class WanVAE(nn.Module):
    """Frozen Wan2.2 VAE with normalised latents; pixels are (B, 3, T, H, W), uint8 0..255 or float in
    [-1, 1].

    uint8 pixels cross to the module's device as bytes and become floats there (x / 255 · 2 - 1 in float32,
    then the module's dtype): the only place the encoder's input range is made. The posterior's mean and std
    and the per-channel normalisation run in float32 whatever the module's dtype, and latents come back in
    float32 (or ``dtype``); decoded pixels come back in the module's dtype.
    """

    def __init__(self, cfg: VAEConfig, autoencoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.autoencoder = autoencoder
        stats = autoencoder.config
        if len(stats.latents_mean) != stats.z_dim or len(stats.latents_std) != stats.z_dim:
            raise ValueError(f"latents_mean/std need {stats.z_dim} values, got {len(stats.latents_mean)} and "
                             f"{len(stats.latents_std)}")
        self.requires_grad_(False)

    def latent_stats(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean and std as float32 (1, C, 1, 1, 1), whatever the module's dtype."""
        shape = (1, -1, 1, 1, 1)
        config = self.autoencoder.config
        mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=device).view(shape)
        return mean, torch.tensor(config.latents_std, dtype=torch.float32, device=device).view(shape)

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> WanVAE:
        """Random init (seeded) when ``cfg.path`` is None, else a diffusers folder or an original single file."""
        from diffusers import AutoencoderKLWan

        if cfg.path is None:
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                return cls(cfg, AutoencoderKLWan(**diffusers_config(cfg)))
        if not os.path.exists(cfg.path):
            raise FileNotFoundError(f"VAE weights not found: {cfg.path!r} (model.weights.vae)")
        if os.path.isdir(cfg.path):
            return cls(cfg, _load_diffusers_folder(cfg))
        autoencoder = AutoencoderKLWan(**diffusers_config(cfg))
        converted = convert_wan_vae_state_dict(_load_single_file(cfg.path))
        load_state_dict_checked(autoencoder, converted, f"{cfg.path} (Wan2.2 VAE)")
        return cls(cfg, autoencoder)

    def describe(self) -> dict:
        """What the shards' metadata records of this VAE (besides its weights and dtype)."""
        stats = self.autoencoder.config
        return {"encoder": "Wan2.2 VAE (diffusers AutoencoderKLWan)", "preset": self.cfg.preset,
                "channels": self.cfg.latent_channels,
                "compression": {"temporal": self.cfg.temporal_ratio, "spatial": self.cfg.spatial_ratio},
                "normalisation": "latent = (mu - latents_mean[c]) / latents_std[c] per channel c, std = sigma / "
                                 "latents_std[c] in float32; the VAE decodes latent * latents_std[c] + latents_mean[c]",
                "latents_mean": [float(x) for x in stats.latents_mean],
                "latents_std": [float(x) for x in stats.latents_std]}

    def drop_decoder(self) -> None:
        """Free the decoder (555M of the Wan2.2 VAE's 705M parameters) where only encoding runs."""
        del self.autoencoder.decoder

    @property
    def dtype(self) -> torch.dtype:
        return self.autoencoder.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.autoencoder.encoder.conv_in.weight.device

    # ---------------------------------------------------------------------------------------- shapes
    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Pixel (T, H, W) -> latent (T', H', W'); ValueError unless T = 4k+1 and H, W are multiples of 16."""
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
    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """(B, 3, T, H, W) uint8 or in [-1, 1] -> normalised latents (B, C, T', H', W') in ``dtype``
        (normalised in float32 whatever the module's dtype).

        ``sample=True`` draws z = mu + sigma·eps from the posterior and normalises it like the mean, so the
        noise is divided by the same per-channel std (eps is drawn on the generator's device).
        """
        z, sigma = self._posterior(pixels)
        if sample:
            device = generator.device if generator is not None else z.device
            eps = torch.randn(z.shape, generator=generator, device=device).to(z.device)
            z = z + sigma * eps
        mean, std = self.latent_stats(z.device)
        return ((z - mean) / std).to(dtype)

    @torch.no_grad()
    def encode_posterior(
        self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) uint8 or in [-1, 1] -> the posterior's mean and std, both normalised per channel:
        ((mu - m) / s, sigma / s), computed in float32, returned in ``dtype``. A latent drawn as
        ``mean + std * eps`` (:func:`sample_posterior`) is then exactly the normalised posterior sample
        (mu + sigma * eps - m) / s."""
        mu, sigma = self._posterior(pixels)
        mean, std = self.latent_stats(mu.device)
        return ((mu - mean) / std).to(dtype), (sigma / std).to(dtype)

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels on the module's device in its dtype, in [-1, 1]: uint8 0..255 is copied as bytes and
        converted there (x / 255 · 2 - 1 in float32, then the module's dtype); floats are taken as already in
        [-1, 1]."""
        if pixels.dtype != torch.uint8:
            return pixels.to(self.device, self.dtype)
        x = pixels.to(self.device, non_blocking=True).contiguous().float().div_(255.0).mul_(2.0).sub_(1.0)
        return x.to(self.dtype)

    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and std in float32 (diffusers' clamp of log-variance to [-30, 20], then
        exp(logvar / 2)), from the encoder's moments in the module's dtype."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, T, H, W), got {tuple(pixels.shape)}")
        self.latent_shape(*pixels.shape[2:])
        moments = self.autoencoder.encode(self.model_input(pixels)).latent_dist.parameters
        mu, logvar = moments.float().chunk(2, dim=1)
        return mu, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') -> pixels (B, 3, T, H, W) in [-1, 1]."""
        channels = self.autoencoder.config.z_dim
        if latents.dim() != 5 or latents.shape[1] != channels:
            raise ValueError(f"latents must be (B, {channels}, T', H', W'), got {tuple(latents.shape)}")
        mean, std = self.latent_stats(self.device)
        z = latents.to(self.device).float() * std + mean
        return self.autoencoder.decode(z.to(self.dtype)).sample.clamp(-1, 1)

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') -> RGB frames (B, T, H, W, 3) uint8 on the CPU."""
        return pixels_to_uint8(self.decode(latents)).permute(0, 2, 3, 4, 1).cpu()


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (any shape) -> uint8 0..255: (x + 1) x 127.5, rounded half to even."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def sample_posterior(mean: torch.Tensor, std: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh latent ``mean + std * eps`` from a stored posterior (both normalised, as
    :meth:`WanVAE.encode_posterior` gives them), in float32; eps is drawn on the CPU generator's stream."""
    if mean.shape != std.shape:
        raise ValueError(f"posterior mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return mean.float() + std.float() * eps.to(mean.device)


def latents_to_tokens(latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One clip's latents (C, T', H', W') -> (T'·H'·W', C) tokens in (t, h, w) raster order, and the grid."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be (C, T', H', W'), got {tuple(latents.shape)}")
    channels, frames, height, width = latents.shape
    return latents.permute(1, 2, 3, 0).reshape(-1, channels), (frames, height, width)


def tokens_to_latents(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`latents_to_tokens`: (T'·H'·W', C) tokens and their grid -> (C, T', H', W')."""
    frames, height, width = grid
    if tokens.dim() != 2 or tokens.shape[0] != frames * height * width:
        raise ValueError(f"{tuple(tokens.shape)} tokens do not fill the grid {tuple(grid)}")
    return tokens.reshape(frames, height, width, -1).permute(3, 0, 1, 2)


def _load_diffusers_folder(cfg: VAEConfig) -> nn.Module:
    from diffusers import AutoencoderKLWan

    config_file = os.path.join(cfg.path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file!r} not found: model.weights.vae must be a diffusers AutoencoderKLWan "
                                f"folder or a single .pth/.safetensors file")
    autoencoder = AutoencoderKLWan.from_pretrained(cfg.path, local_files_only=True)
    if autoencoder.config.z_dim != cfg.latent_channels:
        raise ValueError(f"{cfg.path!r}: z_dim {autoencoder.config.z_dim} != model.vae.latent_channels "
                         f"{cfg.latent_channels}")
    return autoencoder


