"""The torch device a worker or actor computes on."""

from __future__ import annotations

import torch


def pick_device(gpus: float, local_rank: int | None = None) -> torch.device:
    """CUDA when this process was given GPUs (``gpus`` > 0: a count, a fraction, or True) and CUDA is
    available, else the CPU. ``local_rank``: the GPU of this node to take (``cuda:N``); None takes the
    current one (``cuda``)."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    return torch.device("cpu")
