"""The reward contract: a callable from RGB uint8 images (H, W, 3) and their prompts to one score each,
with an optional reason per sample (why a score is 0: no target, nothing readable, ...)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class RewardOutput:
    scores: list[float]
    reasons: list[str | None]
    """Per sample, None or a short code counted in the metrics."""
    details: dict[str, list] = field(default_factory=dict)
    """Per-sample extras for the gallery (recognised text, ...)."""


class RewardFn(Protocol):
    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> RewardOutput: ...


class CallableReward:
    """Any ``f(images, prompts) -> list[float]`` (or a :class:`RewardOutput`) as a reward."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> RewardOutput:
        out = self.fn(images, prompts)
        if isinstance(out, RewardOutput):
            return out
        scores = [float(s) for s in out]
        if len(scores) != len(images):
            raise ValueError(f"reward callable returned {len(scores)} scores for {len(images)} images")
        return RewardOutput(scores, [None] * len(scores))


def import_callable(path: str) -> Callable:
    """``package.module:name`` -> the object."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"callable path must look like 'package.module:function', got {path!r}")
    target = getattr(importlib.import_module(module), name, None)
    if target is None or not callable(target):
        raise ValueError(f"{path!r} does not name a callable")
    return target
