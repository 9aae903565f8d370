"""The DeepSpeed engine config both trainers share (the supervised trainer and the GRPO learner); each adds
its own optimizer or scheduler entries."""

from __future__ import annotations

from typing import Literal


CommunicationDtype = Literal["fp32", "bf16"]


def engine_config(*, micro_batch: int, accumulation: int, grad_clip: float, zero_stage: int, bf16: bool,
                  on_gpu: bool, bucket_size: int | None = None, communication_dtype: CommunicationDtype = "fp32") -> dict:
    """``bucket_size`` sizes ZeRO's reduce / all-gather (and stage-3 prefetch) buckets; None keeps
    DeepSpeed's defaults. ``communication_dtype``: the dtype gradients are reduced in across the ranks
    (fp32 by default: a bf16 sum over many ranks loses the small gradients; bf16 halves the traffic)."""
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 1 and bucket_size is not None:
        # Copying gradients into one contiguous buffer saves GPU memory fragmentation; on CPU it is a
        # memory-bound copy per step for nothing.
        zero.update(reduce_bucket_size=bucket_size, allgather_bucket_size=bucket_size, overlap_comm=on_gpu,
                    contiguous_gradients=on_gpu)
    if zero_stage == 3 and bucket_size is not None:
        zero.update(stage3_prefetch_bucket_size=bucket_size, stage3_param_persistence_threshold=10_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "communication_data_type": communication_dtype,
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
