"""Encoder actors for Ray Data ``map_batches``: the Wan2.2 VAE and the Qwen2.5-VL ViT.

A batch is one partition's block; its rows are grouped by pixel shape (the aspect bucket) and encoded in
chunks of ``encoders.batch_size``. With ``encoders.store_posterior_std`` the VAE stage also hands on the
posterior's normalised std (``<slot>_vae_std``) beside the mean.
Tensors leave as their stored values (``lance_core.shards.storage_values``: rounded to ``latent_dtype``, in
the storage dtype, as bytes); a sample whose values cannot be stored that way (not finite, or beyond
float16's range) is quarantined with reason ``not_storable``. Each stage also hands on a JSON description of
its encoder (``vae_info`` / ``vit_info``) for the shard's metadata.
Rows that are not ``ok`` pass through untouched. The actors are built once per pool member.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict

import numpy as np
import pandas as pd
import torch

from lance_core.encoders import QwenViT, WanVAE
from lance_core.shards import storage_values
from pipelines.runtime.devices import pick_device

from .config import PrecomputeConfig
from .records import frame_to_arrow


def _groups(batch: pd.DataFrame, key: str, chunk: int) -> list[tuple[tuple, list[int]]]:
    """Rows to encode grouped by pixel shape (the bucket), in chunks of at most ``chunk`` rows."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (status, shape, data) in enumerate(zip(batch["status"], batch[f"{key}_shape"], batch[f"{key}_pixels"])):
        if status == "ok" and data is not None and len(data):
            groups[tuple(int(s) for s in shape)].append(i)
    return [(shape, rows[start:start + chunk]) for shape, rows in groups.items()
            for start in range(0, len(rows), chunk)]


def _stored(batch: pd.DataFrame, row: int, stage: str, tensors: list,
            latent_dtype: str) -> list[bytes] | None:
    """The tensors' stored bytes, or None with the row quarantined when a value cannot be stored."""
    try:
        return [storage_values(t, latent_dtype).tobytes() for t in tensors]
    except ValueError as err:
        batch.loc[batch.index[row], ["status", "stage", "reason", "error"]] = [
            "quarantined", stage, "not_storable", f"latent_dtype {latent_dtype}: {err}"]
        return None


def _weights(path) -> str:
    return str(path) if path is not None else "random init (seeded; tests and demo)"


def _pixels(batch: pd.DataFrame, key: str, rows: list[int], shape: tuple) -> torch.Tensor:
    arrays = [np.frombuffer(batch[f"{key}_pixels"].iloc[i], dtype=np.uint8).reshape(shape) for i in rows]
    return torch.from_numpy(np.stack(arrays)).float().div_(255.0)  # (B, T, H, W, 3) in [0, 1]


class _EncoderActor:
    """Shared set-up: the config, the device, the latent dtype and the chunk size."""

    def __init__(self, cfg_json: str) -> None:
        self.cfg = PrecomputeConfig.model_validate_json(cfg_json)
        self.device = pick_device(self.cfg.encoders.num_gpus_per_actor)
        self.latent_dtype = self.cfg.latent_dtype
        self.chunk = self.cfg.encoders.batch_size
        if self.device.type == "cpu":
            enc = self.cfg.encoders
            torch.set_num_threads(enc.threads_per_actor or max(1, math.ceil(enc.cpus_per_actor)))

    def encoder_config(self, name: str):
        """The model's ``vae`` or ``vit`` config, with its weights path (``model.weights``) when given."""
        return getattr(self.cfg.model.build(), name)


