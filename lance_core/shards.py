"""The latent shard schema (DATA.md), shared by the writer (pipelines/data) and the readers (training, RL).

One Parquet row per sample, readable with pyarrow, pandas, numpy, Ray Data or DuckDB alone (schema version 2).

Columns
-------
- identity: ``sample_id`` (sha256 of source URI, content hash and clip index), ``source_uri``,
  ``content_sha256`` (of the media bytes), ``clip_index`` (clip of a cut video; 0 for images)
- task: ``task`` (t2i, t2v, i2v, i2i, v2v, i2t, v2t, subject), ``caption``; QA rows: ``system``,
  ``question``, ``answer``
- scores: ``clip_score`` (CLIP image-text score), ``scores`` (JSON of the other filter scores);
  ``clip_embedding`` (float16 list: the normalised CLIP image embedding, with ``filters.semantic_dedup``)
- per media slot (``target`` always; ``source`` for edits and i2v; ``ref_0``... for subject-driven rows):
  ``<slot>_vae``, ``<slot>_vae_std``, ``<slot>_vae_shape``, ``<slot>_vit``, ``<slot>_vit_shape``,
  ``<slot>_vit_grid``, and the media's ``<slot>_width``, ``<slot>_height`` (source pixels), ``<slot>_frames``
  (frames of the clip), ``<slot>_fps`` (sampling rate; 0 for images)

Tensor layout
-------------
A tensor is stored flattened in row-major (C) order as ``list<float16>`` (``latent_dtype`` bf16 or fp16) or
``list<float32>`` (fp32), its dims in an integer list column beside it::

    <slot>_vae        list<float16|float32>  VAE latents (T', H', W', C=48), normalised per channel
    <slot>_vae_std    list<float16|float32>  optional: the posterior's std, normalised like the latents
    <slot>_vae_shape  list<int32>            [T', H', W', C] of both
    <slot>_vit        list<float16|float32>  ViT features after the patch merger (L, D)
    <slot>_vit_shape  list<int32>            [L, D]
    <slot>_vit_grid   list<int32>            the merged token grid [t, h, w], L = t * h * w

so ``np.asarray(row["target_vae"]).reshape(row["target_vae_shape"])`` is a sample's latent, with numpy,
pandas (``to_pandas()`` gives one numpy array per cell) or DuckDB (``FLOAT[]`` plus ``INTEGER[]``). Shapes
vary per row (aspect buckets, frame counts), hence lists and not Arrow fixed-shape tensors; pyarrow (26)
offers no variable-shape tensor type in Python, and DuckDB and pandas read plain lists as they are.

Precision: ``latent_dtype: bf16`` (the default) rounds every value to bfloat16 (8 significant bits, as
before) and stores it as float16, which holds every bfloat16 value of magnitude 2^-14 to 65504 exactly (a
smaller one to within 2^-25) in the same 2 bytes, and which numpy, pandas and DuckDB read (none of them
reads bfloat16). ``fp16`` stores float16 rounding (11 significant bits), ``fp32`` float32 (twice the size).
A value that 2 bytes cannot hold (magnitude over 65504) or that is not finite is refused by
:func:`storage_values`; the encoder stage quarantines that sample with reason ``not_storable``.
``<slot>_vae`` is the VAE posterior mean mu normalised per channel c, ``(mu - latents_mean[c]) /
latents_std[c]``; ``<slot>_vae_std`` is ``sigma / latents_std[c]``, so ``mean + std * eps`` is a normalised
posterior draw. The statistics, the encoders and their weights are in the file metadata.

Columns that no row of a shard fills are not written (a t2i shard has no ``source_*``, ``*_vit``,
``system``/``question``/``answer`` columns); readers treat a missing column as all null. Shards of one run can
therefore differ in their columns: read a folder with DuckDB's ``read_parquet(..., union_by_name = true)``,
or with pyarrow over :func:`dataset_schema`.

File metadata (Parquet key/value)
---------------------------------
``lance_shard_schema`` "2"; ``lance.layout`` the layout above in words; ``lance.columns`` JSON: per column
present its description and Arrow type, and for a tensor its shape column, dims and numpy dtype;
``lance.latents`` JSON: the VAE (encoder, weights, channels, compression, normalisation and its per-channel
statistics) and the precision; ``lance.vit`` JSON: the ViT (encoder, weights, feature size). With
``filters.near_dedup``, ``lance.near_hashes`` JSON: the perceptual hashes of the partition's records (those
written, and by record number those that were not), which a resumed precompute's near-duplicate index reads.

Version 1 shards (raw little-endian bytes with a ``<slot>_vae_dtype`` string, bfloat16 by default, every
column written) still read: :func:`shard_rows` decodes them into the same arrays (bfloat16 as float32).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2
VERSION_KEY = "lance_shard_schema"
LATENT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""``latent_dtype`` -> the precision values are rounded to."""
STORAGE_DTYPES = {"bf16": "float16", "fp16": "float16", "fp32": "float32"}
"""``latent_dtype`` -> the numpy dtype the values are stored in."""
FLOAT16_MAX = 65504.0
SLOTS = ("target", "source", "ref_0", "ref_1", "ref_2")
TENSOR_DIMS = {"vae": ["T", "H", "W", "C"], "vae_std": ["T", "H", "W", "C"], "vit": ["L", "D"]}

