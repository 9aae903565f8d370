"""The DeepSpeed config, built in one place from the typed training config."""

from __future__ import annotations

from .config import TrainConfig


def use_bf16(cfg: TrainConfig, on_gpu: bool) -> bool:
    return cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and on_gpu)


def build_deepspeed_config(cfg: TrainConfig, on_gpu: bool) -> dict:
    """One micro-batch (one pack) per rank per step. The optimizer is a torch AdamW handed to
    ``deepspeed.initialize`` (runs on CPU and GPU alike); warm-up then constant is DeepSpeed's WarmupLR."""
    ds, optim = cfg.deepspeed, cfg.optim
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # Copying gradients into one contiguous buffer saves GPU memory fragmentation; on CPU it is a
        # memory-bound copy per step for nothing.
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, allgather_bucket_size=ds.reduce_bucket_size,
                    overlap_comm=on_gpu, contiguous_gradients=on_gpu)
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.reduce_bucket_size, stage3_param_persistence_threshold=10_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg, on_gpu)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optim.warmup_steps:  # DeepSpeed's WarmupLR refuses 0 steps; without warm-up the lr is constant
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": optim.warmup_steps,
                       "warmup_type": "linear"},
        }
    return config
