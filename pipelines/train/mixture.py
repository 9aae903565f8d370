"""Multi-task mixture weights and their adaptive schedules.

weight(task, step) ∝ base(task) · progressive(task, step) · capability(task), normalised over the tasks
that have trainable rows.

- Progressive (continual training, "raise the share of harder tasks such as editing over time"): for the
  listed tasks a factor that grows linearly from 1 at ``start_step`` to ``final_multiplier`` at
  ``end_step``, then stays.
- Capability-oriented (raise the weight of tasks whose held-out loss improves least): with the held-out
  loss L_t at the first evaluation as reference L_t⁰, each later evaluation computes r_t = L_t / L_t⁰
  (the share of the loss left) and moves c_t ← c_t · exp(strength · (r_t − mean r)), clipped to
  [1 / max_multiplier, max_multiplier].
"""

from __future__ import annotations

import math

from .config import MixtureSection


class MixtureSchedule:
    def __init__(self, cfg: MixtureSection, available: list[str]) -> None:
        self.cfg = cfg
        self.tasks = [t for t in available if cfg.weights.get(t, 0) > 0]
        self.capability = {t: 1.0 for t in self.tasks}
        self.reference: dict[str, float] = {}

    def progressive(self, task: str, step: int) -> float:
        p = self.cfg.progressive
        if not p.enabled or task not in p.tasks:
            return 1.0
        span = max(p.end_step - p.start_step, 1)
        frac = min(max((step - p.start_step) / span, 0.0), 1.0)
        return 1.0 + (p.final_multiplier - 1.0) * frac

    def weights(self, step: int) -> dict[str, float]:
        raw = {t: self.cfg.weights[t] * self.progressive(t, step) * self.capability[t] for t in self.tasks}
        total = sum(raw.values())
        return {t: w / total for t, w in raw.items()}

    def update_capability(self, heldout: dict[str, float]) -> dict[str, float]:
        """Feed the held-out loss per task; returns the loss ratios r_t used (empty at the reference)."""
        c = self.cfg.capability
        losses = {t: v for t, v in heldout.items() if t in self.capability and math.isfinite(v)}
        if not c.enabled or not losses:
            return {}
        if not self.reference:
            self.reference = dict(losses)
            return {}
        ratios = {t: losses[t] / max(self.reference[t], 1e-12) for t in losses if t in self.reference}
        if not ratios:
            return {}
        mean = sum(ratios.values()) / len(ratios)
        for task, ratio in ratios.items():
            value = self.capability[task] * math.exp(c.strength * (ratio - mean))
            self.capability[task] = min(max(value, 1.0 / c.max_multiplier), c.max_multiplier)
        return ratios

    def state_dict(self) -> dict:
        return {"capability": dict(self.capability), "reference": dict(self.reference)}

    def load_state_dict(self, state: dict) -> None:
        self.capability.update({t: v for t, v in state["capability"].items() if t in self.capability})
        self.reference = dict(state["reference"])