class VAEEncoder(_EncoderActor):
    def __init__(self, cfg_json: str) -> None:
        super().__init__(cfg_json)
        vae_cfg = self.encoder_config("vae")
        self.vae = WanVAE.from_config(vae_cfg).to(self.device).eval()
        stats = self.vae.autoencoder.config
        self.info = json.dumps({
            "encoder": "Wan2.2 VAE (diffusers AutoencoderKLWan)", "preset": vae_cfg.preset,
            "weights": _weights(vae_cfg.path), "channels": vae_cfg.latent_channels,
            "compression": {"temporal": vae_cfg.temporal_ratio, "spatial": vae_cfg.spatial_ratio},
            "content": "posterior mean" + (" and std" if self.cfg.encoders.store_posterior_std else ""),
            "normalisation": "latent = (mu - latents_mean[c]) / latents_std[c] per channel c, std = sigma / "
                             "latents_std[c]; the VAE decodes latent * latents_std[c] + latents_mean[c]",
            "latents_mean": [float(x) for x in stats.latents_mean],
            "latents_std": [float(x) for x in stats.latents_std],
        })

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.perf_counter()
        with_std = self.cfg.encoders.store_posterior_std
        for slot in ("target", "source"):
            latents, stds, shapes = [b""] * len(batch), [b""] * len(batch), [[] for _ in range(len(batch))]
            for shape, rows in _groups(batch, slot, self.chunk):
                pixels = _pixels(batch, slot, rows, shape).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, T, H, W)
                pixels = pixels.to(self.device)
                mean, std = self.vae.encode_posterior(pixels) if with_std else (self.vae.encode(pixels), None)
                for k, i in enumerate(rows):
                    lat = mean[k].permute(1, 2, 3, 0).cpu()  # (T', H', W', C)
                    tensors = [lat] if std is None else [lat, std[k].permute(1, 2, 3, 0).cpu()]
                    stored = _stored(batch, i, "vae", tensors, self.latent_dtype)
                    if stored is not None:
                        latents[i], shapes[i] = stored[0], list(lat.shape)
                        stds[i] = stored[1] if std is not None else b""
            batch[f"{slot}_vae"] = latents
            batch[f"{slot}_vae_shape"] = shapes
            if with_std:
                batch[f"{slot}_vae_std"] = stds
            batch = batch.drop(columns=[f"{slot}_pixels"])
        batch["vae_info"] = self.info
        batch["vae_seconds"] = (time.perf_counter() - started) / max(len(batch), 1)
        return frame_to_arrow(batch)


class ViTEncoder(_EncoderActor):
    def __init__(self, cfg_json: str) -> None:
        super().__init__(cfg_json)
        vit_cfg = self.encoder_config("vit")
        self.vit = QwenViT.from_config(vit_cfg).to(self.device).eval()
        self.info = json.dumps({
            "encoder": "Qwen2.5-VL vision tower with its patch merger (transformers)",
            "preset": vit_cfg.preset,
            "weights": _weights(vit_cfg.path), "feature_size": vit_cfg.out_hidden_size,
            "patch_size": vit_cfg.patch_size, "temporal_patch_size": vit_cfg.temporal_patch_size,
            "spatial_merge_size": vit_cfg.spatial_merge_size,
        })

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.perf_counter()
        for slot in ("target", "source"):
            features, shapes, grids = [b""] * len(batch), [[] for _ in batch.index], [[] for _ in batch.index]
            for shape, rows in _groups(batch, f"{slot}_vit", self.chunk):
                clips = [c.permute(0, 3, 1, 2) for c in _pixels(batch, f"{slot}_vit", rows, shape)]
                encoded, llm_grids = self.vit.encode_many(clips)
                for i, feat, grid in zip(rows, encoded, llm_grids):
                    stored = _stored(batch, i, "vit", [feat.cpu()], self.latent_dtype)
                    if stored is not None:
                        features[i], shapes[i], grids[i] = stored[0], list(feat.shape), list(grid)
            batch[f"{slot}_vit"] = features
            batch[f"{slot}_vit_feat_shape"] = shapes
            batch[f"{slot}_vit_grid"] = grids
            batch = batch.drop(columns=[f"{slot}_vit_pixels"])
        batch["vit_info"] = self.info
        batch["vit_seconds"] = (time.perf_counter() - started) / max(len(batch), 1)
        return frame_to_arrow(batch)
