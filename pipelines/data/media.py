"""One media slot of a record, from bytes to bucketed pixels.

:func:`open_media` reads what a video's container says (size, frame rate, length) without decoding a
frame, so the size, aspect and duration filters run first and a dropped video costs no decoding.
:func:`slot_clips` then streams its clips: each selected frame is resized to the slot's VAE bucket (and
ViT size) as it is decoded, the clip is handed on as row values, and nothing at source resolution stays
behind, however long the video.

Slots (:data:`SLOTS`, the shard's): ``target`` always; ``source`` for edits (i2i, v2v); ``ref_0``... for
subject-driven rows (task ``subject``), whose references are encoded as edit sources are (VAE latents and
ViT features at the edit area).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lance_core.shards import SLOTS

from .buckets import fit_bucket, resize_frame
from .config import FilterConfig, PrecomputeConfig, VideoConfig
from .decode import VideoInfo, decode_image, decode_video, media_kind, probe_video, video_clips
from .filters import duration_reason, motion_score, size_reason

VIDEO_TASKS = ("t2v", "i2v", "v2v", "v2t")
EDIT_TASKS = ("i2i", "v2v")
REFERENCE_SLOTS = tuple(slot for slot in SLOTS if slot.startswith("ref_"))
"""Reference slots of subject-driven rows, filled in order (at most this many references per row)."""


def uri_key(slot: str) -> str:
    """The record field holding the URI of a slot's media to fetch (``source_uri`` names the record itself,
    so the source slot's is ``source_uri_media``)."""
    return "source_uri_media" if slot == "source" else f"{slot}_uri"


def condition_slots(record: dict, task: str) -> tuple[str, ...]:
    """The slots besides ``target`` that a record of ``task`` is encoded with: the source of an edit, the
    references a subject-driven record names (those holding bytes or a URI)."""
    if task in EDIT_TASKS:
        return ("source",)
    if task == "subject":
        return tuple(slot for slot in REFERENCE_SLOTS
                     if record.get(f"{slot}_bytes") is not None or record.get(uri_key(slot)))
    return ()


def vit_for(slot: str, task: str, vit_tasks: tuple[str, ...]) -> bool:
    """Whether a slot gets ViT features: references always (subject-driven rows condition on them as the
    release does, a ViT span and a clean VAE span each); the target of an understanding task and an edit
    source when their task is in ``encoders.vit_tasks``."""
    if slot in REFERENCE_SLOTS:
        return True
    if slot == "target":
        return task in ("i2t", "v2t") and task in vit_tasks
    return task in vit_tasks


@dataclass
class Media:
    data: bytes
    width: int
    height: int
    video: VideoInfo | None
    """Container metadata of a video; None for an image."""
    image: np.ndarray | None
    """(H, W, 3) uint8 pixels of an image (images are decoded whole); None for a video."""

    @property
    def seconds(self) -> float:
        return self.video.seconds if self.video is not None else 0.0


def open_media(data: bytes, name: str, task: str, cfg: VideoConfig) -> Media:
    """A video is probed (no frame decoded), an image decoded; raises :class:`DecodeError`, for a video too
    short to give one clip of ``cfg.min_frames`` too."""
    if media_kind(name, data) == "video" or task in VIDEO_TASKS:
        info = probe_video(data)
        video_clips(info, cfg.fps, cfg.max_seconds, cfg.max_clip_seconds, cfg.stride_seconds,
                    cfg.max_clips_per_video, cfg.min_frames)
        return Media(data, info.width, info.height, info, None)
    pixels = decode_image(data).pixels
    return Media(data, pixels.shape[1], pixels.shape[0], None, pixels)


def media_reason(media: Media, cfg: FilterConfig) -> tuple[str, str] | None:
    """(stage, reason) of the first size / aspect / duration filter the media fails, from its header."""
    reason = size_reason(media.width, media.height, cfg)
    if reason:
        return "size", reason
    if media.video is not None and duration_reason(media.seconds, cfg):
        return "duration", "too_short"
    return None


@dataclass
class SlotClip:
    clip_index: int
    bucket: str
    motion: float
    """Mean frame difference of the bucketed frames (NaN for an image)."""
    values: dict
    """Row columns of the slot: ``<slot>_pixels``, ``_shape``, ``_width``, ``_height``, ``_frames``, ``_fps``
    and, with ViT input, ``<slot>_vit_pixels`` and ``_vit_shape``."""


def slot_clips(media: Media, slot: str, vit: bool, cfg: PrecomputeConfig) -> Iterator[SlotClip]:
    """The slot's clips (an image: one), bucketed, one at a time; video decode errors raise lazily."""
    is_video = media.video is not None
    area = cfg.buckets.video_area if is_video else cfg.buckets.image_area
    bucket = fit_bucket(media.width, media.height, area)
    width, height = bucket.crop_width, bucket.crop_height
    sizes = [bucket.view]
    if vit:  # an edit source or reference image goes to the ViT at the larger edit area, as in the release
        vit_area = cfg.buckets.vit_area_for(edit_source=slot != "target" and not is_video)
        sizes.append(fit_bucket(media.width, media.height, vit_area, crop=28).view)
    if is_video:
        v = cfg.video
        clips = ((c.clip_index, c.fps, (c.frames, *c.extra)) for c in decode_video(
            media.data, v.fps, v.max_seconds, v.stride_seconds, v.min_frames, v.max_clips_per_video,
            v.max_clip_seconds, tuple(sizes), media.video))
    else:
        clips = iter([(0, 0.0, tuple(resize_frame(media.image, *size)[None] for size in sizes))])
    for clip_index, fps, views in clips:
        frames = views[0]
        values = {f"{slot}_pixels": frames.tobytes(), f"{slot}_shape": [len(frames), height, width, 3],
                  f"{slot}_width": media.width, f"{slot}_height": media.height, f"{slot}_frames": len(frames),
                  f"{slot}_fps": fps}
        if vit:
            values[f"{slot}_vit_pixels"] = views[1].tobytes()
            values[f"{slot}_vit_shape"] = list(views[1].shape)
        motion = motion_score(frames) if is_video else float("nan")
        del views, frames
        yield SlotClip(clip_index, bucket.name, motion, values)
