"""Aspect buckets: the nearest of 21:9, 16:9, 4:3, 1:1, 3:4, 9:16 at a target area, sides multiples of 16
(VAE); the ViT input of the same bucket has sides multiples of 28. Resize (bicubic) then centre crop."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ASPECTS = {"21:9": 21 / 9, "16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16}


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def bucket_for(width: int, height: int, target_area: int, multiple: int = 16,
               aspects: dict[str, float] = ASPECTS) -> tuple[str, int, int]:
    """(name, width, height) of the bucket nearest in log-aspect to ``width / height``."""
    ratio = width / height
    name = min(aspects, key=lambda k: abs(math.log(aspects[k]) - math.log(ratio)))
    aspect = aspects[name]
    bucket_w = _round_to(math.sqrt(target_area * aspect), multiple)
    bucket_h = _round_to(math.sqrt(target_area / aspect), multiple)
    return name, bucket_w, bucket_h


def resize_center_crop(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, height, width) float in [0, 1]: scale to cover, then crop the centre."""
    video = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2).float() / 255.0
    _, _, src_h, src_w = video.shape
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    video = F.interpolate(video, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return video[:, :, top:top + height, left:left + width].clamp(0, 1)


def resize_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """One (H, W, 3) uint8 frame -> (height, width, 3) uint8, as :func:`resize_center_crop` resizes each frame
    of a clip: decoders resize frame by frame, so no clip is ever held at source resolution."""
    resized = resize_center_crop(frame[None], width, height)[0]
    return (resized * 255).round().byte().permute(1, 2, 0).numpy()
