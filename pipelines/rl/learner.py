"""The GRPO learner: the policy in a DeepSpeed engine, the clipped GRPO objective with KL to the frozen
reference, an fp32 EMA of the trained weights, resumable checkpoints. Nothing here needs Ray: the actor
that hosts it in a GRPO run (``LearnerActor``, pipelines/rl/learner_group.py) adds the rendezvous, the
weight sync and the object store; the GPU check (bench/gpu) runs it under plain torch.distributed.

``learner.ranks`` learners form one torch.distributed group (NCCL on GPUs, else gloo) that DeepSpeed
data-parallelises over (ZeRO partitions over it): every update, each rank trains its share of the groups and
the gradients are averaged, so the ranks keep the same weights. The EMA is sharded over the ranks like the
optimizer's fp32 master weights (pipelines/runtime/ema.py); rank 0 writes the model files and sends the
weights to the rollout workers; metrics are reduced over the ranks (pipelines/runtime/collectives.py).

Each window step of each group is replayed with the same group batching as the rollout, so the first
ratio of an epoch is 1 when the rollout workers run with the learner's weights and thread count. In
asynchronous mode they ran with the weights of one update before: the old log-probs are those of the
policy that sampled, the new ones the learner's, and the clipped ratio corrects for the difference."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lance_core.checkpoint import save_lance_checkpoint
from lance_core.rl import GroupTrajectory, clipped_policy_loss, kl_to_reference, replay_step
from pipelines.runtime.checkpointing import export_weights, load_training_state, save_training_state
from pipelines.runtime.collectives import all_reduce_named
from pipelines.runtime.deepspeed_config import engine_config
from pipelines.runtime.devices import pick_device
from pipelines.runtime.ema import ShardedEMA
from pipelines.runtime.finite_steps import step_if_finite

from .config import GRPOConfig
from .policy import Policy

MODEL_FILE = "model.safetensors"
EMA_EXPORT_FILE = "ema.safetensors"


def accumulation_steps(cfg: GRPOConfig) -> int:
    """Micro-batches per optimizer step on one rank: its groups of an update times the window's steps."""
    learner, sampler = cfg.learner, cfg.rollout.sampler
    lo, hi = sampler.window_range or (0, sampler.steps)
    window = sampler.window_size or (hi - lo)
    return cfg.rollout.prompts_per_epoch // (learner.minibatches * learner.ranks) * window


def deepspeed_config(cfg: GRPOConfig, accumulation: int, on_gpu: bool = False) -> dict:
    """The shared engine config with the learner's AdamW; one micro-batch is one prompt's group."""
    optim = cfg.optim
    config = engine_config(micro_batch=cfg.rollout.group_size, accumulation=accumulation,
                           grad_clip=optim.grad_clip, zero_stage=cfg.deepspeed.zero_stage,
                           bf16=cfg.deepspeed.precision == "bf16", on_gpu=on_gpu,
                           communication_dtype=cfg.deepspeed.communication_dtype)
    config["optimizer"] = {"type": "AdamW", "params": {
        "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
        "weight_decay": optim.weight_decay, "torch_adam": True, "adam_w_mode": True}}
    return config