_COLUMN_TEXT = {
    "sample_id": "stable id: sha256 of source_uri, content_sha256 and clip_index (32 hex digits)",
    "source_uri": "the input the sample came from (file, tar member, manifest or Parquet row)",
    "content_sha256": "sha256 of the media bytes (target, then source)",
    "task": "t2i, t2v, i2v, i2i, v2v, i2t, v2t or subject",
    "caption": "the caption / prompt",
    "system": "QA rows: the system instruction",
    "question": "QA rows: the question (may be empty)",
    "answer": "QA rows: the answer",
    "clip_index": "clip of a cut video (0 for images)",
    "clip_score": "CLIP image-text score of the target (null where not computed)",
    "clip_embedding": "normalised CLIP image embedding of the target's middle frame (filters.semantic_dedup; "
                      "null where not computed)",
    "scores": "JSON of the other filter scores (motion, text_area; null where not computed)",
}
_SLOT_TEXT = {
    "vae": "VAE latents (posterior mean), normalised per channel; flattened row-major, dims in "
           "{slot}_vae_shape",
    "vae_std": "VAE posterior std, normalised like {slot}_vae; flattened row-major, dims in {slot}_vae_shape",
    "vae_shape": "[T', H', W', C] of {slot}_vae and {slot}_vae_std (latent frames, height, width, channels)",
    "vit": "ViT features after the patch merger; flattened row-major, dims in {slot}_vit_shape",
    "vit_shape": "[L, D] of {slot}_vit (tokens, feature size)",
    "vit_grid": "the merged ViT token grid [t, h, w] of {slot}_vit, L = t * h * w",
    "width": "width of the {slot} media in pixels, before bucketing",
    "height": "height of the {slot} media in pixels, before bucketing",
    "frames": "frames of the {slot} clip (1 for an image)",
    "fps": "frame rate the {slot} clip was sampled at (0 for an image)",
}
LAYOUT_TEXT = (
    "One row per sample. Tensors are stored flattened in row-major (C) order as list<float16> or "
    "list<float32>; the integer list column named in lance.columns (<name>_shape; <slot>_vae_std shares "
    "<slot>_vae_shape) holds their dims: numpy.asarray(row['target_vae']).reshape(row['target_vae_shape']). "
    "Columns no row fills are not written; a missing column means null for every row.")

REQUIRED_COLUMNS = ("sample_id", "source_uri", "content_sha256", "task", "caption", "clip_index")
"""Written in every shard, even where null."""


def _tensor_type(latent_dtype: str) -> pa.DataType:
    return pa.list_(pa.float16() if STORAGE_DTYPES[latent_dtype] == "float16" else pa.float32())


def slot_fields(slot: str, latent_dtype: str = "bf16") -> list[pa.Field]:
    values = _tensor_type(latent_dtype)
    return [
        pa.field(f"{slot}_vae", values),
        pa.field(f"{slot}_vae_std", values),
        pa.field(f"{slot}_vae_shape", pa.list_(pa.int32())),
        pa.field(f"{slot}_vit", values),
        pa.field(f"{slot}_vit_shape", pa.list_(pa.int32())),
        pa.field(f"{slot}_vit_grid", pa.list_(pa.int32())),
        pa.field(f"{slot}_width", pa.int32()),
        pa.field(f"{slot}_height", pa.int32()),
        pa.field(f"{slot}_frames", pa.int32()),
        pa.field(f"{slot}_fps", pa.float32()),
    ]


def shard_schema(latent_dtype: str = "bf16") -> pa.Schema:
    """Every column a version-2 shard can hold (a shard writes those its rows fill), no metadata."""
    return pa.schema(
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
            pa.field("clip_embedding", pa.list_(pa.float16())),
            pa.field("scores", pa.string()),
        ]
        + [f for slot in SLOTS for f in slot_fields(slot, latent_dtype)])


