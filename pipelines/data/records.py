"""One input record -> zero or more sample rows (decode, filter, bucket), or a filtered / quarantined row.

Rows share one flat schema (:data:`ROW_DEFAULTS`) so Ray Data blocks concatenate: pixels travel as raw
uint8 bytes with their shape. Every record ends as exactly one of: written sample row(s), one filtered
row, one quarantined row; the writer counts them per partition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from lance_core.shards import sample_id
from pipelines.runtime.storage import fetch_bytes, is_environment_failure

from .config import PrecomputeConfig
from .decode import DecodeError
from .filters import caption_reason, format_near_hash, perceptual_hash
from .media import SLOTS, condition_slots, media_reason, open_media, slot_clips, uri_key, vit_for

ROW_DEFAULTS: dict = {
    "partition": -1, "record_index": -1, "source_uri": "", "status": "ok", "stage": "", "reason": "", "error": "",
    "task": "", "caption": "", "system": "", "question": "", "answer": "", "clip_index": 0,
    "content_sha256": "", "sample_id": "", "bucket": "", "motion": float("nan"), "row_seq": -1,
    "partition_rows": -1, "near_hash": "", "media": "",
    "clip_score": float("nan"), "text_area": float("nan"), "clip_embedding": b"",
    **{f"{slot}_{name}": default for slot in SLOTS for name, default in (
        ("pixels", b""), ("shape", []), ("vit_pixels", b""), ("vit_shape", []), ("width", 0), ("height", 0),
        ("frames", 0), ("fps", 0.0))},
}


def _row(record: dict, partition: int, index: int, **values) -> dict:
    row = dict(ROW_DEFAULTS)
    row.update(partition=partition, record_index=index, source_uri=record.get("source_uri", ""))
    for key in ("task", "caption", "system", "question", "answer", "media"):
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
    uri = record.get(uri_key(slot))
    if not uri:
        raise FileNotFoundError(f"the record names no {slot} media")
    return fetch_bytes(uri, cfg.storage)


def process_record(record: dict, partition: int, index: int, cfg: PrecomputeConfig) -> list[dict]:
    """Every row of :func:`record_rows` at once (tests and benches; the pipeline streams them)."""
    return list(record_rows(record, partition, index, cfg))


def record_rows(record: dict, partition: int, index: int, cfg: PrecomputeConfig) -> Iterator[dict]:
    """Read, decode, filter and bucket one record, yielding its rows one at a time: a video's clips are
    handed on as they are decoded, so a task holds one clip of a long video, not all of them.

    A record that fails after some clips were yielded ends with a quarantined row; the writer then
    quarantines the whole record (a record is written whole or not at all)."""
    if "error" in record:
        yield dropped(record, partition, index, "quarantined", "read", record.get("error_reason", "bad_record"),
                      record["error"])
        return
    if "filtered_reason" in record:  # the source marks the sample failed (img2dataset's status)
        yield dropped(record, partition, index, "filtered", "read", record["filtered_reason"])
        return
    task = record.get("task") or "t2i"
    caption = record.get("caption")
    if caption == "\0invalid-utf8":
        yield dropped(record, partition, index, "quarantined", "read", "caption_not_utf8")
        return
    text = caption if task not in ("i2t", "v2t") else record.get("answer")
    reason = caption_reason(text, cfg.filters)
    if reason:
        yield dropped(record, partition, index, "filtered", "caption", reason)
        return
    conditions = condition_slots(record, task)
    try:
        if task == "subject" and not conditions:
            raise FileNotFoundError("the record names no reference media (ref_0, ...)")
        target_data = _media_bytes(record, "target", cfg)
        condition_data = {slot: _media_bytes(record, slot, cfg) for slot in conditions}
    except FileNotFoundError as err:
        yield dropped(record, partition, index, "quarantined", "read", "missing_file", str(err))
        return
    except Exception as err:  # noqa: BLE001 - storage errors of any client
        if is_environment_failure(err):
            raise  # the storage's failure, not the record's: the task fails and a rerun reads it again
        yield dropped(record, partition, index, "quarantined", "read", "storage_error", str(err))
        return
    content = hashlib.sha256(target_data + b"".join(condition_data.values())).hexdigest()
    # Videos are probed, not decoded, until the size / aspect / duration filters have passed them; their
    # clips then stream (decoded, bucketed and handed on one at a time).
    try:
        target = open_media(target_data, record.get("target_name", ""), task, cfg.video)
        conditioning = {slot: open_media(data, record.get(f"{slot}_name", ""), task, cfg.video)
                        for slot, data in condition_data.items()}
    except DecodeError as err:
        yield dropped(record, partition, index, "quarantined", "decode", err.reason, err.detail)
        return
    for media in (target, *conditioning.values()):
        failed = media_reason(media, cfg.filters)
        if failed:
            yield dropped(record, partition, index, "filtered", *failed)
            return
    vit_tasks = cfg.encoders.vit_tasks
    yielded = 0
    near = ""
    try:
        condition_clips = {slot: slot_clips(media, slot, vit_for(slot, task, vit_tasks), cfg)
                           for slot, media in conditioning.items()}
        condition_values: dict = {}
        for clip in slot_clips(target, "target", vit_for("target", task, vit_tasks), cfg):
            for clips in condition_clips.values():
                # the clip of the same index, or a shorter source's last (an image: its one clip)
                condition_clip = next(clips, None)
                if condition_clip is not None:
                    condition_values.update(condition_clip.values)
            static = cfg.filters.motion_min is not None and clip.motion < cfg.filters.motion_min
            if static and target.video is not None:
                continue
            if cfg.filters.near_dedup and not near:
                near = near_hash({**clip.values, **condition_values})
            yield _row(record, partition, index, clip_index=clip.clip_index, content_sha256=content,
                       near_hash=near, sample_id=sample_id(record["source_uri"], content, clip.clip_index),
                       bucket=clip.bucket, motion=clip.motion, **clip.values, **condition_values)
            yielded += 1
    except DecodeError as err:
        yield dropped(record, partition, index, "quarantined", "decode", err.reason, err.detail)
        return
    if not yielded:
        yield dropped(record, partition, index, "filtered", "motion", "static_video")


NEAR_HASH_FRAMES = 3


def near_hash(values: dict) -> str:
    """The record's perceptual hashes, from the row values of its first clip: one per image, or of
    ``NEAR_HASH_FRAMES`` frames evenly spaced over a video clip; the target's, then the source's."""
    hashes = []
    for slot in ("target", "source"):
        data = values.get(f"{slot}_pixels")
        if not data:
            continue
        frames = np.frombuffer(data, dtype=np.uint8).reshape(values[f"{slot}_shape"])
        picks = np.linspace(0, len(frames) - 1, min(NEAR_HASH_FRAMES, len(frames))).round().astype(int)
        hashes += [perceptual_hash(frames[k]) for k in picks]
    return format_near_hash(hashes)


def _arrow_type(name: str, sample):
    import pyarrow as pa

    if name.endswith(("_shape", "_grid")):
        return pa.list_(pa.int64())
    if name.endswith(("_pixels", "_vae", "_vae_std", "_vit", "_embedding")):
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