class Learner:
    """Rank ``rank`` of ``learner.ranks``. The engine starts with :meth:`start` once rank 0's address is
    known (the group's MASTER_ADDR and port)."""

    def __init__(self, cfg_data: dict, checkpoint: str | None = None, rank: int = 0) -> None:
        self.cfg = GRPOConfig.model_validate(cfg_data)
        resources = self.cfg.learner.actor
        torch.set_num_threads(resources.torch_threads)
        self.device = pick_device(resources.num_gpus)
        self.rank, self.world = rank, self.cfg.learner.ranks
        self.policy = Policy(self.cfg, self.device, checkpoint, keep_reference=self.cfg.learner.kl_weight > 0)
        self.engine = None
        self.ema: ShardedEMA | None = None
        self.updates = 0

    def start(self, group: tuple[str, int]) -> None:
        """Join the learner group at ``group`` (address, port) and build the DeepSpeed engine and the EMA
        (blocks until every rank has joined)."""
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
        if self.cfg.deepspeed.ema_decay:
            self.ema = ShardedEMA(list(self.policy.trained().items()), self.cfg.deepspeed.ema_decay)

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.get_weights()

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        """Collective: the EMA's weights, whole, on rank 0 (in the trained weights' dtype); None elsewhere or
        without an EMA."""
        if self.ema is None:
            return None if self.rank else self.get_weights()
        dtypes = {name: p.dtype for name, p in self.policy.trained().items()}
        state = self.ema.full_state(dst=0)
        return {name: value.to(dtypes[name]) for name, value in state.items()} if state is not None else None

    def synced_weights(self) -> dict[str, torch.Tensor]:
        return self.policy.trained()

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
    def train_groups(self, groups: list[dict], advantages: list[list[float]]) -> dict:
        """One epoch of optimisation over this rank's groups (group payloads as the rollout workers make them)
        in training order (its share of every update in turn), ``advantages`` in the same order. Returns the
        metrics reduced over the ranks."""
        started = time.perf_counter()
        if len(groups) != len(advantages):
            raise ValueError(f"{len(groups)} groups for {len(advantages)} advantage rows")
        sampled_with = min(payload["version"] for payload in groups)
        learner, sampler = self.cfg.learner, self.cfg.rollout.sampler
        per_update = len(groups) // learner.minibatches
        ratios, clipped, kls, losses, grad_norms = [], [], [], [], []
        first_deviation, skipped, window_finite = 0.0, 0, True
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
                    window_finite = window_finite and bool(torch.isfinite(out.loss.detach()))
                    boundary = self.engine.is_gradient_accumulation_boundary()
                    if boundary and not self.cfg.deepspeed.zero_stage:
                        norm = self._grad_norm()
                    if not boundary:
                        self.engine.step()
                    elif step_if_finite(self.engine, window_finite):
                        grad_norms.append(norm if not self.cfg.deepspeed.zero_stage else self._grad_norm())
                    else:
                        skipped += 1
                    window_finite = window_finite or boundary  # a new window starts after a boundary
                    ratios.append(out.ratio.cpu())
                    clipped.append(out.clipped.cpu())
                    kls.append(float(out.kl.detach()))
                    losses.append(float(out.loss.detach()))
                    if update == 0:
                        first_deviation = max(first_deviation, float((out.ratio - 1).abs().max()))
            self.updates += 1
            if self.ema is not None:
                with torch.no_grad():
                    self.ema.update()
        ratio = torch.cat(ratios).double()
        sums = all_reduce_named(sums={
            "loss": sum(losses), "kl": sum(kls), "steps": len(losses), "ratio": float(ratio.sum()),
            "ratios": ratio.numel(), "clipped": float(torch.cat(clipped).sum()), "grad_norm": sum(grad_norms),
            "updates": len(grad_norms), "groups": len(groups), "skipped": skipped if self.rank == 0 else 0})
        ratio_mean = sums["ratio"] / sums["ratios"]
        spread = all_reduce_named(sums={"ratio_sq_dev": float(((ratio - ratio_mean) ** 2).sum())})
        peaks = all_reduce_named(maxes={"first_deviation": first_deviation, "learn_s": time.perf_counter() - started},
                                 mins={"version": sampled_with})
        return {
            "loss": sums["loss"] / sums["steps"], "kl": sums["kl"] / sums["steps"],
            "ratio_mean": ratio_mean, "ratio_std": (spread["ratio_sq_dev"] / sums["ratios"]) ** 0.5,
            "ratio_first_update_max_dev": peaks["first_deviation"],
            "clip_fraction": sums["clipped"] / sums["ratios"],
            "grad_norm": sums["grad_norm"] / max(sums["updates"], 1), "updates": self.updates,
            "skipped_steps": int(sums["skipped"]),
            "groups_trained": int(sums["groups"]), "learner_ranks": self.world,
            "learn_s": peaks["learn_s"], "sampled_with_version": int(peaks["version"]),
        }

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, directory: str, tag: str, client_state: dict) -> str:
        """Collective. The engine state (optimizer included, in ZeRO partitions: ``ds/``) and the EMA shards
        (``ema/``) for resume;
        the model (LoRA merged) as a Lance checkpoint, and the EMA's weights whole (``ema.safetensors``),
        written by rank 0. Every rank writes its partitions into the same folder (a filesystem all nodes
        share)."""
        directory = Path(directory)
        save_training_state(self.engine, directory, self.ema, {**client_state, "updates": self.updates, "tag": tag})
        ema = self.ema_weights() if self.ema is not None else None
        export_weights(self.engine, self.cfg.deepspeed.zero_stage, None, self.rank,
                       lambda policy, _: self._write_model(directory))
        if self.rank == 0 and ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in ema.items()}, str(directory / EMA_EXPORT_FILE))
        return str(directory)

    def _write_model(self, directory: Path) -> Path:
        if self.policy.adapters is None:
            return save_lance_checkpoint(self.policy.model, directory / MODEL_FILE)
        path = directory / MODEL_FILE
        save_file({k: v.contiguous() for k, v in self.policy.export_state().items()}, str(path),
                  metadata={"format": "pt", "lance_preset": str(self.policy.model_cfg.preset)})
        return path

    def load(self, directory: str, tag: str) -> dict:
        """Collective, at any number of ranks for the EMA (the engine as DeepSpeed allows)."""
        client_state = load_training_state(self.engine, Path(directory), self.ema)
        self.updates = int(client_state.get("updates", 0))
        return client_state
