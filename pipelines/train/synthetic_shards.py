"""A latent shard root of synthetic rows, made without Ray, media or encoders: random latents and ViT
features of the model's sizes, captions and answers in words, written in the shard schema
(lance_core/shards.py) with a manifest that names the model's encoders and counts each shard's rows, as
``lance precompute`` writes it.
For the GPU check (no Ray there) and the tests that train but do not test the precompute.

    root = write_synthetic_shards(tmp / "latents", model_preset("tiny"), rows_per_task=8)
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lance_core.config import ModelConfig
from lance_core.encoder_identity import encoder_identity
from lance_core.shards import parquet_options, shard_table
from pipelines.runtime.shard_manifest import MANIFEST_FILE, shard_counts

DEFAULT_TASKS = ("t2i", "t2v", "i2i", "v2v", "i2t", "v2t")
WORDS = ("red", "blue", "green", "cat", "dog", "house", "tree", "river", "sun", "car", "bird", "small", "large")
MANIFEST_SCHEMA_V1 = "lance-latent-shards/1"
"""Entries listed in manifest.json itself: the reader takes it as it takes /2's segments."""


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def synthetic_row(task: str, cfg: ModelConfig, index: int, latent_side: int, video_frames: int,
                  rng: np.random.Generator, words: random.Random) -> dict:
    """One shard row of ``task``: latents (T', side, side, C) and, where the task reads them, ViT features of
    a (t, 2, 2) merged grid."""
    channels, width = cfg.latent_channels, cfg.hidden_size
    frames = video_frames if task in ("t2v", "v2v", "v2t") else 1
    pixels = latent_side * cfg.vae.spatial_ratio
    caption = " ".join(words.choice(WORDS) for _ in range(5))
    uri = f"synthetic://{task}/{index}"
    row = {"sample_id": _hex(uri)[:32], "source_uri": uri, "content_sha256": _hex(f"{uri}#content"),
           "task": task, "caption": caption, "clip_index": 0}

    def latents(count: int) -> np.ndarray:
        return rng.standard_normal((count, latent_side, latent_side, channels), dtype=np.float32)

    def vit(grid: tuple[int, int, int]) -> tuple[np.ndarray, list[int]]:
        return (rng.standard_normal((grid[0] * grid[1] * grid[2], width), dtype=np.float32) * 0.5, list(grid))

    def media(slot: str, count: int) -> dict:
        return {f"{slot}_width": pixels, f"{slot}_height": pixels, f"{slot}_frames": 4 * (count - 1) + 1,
                f"{slot}_fps": 12.0 if count > 1 else 0.0}

    if task in ("i2t", "v2t"):
        features, grid = vit((max(1, frames // 2) if task == "v2t" else 1, 2, 2))
        row.update(target_vit=features, target_vit_grid=grid, system="You are a helpful assistant.",
                   question="What is shown?", answer=caption, **media("target", frames))
        return row
    row.update(target_vae=latents(frames), **media("target", frames))
    if task in ("i2i", "v2v"):
        features, grid = vit((max(1, frames // 2), 2, 2))
        row.update(source_vae=latents(frames), source_vit=features, source_vit_grid=grid,
                   caption="make it " + caption, **media("source", frames))
    return row


def write_synthetic_shards(root: Path | str, cfg: ModelConfig, tasks: tuple[str, ...] = DEFAULT_TASKS,
                           rows_per_task: int = 8, rows_per_shard: int = 16, latent_side: int = 4,
                           video_frames: int = 2, seed: int = 0, latent_dtype: str = "bf16") -> Path:
    """Shards ``shards/part-NNNNN.parquet`` (tasks interleaved) and ``manifest.json`` under ``root``."""
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng, words = np.random.default_rng(seed), random.Random(seed)
    frames = min(video_frames, cfg.max_latent_frames)
    video_tasks = {"t2v", "v2v", "v2t"}
    usable = [t for t in tasks if frames > 1 or t not in video_tasks]
    rows = [synthetic_row(task, cfg, i, latent_side, frames, rng, words)
            for i in range(rows_per_task) for task in usable]
    entries = []
    for partition, start in enumerate(range(0, len(rows), rows_per_shard)):
        table = shard_table(rows[start:start + rows_per_shard], latent_dtype)
        name = f"shards/part-{partition:05d}.parquet"
        pq.write_table(table, root / name, compression="zstd", **parquet_options(table.schema))
        entries.append({"partition": partition, "shard": name, "rows": table.num_rows,
                        "bytes": (root / name).stat().st_size,
                        "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest(), "inputs": table.num_rows,
                        **shard_counts(table)})
    manifest = {"schema": MANIFEST_SCHEMA_V1, "encoder": encoder_identity(cfg), "shards": entries}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return root
