"""Rewards composed as a weighted sum; each component's scores and reasons are kept for the metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import CallableReward, RewardFn, import_callable
from .config import CLIPConfig, OCRConfig, RewardSpec


def build_reward(spec: RewardSpec) -> RewardFn:
    if spec.kind == "ocr":
        from .ocr import OCRReward

        return OCRReward(spec.ocr or OCRConfig())
    if spec.kind == "clip":
        from .clip import CLIPReward

        return CLIPReward(spec.clip or CLIPConfig())
    if spec.kind == "brightness":
        from .simple import BrightnessReward

        return BrightnessReward()
    if spec.kind == "colour":
        from .simple import ColourReward

        return ColourReward(spec.colour)
    target = import_callable(spec.callable)
    return CallableReward(target(**spec.options) if isinstance(target, type) or spec.options else target)


@dataclass
class ComposedScores:
    total: list[float]
    components: dict[str, list[float]]
    reasons: dict[str, list[str | None]]
    details: dict[str, list]


class WeightedReward:
    """total = Σ weight_k · reward_k."""

    def __init__(self, specs: list[RewardSpec]) -> None:
        if not specs:
            raise ValueError("at least one reward is needed")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        self.specs = specs
        self.fns = [build_reward(spec) for spec in specs]

    def __call__(self, images: list[np.ndarray], prompts: list[str],
                 targets: list[str | None] | None = None) -> ComposedScores:
        total = np.zeros(len(images), dtype=np.float64)
        components, reasons, details = {}, {}, {}
        for spec, fn in zip(self.specs, self.fns):
            out = fn(images, prompts, targets) if getattr(fn, "uses_targets", False) else fn(images, prompts)
            if len(out.scores) != len(images):
                raise ValueError(f"reward {spec.name!r} returned {len(out.scores)} scores for {len(images)} images")
            total += spec.weight * np.asarray(out.scores, dtype=np.float64)
            components[spec.name] = [float(s) for s in out.scores]
            reasons[spec.name] = list(out.reasons)
            details.update({f"{spec.name}/{k}": v for k, v in out.details.items()})
        return ComposedScores(total.tolist(), components, reasons, details)
