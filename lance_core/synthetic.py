"""Synthetic samples of every task, with random latents and ViT features of the right shapes.

Used by the demo, the tests and the benchmarks when no latent shards are at hand.
"""

from __future__ import annotations

import random

import torch

from .config import ModelConfig
from .packing import (
    TASKS,
    Sample,
    VisualInput,
    build_generation_sample,
    build_understanding_sample,
)
from .tokenizer import TextTokenizer

WORDS = ("red", "blue", "cat", "dog", "house", "tree", "river", "sun", "car", "bird", "moving", "small", "large")


def _caption(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _latents(frames: int, height: int, width: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(frames, height, width, channels, generator=gen)


def _vit(grid: tuple[int, int, int], dim: int, gen: torch.Generator) -> VisualInput:
    n = grid[0] * grid[1] * grid[2]
    return VisualInput(vit_features=torch.randn(n, dim, generator=gen) * 0.5, vit_grid=grid, is_video=grid[0] > 1)


def synthetic_sample(
    task: str, tokenizer: TextTokenizer, cfg: ModelConfig, seed: int, image_side: int = 4, video_frames: int = 2,
) -> Sample:
    """One random sample of ``task`` with latent grids of ``image_side`` tokens per side."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    c, d, s = cfg.latent_channels, cfg.hidden_size, image_side
    caption = _caption(rng)
    if task == "t2i":
        return build_generation_sample(tokenizer, task, caption, _latents(1, s, s, c, gen), key=f"{task}-{seed}")
    if task in ("t2v", "i2v"):
        target = _latents(video_frames, s, s, c, gen)
        return build_generation_sample(tokenizer, task, caption, target, first_frame_clean=task == "i2v",
                                       key=f"{task}-{seed}")
    if task in ("i2i", "v2v"):
        frames = 1 if task == "i2i" else video_frames
        source = VisualInput(latents=_latents(frames, s, s, c, gen))
        vit = _vit((max(1, frames // 2), 2, 2), d, gen)
        source.vit_features, source.vit_grid, source.is_video = vit.vit_features, vit.vit_grid, frames > 1
        return build_generation_sample(tokenizer, task, "make it " + caption, _latents(frames, s, s, c, gen),
                                       source=source, key=f"{task}-{seed}")
    if task == "subject":
        refs = [VisualInput(latents=_latents(1, s, s, c, gen)) for _ in range(2)]
        return build_generation_sample(tokenizer, task, caption, _latents(1, s, s, c, gen), references=refs,
                                       key=f"{task}-{seed}")
    if task in ("i2t", "v2t"):
        grid = (1, 2, 2) if task == "i2t" else (2, 2, 2)
        return build_understanding_sample(tokenizer, task, _vit(grid, d, gen), "What is shown?", caption,
                                          key=f"{task}-{seed}")
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")


def synthetic_mix(tokenizer: TextTokenizer, cfg: ModelConfig, seed: int = 0, per_task: int = 1,
                  tasks: tuple[str, ...] = TASKS, image_side: int = 4) -> list[Sample]:
    """``per_task`` samples of each task, interleaved."""
    return [synthetic_sample(task, tokenizer, cfg, seed * 1000 + i * len(tasks) + j, image_side)
            for i in range(per_task) for j, task in enumerate(tasks)]
