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


# ---------------------------------------------------------------------------------------------- near duplicates
PHASH_SIDE = 32
PHASH_LOW = 8
_DCT = np.cos(np.pi * (2 * np.arange(PHASH_SIDE)[None, :] + 1) * np.arange(PHASH_SIDE)[:, None] / (2 * PHASH_SIDE))
"""DCT-II basis: _DCT[k, n] = cos(pi (2n + 1) k / 2N); the unnormalised 2D DCT of X is _DCT @ X @ _DCT.T."""


def perceptual_hash(frame: np.ndarray) -> int:
    """64-bit pHash of an (H, W, 3) uint8 frame: the grey frame averaged down to 32 x 32, its 2D DCT, and
    one bit per coefficient of the lowest 8 x 8 frequencies: set where it is above their median."""
    from PIL import Image

    grey = Image.fromarray(np.ascontiguousarray(frame)).convert("L").resize((PHASH_SIDE, PHASH_SIDE),
                                                                            Image.Resampling.BOX)
    coefficients = _DCT @ np.asarray(grey, dtype=np.float64) @ _DCT.T
    low = coefficients[:PHASH_LOW, :PHASH_LOW].reshape(-1)
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def band_masks(distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of the ``distance + 1`` bands the 64 bits are cut into. Two hashes at most ``distance``
    bits apart differ in at most ``distance`` bands, so by the pigeonhole principle they agree exactly on
    at least one: looking up each band's value finds every pair within the distance."""
    count = distance + 1
    widths = [64 // count + (1 if k < 64 % count else 0) for k in range(count)]
    masks, shift = [], 0
    for width in widths:
        masks.append((shift, (1 << width) - 1))
        shift += width
    return masks


def band_keys(value: int, distance: int) -> list[int]:
    """One key per band of a 64-bit hash: the band's value and its number, so equal keys mean the same band
    holds the same bits."""
    return [((value >> shift) & mask) << 6 | band for band, (shift, mask) in enumerate(band_masks(distance))]


def within(a: tuple[int, ...], b: tuple[int, ...], distance: int) -> bool:
    """Whether two records' frame hashes are near duplicates: as many frames, each within ``distance`` bits."""
    return len(a) == len(b) and all(hamming(x, y) <= distance for x, y in zip(a, b))


def format_near_hash(values: list[int]) -> str:
    return ",".join(f"{v:016x}" for v in values)


def parse_near_hash(text: str) -> tuple[int, ...]:
    return tuple(int(part, 16) for part in text.split(",")) if text else ()
