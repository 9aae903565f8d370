"""The frame of bench/gpu/check.py: a total time budget shared among parts, synchronised timing, peak
GPU memory, and a JSON report rewritten after every part, with a watchdog that ends an overrun run."""

from __future__ import annotations

import gc
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

GIB = 2**30


class Budget:
    """The total time budget; each part gets a share of what is left. ``None``: no budget (the dry run is
    not timed, so a loaded machine cannot make it skip parts)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def deadline(self, weight: float, weights_left: float) -> float:
        """perf_counter time by which a part of ``weight`` should be done, the parts left (itself
        included) weighing ``weights_left`` in all."""
        if self.seconds is None:
            return float("inf")
        return time.perf_counter() + max(0.0, self.remaining()) * weight / weights_left


def share_until(deadline: float, weight: float, weights_left: float) -> float:
    """The deadline of a piece of ``weight`` among pieces weighing ``weights_left`` that end by ``deadline``."""
    now = time.perf_counter()
    if deadline == float("inf"):
        return deadline
    return now + max(0.0, deadline - now) * weight / weights_left


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], object], device: torch.device, warmup: int, max_reps: int,
                deadline: float) -> tuple[list[float], float]:
    """Seconds of the timed calls of ``fn`` after ``warmup`` calls, and the warm-up seconds. Every timed call
    is synchronised on both sides. Timing stops at ``max_reps`` or when the next call would end past
    ``deadline`` (at least one timed call); the warm-up stops after one call once the deadline has passed."""
    began = time.perf_counter()
    for index in range(warmup):
        if index and time.perf_counter() > deadline:
            break
        fn()
    sync(device)
    warm = time.perf_counter() - began
    times: list[float] = []
    while len(times) < max_reps:
        if times and time.perf_counter() + statistics.median(times) > deadline:
            break
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, warm


def reset_peak(device: torch.device) -> None:
    """Free what is unreferenced and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since :func:`reset_peak` (None on the CPU: not tracked)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:600]


def section_status(rows: list[dict]) -> str:
    """ok: every row ok; fallback: every row ran, some not as on the GPU; partial: some rows failed;
    error / skipped: no row ran."""
    ran = [r for r in rows if r["status"] in ("ok", "fallback")]
    if not ran:
        return "error" if any(r["status"] == "error" for r in rows) else "skipped"
    if len(ran) < len(rows):
        return "partial"
    return "fallback" if any(r["status"] == "fallback" for r in rows) else "ok"


class Report:
    """The JSON payload: one section per part (``pending`` until it has run), rewritten whole (then
    renamed into place) after every part, so a run killed from outside still leaves a readable file."""

    def __init__(self, path: Path, parts: dict[str, float], budget: Budget, header: dict,
                 render: Callable[[dict], None]) -> None:
        self.path, self.parts, self.budget, self.render = path, parts, budget, render
        self.payload = {**header, "budget_s": budget.seconds, "elapsed_s": 0.0,
                        **{part: {"status": "pending", "rows": []} for part in parts}}
        self.lock = threading.RLock()
        self.current: str | None = None
        self.children: list = []
        """Processes a part started, ended by the watchdog if it fires."""

    def set(self, part: str, value: dict) -> None:
        with self.lock:
            self.payload[part] = value
            self.save()

    def save(self) -> None:
        with self.lock:
            self.payload["elapsed_s"] = self.budget.elapsed()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.payload, indent=2))
            tmp.replace(self.path)

    def finish(self) -> None:
        """Print the table (``render`` may add summary fields) and write the JSON."""
        self.render(self.payload)
        self.save()
        print(f"wrote {self.path}", flush=True)

    def run_part(self, part: str, fn: Callable[[float], dict], min_seconds: float) -> None:
        """Run one part by the deadline of its share of the budget (``fn`` gets it); a failure is recorded
        and the next part goes on; a part is skipped when less than ``min_seconds`` is left."""
        names = list(self.parts)
        weights_left = sum(self.parts[p] for p in names[names.index(part):])
        if self.budget.remaining() < min_seconds:
            self.set(part, {"status": "skipped", "reason": f"time budget spent ({self.budget.elapsed():.0f} s of "
                                                           f"{self.budget.seconds or 0:.0f} s)", "rows": []})
            return
        self.current = part
        started = time.perf_counter()
        try:
            result = fn(self.budget.deadline(self.parts[part], weights_left))
        except Exception as err:  # noqa: BLE001 - recorded; the next part still runs
            result = {"status": "error", "reason": error_text(err), "rows": []}
        release_memory()  # what the part built is unreferenced now
        result["seconds"] = time.perf_counter() - started
        with self.lock:
            self.current = None
            self.set(part, result)
        print(f"{part}: {result['status']} in {result['seconds']:.1f} s", flush=True)

    def start_watchdog(self, grace: float) -> None:
        """Past the budget plus ``grace``: record the running part as stopped and the pending ones as
        skipped, end the processes parts started, print the table and end the process (exit code 3)."""

        def fire() -> None:
            with self.lock:
                if self.current:
                    self.payload[self.current] = {
                        "status": "error", "rows": [],
                        "reason": f"stopped: the {self.budget.seconds:.0f} s time budget ran out in this part"}
                for part in self.parts:
                    if self.payload[part]["status"] == "pending":
                        self.payload[part] = {"status": "skipped", "reason": "time budget spent", "rows": []}
                for process in self.children:
                    if process.is_alive():
                        process.kill()
                self.finish()
                os._exit(3)

        timer = threading.Timer(self.budget.seconds + grace, fire)
        timer.daemon = True
        timer.start()
