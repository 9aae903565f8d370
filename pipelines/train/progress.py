"""The training progress line: one per logging step (``metrics.report_every`` and the last step), made on
rank 0 from the steps since the previous line, logged to rank 0's log file and carried to the driver.

    step 8/24 (33%) | loss 2.3853 | 12502 tok/s | MFU 10.9% | data wait 0.1% | lr 2.0e-03 | ETA 0:01:05
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

log = logging.getLogger("lance.train")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def progress_line(summary: dict) -> str:
    step, total = summary["step"], summary["total"]
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)"]
    parts.append("loss -" if summary["loss"] is None else f"loss {summary['loss']:.4f}")
    parts.append(f"{summary['tokens_per_s']:.0f} tok/s")
    parts.append("MFU -" if summary["mfu"] is None else f"MFU {100 * summary['mfu']:.1f}%")
    parts.append(f"data wait {100 * summary['data_wait_share']:.1f}%")
    parts.append(f"lr {summary['lr']:.1e}")
    if summary.get("heldout_total") is not None:
        parts.append(f"held-out {summary['heldout_total']:.4f}")
    if summary["skipped_steps"]:
        parts.append(f"skipped steps {summary['skipped_steps']}")
    parts.append(f"ETA {timedelta(seconds=round(summary['eta_s']))}")
    return " | ".join(parts)


class StepProgress:
    """Rank 0's side: takes every step's metrics row, logs a progress line at each logging step. Loss, MFU
    and rates are over the steps since the previous line; the ETA from the wall time per step since the
    first step ended (which pays one-off costs), evaluations and checkpoints included."""

    def __init__(self, start: int, total: int, every: int) -> None:
        self.start, self.total, self.every = start, total, every
        self.rows: list[dict] = []
        self.first_done: float | None = None

    def add(self, row: dict) -> dict | None:
        """The summary logged for this step, or None where no line is due."""
        now = time.perf_counter()
        step = row["step"]
        self.rows.append(row)
        if self.first_done is None:
            self.first_done, self.first_step_s = now, row["step_time_s"]
        if step % self.every and step != self.total:
            return None
        rows, self.rows = self.rows, []
        after_first = step - self.start - 1
        per_step = (now - self.first_done) / after_first if after_first else self.first_step_s
        seconds = sum(r["step_time_s"] for r in rows)
        summary = {
            "step": step, "total": self.total,
            "loss": _mean([r["loss"] for r in rows if r["loss"] is not None]),
            "tokens_per_s": sum(r["tokens"] for r in rows) / seconds,
            "mfu": _mean([r["mfu"] for r in rows if r.get("mfu") is not None]),
            "data_wait_share": sum(r["data_wait_s"] for r in rows) / seconds,
            "lr": row["lr"], "heldout_total": row.get("heldout_total"), "skipped_steps": row["skipped_steps"],
            "eta_s": per_step * (self.total - step),
        }
        log.info(progress_line(summary))
        return summary
