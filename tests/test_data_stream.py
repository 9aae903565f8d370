"""Rows into pack slots (pipelines/train/data.py ``TaskStream``): a sample-level shuffle over several shards,
each row of a task in exactly one slot and drawn once per epoch, at any slot count (own shards per slot, or
shared shards with the rows dealt out); a stream saved mid-epoch resumes with the same draws."""

from __future__ import annotations

import json

import pytest

from lance_core.config import model_preset
from pipelines.train.config import DataSection
from pipelines.train.data import TaskStream
from pipelines.train.plan import make_plan
from pipelines.train.synthetic_shards import write_synthetic_shards


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("stream") / "latents", model_preset("tiny"),
                                  tasks=("t2i",), rows_per_task=40, rows_per_shard=8)


def _data(root, **fields) -> DataSection:
    return DataSection(uris=(str(root),), holdout_per_task=0, **{"shuffle_buffer": 6, "shuffle_shards": 2, **fields})


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_each_row_in_one_slot_once_per_epoch(root, slots):
    data = _data(root)
    plan = make_plan(data, {"t2i": 1.0})
    assert len(plan.shards) == 5 and plan.task_rows == {"t2i": 40}
    epoch_of_slot = []
    for slot in range(slots):
        stream = TaskStream("t2i", plan, slot, slots, 0, data)
        first = []
        while stream.state.epoch == 0:
            first.append(stream.next_row()["sample_id"])
        epoch_of_slot.append(first[:-1])  # the last draw already opened epoch 1
        assert len(first[:-1]) == len(set(first[:-1]))
    seen = [key for keys in epoch_of_slot for key in keys]
    assert len(seen) == len(set(seen)) == 40  # every row once, in exactly one slot


def test_draws_are_shuffled_across_shards(root):
    data = _data(root)
    plan = make_plan(data, {"t2i": 1.0})
    stream = TaskStream("t2i", plan, 0, 1, 0, data)
    order = [stream.next_row()["sample_id"] for _ in range(40)]
    in_shard_order = TaskStream("t2i", plan, 0, 1, 0, _data(root, shuffle_buffer=1, shuffle_shards=1))
    plain = [in_shard_order.next_row()["sample_id"] for _ in range(40)]
    assert sorted(order) == sorted(plain) and order != plain
    shard_of = {key: index // 8 for index, key in enumerate(plain)}
    assert len({shard_of[key] for key in order[:6]}) >= 2  # the first draws mix shards


def test_a_stream_saved_mid_epoch_resumes_with_the_same_draws(root):
    data = _data(root)
    plan = make_plan(data, {"t2i": 1.0})
    stream = TaskStream("t2i", plan, 1, 3, 0, data)
    for _ in range(5):
        stream.next_row()
    state = json.loads(json.dumps(stream.get_state()))  # as a checkpoint stores it
    expected = [stream.next_row()["sample_id"] for _ in range(30)]
    resumed = TaskStream("t2i", plan, 1, 3, 0, data)
    resumed.set_state(state)
    assert [resumed.next_row()["sample_id"] for _ in range(30)] == expected
