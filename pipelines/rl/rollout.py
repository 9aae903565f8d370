"""Rollout workers: Ray actors holding a policy copy and the VAE. A rollout streams, per micro-batch of
groups, first the decoded images (for the reward pool) and then the trajectories (for the learner), so
scoring starts while the next micro-batch is sampled."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import ray
import torch

from lance_core.encoders import load_vae
from lance_core.rl import SDESamplerConfig, sample_group, sde_window
from pipelines.runtime.devices import pick_device
from pipelines.runtime.run_log import ActorLog

from .config import GRPOConfig
from .policy import Policy
from .weight_sync import WeightGroupMember


@dataclass(frozen=True)
class GroupTask:
    group_id: int
    text: str
    target: str | None
    seed: int


def group_seed(run_seed: int, epoch: int, group_id: int) -> int:
    return (run_seed * 1_000_003 + epoch * 10_007 + group_id) % (2**63 - 1)


class RolloutWorker(WeightGroupMember, ActorLog):
    """Actor body (wrapped with ``ray.remote`` at placement time). ``version``: that of the weights it holds,
    recorded with each trajectory."""

    def __init__(self, cfg_data: dict, checkpoint: str | None = None) -> None:
        self.cfg = GRPOConfig.model_validate(cfg_data)
        resources = self.cfg.rollout.actors
        torch.set_num_threads(resources.torch_threads)
        self.device = pick_device(resources.num_gpus)
        self.policy = Policy(self.cfg, self.device, checkpoint).eval()
        self.vae = load_vae(self.policy.model_cfg.vae).to(self.device).eval()
        self.version = -1

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        self.policy.set_weights(weights)
        self.version = version
        return version

    def synced_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.trained()

    def weights_received(self, version: int) -> None:
        self.version = version

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, N, C) latent tokens -> (B, H, W, 3) uint8 RGB."""
        frames, height, width = self.policy.latent_grid()
        grid = latents.reshape(latents.shape[0], frames, height, width, -1).permute(0, 4, 1, 2, 3)
        return self.vae.decode_frames(grid.to(self.vae.dtype))[:, 0].numpy()  # the first (only) frame

    def _sample(self, task: GroupTask, sampler: SDESamplerConfig, groups: int, window: list[int]):
        cond, uncond = self.policy.group_prefixes(task.text, groups)
        generator = torch.Generator().manual_seed(task.seed)
        return sample_group(self.policy.model, cond, uncond, sampler, groups, window, generator)

    def rollout(self, tasks: list[dict]):
        """Generator: for each micro-batch of ``groups_per_micro_batch`` tasks, yields the decoded images
        (B·G, H, W, 3) uint8, then the list of its groups' trajectories."""
        cfg = self.cfg.rollout
        tasks = [GroupTask(**t) for t in tasks]
        for start in range(0, len(tasks), cfg.groups_per_micro_batch):
            chunk = tasks[start:start + cfg.groups_per_micro_batch]
            trajectories, finals = [], []
            for task in chunk:
                window = sde_window(cfg.sampler, random.Random(task.seed))
                trajectory = self._sample(task, cfg.sampler, cfg.group_size, window)
                finals.append(trajectory.final)
                trajectories.append({
                    "group_id": task.group_id, "text": task.text, "window": trajectory.window,
                    "timesteps": trajectory.timesteps, "states": trajectory.states.cpu(),
                    "log_probs": trajectory.log_probs.cpu(), "version": self.version,
                })
            yield self.decode(torch.cat(finals))
            yield trajectories

    def evaluate(self, texts: list[str], samples: int, steps: int, seed: int,
                 weights: dict[str, torch.Tensor] | None = None) -> np.ndarray:
        """ODE samples (noise level 0, ``steps`` steps) of each prompt, optionally with other weights
        (the EMA) swapped in for the call."""
        sampler = self.cfg.rollout.sampler.model_copy(update={"steps": steps, "noise_level": 0.0,
                                                              "window_size": 0, "window_range": None})
        saved = self.policy.get_weights() if weights is not None else None
        if weights is not None:
            self.policy.set_weights(weights)
        try:
            finals = [self._sample(GroupTask(i, text, None, seed + i), sampler, samples, []).final
                      for i, text in enumerate(texts)]
        finally:
            if saved is not None:
                self.policy.set_weights(saved)
        return self.decode(torch.cat(finals))

