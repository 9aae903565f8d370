"""Sample filters. Each returns None to keep a sample or a short reason code to drop it."""

from __future__ import annotations

import numpy as np

from .config import FilterConfig


def size_reason(width: int, height: int, cfg: FilterConfig) -> str | None:
    if min(width, height) < cfg.min_side:
        return "too_small"
    if max(width, height) / min(width, height) > cfg.max_aspect:
        return "extreme_aspect"
    return None


def caption_reason(caption: str | None, cfg: FilterConfig) -> str | None:
    if caption is None or not caption.strip():
        return "missing_caption"
    if len(caption.strip()) < cfg.min_caption_chars:
        return "caption_too_short"
    if len(caption) > cfg.max_caption_chars:
        return "caption_too_long"
    return None


def duration_reason(seconds: float, cfg: FilterConfig) -> str | None:
    return "too_short" if seconds < cfg.min_duration_seconds else None


def motion_score(frames: np.ndarray) -> float:
    """Mean absolute difference of consecutive grey frames, in [0, 1] (two grey frames held at a time)."""
    if len(frames) < 2:
        return 0.0
    total = 0.0
    previous = frames[0].mean(axis=-1, dtype=np.float32)
    for frame in frames[1:]:
        grey = frame.mean(axis=-1, dtype=np.float32)
        total += float(np.abs(grey - previous).mean())
        previous = grey
    return total / (len(frames) - 1) / 255.0
