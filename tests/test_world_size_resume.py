"""A run resumes on another number of workers and continues the same run (pipelines/train): the global batch
is fixed (``data.global_packs``) and cut into pack slots whose data position is saved per slot, and the engine
state reshards (pipelines/runtime/engine_state.py). Four gloo ranks train, two ranks with two accumulation
micro-batches each resume from the four's checkpoint: their losses equal an uninterrupted four-rank run's and
every sample of the epoch is seen once across the resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lance_core.config import model_preset
from pipelines.train.synthetic_shards import write_synthetic_shards
from tests.test_torch_launcher import _config
from tests.torch_runs import run_ranks, train_rank

pytestmark = pytest.mark.deepspeed


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("synthetic") / "latents", model_preset("tiny"),
                                  rows_per_task=8, tasks=("t2i", "i2t"))


def _run(shards: Path, output: Path, steps: int, workers: int, out: Path) -> tuple[list[dict], dict]:
    """(metrics rows, {step: {pack slot: sample keys}})."""
    cfg = _config(shards, output, "resharded", steps=steps, precision="fp32", ema_decay=0.99)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"global_packs": 4, "token_budget": 256,
                                                                     "holdout_per_task": 0})})
    run_ranks(workers, train_rank, cfg.model_dump_json(), str(out))
    keys: dict[int, dict[int, list[str]]] = {}
    per_rank = 4 // workers
    for rank in range(workers):
        for step, packs in json.loads((out / f"keys-{rank}.json").read_text()).items():
            for micro, pack_keys in enumerate(packs):
                keys.setdefault(int(step), {})[rank * per_rank + micro] = pack_keys
    return json.loads((out / "metrics.json").read_text()), keys


@pytest.mark.slow
def test_four_workers_resume_on_two_with_accumulation_and_continue_the_same_run(shards, tmp_path):
    straight, straight_keys = _run(shards, tmp_path / "straight", 6, 4, tmp_path / "a")
    _, first_keys = _run(shards, tmp_path / "resumed", 4, 4, tmp_path / "b")
    resumed, resumed_keys = _run(shards, tmp_path / "resumed", 6, 2, tmp_path / "c")
    resumed_keys = {**first_keys, **resumed_keys}
    assert [row["step"] for row in resumed] == list(range(1, 7))
    for step in (5, 6):
        got, want = resumed[step - 1], straight[step - 1]
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * max(1.0, abs(want["loss"])), (step, got["loss"], want["loss"])
        assert got["lr"] == want["lr"] and got["samples"] == want["samples"]
    # the resumed run read exactly what the uninterrupted one read, pack slot by pack slot
    assert resumed_keys == straight_keys
    # and no sample twice in an epoch: each slot owns its own rows of each task (disjoint between slots) and
    # draws all of them before any again
    rows_of_task = {key: task for task, keys in _task_keys(shards).items() for key in keys}
    owned: dict[str, set[str]] = {}
    for slot in range(4):
        sequence = [key for step in sorted(straight_keys) for key in straight_keys[step][slot]]
        for task in ("t2i", "i2t"):
            drawn = [key for key in sequence if rows_of_task[key] == task]
            mine = set(drawn)
            for start in range(0, len(drawn), max(len(mine), 1)):
                epoch = drawn[start:start + len(mine)]
                assert len(epoch) == len(set(epoch)), (slot, task, drawn)
            assert not mine & owned.get(task, set()), (slot, task)
            owned.setdefault(task, set()).update(mine)


def _task_keys(shards: Path) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    out: dict[str, list[str]] = {}
    for path in sorted((shards / "shards").glob("*.parquet")):
        for row in pq.read_table(path, columns=["sample_id", "task"]).to_pylist():
            out.setdefault(row["task"], []).append(row["sample_id"])
    return out
