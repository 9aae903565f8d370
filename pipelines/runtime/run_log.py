"""How a run logs: its ``metrics.jsonl`` and TensorBoard events (:class:`MetricsLog`, one row per step or
epoch); what the program says, in one ``logging`` format; each Ray worker's output in its own file; worker
lines meant for the user carried to the driver.

    setup_logging()                                    # a job's entrypoint: the ``lance`` loggers to stderr
    with worker_logging(run_dir / "logs" / "rank-0.log", sink):   # in a worker: fd 1 and 2 to the file,
        ...                                            # and the ``lance`` lines to the driver as well
    with follow_worker_logs(sink): trainer.fit()       # the driver logs what the workers sent
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .local_files import read_jsonl, write_text_atomic

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
ROOT_LOGGER = "lance"

log = logging.getLogger(f"{ROOT_LOGGER}.run")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirect made later)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """The ``lance`` loggers print to stderr in LOG_FORMAT (once per process, whatever the calls)."""
    logger = logging.getLogger(ROOT_LOGGER)
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        logger.addHandler(_CurrentStderr())
    logger.setLevel(level)
    logger.propagate = False
    return logger


# ------------------------------------------------------------------------------------------ rank log files
@contextmanager
def redirect_output(path: Path):
    """This process's file descriptors 1 and 2 appended to ``path`` (Python, C++ and Ray's own lines of
    every thread), restored on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (fd, *saved):
            os.close(descriptor)


class LogSink:
    """A Ray actor holding the log lines workers send until the driver takes them."""

    def __init__(self) -> None:
        self.records: list[tuple] = []

    def push(self, record: tuple) -> None:
        self.records.append(record)

    def take(self) -> list[tuple]:
        records, self.records = self.records, []
        return records


def new_log_sink():
    import ray

    return ray.remote(LogSink).options(num_cpus=0).remote()


class _ToSink(logging.Handler):
    """Sends each record to the sink; calls from one process run in order, ``flush`` waits for the last."""

    def __init__(self, sink) -> None:
        super().__init__()
        self.sink, self.last = sink, None

    def emit(self, record: logging.LogRecord) -> None:
        from ray.exceptions import RayError

        try:
            self.last = self.sink.push.remote((record.created, record.levelno, record.name, record.getMessage()))
        except RayError:
            self.handleError(record)

    def flush(self) -> None:
        if self.last is not None:
            import ray
            from ray.exceptions import RayError

            try:
                ray.get(self.last, timeout=60)
            except RayError as err:  # the lines are in the rank log file all the same
                print(f"log lines for the driver not delivered: {err}", file=sys.stderr, flush=True)
            self.last = None


@contextmanager
def worker_logging(path: Path, sink=None):
    """In a Ray worker: all output into ``path``, the ``lance`` loggers in LOG_FORMAT there and, with a
    sink (rank 0), to the driver as well."""
    with redirect_output(path):
        logger = logging.getLogger(ROOT_LOGGER)
        added = [_CurrentStderr()] + ([_ToSink(sink)] if sink is not None else [])
        before = logger.level, logger.propagate
        for handler in added:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield
        finally:
            for handler in added:
                handler.flush()
                logger.removeHandler(handler)
            logger.setLevel(before[0])
            logger.propagate = before[1]


class ActorLog:
    """Mixed into a long-lived Ray actor: ``actor.log_to.remote(path)`` sends the rest of its process's output
    (and its ``lance`` log lines, in the one format) to ``path`` for the actor's life, as a training rank's go
    to ``logs/rank-N.log``."""

    def log_to(self, path: str) -> str:
        from contextlib import ExitStack

        if getattr(self, "_actor_log", None) is None:
            self._actor_log = ExitStack()
            self._actor_log.enter_context(worker_logging(Path(path)))
        return path


@contextmanager
def follow_worker_logs(sink, interval_s: float = 0.5):
    """On the driver, while the block runs: log the records workers sent to ``sink`` under their own
    logger names and times (and the last ones after the block)."""
    import ray
    from ray.exceptions import RayError

    stop = threading.Event()

    def drain() -> None:
        for created, level, name, message in ray.get(sink.take.remote(), timeout=60):
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                record = logger.makeRecord(name, level, "(worker)", 0, message, None, None)
                record.created, record.msecs = created, math.modf(created)[0] * 1000
                logger.handle(record)

    def follow() -> None:
        while not stop.wait(interval_s):
            try:
                drain()
            except RayError as err:  # the driver's own work goes on; the rank log files hold the lines
                log.warning("worker log lines no longer reach the driver: %s", err)
                return

    thread = threading.Thread(target=follow, name="lance-worker-logs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            drain()
        except RayError as err:
            log.warning("the last worker log lines did not reach the driver: %s", err)
        ray.kill(sink, no_restart=True)


# ------------------------------------------------------------------------------------------ TensorBoard
def _numbers(row: dict, index: str, prefix: str = ""):
    for key, value in row.items():
        if key == index:
            continue
        if isinstance(value, dict):
            yield from _numbers(value, index, f"{prefix}{key}/")
        elif isinstance(value, (int, float)):
            yield f"{prefix}{key}", float(value)


class TensorBoardLog:
    """TensorBoard events under ``folder``: every number of a metrics row as a scalar (nested dicts as
    ``key/inner``), images as HWC uint8 arrays. ``purge_step``: a resumed run's first step, whose later
    events from the run before are dropped. Without the tensorboard package it says so and records nothing."""

    def __init__(self, folder: Path, purge_step: int | None = None, index: str = "step") -> None:
        self.index = index
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
            self.writer = None
        else:
            self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def scalars(self, row: dict, step: int) -> None:
        if self.writer is not None:
            for tag, value in _numbers(row, self.index):
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricsLog:
    """``metrics.jsonl`` (one JSON row per step or epoch, ``index`` naming which) and, with ``tensorboard``,
    events under ``tb/``: every number of a row (nested dicts too) and images."""

    def __init__(self, run_dir: Path, index: str = "step", tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.index = index
        self.tb_dir = run_dir / "tb" if tensorboard else None
        self.tb: TensorBoardLog | None = None

    def history(self) -> list[dict]:
        """The rows written so far (a line cut short by a kill is left out)."""
        return read_jsonl(self.path) if self.path.is_file() else []

    def resume_at(self, first: int) -> None:
        """Keep the rows before ``first`` (a resumed run writes the later ones again) and open TensorBoard from
        ``first`` on (events a run before wrote from there are dropped)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in self.history() if row.get(self.index, 0) < first]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        if self.tb_dir is not None:
            self.close()
            self.tb = TensorBoardLog(self.tb_dir, purge_step=first, index=self.index)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            self.tb.scalars(row, row[self.index])

    def image(self, tag: str, image: np.ndarray, at: int) -> None:
        if self.tb is not None:
            self.tb.image(tag, image, at)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
