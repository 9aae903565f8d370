"""Encoder actors for Ray Data ``map_batches``: the Wan2.2 VAE and the Qwen2.5-VL ViT.

A batch is one partition's block; its rows are grouped by pixel shape (the aspect bucket) and encoded in
chunks of ``encoders.batch_size`` rows (``encoders.video_batch_size`` for video buckets). Pixels leave the
host as uint8 (pinned and copied asynchronously to a GPU: a quarter of float32's bytes) and become floats on
the device, in the encoders, which compute in ``encoders.dtype`` (bf16 on a GPU by default); the VAE's
latents are normalised in float32 and handed to storage from float32. With ``encoders.store_posterior_std``
the VAE stage also hands on the posterior's normalised std (``<slot>_vae_std``) beside the mean.
Tensors leave as their stored values (``lance_core.shards.storage_values``: rounded to ``latent_dtype``, in
the storage dtype, as bytes); a sample whose values cannot be stored that way (not finite, or beyond
float16's range) is quarantined with reason ``not_storable``. Each stage also hands on a JSON description of
its encoder (``vae_info`` / ``vit_info``) for the shard's metadata.
Every media slot a batch carries is encoded (target, source, references ``ref_k``).
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

from lance_core.encoders import QwenViT, load_vae
from lance_core.shards import storage_values
from pipelines.runtime.devices import pick_device

from .config import PrecomputeConfig
from .media import SLOTS
from .records import frame_to_arrow


def _groups(batch: pd.DataFrame, key: str, chunk: int,
            video_chunk: int | None = None) -> list[tuple[tuple, list[int]]]:
    """Rows to encode grouped by pixel shape (T, H, W, 3) (the bucket), in chunks of at most ``chunk`` rows
    (``video_chunk`` for shapes of more than one frame, when given)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (status, shape, data) in enumerate(zip(batch["status"], batch[f"{key}_shape"], batch[f"{key}_pixels"])):
        if status == "ok" and data is not None and len(data):
            groups[tuple(int(s) for s in shape)].append(i)
    out = []
    for shape, rows in groups.items():
        size = video_chunk if video_chunk is not None and shape[0] > 1 else chunk
        out += [(shape, rows[start:start + size]) for start in range(0, len(rows), size)]
    return out


def carried_slots(batch: pd.DataFrame, pixels: str) -> list[str]:
    """The media slots (target, source, references) whose ``<slot><pixels>`` column the batch carries."""
    return [slot for slot in SLOTS if f"{slot}{pixels}" in batch]


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


