"""Named metric reduction (pipelines/train/collectives.py): the names round-trip through one flat tensor,
sums, maxes and mins come back under their names, and the whole thing runs on a real one-rank gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipelines.train import collectives
from pipelines.train.collectives import all_reduce_named, pack_named, unpack_named


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
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op: sent.append(tensor.clone()))
    all_reduce_named(**other)
    calls = iter(sent)

    def combine(tensor: torch.Tensor, op) -> None:
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
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op: ops.append(op))
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