SHARD_SCHEMA = shard_schema("bf16")
TENSOR_COLUMNS = frozenset(f"{slot}_{kind}" for slot in SLOTS for kind in TENSOR_DIMS)

LEGACY_SCHEMA = pa.schema(
    [f for f in SHARD_SCHEMA if f.name in _COLUMN_TEXT and f.name != "clip_embedding"]
    + [pa.field(f"{slot}_{name}", kind) for slot in SLOTS for name, kind in (
        ("vae", pa.binary()), ("vae_shape", pa.list_(pa.int32())), ("vae_dtype", pa.string()),
        ("vae_std", pa.binary()), ("vit", pa.binary()), ("vit_shape", pa.list_(pa.int32())),
        ("vit_grid", pa.list_(pa.int32())), ("width", pa.int32()), ("height", pa.int32()),
        ("frames", pa.int32()), ("fps", pa.float32()))],
    metadata={VERSION_KEY: "1"},
)
"""Version 1: tensors as raw little-endian bytes with a dtype string; every column written."""
LEGACY_OPTIONAL_COLUMNS = frozenset(f"{slot}_vae_std" for slot in SLOTS)
"""Columns that the oldest version-1 shards lack."""

SEMANTIC_DROP_FILE = "semantic_drop.parquet"
"""Beside ``manifest.json``: the ``sample_id`` of each row the semantic dedup pass drops (``duplicate_of``: the
earlier row it repeats, ``cosine``: their similarity, ``cluster``, ``partition``: whose shard holds it); training
leaves them out."""

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


def shape_column(name: str) -> str:
    """The column holding the dims of tensor column ``name`` (``<slot>_vae_std`` shares
    ``<slot>_vae_shape``)."""
    return name.removesuffix("_std") + "_shape"


def column_text(name: str) -> str:
    """What column ``name`` holds, in words."""
    if name in _COLUMN_TEXT:
        return _COLUMN_TEXT[name]
    for slot in SLOTS:
        if name.startswith(slot + "_") and name[len(slot) + 1:] in _SLOT_TEXT:
            return _SLOT_TEXT[name[len(slot) + 1:]].format(slot=slot)
    raise KeyError(f"{name!r} is not a latent shard column")


# ---------------------------------------------------------------------------------------------- values
def _as_float32(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (any dtype, bfloat16 included)
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _round_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (ties to even), still as float32; values must be finite."""
    bits = values.view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def storage_values(value, latent_dtype: str) -> np.ndarray:
    """A tensor (numpy array, torch tensor) -> its values as stored: flat, rounded to the ``latent_dtype``
    precision, in the storage dtype. ValueError if a value is not finite or is beyond float16's range."""
    values = np.ascontiguousarray(_as_float32(value)).reshape(-1)
    finite = np.isfinite(values)
    if not finite.all():
        raise ValueError(f"{int((~finite).sum())} of {values.size} values are not finite (NaN or inf)")
    storage = STORAGE_DTYPES[latent_dtype]
    if storage == "float32":
        return values
    if LATENT_DTYPES[latent_dtype] == "bfloat16":
        values = _round_bfloat16(values.copy())
    largest = float(np.abs(values).max(initial=0.0))
    if largest > FLOAT16_MAX:
        raise ValueError(f"a value of magnitude {largest:.6g} is beyond float16's range ({FLOAT16_MAX:g}); "
                         f"latent_dtype fp32 stores it")
    return values.astype(np.float16)


MAX_CHUNK_VALUES = 2**31 - 1
"""A list array's int32 offsets address this many values; a longer column is cut into chunks."""


def _list_chunk(flats: list, dtype: np.dtype) -> pa.ListArray:
    sizes = np.array([0 if f is None else f.size for f in flats], dtype=np.int64)
    present = [f for f in flats if f is not None]
    child = pa.array(np.concatenate(present) if present else np.zeros(0, dtype))
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, child, mask=pa.array([f is None for f in flats], pa.bool_()))


def tensor_column(values: list, latent_dtype: str) -> pa.ChunkedArray:
    """One list column from per-row tensors (None for a null cell), flattened and converted as stored."""
    flats = [None if v is None else storage_values(v, latent_dtype) for v in values]
    dtype = np.dtype(STORAGE_DTYPES[latent_dtype])
    chunks, start, count = [], 0, 0
    for end, flat in enumerate(flats):
        size = 0 if flat is None else flat.size
        if count + size > MAX_CHUNK_VALUES and end > start:
            chunks.append(_list_chunk(flats[start:end], dtype))
            start, count = end, 0
        count += size
    chunks.append(_list_chunk(flats[start:], dtype))
    return pa.chunked_array(chunks, type=_tensor_type(latent_dtype))


