"""The collectives of the trainers (pipelines/runtime/collectives.py): named metric reduction (the names
round-trip through one flat tensor, sums, maxes and mins come back under their names, on a real one-rank
gloo group), and every tensor on the process group's device: a group whose backend is NCCL gets its
tensors on the GPU (here: a stand-in device), and the checking double refuses a tensor off the group's
device or a collective called around the helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipelines.runtime import collectives
from pipelines.runtime.collectives import all_reduce_named, pack_named, unpack_named


def test_pack_and_unpack_keep_names_order_and_shapes():
    values = {"loss": 1.5, "tokens": 7, "per_task": torch.arange(6, dtype=torch.float32).view(2, 3), "one": 2.0}
    flat, layout = pack_named(values)
    assert flat.dtype == torch.float64 and flat.tolist() == [1.5, 7.0, 0, 1, 2, 3, 4, 5, 2.0]
    out = unpack_named(flat, layout)
    assert list(out) == list(values)
    assert out["loss"] == 1.5 and out["tokens"] == 7.0 and out["one"] == 2.0
    assert isinstance(out["loss"], float)
    assert out["per_task"].dtype == torch.float64 and out["per_task"].shape == (2, 3)
    assert torch.equal(out["per_task"], values["per_task"].double())


def _two_ranks(monkeypatch, mine: dict, other: dict) -> dict:
    """``all_reduce_named`` on this rank's values, with a second rank's values supplied by replaying what
    that rank would send: each collective call combines with the other rank's tensor of the same call."""
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op, group=None: sent.append(tensor.clone()))
    all_reduce_named(**other)
    calls = iter(sent)

    def combine(tensor: torch.Tensor, op, group=None) -> None:
        theirs = next(calls)
        assert theirs.shape == tensor.shape
        tensor.copy_(tensor + theirs if op == dist.ReduceOp.SUM else torch.maximum(tensor, theirs))

    monkeypatch.setattr(collectives.dist, "all_reduce", combine)
    out = all_reduce_named(**mine)
    assert next(calls, None) is None
    return out


def test_sums_maxes_and_mins_by_name(monkeypatch):
    mine = {"sums": {"loss": 1.0, "tasks": torch.tensor([[1.0, 2.0], [3.0, 4.0]])},
            "maxes": {"step_s": 2.0, "wait_s": 0.5}, "mins": {"und_grad": 3.0, "gen_grad": -1.0}}
    other = {"sums": {"loss": 2.5, "tasks": torch.tensor([[10.0, 20.0], [30.0, 40.0]])},
             "maxes": {"step_s": 1.0, "wait_s": 0.75}, "mins": {"und_grad": 0.25, "gen_grad": 5.0}}
    out = _two_ranks(monkeypatch, mine, other)
    assert list(out) == ["loss", "tasks", "step_s", "wait_s", "und_grad", "gen_grad"]
    assert out["loss"] == 3.5
    assert out["tasks"].tolist() == [[11.0, 22.0], [33.0, 44.0]]
    assert out["step_s"] == 2.0 and out["wait_s"] == 0.75
    assert out["und_grad"] == 0.25 and out["gen_grad"] == -1.0


def test_one_call_per_reduction_kind(monkeypatch):
    ops = []
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op, group=None: ops.append(op))
    all_reduce_named(sums={"a": 1.0, "b": 2.0}, maxes={"c": 1.0}, mins={"d": 1.0, "e": 2.0})
    assert ops == [dist.ReduceOp.SUM, dist.ReduceOp.MAX]
    ops.clear()
    all_reduce_named(mins={"d": 1.0})
    assert ops == [dist.ReduceOp.MAX]
    ops.clear()
    assert all_reduce_named() == {} and ops == []


def test_a_name_reduced_two_ways_is_refused():
    with pytest.raises(ValueError, match="more than one way: \\['x'\\]"):
        all_reduce_named(sums={"x": 1.0}, mins={"x": 2.0})


def test_one_rank_gloo_group(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = all_reduce_named(sums={"loss": 1.25, "tasks": torch.ones(2, 3)}, maxes={"step_s": 0.5},
                               mins={"grad": 2.0, "nan_grad": float("nan")})
    finally:
        dist.destroy_process_group()
    assert out["loss"] == 1.25 and out["tasks"].tolist() == [[1.0] * 3] * 2
    assert out["step_s"] == 0.5 and out["grad"] == 2.0
    assert out["nan_grad"] != out["nan_grad"]  # a missing probe's NaN stays NaN


# ---------------------------------------------------------------------------------------------- devices
def _as_nccl(monkeypatch) -> list[torch.device]:
    """The group's device reads as a stand-in for the GPU (``meta``: no values, so a CPU tensor cannot pass
    for it); the collectives record the devices of their tensors and do nothing else."""
    seen: list[torch.device] = []
    monkeypatch.setattr(collectives, "collective_device", lambda group=None: torch.device("meta"))
    for name in ("all_reduce", "broadcast", "reduce"):
        monkeypatch.setattr(collectives.dist, name, lambda tensor, *args, **kwargs: seen.append(tensor.device))
    return seen


def test_nccl_groups_get_their_tensors_on_the_gpu(monkeypatch):
    """What failed at the first NCCL step: the metric buffer and the finite flag were made on the CPU."""
    seen = _as_nccl(monkeypatch)
    calls = [lambda: collectives.all_reduce_named(sums={"loss": 1.0, "tasks": torch.ones(2)}),
             lambda: collectives.all_reduce_named(maxes={"s": 1.0}, mins={"g": 1.0}),
             lambda: collectives.all_ranks_true(True), lambda: collectives.sum_over_ranks(torch.ones(3)),
             lambda: collectives.broadcast_from(torch.ones(3)), lambda: collectives.reduce_to(torch.ones(3))]
    for call in calls:
        try:
            call()
        except (NotImplementedError, RuntimeError):
            pass  # the stand-in holds no values to read back; what reached the collective is recorded
    assert len(seen) == 6 and {d.type for d in seen} == {"meta"}


def test_collective_device_follows_the_backend(monkeypatch, tmp_path):
    assert collectives.collective_device() == torch.device("cpu")  # no group yet
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert collectives.collective_device() == torch.device("cpu")
        monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(collectives.torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(collectives.torch.cuda, "current_device", lambda: 3)
        assert collectives.collective_device() == torch.device("cuda", 3)
        monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
        assert collectives.collective_device() == torch.device("cuda", 3)
    finally:
        dist.destroy_process_group()


def test_checked_collectives_refuse_a_tensor_off_the_group_device(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with collectives.check_collective_devices() as seen:
            assert collectives.all_ranks_true(True)
            assert collectives.sum_over_ranks(torch.full((2,), 3.0)).tolist() == [3.0, 3.0]
        assert [name for name, _, _ in seen] == ["all_reduce", "all_reduce"]
        with collectives.check_collective_devices(device="meta"), \
                pytest.raises(collectives.CollectiveDeviceError, match="tensor on cpu, the group works on meta"):
            collectives.all_ranks_true(True)
        with collectives.check_collective_devices(project_paths=(str(Path(__file__).parent),)), \
                pytest.raises(collectives.CollectiveDeviceError, match="called directly from .*test_collectives"):
            _direct_call()
    finally:
        dist.destroy_process_group()


def _direct_call():
    """A project module calling torch.distributed itself (this test file stands in for one)."""
    dist.all_reduce(torch.ones(1))
