"""The training job's DeepSpeed config: the shared engine config (pipelines/runtime) with its scheduler."""

from __future__ import annotations

from pipelines.runtime.deepspeed_config import engine_config

from .config import TrainConfig


def use_bf16(cfg: TrainConfig, on_gpu: bool) -> bool:
    return cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and on_gpu)


def build_deepspeed_config(cfg: TrainConfig, on_gpu: bool, accumulation: int = 1) -> dict:
    """One micro-batch (one pack) per rank, ``accumulation`` of them per step. The optimizer is a torch AdamW
    handed to ``deepspeed.initialize`` (runs on CPU and GPU alike); warm-up then constant is DeepSpeed's
    WarmupLR, warm-up then linear decay to 0 at the last step its WarmupDecayLR."""
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
    elif optim.warmup_steps:  # DeepSpeed's WarmupLR refuses 0 steps; without warm-up the lr is constant
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": optim.warmup_steps,
                       "warmup_type": "linear"},
        }
    return config
