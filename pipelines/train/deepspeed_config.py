"""The training job's DeepSpeed config: the shared engine config (pipelines/runtime) with its scheduler."""

from __future__ import annotations

from pipelines.runtime.deepspeed_config import engine_config

from .config import TrainConfig


def use_bf16(cfg: TrainConfig, on_gpu: bool) -> bool:
    return cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and on_gpu)


def build_deepspeed_config(cfg: TrainConfig, on_gpu: bool, accumulation: int = 1) -> dict:
    """One micro-batch (one pack) per rank, ``accumulation`` of them per step. The optimizer is a torch AdamW
    handed to ``deepspeed.initialize`` (runs on CPU and GPU alike); warm-up then constant is DeepSpeed's
    WarmupLR, warm-up then linear decay to 0 at the last step its WarmupDecayLR; warm-up, stable, decay
    (``wsd``) is :class:`WarmupStableDecayLR`, built on the engine's optimizer."""
    ds, optim = cfg.deepspeed, cfg.optim
    config = engine_config(micro_batch=1, accumulation=accumulation, grad_clip=optim.grad_clip, zero_stage=ds.zero_stage,
                           bf16=use_bf16(cfg, on_gpu), on_gpu=on_gpu, bucket_size=ds.reduce_bucket_size,
                           communication_dtype=ds.communication_dtype)
    config["zero_allow_untested_optimizer"] = True
    if optim.decay == "linear":
        config["scheduler"] = {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": max(optim.warmup_steps, 1),
                       "total_num_steps": max(cfg.steps, optim.warmup_steps + 1), "warmup_type": "linear"},
        }
    elif optim.decay == "constant" and optim.warmup_steps:
        # DeepSpeed's WarmupLR refuses 0 steps; without warm-up the lr is constant. (wsd: the scheduler of
        # lr_scheduler_factory, handed to deepspeed.initialize.)
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": optim.warmup_steps,
                       "warmup_type": "linear"},
        }
    return config


def lr_scheduler_factory(cfg: TrainConfig):
    """For ``deepspeed.initialize(lr_scheduler=...)``: a callable that builds the scheduler on the optimizer
    DeepSpeed wraps (its ZeRO partitions), or None when the config's ``scheduler`` section says it all."""
    optim = cfg.optim
    if optim.decay != "wsd":
        return None
    decay_steps = max(1, round(optim.decay_fraction * cfg.steps))
    return lambda optimizer: WarmupStableDecayLR(optimizer, optim.lr, optim.warmup_steps, cfg.steps, decay_steps)


class WarmupStableDecayLR:
    """Linear warm-up to ``max_lr`` over ``warmup_steps``, ``max_lr`` until the last ``decay_steps`` of
    ``total_steps``, then linear to 0 at ``total_steps``. DeepSpeed's scheduler interface (``step``,
    ``get_last_lr``, ``state_dict``: the step only, as its WarmupLR), with the same lr during the warm-up."""

    def __init__(self, optimizer, max_lr: float, warmup_steps: int, total_steps: int, decay_steps: int) -> None:
        self.optimizer, self.max_lr = optimizer, max_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.decay_steps = max(1, min(decay_steps, total_steps))
        self.last_batch_iteration = -1
        self._last_lr = self._apply()

    def lr_at(self, step: int) -> float:
        if step < 0:
            return 0.0
        warmup = max(self.warmup_steps, 2) if self.warmup_steps else 0  # as DeepSpeed's WarmupLR counts it
        if step < warmup:
            return self.max_lr * step / warmup
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return self.max_lr
        return self.max_lr * max(0.0, (self.total_steps - step) / self.decay_steps)

    def _apply(self) -> list[float]:
        lr = self.lr_at(self.last_batch_iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return [lr] * len(self.optimizer.param_groups)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_batch_iteration)] * len(self.optimizer.param_groups)

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None \
            else last_batch_iteration
        self._last_lr = self._apply()

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.last_batch_iteration = state["last_batch_iteration"]
        self._last_lr = self._apply()