# ---------------------------------------------------------------------------------------------- writing
def _column_entry(field: pa.Field, latent_dtype: str) -> dict:
    entry = {"description": column_text(field.name), "type": str(field.type)}
    kind = next((k for k in ("vae_std", "vae", "vit") if field.name.endswith("_" + k)), None)
    if field.name in TENSOR_COLUMNS and kind:
        entry.update(shape_column=shape_column(field.name), dims=TENSOR_DIMS[kind],
                     dtype=STORAGE_DTYPES[latent_dtype], precision=LATENT_DTYPES[latent_dtype])
    return entry


def shard_metadata(schema: pa.Schema, latent_dtype: str, latents: dict | None = None,
                   vit: dict | None = None) -> dict[str, str]:
    """The file's key/value metadata for the columns of ``schema``: layout, columns, encoders, precision."""
    precision = {
        "precision": LATENT_DTYPES[latent_dtype], "storage_dtype": STORAGE_DTYPES[latent_dtype],
        "note": {"bf16": "values rounded to bfloat16, stored as float16: exact for magnitudes 2^-14..65504, "
                         "smaller ones to within 2^-25",
                 "fp16": "values rounded to float16", "fp32": "values stored as float32"}[latent_dtype],
    }
    return {
        VERSION_KEY: str(SCHEMA_VERSION),
        "lance.layout": LAYOUT_TEXT,
        "lance.columns": json.dumps({f.name: _column_entry(f, latent_dtype) for f in schema}),
        "lance.latents": json.dumps({**(latents or {}), **precision}),
        "lance.vit": json.dumps({**(vit or {}), **precision}),
    }


def shard_table(rows: list[dict], latent_dtype: str = "bf16", latents: dict | None = None,
                vit: dict | None = None) -> pa.Table:
    """Shard rows -> the Parquet table to write: tensors (numpy arrays or torch tensors, any shape; their
    dims go to the shape column when the row gives none) stored as the layout says, columns no row fills
    left out, the metadata attached. ``latents`` / ``vit`` describe the encoders (``lance.latents`` /
    ``lance.vit``)."""
    full = shard_schema(latent_dtype)
    unknown = sorted({k for row in rows for k in row} - set(full.names))
    if unknown:
        raise KeyError(f"not latent shard columns: {unknown}")
    fields, arrays = [], []
    for field in full:
        values = [row.get(field.name) for row in rows]
        if field.name.endswith("_shape"):
            tensor = field.name.removesuffix("_shape")
            values = [list(np.shape(row[tensor])) if v is None and row.get(tensor) is not None else v
                      for v, row in zip(values, rows)]
        if field.name not in REQUIRED_COLUMNS and all(v is None for v in values):
            continue
        if field.name in TENSOR_COLUMNS:
            array = tensor_column(values, latent_dtype)
        else:
            if pa.types.is_list(field.type) and pa.types.is_integer(field.type.value_type):
                values = [None if v is None else [int(x) for x in v] for v in values]
            elif pa.types.is_list(field.type):
                values = [None if v is None else np.asarray(v, dtype=np.float16) for v in values]
            array = pa.array(values, type=field.type)
        fields.append(field)
        arrays.append(array)
    schema = pa.schema(fields)
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(
        shard_metadata(schema, latent_dtype, latents, vit)))


def parquet_options(schema: pa.Schema) -> dict:
    """``pyarrow.parquet.write_table`` options for a table of ``schema``: tensors without a dictionary (for
    float16 a dictionary saves a few percent on small tensors and halves the read speed of large ones);
    float32 tensors byte-stream-split, which zstd then compresses better (DuckDB reads that split for float32,
    not for float16, so float16 stays plain)."""
    tensors = [f for f in schema if f.name in TENSOR_COLUMNS]
    split = [f.name for f in tensors if f.type.value_type == pa.float32()]
    return {"use_dictionary": [n for n in schema.names if n not in {f.name for f in tensors}],
            "column_encoding": {f"{name}.list.element": "BYTE_STREAM_SPLIT" for name in split} or None}