def uint8_pixels(batch: pd.DataFrame, key: str, rows: list[int], shape: tuple,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The rows' pixels as one uint8 tensor (B, T, H, W, 3) on ``device``: they cross to it as bytes (a
    quarter of float32's), from pinned memory and without blocking the host when it is a GPU. The encoders
    turn them into floats on the device."""
    arrays = [np.frombuffer(batch[f"{key}_pixels"].iloc[i], dtype=np.uint8).reshape(shape) for i in rows]
    pixels = torch.from_numpy(np.stack(arrays))
    device = torch.device(device)
    if device.type == "cuda":
        return pixels.pin_memory().to(device, non_blocking=True)
    return pixels.to(device)


def _pixels(batch: pd.DataFrame, key: str, rows: list[int], shape: tuple) -> torch.Tensor:
    """(B, T, H, W, 3) float32 in [0, 1] on the host: for the scoring stage, whose CLIP preprocessing takes
    floats on the host; the VAE and ViT stages take :func:`uint8_pixels`."""
    return uint8_pixels(batch, key, rows, shape).float().div_(255.0)


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``encoders.dtype`` on ``device``: ``auto`` is bf16 on a GPU, fp32 on the CPU; the others as named."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return COMPUTE_DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in COMPUTE_DTYPES.items()}[dtype]


class _EncoderActor:
    """Shared set-up: the config, the device, the compute and latent dtypes and the chunk sizes."""

    def __init__(self, cfg_json: str) -> None:
        self.cfg = PrecomputeConfig.model_validate_json(cfg_json)
        self.device = pick_device(self.cfg.encoders.num_gpus_per_actor)
        self.dtype = compute_dtype(self.cfg.encoders.dtype, self.device)
        self.latent_dtype = self.cfg.latent_dtype
        self.chunk = self.cfg.encoders.batch_size
        self.video_chunk = self.cfg.encoders.video_batch_size
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
        self.vae = load_vae(vae_cfg).eval()
        self.vae.drop_decoder()  # the stage only encodes
        self.vae.to(self.device, self.dtype)
        self.info = json.dumps({
            **self.vae.describe(), "weights": _weights(vae_cfg.path),
            "compute_dtype": dtype_name(self.dtype), "device": self.device.type,
            "content": "posterior mean" + (" and std" if self.cfg.encoders.store_posterior_std else ""),
        })

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.perf_counter()
        with_std = self.cfg.encoders.store_posterior_std
        for slot in carried_slots(batch, "_pixels"):
            latents, stds, shapes = [b""] * len(batch), [b""] * len(batch), [[] for _ in range(len(batch))]
            for shape, rows in _groups(batch, slot, self.chunk, self.video_chunk):
                pixels = uint8_pixels(batch, slot, rows, shape, self.device)
                pixels = pixels.permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W) uint8
                # float32 out of the VAE whatever its dtype: normalised in float32, stored from float32
                mean, std = self.vae.encode_posterior(pixels) if with_std else (self.vae.encode(pixels), None)
                del pixels
                mean = mean.permute(0, 2, 3, 4, 1).cpu()  # (B, T', H', W', C)
                std = None if std is None else std.permute(0, 2, 3, 4, 1).cpu()
                for k, i in enumerate(rows):
                    lat = mean[k]
                    tensors = [lat] if std is None else [lat, std[k]]
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
        self.vit = QwenViT.from_config(vit_cfg).to(self.device, self.dtype).eval()
        self.info = json.dumps({
            "encoder": "Qwen2.5-VL vision tower with its patch merger (transformers)",
            "preset": vit_cfg.preset,
            "weights": _weights(vit_cfg.path), "feature_size": vit_cfg.out_hidden_size,
            "compute_dtype": dtype_name(self.dtype), "device": self.device.type,
            "patch_size": vit_cfg.patch_size, "temporal_patch_size": vit_cfg.temporal_patch_size,
            "spatial_merge_size": vit_cfg.spatial_merge_size,
        })

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.perf_counter()
        for slot in carried_slots(batch, "_vit_pixels"):
            features, shapes, grids = [b""] * len(batch), [[] for _ in batch.index], [[] for _ in batch.index]
            for shape, rows in _groups(batch, f"{slot}_vit", self.chunk, self.video_chunk):
                pixels = uint8_pixels(batch, f"{slot}_vit", rows, shape, self.device)  # (B, T, H, W, 3)
                encoded, llm_grids = self.vit.encode_many(list(pixels.permute(0, 1, 4, 2, 3)))
                del pixels
                for i, feat, grid in zip(rows, encoded, llm_grids):
                    # in the tower's dtype over the bus, float32 (exact) for storage
                    stored = _stored(batch, i, "vit", [feat.cpu().float()], self.latent_dtype)
                    if stored is not None:
                        features[i], shapes[i], grids[i] = stored[0], list(feat.shape), list(grid)
            batch[f"{slot}_vit"] = features
            batch[f"{slot}_vit_feat_shape"] = shapes
            batch[f"{slot}_vit_grid"] = grids
            batch = batch.drop(columns=[f"{slot}_vit_pixels"])
        batch["vit_info"] = self.info
        batch["vit_seconds"] = (time.perf_counter() - started) / max(len(batch), 1)
        return frame_to_arrow(batch)
