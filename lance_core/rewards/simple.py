"""Cheap verifiable rewards on pixels, for tests and smoke runs of the RL loop."""

from __future__ import annotations

import numpy as np

from .base import RewardOutput


class BrightnessReward:
    """Mean pixel value in [0, 1]."""

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> RewardOutput:
        scores = [float(np.asarray(image, dtype=np.float32).mean() / 255.0) for image in images]
        return RewardOutput(scores, [None] * len(scores))


class ColourReward:
    """1 - mean distance of the pixels to a target RGB colour, distances scaled to [0, 1]."""

    def __init__(self, rgb: tuple[int, int, int]) -> None:
        self.rgb = np.asarray(rgb, dtype=np.float32)

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> RewardOutput:
        scale = float(np.sqrt(3.0) * 255.0)
        scores = [1.0 - float(np.linalg.norm(np.asarray(image, dtype=np.float32) - self.rgb, axis=-1).mean()) / scale
                  for image in images]
        return RewardOutput(scores, [None] * len(scores))
