"""ZeRO-3 ``zero.Init``: the model is created partitioned, yet holds exactly the values of the plain build,
random or loaded from a Lance checkpoint. Two gloo ranks in subprocesses (DeepSpeed on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.deepspeed

ROOT = Path(__file__).resolve().parents[1]

RANK_SCRIPT = r"""
import os, sys, torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist
from pipelines.train.config import load_train_config
from pipelines.train.deepspeed_config import build_deepspeed_config
from pipelines.train.trainer import build_initial_model

init_lance, out = sys.argv[1] or None, sys.argv[2]
cfg = load_train_config({"model": {"preset": "tiny", "weights": {"lance": init_lance}}, "seed": 3,
                         "deepspeed": {"zero_stage": 3}})
ds_config = build_deepspeed_config(cfg, on_gpu=False)
_, model = build_initial_model(cfg, ds_config)
params = list(model.parameters())
assert all(hasattr(p, "ds_id") for p in params), "the parameters were not created partitioned"
local = sum(p.ds_tensor.numel() for p in params)
total = sum(p.ds_numel for p in params)
assert local < 0.6 * total, f"rank {dist.get_rank()} holds {local} of {total} values"
with deepspeed.zero.GatheredParameters(params):
    if dist.get_rank() == 0:
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        state.update({n: b.detach().clone() for n, b in model.named_buffers()})
        torch.save(state, out)
dist.barrier()
dist.destroy_process_group()
# skip the interpreter's teardown of gloo/DeepSpeed C++ statics, which can abort once the work is done
sys.stdout.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _partitioned_state(tmp_path: Path, init_lance: str = "") -> dict[str, torch.Tensor]:
    out = tmp_path / "state.pt"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, init_lance, str(out)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    return torch.load(out)


def _plain_state(init_lance: str | None = None) -> dict[str, torch.Tensor]:
    from pipelines.train.config import load_train_config
    from pipelines.train.trainer import build_initial_model

    cfg = load_train_config({"model": {"preset": "tiny", "weights": {"lance": init_lance}}, "seed": 3})
    _, model = build_initial_model(cfg)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return state


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_zero_init_random_weights_equal_the_plain_build(tmp_path):
    _assert_same(_partitioned_state(tmp_path), _plain_state())


@pytest.mark.slow
def test_zero_init_loads_a_checkpoint_scattered_from_rank0(tmp_path):
    from lance_core.config import model_preset
    from lance_core.model import build_model

    torch.manual_seed(11)
    other = build_model(model_preset("tiny"))
    weights = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    got = _partitioned_state(tmp_path, str(weights))
    _assert_same(got, _plain_state(str(weights)))
    assert torch.equal(got["llm2vae.weight"], other.state_dict()["llm2vae.weight"])
