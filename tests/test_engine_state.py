"""The engine state reshards (pipelines/runtime/engine_state.py): real DeepSpeed engines on gloo ranks (CPU).
Four ranks at ZeRO-2 train three steps and save; two ranks at ZeRO 0, 1, 2 and 3, with two accumulation
micro-batches each (the same global batch), load it and take the fourth step. Their fp32 masters, Adam moments
and learning rate then equal those of the four ranks' own fourth step; no file of the state is a pickle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.deepspeed

ROOT = Path(__file__).resolve().parents[1]

RANK_SCRIPT = r"""
import json, os, sys, torch, deepspeed
from pathlib import Path
deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from pipelines.runtime.deepspeed_config import engine_config
from pipelines.runtime.engine_state import load_engine_state, save_engine_state

rank, world = dist.get_rank(), dist.get_world_size()
mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
GLOBAL = 4
data = torch.Generator().manual_seed(7)
batches = [(torch.randn(3, 8, generator=data), torch.randn(3, 4, generator=data)) for _ in range(4 * GLOBAL)]


def build(stage, accumulation):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = engine_config(micro_batch=3, accumulation=accumulation, grad_clip=1.0, zero_stage=stage, bf16=False,
                           on_gpu=False, bucket_size=64)
    config["zero_allow_untested_optimizer"] = True
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                          "warmup_num_steps": 10, "warmup_type": "linear"}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def step(engine, number, accumulation):
    for micro in range(accumulation):
        x, y = batches[number * GLOBAL + rank * accumulation + micro]
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()


def moment(engine, p, key):
    full = safe_get_full_optimizer_state(p, key)
    return engine.optimizer.state[p][key] if full is None else full  # ZeRO-0: the torch optimizer's own


def record(engine):
    params = [p for p in engine.module.parameters()]
    masters = [safe_get_full_fp32_param(p) for p in params]
    masters = [p.detach() if m is None else m for p, m in zip(params, masters)]  # ZeRO-0 in fp32: the parameter
    return {"master": [m.reshape(-1).tolist() for m in masters],
            "exp_avg": [moment(engine, p, "exp_avg").reshape(-1).tolist() for p in params],
            "exp_avg_sq": [moment(engine, p, "exp_avg_sq").reshape(-1).tolist() for p in params],
            "lr": engine.get_lr()[0], "global_steps": engine.global_steps}


results = {}
if mode == "save":
    engine = build(2, 1)
    for number in range(3):
        step(engine, number, 1)
    save_engine_state(engine, folder, {"note": "client"})
    step(engine, 3, 1)
    results["reference"] = record(engine)
else:
    for stage in (0, 1, 2, 3):
        engine = build(stage, 2)
        client = load_engine_state(engine, folder)
        assert client == {"note": "client"}, client
        step(engine, 3, 2)
        results[f"zero{stage}"] = record(engine)
        del engine
if rank == 0:
    Path(out).write_text(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ranks(world: int, *args: str) -> None:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(log[-4000:] for log in logs)


def _close(a, b, tol=1e-6):
    return all(abs(x - y) <= tol * max(1.0, abs(y)) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@pytest.mark.slow
def test_four_zero2_ranks_resume_on_two_ranks_at_every_stage(tmp_path):
    folder = tmp_path / "checkpoint"
    _ranks(4, "save", str(folder), str(tmp_path / "four.json"))
    assert sorted(p.name for p in (folder / "state").iterdir()) == [
        "engine.json", *(f"rank_{r:05d}.safetensors" for r in range(4))]
    _ranks(2, "load", str(folder), str(tmp_path / "two.json"))
    reference = json.loads((tmp_path / "four.json").read_text())["reference"]
    resumed = json.loads((tmp_path / "two.json").read_text())
    assert sorted(resumed) == ["zero0", "zero1", "zero2", "zero3"]
    for stage, got in resumed.items():
        assert got["global_steps"] == reference["global_steps"] == 4, stage
        assert abs(got["lr"] - reference["lr"]) < 1e-12, stage
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert _close(got[key], reference[key]), (stage, key)
