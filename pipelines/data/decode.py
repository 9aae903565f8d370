"""Decoding media bytes: images with Pillow, videos with PyAV (bounded clips at a fixed frame rate).

Errors raise :class:`DecodeError` with a short reason code; the pipeline turns them into quarantine records.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default bomb limit (about 0.25 GB of RGBA)


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    pixels: np.ndarray
    """(H, W, 3) uint8 RGB."""


@dataclass
class DecodedClip:
    frames: np.ndarray
    """(T, H, W, 3) uint8 RGB, T = 4k + 1."""
    fps: float
    start_seconds: float
    clip_index: int


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> DecodedImage:
    """EXIF orientation applied; palette / RGBA / LA composited on white; CMYK, 16-bit and grey to RGB."""
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise DecodeError("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
            image = ImageOps.exif_transpose(probe)
            image.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise DecodeError("decompression_bomb", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError("undecodable_image", str(err) or type(err).__name__) from None
    return DecodedImage(_to_rgb(image))


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def snap_frames(count: int, temporal_ratio: int = 4) -> int:
    """Largest 4k + 1 not above ``count`` (0 when fewer than one frame)."""
    return 0 if count < 1 else ((count - 1) // temporal_ratio) * temporal_ratio + 1


def decode_video(
    data: bytes, fps: float = 12.0, max_seconds: float = 6.0, stride_seconds: float | None = None,
    min_frames: int = 5, max_clips: int = 64,
):
    """Yield clips of at most ``max_seconds`` sampled at ``fps``, each 4k + 1 frames.

    Frames are taken by presentation time, so variable frame rate sources are resampled correctly. Only
    the current clip's frames are held in memory, whatever the video's length."""
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    import av

    try:
        container = av.open(io.BytesIO(data))
    except (av.FFmpegError, ValueError, OSError) as err:
        raise DecodeError("undecodable_video", str(err)) from None
    with container:
        if not container.streams.video:
            raise DecodeError("no_video_stream", "the container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        clip_frames = snap_frames(int(math.floor(max_seconds * fps)) + 1)
        stride = stride_seconds or max_seconds
        step = 1.0 / fps
        clip: list[np.ndarray] = []
        clip_start = 0.0
        next_time = 0.0
        clip_index = 0
        produced = 0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                while frame.time + 1e-6 >= next_time:
                    if not clip:
                        clip_start = next_time
                    clip.append(frame.to_ndarray(format="rgb24"))
                    next_time += step
                    if len(clip) == clip_frames:
                        yield DecodedClip(np.stack(clip), fps, clip_start, clip_index)
                        produced += 1
                        clip_index += 1
                        if clip_index >= max_clips:
                            return
                        clip = []
                        next_time = clip_start + stride
                        break
        except (av.FFmpegError, ValueError) as err:
            if produced == 0 and len(clip) < min_frames:
                raise DecodeError("corrupt_video", str(err)) from None
        tail = snap_frames(len(clip))
        if tail >= min_frames:
            yield DecodedClip(np.stack(clip[:tail]), fps, clip_start, clip_index)
            produced += 1
        if produced == 0:
            raise DecodeError("video_too_short", f"fewer than {min_frames} frames at {fps:g} fps")


def media_kind(name: str, data: bytes) -> str:
    """'image' or 'video' from the extension, else from the leading bytes."""
    lower = name.lower()
    if lower.endswith((".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")):
        return "video"
    if lower.endswith((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")):
        return "image"
    head = data[:12]
    if head[4:8] == b"ftyp" or head[:4] == b"\x1aE\xdf\xa3":
        return "video"
    return "image"
