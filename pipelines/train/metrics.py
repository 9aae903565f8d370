"""Per-step metrics: reduced across ranks, written by rank 0 as JSON lines and TensorBoard events.

MFU (TRAINING.md): FLOPs of a step = Σ over packed samples of T·(6·N_expert + 12·L·H·d·T), T the
sample's tokens (attention summed per sample, not over the whole pack; N_expert one expert's layers), plus
6·N_lm_head per answer token (the logits are computed there only),
divided by step time · workers · peak FLOP/s of one worker (on CPU: step CPU time and the matmul
probe's FLOP per CPU-second).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lance_core.config import ModelConfig
from lance_core.flops import ParameterCounts, attention_flops_per_token
from lance_core.packing import IGNORE_INDEX, TASKS, PackedBatch
from pipelines.runtime.local_files import read_jsonl

GPU_BF16_DENSE_TFLOPS: tuple[tuple[str, str, float], ...] = (
    # (entry, substring of the CUDA device name, datasheet dense bf16 TFLOP/s); the first entry whose
    # substring occurs in the name wins, so "H100 PCIe" comes before "H100" and "L40S" / "L40" before "L4"
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100 SXM", "H100", 989.0),
    ("H200 NVL", "H200 NVL", 835.0),
    ("H200", "H200", 989.0),
    ("B200", "B200", 2250.0),
    ("A100", "A100", 312.0),
    ("A10G", "A10G", 125.0),  # approximate: the A10's figure
    ("L40S", "L40S", 362.0),
    ("L40", "L40", 181.0),
    ("L4", "L4", 121.0),
)
METRICS_FILE = "metrics.jsonl"


def pack_flops(batch: PackedBatch, cfg: ModelConfig, counts: ParameterCounts) -> float:
    """Training FLOPs of a pack: every real token through one expert's layers (6·N_expert) and attention over
    its own sample; lm_head (6·N_head) only at the answer tokens, where the logits are computed."""
    real = batch.task_index >= 0
    lengths = torch.bincount(batch.sample_index[real]).double()
    lengths = lengths[lengths > 0]
    per_token_attention = attention_flops_per_token(cfg, 1)
    lm_head = counts.active_per_token - counts.und_expert
    ce_tokens = int((batch.ce_labels != IGNORE_INDEX).sum())
    return float((lengths * (6.0 * counts.und_expert + per_token_attention * lengths)).sum()
                 + 6.0 * lm_head * ce_tokens)


def probe_peak_tflops(size: int = 1024, reps: int = 5) -> float:
    """fp32 matmul TFLOP per CPU-second of this process: the MFU denominator on CPU, where MFU is taken
    over the step's CPU time (a host shared with other work stretches wall time, not CPU time)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.process_time()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.process_time() - start) / 1e12


def probe_cuda_peak_tflops(device: torch.device, size: int = 8192, reps: int = 20) -> float:
    """bf16 matmul TFLOP per wall second on ``device``: the MFU denominator of a GPU missing from
    :data:`GPU_BF16_DENSE_TFLOPS` (a measured rate, below the datasheet peak)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def gpu_table_entry(device_name: str) -> tuple[str, float] | None:
    """(entry, dense bf16 TFLOP/s) of the first table row whose substring is in ``device_name`` (any case)."""
    name = device_name.lower()
    return next(((entry, tflops) for entry, pattern, tflops in GPU_BF16_DENSE_TFLOPS if pattern.lower() in name),
                None)


def peak_tflops(configured: float | None, device: torch.device) -> tuple[float, str]:
    """Peak TFLOP/s of one worker and where it came from: the config, the GPU table (by device name), a bf16
    matmul probe on a GPU missing from the table, or the CPU matmul probe."""
    if configured is not None:
        return configured, "config"
    if device.type != "cuda":
        return probe_peak_tflops(), "cpu-matmul-probe"
    device_name = torch.cuda.get_device_name(device)
    entry = gpu_table_entry(device_name)
    if entry is not None:
        return entry[1], f"table:{entry[0]} bf16 dense ({device_name})"
    return probe_cuda_peak_tflops(device), f"cuda-matmul-probe ({device_name} is not in the table)"


def task_loss_sums(batch: PackedBatch, per_task: dict[str, float]) -> torch.Tensor:
    """(4, len(TASKS)): CE sums, CE token counts, MSE sums, MSE token counts per task on this rank."""
    out = torch.zeros(4, len(TASKS), dtype=torch.float64)
    ce_mask = batch.ce_labels != IGNORE_INDEX
    for index, task in enumerate(TASKS):
        of_task = batch.task_index == index
        for row, (mask, key) in enumerate(((ce_mask, f"ce/{task}"), (batch.mse_mask, f"mse/{task}"))):
            count = float((mask & of_task).sum())
            if count and key in per_task:
                out[2 * row, index] = per_task[key] * count
                out[2 * row + 1, index] = count
    return out


class ExpertGradProbe:
    """Accumulates, during backward on this rank, the squared gradient norm reaching each expert
    (UND: weights without ``_moe_gen``; GEN: ``_moe_gen`` weights) before any cross-rank reduction."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.sq: dict[str, torch.Tensor | float] = {"und": 0.0, "gen": 0.0}
        self.handles = []
        for name, param in model.named_parameters():
            if not param.requires_grad or ".layers." not in name:
                continue
            expert = "gen" if "_moe_gen" in name else "und"
            self.handles.append(param.register_hook(lambda grad, e=expert: self._add(e, grad)))

    def _add(self, expert: str, grad: torch.Tensor) -> None:
        self.sq[expert] = self.sq[expert] + grad.detach().float().pow(2).sum()

    def take(self) -> tuple[float, float]:
        und, gen = float(self.sq["und"]) ** 0.5, float(self.sq["gen"]) ** 0.5
        self.sq = {"und": 0.0, "gen": 0.0}
        return und, gen


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``, one per step (the last one written wins after a restart)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    for row in read_jsonl(path):
        if "step" in row:
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]
