"""One input record -> zero or more sample rows (decode, filter, bucket), or a filtered / quarantined row.

Rows share one flat schema (:data:`ROW_DEFAULTS`) so Ray Data blocks concatenate: pixels travel as raw
uint8 bytes with their shape. Every record ends as exactly one of: written sample row(s), one filtered
row, one quarantined row; the writer counts them per partition.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from lance_core.shards import sample_id

from .buckets import bucket_for, resize_center_crop
from .config import PrecomputeConfig
from .decode import DecodeError, decode_image, decode_video, media_kind
from .filters import caption_reason, duration_reason, motion_score, size_reason
from .sources import fetch_bytes

ROW_DEFAULTS: dict = {
    "partition": -1, "record_index": -1, "source_uri": "", "status": "ok", "stage": "", "reason": "", "error": "",
    "task": "", "caption": "", "system": "", "question": "", "answer": "", "clip_index": 0,
    "content_sha256": "", "sample_id": "", "bucket": "", "motion": float("nan"),
    "clip_score": float("nan"), "text_area": float("nan"),
    **{f"{slot}_{name}": default for slot in ("target", "source") for name, default in (
        ("pixels", b""), ("shape", []), ("vit_pixels", b""), ("vit_shape", []), ("width", 0), ("height", 0),
        ("frames", 0), ("fps", 0.0))},
}
VIDEO_TASKS = ("t2v", "i2v", "v2v", "v2t")


def _row(record: dict, partition: int, index: int, **values) -> dict:
    row = dict(ROW_DEFAULTS)
    row.update(partition=partition, record_index=index, source_uri=record.get("source_uri", ""))
    for key in ("task", "caption", "system", "question", "answer"):
        if record.get(key) is not None:
            row[key] = record[key]
    row.update(values)
    return row


def dropped(record: dict, partition: int, index: int, status: str, stage: str, reason: str, error: str = ""):
    return _row(record, partition, index, status=status, stage=stage, reason=reason, error=error[:2000])


def _media_bytes(record: dict, slot: str, cfg: PrecomputeConfig) -> bytes:
    data = record.get(f"{slot}_bytes")
    if data is not None:
        return data
    uri = record.get(f"{slot}_uri") if slot == "target" else record.get("source_uri_media")
    if not uri:
        raise FileNotFoundError(f"the record names no {slot} media")
    return fetch_bytes(uri, cfg.storage)


def _vit_size(width: int, height: int, cfg: PrecomputeConfig) -> tuple[int, int]:
    _, w, h = bucket_for(width, height, cfg.buckets.vit_area, multiple=28)
    return w, h


def _slot_values(slot: str, frames: np.ndarray, fps: float, needs_vit: bool, cfg: PrecomputeConfig,
                 area: int) -> dict:
    count, height, width, _ = frames.shape
    bucket, bw, bh = bucket_for(width, height, area)
    resized = (resize_center_crop(frames, bw, bh) * 255).round().byte()
    values = {f"{slot}_pixels": resized.permute(0, 2, 3, 1).numpy().tobytes(),
              f"{slot}_shape": [count, bh, bw, 3], f"{slot}_width": width, f"{slot}_height": height,
              f"{slot}_frames": count, f"{slot}_fps": fps}
    if needs_vit:
        vw, vh = _vit_size(width, height, cfg)
        vit = (resize_center_crop(frames, vw, vh) * 255).round().byte()
        values[f"{slot}_vit_pixels"] = vit.permute(0, 2, 3, 1).numpy().tobytes()
        values[f"{slot}_vit_shape"] = [count, vh, vw, 3]
    return values, bucket


def _decode_slot(data: bytes, name: str, task: str, cfg: PrecomputeConfig):
    """-> list of (frames (T, H, W, 3), fps, clip_index)."""
    if media_kind(name, data) == "video" or task in VIDEO_TASKS:
        v = cfg.video
        return [(c.frames, c.fps, c.clip_index) for c in decode_video(
            data, v.fps, v.max_seconds, v.stride_seconds, v.min_frames, v.max_clips_per_video)]
    return [(decode_image(data).pixels[None], 0.0, 0)]


def process_record(record: dict, partition: int, index: int, cfg: PrecomputeConfig) -> list[dict]:
    """Read, decode, filter and bucket one record."""
    if "error" in record:
        return [dropped(record, partition, index, "quarantined", "read", "bad_record", record["error"])]
    task = record.get("task") or "t2i"
    caption = record.get("caption")
    if caption == "\0invalid-utf8":
        return [dropped(record, partition, index, "quarantined", "read", "caption_not_utf8")]
    text = caption if task not in ("i2t", "v2t") else record.get("answer")
    reason = caption_reason(text, cfg.filters)
    if reason:
        return [dropped(record, partition, index, "filtered", "caption", reason)]
    try:
        target_data = _media_bytes(record, "target", cfg)
        source_data = _media_bytes(record, "source", cfg) if task in ("i2i", "v2v") else None
    except FileNotFoundError as err:
        return [dropped(record, partition, index, "quarantined", "read", "missing_file", str(err))]
    except Exception as err:  # noqa: BLE001 - storage errors of any client
        return [dropped(record, partition, index, "quarantined", "read", "storage_error", str(err))]
    content = hashlib.sha256(target_data + (source_data or b"")).hexdigest()
    try:
        clips = _decode_slot(target_data, record.get("target_name", ""), task, cfg)
        source_clips = (_decode_slot(source_data, record.get("source_name", ""), task, cfg)
                        if source_data is not None else None)
    except DecodeError as err:
        return [dropped(record, partition, index, "quarantined", "decode", err.reason, err.detail)]
    frames0 = clips[0][0]
    reason = size_reason(frames0.shape[2], frames0.shape[1], cfg.filters)
    if reason:
        return [dropped(record, partition, index, "filtered", "size", reason)]
    if clips[0][1] and duration_reason(len(frames0) / clips[0][1], cfg.filters):
        return [dropped(record, partition, index, "filtered", "duration", "too_short")]
    needs_vit = task in cfg.encoders.vit_tasks
    rows = []
    for frames, fps, clip_index in clips:
        motion = motion_score(frames) if fps else float("nan")
        if cfg.filters.motion_min is not None and fps and motion < cfg.filters.motion_min:
            continue
        area = cfg.buckets.video_area if fps else cfg.buckets.image_area
        values, bucket = _slot_values("target", frames, fps, needs_vit and task in ("i2t", "v2t"), cfg, area)
        if source_clips is not None:
            src_frames, src_fps, _ = source_clips[min(clip_index, len(source_clips) - 1)]
            src_values, _ = _slot_values("source", src_frames, src_fps, needs_vit, cfg, area)
            values.update(src_values)
        rows.append(_row(record, partition, index, clip_index=clip_index, content_sha256=content,
                         sample_id=sample_id(record["source_uri"], content, clip_index), bucket=bucket,
                         motion=motion, **values))
    if not rows:
        return [dropped(record, partition, index, "filtered", "motion", "static_video")]
    return rows


def frames_from_row(row: dict, slot: str, vit: bool = False) -> np.ndarray:
    key = f"{slot}_vit" if vit else slot
    shape = tuple(int(s) for s in row[f"{key}_shape"])
    return np.frombuffer(row[f"{key}_pixels"], dtype=np.uint8).reshape(shape)


def is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _arrow_type(name: str, sample):
    import pyarrow as pa

    if name.endswith(("_shape", "_grid")):
        return pa.list_(pa.int64())
    if name.endswith(("_pixels", "_vae", "_vit")):
        return pa.binary()
    if isinstance(sample, bool):
        return pa.bool_()
    if isinstance(sample, int):
        return pa.int64()
    if isinstance(sample, float):
        return pa.float64()
    return pa.string()


def to_arrow(columns: dict[str, list]):
    """Rows as an Arrow table with types fixed by column name, so blocks of any content concatenate."""
    import pyarrow as pa

    fields, arrays = [], []
    for name, values in columns.items():
        sample = next((v for v in values if v is not None), ROW_DEFAULTS.get(name, ""))
        kind = _arrow_type(name, sample)
        if pa.types.is_list(kind):
            values = [[int(x) for x in v] if v is not None else [] for v in values]
        fields.append(pa.field(name, kind))
        arrays.append(pa.array(values, type=kind))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def frame_to_arrow(frame):
    return to_arrow({name: list(frame[name]) for name in frame.columns})
