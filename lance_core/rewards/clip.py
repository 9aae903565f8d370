"""CLIP score reward: the open_clip image-text cosine similarity of :class:`ClipScorer`, times ``scale``.

Weights come from a local file (``pretrained``); without one a custom ``architecture`` is randomly
initialised, which is what tests use with a tiny one. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch

from ..encoders.clip import ClipScorer
from .base import RewardOutput
from .config import CLIPConfig


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


class CLIPReward:
    def __init__(self, cfg: CLIPConfig = CLIPConfig()) -> None:
        self.cfg = cfg
        self.scorer = ClipScorer(cfg.model_name or "", cfg.pretrained, _device(cfg.device), cfg.seed,
                                 architecture=cfg.architecture)

    def _score(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        """Images of one size are scored as one batch, others one by one."""
        tensors = [torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0 for image in images]
        if len({t.shape for t in tensors}) == 1:
            return self.scorer.score(torch.stack(tensors), prompts).tolist()
        return [float(self.scorer.score(t[None], [p])[0]) for t, p in zip(tensors, prompts)]

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> RewardOutput:
        scores: list[float] = []
        for start in range(0, len(images), self.cfg.batch_size):
            chunk = slice(start, start + self.cfg.batch_size)
            scores += [self.cfg.scale * s for s in self._score(images[chunk], prompts[chunk])]
        return RewardOutput(scores, [None] * len(scores))