# ---------------------------------------------------------------------------------------------- reading
def shard_version(schema: pa.Schema) -> int:
    """2 for this layout, 1 for shards of raw bytes (by metadata, else by the tensor columns' type)."""
    recorded = (schema.metadata or {}).get(VERSION_KEY.encode())
    if recorded is not None:
        return int(recorded)
    binary = [n for n in schema.names if n in TENSOR_COLUMNS and pa.types.is_binary(schema.field(n).type)]
    return 1 if binary else SCHEMA_VERSION


def check_schema(schema: pa.Schema, where: str) -> int:
    """The shard's schema version; ValueError naming the column unless ``schema`` is a latent shard's (a
    required column missing, a known column of another type)."""
    for name in ("sample_id", "task"):
        if name not in schema.names:
            raise ValueError(f"{where}: not a latent shard, column {name!r} is missing")
    version = shard_version(schema)
    if version == 1:
        expected = LEGACY_SCHEMA
        for field in expected:
            absent_optional = field.name in LEGACY_OPTIONAL_COLUMNS and field.name not in schema.names
            if field.name.startswith(SLOTS[1:]) or absent_optional:
                continue
            if field.name not in schema.names:
                raise ValueError(f"{where}: not a latent shard, column {field.name!r} is missing")
    elif version == SCHEMA_VERSION:
        expected = SHARD_SCHEMA
    else:
        raise ValueError(f"{where}: latent shard schema version {version}; this code reads versions 1 and "
                         f"{SCHEMA_VERSION}")
    for name in schema.names:
        if name not in expected.names:
            continue
        found, wanted = schema.field(name).type, expected.field(name).type
        ok = found.equals(wanted) or (version == SCHEMA_VERSION and name in TENSOR_COLUMNS and found.equals(
            pa.list_(pa.float32())))
        if not ok:
            raise ValueError(f"{where}: column {name!r} has type {found}, expected {wanted}")
    return version


def dataset_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema over shards whose columns differ (columns no row filled are not written), for
    ``pyarrow.dataset.dataset(paths, schema=...)``."""
    return pa.unify_schemas([s.remove_metadata() for s in schemas])


def _legacy_array(data: bytes, shape, dtype: str | None) -> np.ndarray:
    """Version-1 bytes -> a numpy array (bfloat16 widened to float32, the others as stored)."""
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape))
    if not dtype:
        dtype = {2: "bfloat16", 4: "float32"}.get(len(data) // max(count, 1), "bfloat16")
    if dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)


def _legacy_dtype(row: dict, name: str) -> str | None:
    slot = name.split("_v")[0]
    return next((row[k] for k in (f"{slot}_vae_dtype", "target_vae_dtype", "source_vae_dtype") if row.get(k)),
                None)


def shard_rows(batch: pa.RecordBatch | pa.Table) -> list[dict]:
    """A shard's rows as dicts; a tensor cell is a numpy array in its shape (read-only, sharing the batch's
    memory; float16 or float32 as stored, a version-1 cell decoded), a null cell or a missing column None."""
    names = batch.schema.names
    tensors = [n for n in names if n in TENSOR_COLUMNS]
    rows = batch.select([n for n in names if n not in tensors]).to_pylist()
    for name in tensors:
        column = batch.column(name)
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        shape_key = shape_column(name)
        index = 0
        for chunk in chunks:
            if pa.types.is_binary(chunk.type):
                for data in chunk.to_pylist():
                    row = rows[index]
                    row[name] = (None if data is None or not len(data) else
                                 _legacy_array(data, row[shape_key], _legacy_dtype(row, name)))
                    index += 1
                continue
            flat = chunk.values.to_numpy(zero_copy_only=False)
            offsets = chunk.offsets.to_numpy()
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            for k in range(len(chunk)):
                row = rows[index]
                row[name] = flat[offsets[k]:offsets[k + 1]].reshape(row[shape_key]) if valid[k] else None
                index += 1
    return rows


def tensor(row: dict, name: str):
    """A tensor cell of a :func:`shard_rows` row as a float32 torch tensor (a copy); None if null or
    absent."""
    import torch

    value = row.get(name)
    if value is None:
        return None
    copy = torch.from_numpy(np.array(value))  # a writable copy in the stored dtype: torch widens faster
    return copy if copy.dtype == torch.float32 else copy.float()


def tensor_to_bytes(array, dtype: str) -> bytes:
    """A tensor -> version-1 bytes (little-endian ``dtype``: bfloat16, float16, float32), for writing shards
    of the old layout (tests and the benchmark compare the two)."""
    values = np.ascontiguousarray(_as_float32(array))
    if dtype == "bfloat16":
        return (_round_bfloat16(values.copy()).view(np.uint32) >> np.uint32(16)).astype("<u2").tobytes()
    return values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
