"""A run's report from its ``metrics.jsonl``: loss curves, mixture weights, the throughput summary."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from lance_core.packing import TASKS

log = logging.getLogger("lance.train")


def throughput_summary(rows: list[dict], warmup: int = 2) -> dict:
    """Medians over the steps after the first ``warmup`` ones (first steps pay one-off costs)."""
    steady = rows[warmup:] or rows

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    first = next((r for r in rows if r.get("loss") is not None), {})
    last = next((r for r in reversed(rows) if r.get("loss") is not None), {})
    return {
        "steps": rows[-1]["step"] if rows else 0,
        "first_loss": {k: first.get(k) for k in ("step", "loss", "ce", "mse")},
        "last_loss": {k: last.get(k) for k in ("step", "loss", "ce", "mse")},
        "tokens_per_s": median("tokens_per_s"), "samples_per_s": median("samples_per_s"),
        "step_time_s": median("step_time_s"), "data_wait_share": median("data_wait_share"),
        "pack_fill": median("pack_fill"), "tflops": median("tflops"), "mfu": median("mfu"),
        "skipped_samples": rows[-1].get("skipped_samples") if rows else 0,
        "skipped_steps": rows[-1].get("skipped_steps") if rows else 0,
        "peak_source": next((r["peak_source"] for r in rows if "peak_source" in r), None),
    }


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_task, ax_mix) = plt.subplots(1, 3, figsize=(15, 3.8))
    steps = [r["step"] for r in rows]
    for key in ("loss", "ce", "mse"):
        ax_loss.plot(steps, [r.get(key) for r in rows], label=key)
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss (all ranks)")
    for kind in ("mse", "ce"):
        for task in TASKS:
            key = f"{kind}/{task}"
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax_task.plot(*zip(*points), label=key, marker=".", linewidth=0.8)
    ax_task.set_yscale("log")
    ax_task.set_title("per task")
    for task in TASKS:
        points = [(r["step"], r["mixture"][task]) for r in rows if task in r.get("mixture", {})]
        if points:
            ax_mix.plot(*zip(*points), label=task)
    ax_mix.set_title("mixture weights")
    for ax in (ax_loss, ax_task, ax_mix):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, rows: list[dict]) -> dict:
    summary = throughput_summary(rows)
    if rows:
        plot_losses(rows, run_dir / "loss_curve.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def loss_window(rows: list[dict], first: bool, share: float = 0.1) -> tuple[float, int, int] | None:
    """(mean loss, first step, last step) over the first (or last) ``share`` of the steps with a loss: means
    over windows, as the progress lines show, not one step's value."""
    losses = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if not losses:
        return None
    count = max(1, int(len(losses) * share))
    window = losses[:count] if first else losses[-count:]
    return statistics.fmean(loss for _, loss in window), window[0][0], window[-1][0]


def print_summary(result) -> None:
    rows = result.metrics
    earlier = getattr(result, "complete_before", False)  # nothing trained now: the earlier run's report stands
    summary = throughput_summary(rows) if earlier else write_report(result.run_dir, rows)
    first, last = loss_window(rows, first=True), loss_window(rows, first=False)
    if first and last:
        done = "nothing trained now; an earlier run trained" if earlier else "trained"
        log.info(f"{done} {summary['steps']} steps: mean loss {first[0]:.4f} over steps {first[1]}-{first[2]} -> "
                 f"{last[0]:.4f} over steps {last[1]}-{last[2]}")
    fmt = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in summary.items()
           if k not in ("first_loss", "last_loss")}
    log.info("throughput: " + ", ".join(f"{k}={v}" for k, v in fmt.items()))
    if result.export is not None:
        log.info(f"exported: {result.export}")
    log.info(f"run folder: {result.run_dir}")
