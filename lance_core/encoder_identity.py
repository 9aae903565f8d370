"""Which VAE and ViT made a set of latents: their architecture fields and a digest of their weights. The
precompute writes it into the shard root's manifest; training compares it with its own model's encoders
and refuses latents from another encoder (they would decode to noise and condition on foreign features).

Weights are identified by content, not by path: a file up to 64 MiB is hashed whole; a larger one by its size
and 64 chunks of 1 MiB spread evenly over it (a fine-tune changes nearly every chunk), so a 7 GB checkpoint
costs a few milliseconds, not a minute. Random weights are identified by their seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import ModelConfig, VAEConfig, ViTConfig

WHOLE_FILE_BYTES = 64 * 2**20
CHUNKS, CHUNK_BYTES = 64, 2**20
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".json")
"""Files of a weights folder that take part in its digest (weights, index, configs)."""


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\n".encode())
    with path.open("rb") as fh:
        if size <= WHOLE_FILE_BYTES:
            digest.update(fh.read())
            return
        step = (size - CHUNK_BYTES) // (CHUNKS - 1)
        for index in range(CHUNKS):
            fh.seek(index * step)
            digest.update(fh.read(CHUNK_BYTES))


def weights_digest(path: str) -> str:
    """``sha256:<hex>`` of a weights file or folder (the files named by :data:`WEIGHT_SUFFIXES`, with their
    names relative to it); a URI is identified by itself (``uri:s3://...``)."""
    if "://" in path:
        return f"uri:{path}"
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"weights not found: {path!r}")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root) if file != root else file.name}\n".encode())
        _file_digest(file, digest)
    return f"sha256:{digest.hexdigest()}"


def _weights(path: str | None, seed: int) -> str:
    return weights_digest(path) if path else f"random:seed={seed}"


def vae_identity(cfg: VAEConfig) -> dict:
    return {**cfg.model_dump(mode="json", exclude={"path", "seed"}), "weights": _weights(cfg.path, cfg.seed)}


def vit_identity(cfg: ViTConfig) -> dict:
    return {**cfg.model_dump(mode="json", exclude={"path", "seed"}), "weights": _weights(cfg.path, cfg.seed)}


def encoder_identity(cfg: ModelConfig) -> dict:
    """``{"vae": {...}, "vit": {...}}`` of the model's encoders."""
    return {"vae": vae_identity(cfg.vae), "vit": vit_identity(cfg.vit)}


def identity_mismatch(made_by: dict, model: dict) -> list[str]:
    """What differs between the encoders that made latents and the model's (``encoder_identity`` dicts),
    one line per field; empty when they agree."""
    lines = []
    for encoder in ("vae", "vit"):
        theirs, ours = made_by.get(encoder, {}), model.get(encoder, {})
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key):
                lines.append(f"{encoder}.{key}: {theirs.get(key)!r} in the shards, {ours.get(key)!r} in the model")
    return lines
