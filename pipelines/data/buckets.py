"""Aspect buckets, as the released Lance data transforms compute them (``BucketResize`` then
``DivisibleCrop``).

For each aspect ratio of 21:9, 16:9, 4:3, 1:1, 3:4, 9:16 and a target area, the bucket's sides are multiples
of the stride (16). A source goes to the bucket whose own width / height ratio is nearest to its own (plain
difference of ratios; the first of the list on a tie), is centre-cropped to that ratio and resized to the
bucket, then centre-cropped again so each side is a multiple of the crop factor: 16 for the VAE (no change),
28 for the ViT (patch 14, merge 2). 854x480 gives 848x480 at 640² (VAE video) and 832x464 -> 812x448 at 616²
(ViT).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

ASPECTS = {"21:9": 21 / 9, "16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16}
STRIDE = 16
"""Sides of every bucket are multiples of this (the release's ``stride`` in all its settings)."""


class Bucket(NamedTuple):
    """Where a source goes: resized to ``width`` x ``height`` (the bucket), then centre-cropped to
    ``crop_width`` x ``crop_height``, the size the encoder receives."""

    name: str
    width: int
    height: int
    crop_width: int
    crop_height: int

    @property
    def view(self) -> tuple[int, int, int, int]:
        """(crop width, crop height, bucket width, bucket height): the arguments of :func:`resize_frame`."""
        return self.crop_width, self.crop_height, self.width, self.height


def _round_to(value: float, multiple: int) -> int:
    """Nearest multiple (Python rounding: halves to even), at least one multiple."""
    return max(1, round(value / multiple)) * multiple


def bucket_size(aspect: float, target_area: int, stride: int = STRIDE) -> tuple[int, int]:
    """(width, height) of one aspect's bucket: multiples of ``stride``, its ratio nearest to ``aspect``.

    Two candidates are rounded: from the width (width = sqrt(area * aspect), then height = width / aspect) and
    from the height (height = sqrt(area / aspect), then width = height * aspect). The one whose ratio is
    nearer to ``aspect`` wins; on a tie, the one whose area is nearer to ``target_area`` (the width-first one
    when those tie too). At 768²: 4:3 -> 896x672, 21:9 -> 1152x496.
    """
    width1 = _round_to(math.sqrt(target_area * aspect), stride)
    height1 = _round_to(width1 / aspect, stride)
    height2 = _round_to(math.sqrt(target_area / aspect), stride)
    width2 = _round_to(height2 * aspect, stride)
    miss1, miss2 = abs(width1 / height1 - aspect), abs(width2 / height2 - aspect)
    if miss1 == miss2:
        miss1, miss2 = abs(width1 * height1 - target_area), abs(width2 * height2 - target_area)
        return (width1, height1) if miss1 <= miss2 else (width2, height2)
    return (width1, height1) if miss1 < miss2 else (width2, height2)


@lru_cache(maxsize=64)
def _bucket_table(target_area: int, stride: int, aspects: tuple[tuple[str, float], ...]
                  ) -> tuple[tuple[str, int, int], ...]:
    return tuple((name, *bucket_size(aspect, target_area, stride)) for name, aspect in aspects)


def bucket_table(target_area: int, stride: int = STRIDE,
                 aspects: dict[str, float] = ASPECTS) -> tuple[tuple[str, int, int], ...]:
    """(name, width, height) of every bucket at ``target_area``, in the order of ``aspects``."""
    return _bucket_table(target_area, stride, tuple(aspects.items()))


def nearest_bucket(width: int, height: int, table: tuple[tuple[str, int, int], ...]) -> tuple[str, int, int]:
    """The bucket of ``table`` whose width / height is nearest to the source's (the first one on a tie).

    The distance is the plain difference of ratios, measured to the bucket's rounded sides, not to its
    nominal aspect: at 640², 1.55 goes to 4:3 (752x560) and 1.56 to 16:9 (848x480).
    """
    ratio = width / height
    return min(table, key=lambda bucket: abs(ratio - bucket[1] / bucket[2]))


def divisible_crop(width: int, height: int, factor: int) -> tuple[int, int]:
    """Each side cut down to a multiple of ``factor``; raises ValueError when a side would vanish."""
    cropped = (width - width % factor, height - height % factor)
    if min(cropped) < 1:
        raise ValueError(f"a {width}x{height} bucket has no side that is a multiple of {factor}: "
                         f"raise its target area")
    return cropped


def fit_bucket(width: int, height: int, target_area: int, crop: int = STRIDE, stride: int = STRIDE,
               aspects: dict[str, float] = ASPECTS) -> Bucket:
    """The bucket of a ``width`` x ``height`` source at ``target_area``, and its size after the crop to
    multiples of ``crop`` (16 for the VAE, 28 for the ViT)."""
    name, bucket_w, bucket_h = nearest_bucket(width, height, bucket_table(target_area, stride, aspects))
    return Bucket(name, bucket_w, bucket_h, *divisible_crop(bucket_w, bucket_h, crop))


def bucket_for(width: int, height: int, target_area: int, multiple: int = STRIDE,
               aspects: dict[str, float] = ASPECTS) -> tuple[str, int, int]:
    """(name, width, height) the encoder receives: the bucket of :func:`fit_bucket` cropped to multiples of
    ``multiple`` (16: the VAE input; 28: the ViT input)."""
    bucket = fit_bucket(width, height, target_area, crop=multiple, aspects=aspects)
    return bucket.name, bucket.crop_width, bucket.crop_height


def _ratio_box(src_w: int, src_h: int, ratio: float) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the largest centred box of the source with width / height = ``ratio``."""
    if src_w / src_h < ratio:
        box_w, box_h = src_w, max(1, round(src_w / ratio))
    elif src_w / src_h > ratio:
        box_w, box_h = max(1, round(src_h * ratio)), src_h
    else:
        box_w, box_h = src_w, src_h
    return (src_w - box_w) // 2, (src_h - box_h) // 2, box_w, box_h


def resize_center_crop(frames: np.ndarray, width: int, height: int, bucket_width: int | None = None,
                       bucket_height: int | None = None) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, height, width) float in [0, 1].

    The centred box of the bucket's ratio is cut from the source and resized (bicubic) to ``bucket_width`` x
    ``bucket_height`` (default: the output size), whose centre ``width`` x ``height`` is kept.
    """
    bucket_width, bucket_height = bucket_width or width, bucket_height or height
    video = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2)
    _, _, src_h, src_w = video.shape
    left, top, box_w, box_h = _ratio_box(src_w, src_h, bucket_width / bucket_height)
    video = video[:, :, top:top + box_h, left:left + box_w].float() / 255.0
    video = F.interpolate(video, size=(bucket_height, bucket_width), mode="bicubic", align_corners=False,
                          antialias=True)
    top, left = round((bucket_height - height) / 2), round((bucket_width - width) / 2)
    return video[:, :, top:top + height, left:left + width].clamp(0, 1)


def resize_frame(frame: np.ndarray, width: int, height: int, bucket_width: int | None = None,
                 bucket_height: int | None = None) -> np.ndarray:
    """One (H, W, 3) uint8 frame -> (height, width, 3) uint8, as :func:`resize_center_crop` resizes each frame
    of a clip: decoders resize frame by frame, so no clip is ever held at source resolution."""
    resized = resize_center_crop(frame[None], width, height, bucket_width, bucket_height)[0]
    return (resized * 255).round().byte().permute(1, 2, 0).numpy()
