"""Non-finite gradients never reach the weights (pipelines/runtime/finite_steps.py): real DeepSpeed engines on
two gloo ranks (CPU), ZeRO 0-3 in fp32 and bf16, a NaN on one rank only. A run with a bad step in the middle
ends with exactly the weights and optimizer state of the same run without that step; the LR schedule holds,
DeepSpeed counts the skip. The GRPO learner and the trainer's ``_update`` go through the same function."""

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
deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist
from pipelines.runtime.deepspeed_config import engine_config
from pipelines.runtime.finite_steps import step_if_finite

rank = dist.get_rank()
NAN = float("nan")


def build(stage, bf16, accumulation):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = engine_config(micro_batch=2, accumulation=accumulation, grad_clip=1.0, zero_stage=stage, bf16=bf16,
                           on_gpu=False, bucket_size=64)
    config["zero_allow_untested_optimizer"] = True
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                          "warmup_num_steps": 10, "warmup_type": "linear"}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def state(engine):
    # this rank's optimizer state: the innermost torch optimizer's parameters (the fp32 masters, or the flat fp32
    # partitions under ZeRO / bf16) and its Adam moments; local, no collective
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    # ZeRO-3 puts its flat fp32 partitions into the param groups only during its step
    masters = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or \
        [param for group in optimizer.param_groups for param in group["params"]]
    out = {}
    for k, param in enumerate(masters):
        out[str(k)] = param.detach().double().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            value = optimizer.state.get(param, {}).get(key)
            out[f"{k}/{key}"] = value.detach().double().clone() if value is not None else torch.zeros(0)
    return out


def micro_batch(engine, window, index, kind):
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1000 * window + 10 * index + rank)).to(dtype)
    out = engine(x)
    bad = kind != "good" and rank == 1
    if bad and kind == "nan_grad":  # finite loss, NaN gradient
        out.register_hook(lambda grad: torch.full_like(grad, NAN))
    loss = out.float().pow(2).mean()
    if bad and kind == "nan_loss":  # a NaN loss whose gradient is finite: only the loss check sees it
        loss = loss + torch.tensor(NAN)
    if bad and kind == "inf_loss":
        loss = loss * float("inf")
    engine.backward(loss)
    return bool(torch.isfinite(loss.detach()))


def train(stage, bf16, windows, accumulation):
    # windows: (index, kinds of its micro-batches); returns the state after each window, the steps taken
    engine = build(stage, bf16, accumulation)
    states, taken = [state(engine)], []
    for window, kinds in windows:
        finite = True
        for index, kind in enumerate(kinds):
            finite = micro_batch(engine, window, index, kind) and finite
            if engine.is_gradient_accumulation_boundary():
                taken.append(step_if_finite(engine, finite))
            else:
                engine.step()
        states.append(state(engine))
    return engine, states, taken


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


results = []
for stage, bf16, accumulation, kind in json.loads(sys.argv[1]):
    good = ["good"] * accumulation
    bad = ["good"] * (accumulation - 1) + [kind]
    try:
        engine, states, taken = train(stage, bf16, [(0, good), (1, bad), (2, good), (3, good)], accumulation)
        skipped, lr = engine.skipped_steps, engine.get_lr()[0]
        clean_engine, clean, _ = train(stage, bf16, [(0, good), (2, good), (3, good)], accumulation)
        results.append({"case": [stage, bf16, accumulation, kind], "taken": taken, "skipped": skipped,
                        "untouched": same(states[1], states[2]), "same_run": same(states[-1], clean[-1]),
                        "moved": not same(states[0], states[-1]), "lr": lr, "clean_lr": clean_engine.get_lr()[0],
                        "weights_finite": all(bool(torch.isfinite(v).all()) for v in states[-1].values())})
    except Exception as error:  # noqa: BLE001 - reported per case
        import traceback
        results.append({"case": [stage, bf16, accumulation, kind], "error": traceback.format_exc()[-1500:]})
# a checkpoint is never written from non-finite weights: one master value NaN on rank 1 only
from pathlib import Path
from pipelines.runtime.checkpointing import NonFiniteWeightsError, save_training_state
from pipelines.runtime.ema import master_fragment

engine = build(2, True, 1)
if rank == 1:
    fragment = next(f for f in (master_fragment(p)[1] for p in engine.module.parameters()) if f.numel())
    with torch.no_grad():
        fragment[0] = NAN
folder = Path(sys.argv[2] + ".checkpoint")
try:
    save_training_state(engine, folder, None)
    refused = None
except NonFiniteWeightsError as error:
    refused = str(error)
results.append({"case": "save", "refused": refused, "written": folder.exists()})
if True:  # every rank: its own shares of the state
    with open(f"{sys.argv[2]}.{rank}", "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(tmp_path: Path, cases: list) -> list[dict]:
    out = tmp_path / "results.json"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(cases), str(out)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(log[-4000:] for log in logs)
    return [result for rank in range(2) for result in json.loads(Path(f"{out}.{rank}").read_text())]


CASES = [  # (ZeRO stage, bf16, accumulation, what goes wrong on rank 1 in the second window)
    (0, False, 1, "nan_grad"), (0, True, 2, "inf_loss"), (1, True, 2, "nan_grad"),
    (2, False, 1, "nan_loss"), (2, True, 1, "nan_grad"), (3, False, 2, "nan_grad"), (3, True, 1, "nan_loss"),
]


@pytest.mark.slow
def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank_at_every_stage_and_never_saved(tmp_path):
    results = _two_ranks(tmp_path, [list(case) for case in CASES])
    saves = [result for result in results if result["case"] == "save"]
    results = [result for result in results if result["case"] != "save"]
    assert len(results) == 2 * len(CASES) and len(saves) == 2
    for save in saves:  # refused on both ranks, nothing written
        assert save["refused"] and "non-finite weights" in save["refused"] and not save["written"], save
    for result in results:
        case = result["case"]
        assert "error" not in result, result
        assert result["taken"] == [True, False, True, True], result
        assert result["skipped"] == 1 and result["weights_finite"], result
        assert result["untouched"], f"{case}: the skipped window changed weights or optimizer state"
        assert result["same_run"], f"{case}: the run differs from the same run without the bad window"
        assert result["moved"] and result["lr"] == pytest.approx(result["clean_lr"]), result
