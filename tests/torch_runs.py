"""Training runs under the torch launcher in a process of their own (a spawned child: DeepSpeed and the
process group are per process), with what the tests compare recorded on the way.

``record_run`` trains a config in one process, records the fp32 master weights after every optimizer step
(DeepSpeed's own ``safe_get_full_fp32_param``, independent of the EMA code) and every collective call seen
by :func:`pipelines.runtime.collectives.check_collective_devices`, and writes them to ``out``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import torch


def record_run(cfg_json: str, out: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.utils import safe_get_full_fp32_param

    from pipelines.runtime import ema as ema_module
    from pipelines.runtime.collectives import check_collective_devices
    from pipelines.train.config import TrainConfig
    from pipelines.train.torch_launch import run_torch_training

    masters: list[dict[str, torch.Tensor]] = []
    initial: dict[str, torch.Tensor] = {}
    original_init, original_update = ema_module.ShardedEMA.__init__, ema_module.ShardedEMA.update

    def full_masters(ema) -> dict[str, torch.Tensor]:
        return {name: safe_get_full_fp32_param(p).detach().double().clone() for name, p in ema.params.items()}

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        initial.update(full_masters(self))

    def update(self):
        original_update(self)
        masters.append(full_masters(self))

    ema_module.ShardedEMA.__init__, ema_module.ShardedEMA.update = init, update
    with check_collective_devices() as seen:
        result = run_torch_training(TrainConfig.model_validate_json(cfg_json))
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"initial": initial, "masters": masters}, Path(out) / "masters.pt")
    (Path(out) / "collectives.json").write_text(json.dumps(
        {"seen": seen, "checkpoint": result.checkpoint, "export": str(result.export)}))


def run_expecting_error(cfg_json: str, out: str) -> None:
    """Train; write the error the run ends with (type: message) to ``out``/error.txt, or "none"."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import logging

    from pipelines.train.config import TrainConfig
    from pipelines.train.torch_launch import run_torch_training

    Path(out).mkdir(parents=True, exist_ok=True)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("lance").addHandler(Keep())
    try:
        run_torch_training(TrainConfig.model_validate_json(cfg_json))
        error = "none"
    except Exception as err:  # noqa: BLE001 - the test reads it
        error = f"{type(err).__name__}: {err}"
    (Path(out) / "error.txt").write_text(error)
    (Path(out) / "log.txt").write_text("\n".join(records))


def in_child(function, *args, timeout: float = 900) -> None:
    """``function(*args)`` in a spawned process; raises when it fails."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=function, args=args)
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        raise TimeoutError(f"{function.__name__} did not finish in {timeout} s")
    if process.exitcode != 0:
        raise RuntimeError(f"{function.__name__} failed (exit code {process.exitcode}); see the output above")


def run_ranks(world: int, function, *args: str, timeout: float = 900) -> None:
    """``function(*args)`` on ``world`` gloo ranks, each a process of its own with ``torchrun``'s environment;
    raises with the ranks' output when one fails."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    code = f"import sys; from tests.torch_runs import {function.__name__} as f; f(*sys.argv[1:])"
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError("a rank failed:\n" + "\n".join(log[-3000:] for log in logs))


def train_rank(cfg_json: str, out: str) -> None:
    """One rank of a ``torchrun``-style launch: train ``cfg_json``; rank 0 writes the metrics rows it read
    back and every rank the sample keys of its packs (``out/keys-<rank>.json``: step -> one list per pack, in
    the order of the rank's pack slots)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    from pipelines.train import trainer as trainer_module
    from pipelines.train.config import TrainConfig
    from pipelines.train.torch_launch import run_torch_training

    seen: dict[int, list[str]] = {}
    original = trainer_module.Trainer.train_step

    def train_step(self, step):
        outcome = original(self, step)
        seen[step] = [list(pack.keys) for pack in outcome.packs]
        return outcome

    trainer_module.Trainer.train_step = train_step
    result = run_torch_training(TrainConfig.model_validate_json(cfg_json))
    Path(out).mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    (Path(out) / f"keys-{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        (Path(out) / "metrics.json").write_text(json.dumps(result.metrics))


def record_background_save(cfg_json: str, out: str) -> None:
    """Train with a checkpoint write slowed down (its data state takes a second more); write the times of the
    steps and of the writes to ``out``/events.json."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import time

    from pipelines.train import checkpoints
    from pipelines.train import trainer as trainer_module
    from pipelines.train.config import TrainConfig
    from pipelines.train.torch_launch import run_torch_training

    events: list[list] = []
    original_save, original_step = checkpoints.save_data_state, trainer_module.Trainer.train_step

    def slow_save(folder, slot, state):
        events.append(["write_start", str(folder), time.monotonic()])
        time.sleep(1.0)
        original_save(folder, slot, state)
        events.append(["write_end", str(folder), time.monotonic()])

    def train_step(self, step):
        events.append(["step", step, time.monotonic()])
        return original_step(self, step)

    checkpoints.save_data_state, trainer_module.Trainer.train_step = slow_save, train_step
    run_torch_training(TrainConfig.model_validate_json(cfg_json))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "events.json").write_text(json.dumps(events))
