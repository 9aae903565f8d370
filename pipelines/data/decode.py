"""Decoding media bytes: images with Pillow, videos with PyAV, clip by clip with the Lance release's frame
sampler (4k + 1 frames spread over each clip); a video's size, rate and length come from its container
before any frame is decoded.

Errors raise :class:`DecodeError` with a short reason code; the pipeline turns them into quarantine records.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default bomb limit (about 0.25 GB of RGBA)
MAX_VIDEO_FRAME_PIXELS = MAX_IMAGE_PIXELS
"""Largest video frame (width x height, from the container) that is decoded; a larger one is refused as
``decompression_bomb`` before any frame is (one 12000x12000 MJPEG frame in 4.8 MB of file took 4.95 GB)."""


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    pixels: np.ndarray
    """(H, W, 3) uint8 RGB."""


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


# ---------------------------------------------------------------------------------------------- frame sampler
def sample_clip_indices(total_frames: int, source_fps: float, sample_fps: float = 12.0,
                        max_seconds: float = 6.0, temporal_ratio: int = 4) -> list[int]:
    """Frame indices the Lance release takes from a clip of ``total_frames`` frames.

    The count is the clip's duration (at most ``max_seconds``) times ``sample_fps``, rounded, then snapped
    down to 4k + 1; the frames are spread evenly over the whole clip, first to last. A longer clip keeps
    the count of ``max_seconds`` and spreads it further: 6 s at 24 fps -> 69 of 144 frames, 8 s -> 69 of
    192. The source rate is rounded to whole frames per second, as the release reads it."""
    fps = max(1, round(source_fps))
    seconds = min(total_frames / fps, max_seconds)
    count = snap_frames(round(seconds * sample_fps), temporal_ratio)
    if total_frames < 1 or count < 1:
        return []
    return np.linspace(0, total_frames - 1, count, dtype=int).tolist()


def plan_clips(total_frames: int, source_fps: float, sample_fps: float = 12.0, max_seconds: float = 6.0,
               max_clip_seconds: float = 8.0, stride_seconds: float | None = None, max_clips: int = 64,
               temporal_ratio: int = 4) -> list[list[int]]:
    """Source frame indices of each clip of a video, in order.

    Clip k starts at k * ``stride_seconds`` (default ``max_seconds``). When what is left of the video from
    there is at most ``max_clip_seconds`` long, the clip takes all of it and is the last one (a video up to
    that length is one clip, as in the release); otherwise it spans ``max_seconds``. Each clip's frames
    come from :func:`sample_clip_indices`."""
    fps = max(1, round(source_fps))
    stride = stride_seconds or max_seconds
    clips: list[list[int]] = []
    for k in range(max_clips):
        start = round(k * stride * fps)
        if start >= total_frames:
            break
        remaining = total_frames - start
        last = remaining <= max_clip_seconds * fps + 1e-9
        length = remaining if last else min(remaining, round(max_seconds * fps))
        taken = sample_clip_indices(length, fps, sample_fps, max_seconds, temporal_ratio)
        clips.append([start + i for i in taken])
        if last:
            break
    return clips


# ---------------------------------------------------------------------------------------------- video
@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream; read without decoding a frame."""

    width: int
    height: int
    fps: float
    """Average frame rate."""
    frames: int
    """Frame count: the container's, else duration x rate."""
    seconds: float


@dataclass
class DecodedClip:
    frames: np.ndarray
    """(T, H, W, 3) uint8 RGB, T = 4k + 1: at source resolution, or at the first of the requested sizes."""
    fps: float
    """Frame rate of the sampled frames: (T - 1) over the time from the first to the last."""
    start_seconds: float
    clip_index: int
    indices: tuple[int, ...] = ()
    """Source frame indices taken."""
    extra: tuple[np.ndarray, ...] = ()
    """The same frames at each further requested size."""


def _open_video(data: bytes):
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    import av

    try:
        container = av.open(io.BytesIO(data))
    except (av.FFmpegError, ValueError, OSError) as err:
        raise DecodeError("undecodable_video", str(err)) from None
    if not container.streams.video:
        container.close()
        raise DecodeError("no_video_stream", "the container has no video stream")
    return container, container.streams.video[0]


def _stream_info(container, stream) -> VideoInfo:
    import av

    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        seconds = 0.0
    frames = int(stream.frames or 0) or round(seconds * fps)
    if not seconds and fps:
        seconds = frames / fps
    width = stream.codec_context.width or stream.width or 0
    height = stream.codec_context.height or stream.height or 0
    if width < 1 or height < 1 or fps <= 0:
        raise DecodeError("undecodable_video",
                          f"the container gives no size or frame rate ({width}x{height}, {fps:g} fps)")
    if width * height > MAX_VIDEO_FRAME_PIXELS:
        raise DecodeError("decompression_bomb",
                          f"{width}x{height} frames exceed {MAX_VIDEO_FRAME_PIXELS} pixels")
    return VideoInfo(int(width), int(height), fps, frames, seconds)


