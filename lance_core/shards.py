"""The latent shard schema (DATA.md), shared by the writer (pipelines/data) and the readers (training, RL).

One Parquet row per sample. Latents are raw little-endian bytes with a shape and a dtype column, so
pyarrow, Ray Data, pandas and DuckDB read shards without project code. Media slots: ``target`` always;
``source`` for edits and i2v; ``ref_0``... for subject-driven samples. Shapes: VAE (T', H', W', C=48),
ViT (L, D) with its token grid (t, h, w). ``<slot>_vae_std`` (optional, same shape and dtype as
``<slot>_vae``) holds the VAE posterior's std, normalised per channel like the mean, for training that draws
a fresh latent mean + std * eps each step; shards without it carry the posterior mean alone.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

LATENT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SLOTS = ("target", "source", "ref_0", "ref_1", "ref_2")
SCHEMA_VERSION = 1


def slot_fields(slot: str) -> list[pa.Field]:
    return [
        pa.field(f"{slot}_vae", pa.binary()),
        pa.field(f"{slot}_vae_shape", pa.list_(pa.int32())),
        pa.field(f"{slot}_vae_dtype", pa.string()),
        pa.field(f"{slot}_vae_std", pa.binary()),
        pa.field(f"{slot}_vit", pa.binary()),
        pa.field(f"{slot}_vit_shape", pa.list_(pa.int32())),
        pa.field(f"{slot}_vit_grid", pa.list_(pa.int32())),
        pa.field(f"{slot}_width", pa.int32()),
        pa.field(f"{slot}_height", pa.int32()),
        pa.field(f"{slot}_frames", pa.int32()),
        pa.field(f"{slot}_fps", pa.float32()),
    ]


SHARD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("content_sha256", pa.string()),
        pa.field("task", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("system", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("clip_index", pa.int32()),
        pa.field("clip_score", pa.float32()),
        pa.field("scores", pa.string()),
    ]
    + [f for slot in SLOTS for f in slot_fields(slot)],
    metadata={"lance_shard_schema": str(SCHEMA_VERSION)},
)

OPTIONAL_COLUMNS = frozenset(f"{slot}_vae_std" for slot in SLOTS)
"""Columns that older shards lack: readers treat a missing one as all null."""

QUARANTINE_SCHEMA = pa.schema([
    pa.field("source_uri", pa.string()),
    pa.field("partition", pa.int32()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("error", pa.string()),
])


def sample_id(source_uri: str, content_sha256: str, clip_index: int = 0) -> str:
    """Stable id: hash of the source URI and the content (and the clip for cut videos)."""
    return hashlib.sha256(f"{source_uri}\0{content_sha256}\0{clip_index}".encode()).hexdigest()[:32]


def tensor_to_bytes(array, dtype: str) -> bytes:
    """A torch tensor or numpy array -> little-endian bytes in ``dtype`` (bfloat16, float16, float32)."""
    import torch

    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    target = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    tensor = tensor.detach().to("cpu", target).contiguous()
    if target == torch.bfloat16:
        return tensor.view(torch.int16).numpy().astype("<i2").tobytes()
    return tensor.numpy().astype(tensor.numpy().dtype.newbyteorder("<")).tobytes()


def bytes_to_tensor(data: bytes, shape, dtype: str):
    """Inverse of :func:`tensor_to_bytes`, returning a float32 torch tensor."""
    import torch

    shape = tuple(int(s) for s in shape)
    if dtype == "bfloat16":
        raw = torch.from_numpy(np.frombuffer(data, dtype="<i2").copy())
        return raw.view(torch.bfloat16).float().reshape(shape)
    return torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32)
                            .reshape(shape).copy())


def check_schema(schema: pa.Schema, where: str) -> None:
    """A shard whose schema lacks required columns or has other types is rejected with the column named."""
    for field in SHARD_SCHEMA:
        absent_optional = field.name in OPTIONAL_COLUMNS and field.name not in schema.names
        if field.name.startswith(SLOTS[1:]) or absent_optional:
            continue
        if field.name not in schema.names:
            raise ValueError(f"{where}: not a latent shard, column {field.name!r} is missing")
        if not schema.field(field.name).type.equals(field.type):
            raise ValueError(f"{where}: column {field.name!r} has type {schema.field(field.name).type}, "
                             f"expected {field.type}")
