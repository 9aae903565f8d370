"""The learner actor: the policy in a DeepSpeed engine, the clipped GRPO objective with KL to the frozen
reference, an EMA of the trained weights, weights out for the rollout workers, resumable checkpoints.

Each window step of each group is replayed with the same group batching as the rollout, so the first
ratio of an epoch is 1 when the rollout workers run with the learner's weights and thread count. In
asynchronous mode they ran with the weights of one update before: the old log-probs are those of the
policy that sampled, the new ones the learner's, and the clipped ratio corrects for the difference."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file

from lance_core.checkpoint import save_lance_checkpoint
from lance_core.rl import GroupTrajectory, clipped_policy_loss, kl_to_reference, replay_step
from pipelines.runtime.deepspeed_config import engine_config
from pipelines.runtime.devices import pick_device

from .config import GRPOConfig
from .policy import Policy
from .weight_sync import WeightGroupMember


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_config(cfg: GRPOConfig, accumulation: int, on_gpu: bool = False) -> dict:
    """The shared engine config with the learner's AdamW; one micro-batch is one prompt's group."""
    optim = cfg.optim
    config = engine_config(micro_batch=cfg.rollout.group_size, accumulation=accumulation,
                           grad_clip=optim.grad_clip, zero_stage=cfg.deepspeed.zero_stage,
                           bf16=cfg.deepspeed.precision == "bf16", on_gpu=on_gpu)
    config["optimizer"] = {"type": "AdamW", "params": {
        "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
        "weight_decay": optim.weight_decay, "torch_adam": True, "adam_w_mode": True}}
    return config


class Learner(WeightGroupMember):
    """Actor body (wrapped with ``ray.remote`` at placement time); rank 0 of the weight group."""

    def __init__(self, cfg_data: dict, checkpoint: str | None = None) -> None:
        self.cfg = GRPOConfig.model_validate(cfg_data)
        resources = self.cfg.learner.actor
        torch.set_num_threads(resources.torch_threads)
        self.device = pick_device(resources.num_gpus)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        import deepspeed

        learner = self.cfg.learner
        self.policy = Policy(self.cfg, self.device, checkpoint,
                             keep_reference=learner.kl_weight > 0)
        groups_per_update = self.cfg.rollout.prompts_per_epoch // learner.minibatches
        self.window = self._window_length()
        trained = list(self.policy.trained().values())
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy, model_parameters=trained,
            config=deepspeed_config(self.cfg, groups_per_update * self.window, self.device.type == "cuda"))
        self.ema = {n: p.detach().clone() for n, p in self.policy.trained().items()} if self.cfg.deepspeed.ema_decay else None
        self.updates = 0

    def _window_length(self) -> int:
        sampler = self.cfg.rollout.sampler
        lo, hi = sampler.window_range or (0, sampler.steps)
        return sampler.window_size or (hi - lo)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def get_weights(self, ema: bool = False) -> dict[str, torch.Tensor]:
        if ema and self.ema is not None:
            return {n: v.cpu().clone() for n, v in self.ema.items()}
        return self.policy.get_weights()

    def synced_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.trained()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.deepspeed.ema_decay
        for name, param in self.policy.trained().items():
            self.ema[name].mul_(decay).add_(param.detach(), alpha=1 - decay)

    def _grad_norm(self) -> float:
        """Norm of the accumulated gradient before clipping (ZeRO partitions it: ask the engine)."""
        if self.cfg.deepspeed.zero_stage:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        grads = [p.grad for p in self.policy.trained().values() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0

    # ------------------------------------------------------------------------------------ update
    def update(self, trajectory_refs: list, advantages: list[list[float]]) -> dict:
        """One epoch of optimisation over the groups (``trajectory_refs`` hold lists of group payloads,
        ``advantages`` is in the same group order)."""
        started = time.perf_counter()
        groups = [g for chunk in ray.get(trajectory_refs) for g in chunk]
        if len(groups) != len(advantages):
            raise ValueError(f"{len(groups)} trajectories for {len(advantages)} advantage rows")
        sampled_with = min(payload["version"] for payload in groups)
        learner, sampler = self.cfg.learner, self.cfg.rollout.sampler
        per_update = len(groups) // learner.minibatches
        ratios, clipped, kls, losses, grad_norms = [], [], [], [], []
        first_deviation = 0.0
        self.policy.train()
        for update in range(learner.minibatches):
            for payload, adv in zip(groups[update * per_update:(update + 1) * per_update],
                                    advantages[update * per_update:(update + 1) * per_update]):
                trajectory = GroupTrajectory(payload["timesteps"], payload["window"],
                                             payload["states"].to(self.device), payload["log_probs"].to(self.device),
                                             final=payload["states"][-1])
                cond, uncond = self.policy.group_prefixes(payload["text"], trajectory.states.shape[1])
                adv_t = torch.tensor(adv, dtype=torch.float32, device=self.device)
                for position in range(len(trajectory.window)):
                    step = replay_step(self.policy.model, cond, uncond, sampler, trajectory, position)
                    kl = None
                    if learner.kl_weight > 0:
                        with torch.no_grad(), self.policy.as_reference():
                            ref = replay_step(self.policy.model, cond, uncond, sampler, trajectory, position)
                        kl = kl_to_reference(step.mean, ref.mean, step.g)
                    out = clipped_policy_loss(step.log_prob, trajectory.log_probs[position], adv_t,
                                              learner.clip_range, kl, learner.kl_weight)
                    self.engine.backward(out.loss)
                    if self.engine.is_gradient_accumulation_boundary():
                        grad_norms.append(self._grad_norm())
                    self.engine.step()
                    ratios.append(out.ratio.cpu())
                    clipped.append(out.clipped.cpu())
                    kls.append(float(out.kl))
                    losses.append(float(out.loss))
                    if update == 0:
                        first_deviation = max(first_deviation, float((out.ratio - 1).abs().max()))
            self.updates += 1
            if self.ema is not None:
                self._update_ema()
        ratio = torch.cat(ratios)
        return {
            "loss": sum(losses) / len(losses), "kl": sum(kls) / len(kls),
            "ratio_mean": float(ratio.mean()), "ratio_std": float(ratio.std(unbiased=False)),
            "ratio_first_update_max_dev": first_deviation,
            "clip_fraction": float(torch.cat(clipped).float().mean()),
            "grad_norm": sum(grad_norms) / len(grad_norms), "updates": self.updates,
            "learn_s": time.perf_counter() - started, "sampled_with_version": sampled_with,
        }

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, directory: str, tag: str, client_state: dict) -> str:
        """DeepSpeed state (optimizer included) for resume, the model (LoRA merged) as a Lance checkpoint,
        the EMA of the trained weights."""
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory / "engine"), tag=tag,
                                   client_state={**client_state, "updates": self.updates})
        if self.policy.adapters is None:
            save_lance_checkpoint(self.policy.model, directory / "model.safetensors")
        else:
            save_file({k: v.contiguous() for k, v in self.policy.export_state().items()},
                      str(directory / "model.safetensors"),
                      metadata={"format": "pt", "lance_preset": str(self.policy.model_cfg.preset)})
        if self.ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, str(directory / "ema.safetensors"))
        return str(directory)

    def load(self, directory: str, tag: str) -> dict:
        directory = Path(directory)
        _, client_state = self.engine.load_checkpoint(str(directory / "engine"), tag=tag)
        if self.ema is not None and (directory / "ema.safetensors").is_file():
            for name, value in load_file(str(directory / "ema.safetensors")).items():
                self.ema[name].copy_(value)
        self.updates = int((client_state or {}).get("updates", 0))
        return client_state or {}