def probe_video(data: bytes) -> VideoInfo:
    """Size, frame rate, frame count and duration from the container's metadata; no frame is decoded.
    Frames above :data:`MAX_VIDEO_FRAME_PIXELS` raise ``decompression_bomb``."""
    container, stream = _open_video(data)
    with container:
        return _stream_info(container, stream)


class _ClipBuffer:
    """Frames of one planned clip, written in place as the decoder reaches its indices."""

    def __init__(self, clip_index: int, indices: list[int]) -> None:
        self.clip_index, self.indices = clip_index, indices
        self.views: list[np.ndarray] = []
        self.filled = 0

    def take(self, index: int, views: tuple[np.ndarray, ...]) -> None:
        if not self.views:
            self.views = [np.empty((len(self.indices), *v.shape), dtype=v.dtype) for v in views]
        while self.filled < len(self.indices) and self.indices[self.filled] == index:
            for buffer, view in zip(self.views, views):
                buffer[self.filled] = view
            self.filled += 1

    def result(self, count: int, rate: int, sample_fps: float) -> DecodedClip:
        taken = self.indices[:count]
        span = (taken[-1] - taken[0]) / rate
        views = [v[:count] if count == len(self.indices) else v[:count].copy() for v in self.views]
        return DecodedClip(views[0], (count - 1) / span if span > 0 else sample_fps, taken[0] / rate,
                           self.clip_index, tuple(taken), tuple(views[1:]))


def video_clips(info: VideoInfo, fps: float = 12.0, max_seconds: float = 6.0, max_clip_seconds: float = 8.0,
                stride_seconds: float | None = None, max_clips: int = 64,
                min_frames: int = 5) -> list[tuple[int, list[int]]]:
    """(clip index, source frame indices) of the clips of at least ``min_frames`` that :func:`decode_video`
    takes, from the container's metadata; raises ``video_too_short`` when there is none."""
    plans = plan_clips(info.frames, info.fps, fps, max_seconds, max(max_clip_seconds, max_seconds),
                       stride_seconds, max_clips)
    clips = [(k, indices) for k, indices in enumerate(plans) if len(indices) >= min_frames]
    if not clips:
        raise DecodeError("video_too_short", f"fewer than {min_frames} frames at {fps:g} fps "
                                             f"({info.frames} frames at {info.fps:g} fps)")
    return clips


def _frame_views(frame, sizes) -> tuple[np.ndarray, ...]:
    rgb = frame.to_ndarray(format="rgb24")
    if not sizes:
        return (rgb,)
    from .buckets import resize_frame

    return tuple(resize_frame(rgb, *size) for size in sizes)


def decode_video(
    data: bytes, fps: float = 12.0, max_seconds: float = 6.0, stride_seconds: float | None = None,
    min_frames: int = 5, max_clips: int = 64, max_clip_seconds: float = 8.0,
    sizes: tuple[tuple[int, ...], ...] = (), info: VideoInfo | None = None,
):
    """Yield the clips of :func:`plan_clips` one at a time, each 4k + 1 frames.

    One pass of the decoder over the video; a frame is converted to RGB only when a clip takes it, and
    resized at once to each size of ``sizes`` when sizes are given: (width, height), or (width, height,
    bucket width, bucket height) as :func:`~pipelines.data.buckets.resize_frame` takes them,
    so only the clips in flight are held, at their output size, whatever the video's length. Frames are
    counted in decode order, as the release's reader counts them. A clip the stream ends before (the
    container's frame count was too high) is kept with the frames it got, snapped to 4k + 1."""
    import av

    container, stream = _open_video(data)
    with container:
        info = info or _stream_info(container, stream)
        rate = max(1, round(info.fps))
        waiting = [_ClipBuffer(k, indices) for k, indices in video_clips(
            info, fps, max_seconds, max_clip_seconds, stride_seconds, max_clips, min_frames)]
        stream.thread_type = "AUTO"
        active: list[_ClipBuffer] = []
        produced = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                while waiting and waiting[0].indices[0] <= index:
                    active.append(waiting.pop(0))
                wanted = [clip for clip in active if clip.indices[clip.filled] == index]
                if wanted:
                    views = _frame_views(frame, sizes)
                    for clip in wanted:
                        clip.take(index, views)
                    del views
                for clip in [c for c in active if c.filled == len(c.indices)]:
                    active.remove(clip)
                    yield clip.result(clip.filled, rate, fps)
                    produced += 1
                if not active and not waiting:
                    return
        except (av.FFmpegError, ValueError) as err:
            if produced == 0 and all(snap_frames(c.filled) < min_frames for c in active):
                raise DecodeError("corrupt_video", str(err)) from None
        for clip in active:
            count = snap_frames(clip.filled)
            if count >= min_frames:
                yield clip.result(count, rate, fps)
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
