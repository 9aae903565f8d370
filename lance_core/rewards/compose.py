"""Rewards composed as a weighted sum; each component's scores and reasons are kept for the metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .base import CallableReward, RewardFn, RewardOutput, import_callable
from .config import CLIPConfig, OCRConfig, RewardSpec

log = logging.getLogger("lance.rewards")

ERROR_PREFIX = "error:"
"""Reason of an image a reward raised on: ``error:<ExceptionType>``."""
NONFINITE = "nonfinite"
"""Reason of an image a reward scored NaN or ±inf on (scored 0 instead, counted as an error)."""


def build_reward(spec: RewardSpec) -> RewardFn:
    if spec.kind == "ocr":
        from .ocr import OCRReward

        return OCRReward(spec.ocr or OCRConfig())
    if spec.kind == "clip":
        from .clip import CLIPReward

        return CLIPReward(spec.clip or CLIPConfig())
    if spec.kind == "classifier":
        from .classifier import ClassifierReward

        return ClassifierReward(spec.classifier)
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
    errors: dict[str, int] = field(default_factory=dict)
    """Per component, the images it failed on (scored 0): those it scored NaN or ±inf, and with
    ``isolate_errors`` those it raised on."""


def error_reason(error: BaseException) -> str:
    return f"{ERROR_PREFIX}{type(error).__name__}"


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

    def __call__(self, images: list[np.ndarray], prompts: list[str], targets: list[str | None] | None = None,
                 *, isolate_errors: bool = False) -> ComposedScores:
        """With ``isolate_errors`` a component that raises on the batch is run image by image instead, and an
        image it raises on scores 0 for that component, with the reason ``error:<ExceptionType>``. A score
        that is NaN or ±inf is 0 for that component, with the reason ``nonfinite``; both are counted in
        ``errors``."""
        total = np.zeros(len(images), dtype=np.float64)
        components, reasons, details, errors = {}, {}, {}, {}
        for spec, fn in zip(self.specs, self.fns):
            try:
                out = _score(spec, fn, images, prompts, targets)
            except Exception:
                if not isolate_errors:
                    raise
                log.warning("reward %r raised on a batch of %d images; scoring it image by image",
                            spec.name, len(images), exc_info=True)
                out, errors[spec.name] = _score_each(spec, fn, images, prompts, targets)
            scores = np.array(out.scores, dtype=np.float64)
            bad = ~np.isfinite(scores)
            scores[bad] = 0.0
            reasons[spec.name] = [NONFINITE if flag else reason for flag, reason in zip(bad, out.reasons)]
            if bad.any():
                log.warning("reward %r scored %d of %d images NaN or inf; they score 0", spec.name,
                            int(bad.sum()), len(images))
                errors[spec.name] = errors.get(spec.name, 0) + int(bad.sum())
            total += spec.weight * scores
            components[spec.name] = scores.tolist()
            details.update({f"{spec.name}/{k}": v for k, v in out.details.items()})
        return ComposedScores(total.tolist(), components, reasons, details, errors)


def _score(spec: RewardSpec, fn: RewardFn, images: list[np.ndarray], prompts: list[str],
           targets: list[str | None] | None) -> RewardOutput:
    out = fn(images, prompts, targets) if getattr(fn, "uses_targets", False) else fn(images, prompts)
    if len(out.scores) != len(images):
        raise ValueError(f"reward {spec.name!r} returned {len(out.scores)} scores for {len(images)} images")
    return out


def _score_each(spec: RewardSpec, fn: RewardFn, images: list[np.ndarray], prompts: list[str],
                targets: list[str | None] | None) -> tuple[RewardOutput, int]:
    """One image at a time; an image the reward raises on scores 0 (its details None)."""
    scores, reasons, outputs = [], [], []
    for k, image in enumerate(images):
        try:
            out = _score(spec, fn, [image], [prompts[k]], None if targets is None else [targets[k]])
        except Exception as error:  # noqa: BLE001 - whatever one image raises stays with that image
            scores.append(0.0)
            reasons.append(error_reason(error))
            outputs.append(None)
            continue
        scores.append(float(out.scores[0]))
        reasons.append(out.reasons[0])
        outputs.append(out)
    keys = list(dict.fromkeys(key for out in outputs if out is not None for key in out.details))
    details = {key: [out.details[key][0] if out is not None and key in out.details else None for out in outputs]
               for key in keys}
    return RewardOutput(scores, reasons, details), outputs.count(None)
