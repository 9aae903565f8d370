"""The learner actor: the policy in a DeepSpeed engine, the clipped GRPO objective with KL to the frozen
reference, an EMA of the trained weights, weights out for the rollout workers, resumable checkpoints.

``learner.ranks`` actors form one torch.distributed group (NCCL on GPUs, else gloo) that DeepSpeed
data-parallelises over (ZeRO partitions over it): every update, each rank trains its share of the groups and
the gradients are averaged, so the ranks keep the same weights. Rank 0 alone holds the EMA, writes the model
files and sends the weights to the rollout workers; metrics are reduced over the ranks.

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
from torch import distributed as dist

from lance_core.checkpoint import save_lance_checkpoint
from lance_core.rl import GroupTrajectory, clipped_policy_loss, kl_to_reference, replay_step
from pipelines.runtime.deepspeed_config import engine_config
from pipelines.runtime.devices import pick_device

from .config import GRPOConfig
from .policy import Policy
from .weight_sync import WeightGroupMember


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def accumulation_steps(cfg: GRPOConfig) -> int:
    """Micro-batches per optimizer step on one rank: its groups of an update times the window's steps."""
    learner, sampler = cfg.learner, cfg.rollout.sampler
    lo, hi = sampler.window_range or (0, sampler.steps)
    window = sampler.window_size or (hi - lo)
    return cfg.rollout.prompts_per_epoch // (learner.minibatches * learner.ranks) * window


def _all_reduce(values: dict[str, float], op, device: torch.device) -> dict[str, float]:
    flat = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(flat, op=op)
    return dict(zip(values, flat.tolist()))


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
    """Actor body (wrapped with ``ray.remote`` at placement time), rank ``rank`` of ``learner.ranks``; rank 0
    is also rank 0 of the weight group. The engine starts with :meth:`start` once rank 0 has given the
    group's address (:meth:`rendezvous`)."""

    def __init__(self, cfg_data: dict, checkpoint: str | None = None, rank: int = 0) -> None:
        self.cfg = GRPOConfig.model_validate(cfg_data)
        resources = self.cfg.learner.actor
        torch.set_num_threads(resources.torch_threads)
        self.device = pick_device(resources.num_gpus)
        self.rank, self.world = rank, self.cfg.learner.ranks
        self.policy = Policy(self.cfg, self.device, checkpoint, keep_reference=self.cfg.learner.kl_weight > 0)
        self.engine = None
        self.ema = None
        if self.cfg.deepspeed.ema_decay and rank == 0:
            self.ema = {n: p.detach().clone() for n, p in self.policy.trained().items()}
        self.updates = 0

    def rendezvous(self) -> tuple[str, int]:
        """(rank 0) The learner group's address: this node's IP and a free port on it."""
        address = ray.util.get_node_ip_address()
        return address, _free_port(address)

    def start(self, group: tuple[str, int]) -> None:
        """Join the learner group at ``group`` (address, port) and build the DeepSpeed engine (blocks until
        every rank has joined)."""
        address, port = group
        on_gpu = self.device.type == "cuda"
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        # Ray gives each actor only its own GPU(s): the local device is always the first visible one.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          MASTER_ADDR=address, MASTER_PORT=str(port))
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
        trained = list(self.policy.trained().values())
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.policy, model_parameters=trained,
            config=deepspeed_config(self.cfg, accumulation_steps(self.cfg), on_gpu))

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
        """Norm of the accumulated (rank-averaged) gradient before clipping, read before the step; ZeRO
        partitions it: the engine's, read after the step."""
        if self.cfg.deepspeed.zero_stage:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        grads = [p.grad for p in self.policy.trained().values() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0

    # ------------------------------------------------------------------------------------ update
    def update(self, trajectory_refs: list, group_ids: list[int], advantages: list[list[float]]) -> dict:
        """One epoch of optimisation over this rank's groups: ``group_ids`` in training order (its share of
        every update in turn), found in the lists of group payloads that ``trajectory_refs`` hold;
        ``advantages`` in the same order. Returns the metrics reduced over the ranks."""
        started = time.perf_counter()
        payloads = {g["group_id"]: g for chunk in ray.get(trajectory_refs) for g in chunk}
        if len(group_ids) != len(advantages):
            raise ValueError(f"{len(group_ids)} groups for {len(advantages)} advantage rows")
        groups = [payloads[group_id] for group_id in group_ids]
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
                    boundary = self.engine.is_gradient_accumulation_boundary()
                    if boundary and not self.cfg.deepspeed.zero_stage:
                        grad_norms.append(self._grad_norm())
                    self.engine.step()
                    if boundary and self.cfg.deepspeed.zero_stage:
                        grad_norms.append(self._grad_norm())
                    ratios.append(out.ratio.cpu())
                    clipped.append(out.clipped.cpu())
                    kls.append(float(out.kl))
                    losses.append(float(out.loss))
                    if update == 0:
                        first_deviation = max(first_deviation, float((out.ratio - 1).abs().max()))
            self.updates += 1
            if self.ema is not None:
                self._update_ema()
        ratio = torch.cat(ratios).double()
        sums = _all_reduce({"loss": sum(losses), "kl": sum(kls), "steps": len(losses), "ratio": float(ratio.sum()),
                            "ratios": ratio.numel(), "clipped": float(torch.cat(clipped).sum()),
                            "grad_norm": sum(grad_norms), "updates": len(grad_norms), "groups": len(groups)},
                           dist.ReduceOp.SUM, self.device)
        ratio_mean = sums["ratio"] / sums["ratios"]
        spread = _all_reduce({"ratio_sq_dev": float(((ratio - ratio_mean) ** 2).sum())}, dist.ReduceOp.SUM,
                             self.device)
        # one MAX for the maxima and the (negated) minimum
        peaks = _all_reduce({"first_deviation": first_deviation, "learn_s": time.perf_counter() - started,
                             "version": -sampled_with}, dist.ReduceOp.MAX, self.device)
        return {
            "loss": sums["loss"] / sums["steps"], "kl": sums["kl"] / sums["steps"],
            "ratio_mean": ratio_mean, "ratio_std": (spread["ratio_sq_dev"] / sums["ratios"]) ** 0.5,
            "ratio_first_update_max_dev": peaks["first_deviation"],
            "clip_fraction": sums["clipped"] / sums["ratios"],
            "grad_norm": sums["grad_norm"] / sums["updates"], "updates": self.updates,
            "groups_trained": int(sums["groups"]), "learner_ranks": self.world,
            "learn_s": peaks["learn_s"], "sampled_with_version": int(-peaks["version"]),
        }

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, directory: str, tag: str, client_state: dict) -> str:
        """DeepSpeed state (optimizer included, in ZeRO partitions) for resume, the model (LoRA merged) as a
        Lance checkpoint, the EMA of the trained weights. Every rank calls it (each writes its partitions into
        the same folder, a shared filesystem across nodes); rank 0 alone writes the model files."""
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory / "engine"), tag=tag,
                                   client_state={**client_state, "updates": self.updates})
        if self.rank:
            return str(directory)
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
        """Every rank calls it, with the number of ranks that saved."""
        directory = Path(directory)
        _, client_state = self.engine.load_checkpoint(str(directory / "engine"), tag=tag)
        if self.ema is not None and (directory / "ema.safetensors").is_file():
            for name, value in load_file(str(directory / "ema.safetensors")).items():
                self.ema[name].copy_(value)
        self.updates = int((client_state or {}).get("updates", 0))
        return client_state or {}
