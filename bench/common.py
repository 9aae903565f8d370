"""Shared helpers of the benchmarks: timing, peak memory, tables and JSON output."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timings(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn``."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def wall_and_cpu(fn: Callable[[], object], reps: int) -> tuple[list[float], list[float]]:
    """Wall and process CPU seconds (all threads) of ``reps`` calls of ``fn``.

    On a shared machine wall time grows with the load of other processes; CPU time much less so (a
    descheduled process does not accrue it), which makes CPU-time ratios the steadier comparison."""
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def load_average() -> float:
    """1-minute load average of the machine: other work competing for the cores makes timings noisy."""
    return os.getloadavg()[0]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_increase(fn: Callable[[], object], interval: float = 0.0005) -> int:
    """Peak growth of the resident set while ``fn`` runs, sampled every ``interval`` seconds.

    Meaningful when large allocations are returned to the OS on free (glibc with MALLOC_MMAP_THRESHOLD_
    set, which disables its dynamic threshold): the resident set then follows live memory."""
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak, _rss_bytes()) - base)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns] for row in rows]
    widths = [max(len(header), *(len(c[i]) for c in cells)) for i, (_, header, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def write_json(name: str, payload: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
