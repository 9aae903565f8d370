"""Per-step metrics: reduced across ranks, written by rank 0 as JSON lines and TensorBoard events.

MFU (TRAINING.md): FLOPs of a step = Σ over packed samples of T·(6·N_active + 12·L·H·d·T), T the
sample's tokens (attention summed per sample, not over the whole pack; N_active one expert plus lm_head),
divided by step time · workers · peak FLOP/s of one worker (on CPU: step CPU time and the matmul
probe's FLOP per CPU-second).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from lance_core.config import ModelConfig
from lance_core.flops import ParameterCounts, attention_flops_per_token
from lance_core.packing import IGNORE_INDEX, TASKS, PackedBatch
from pipelines.runtime.run_log import TensorBoardLog

H100_BF16_DENSE_TFLOPS = 989.0
METRICS_FILE = "metrics.jsonl"


def pack_flops(batch: PackedBatch, cfg: ModelConfig, counts: ParameterCounts) -> float:
    real = batch.task_index >= 0
    lengths = torch.bincount(batch.sample_index[real]).double()
    lengths = lengths[lengths > 0]
    per_token_attention = attention_flops_per_token(cfg, 1)
    return float((lengths * (6.0 * counts.active_per_token + per_token_attention * lengths)).sum())


def probe_peak_tflops(size: int = 1024, reps: int = 5) -> float:
    """fp32 matmul TFLOP per CPU-second of this process: the MFU denominator on CPU, where MFU is taken
    over the step's CPU time (a host shared with other work stretches wall time, not CPU time)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.process_time()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.process_time() - start) / 1e12


def peak_tflops(configured: float | None, device: torch.device) -> tuple[float, str]:
    if configured is not None:
        return configured, "config"
    if device.type == "cuda":
        return H100_BF16_DENSE_TFLOPS, "h100-bf16-dense"
    return probe_peak_tflops(), "cpu-matmul-probe"


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


class MetricsWriter:
    """Rank 0's writer: ``metrics.jsonl`` (one row per step) and TensorBoard events under ``tb/``."""

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = run_dir / METRICS_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # A resumed run writes the steps after its checkpoint again; a line cut by a kill is dropped.
            kept = [row for row in read_jsonl(self.path) if row.get("step", 0) <= start_step]
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self.tb = TensorBoardLog(run_dir / "tb", purge_step=start_step + 1) if tensorboard else None

    def write(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            self.tb.scalars(row, row["step"])  # nested dicts too: mixture/<task>, capability/<task>, eval/...

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines log, skipping lines that do not parse: a process killed while
    appending leaves the last line cut short (and the next append may land after it)."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _replace_whole(path: Path, fill) -> None:
    """Write ``path`` through ``fill(file)`` beside it under a temporary name, then rename it into place:
    readers (and a resume after a kill) see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    _replace_whole(path, lambda out: out.write(text.encode()))


def copy_file_atomic(source: Path, path: Path) -> None:
    def fill(out) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 24)

    _replace_whole(path, fill)


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
