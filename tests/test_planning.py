"""The plan made in Ray tasks and stored as a Parquet table (pipelines/data/plan.py): the same partitions as
counting every file on the driver (``list_inputs`` + ``plan_partitions``) on the test corpora, read back by a
rerun without counting again, a partition's segments read from its row groups only, plans of the earlier
layout still resumed, and a counting error that leaves no output behind."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data import plan as planning
from pipelines.data.config import PrecomputeConfig
from pipelines.data.plan import FilesPlan, StoredPlan, load_plan, make_plan
from pipelines.data.sources import InputFile, list_inputs
from pipelines.data.writer import DamagedFileError


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """The inputs of the precompute tests: every format (tests/test_precompute.py), the bad-input corpus
    (tests/data_corpus.py) and the fault corpus (tests/test_precompute_faults.py)."""
    from pipelines.data.synth import synth_all
    from tests.data_corpus import build_corpus
    from tests.test_precompute_faults import build_fault_corpus

    root = tmp_path_factory.mktemp("corpora")
    synth_all(root / "synth", count=6, seed=1)
    manifest, _ = build_corpus(root / "bad")
    build_fault_corpus(root / "faults")
    return {"synth": root / "synth", "bad": manifest, "faults": root / "faults"}


def _uri_segments(plan, partition: int, cfg: PrecomputeConfig) -> list[tuple[str, int, int]]:
    files, segments = plan.segments(partition, cfg.storage)
    return [(files[f].uri, start, stop) for f, start, stop in segments]


@pytest.mark.parametrize("corpus,partition_size,files_per_task", [
    ("synth", 4, 3), ("synth", 7, 1), ("synth", 64, 64), ("bad", 5, 1), ("faults", 6, 2), ("faults", 1, 1)])
def test_plan_in_tasks_cuts_the_partitions_counting_on_the_driver_did(ray_local, corpora, tmp_path, corpus,
                                                                     partition_size, files_per_task):
    cfg = PrecomputeConfig(input=str(corpora[corpus]), output=str(tmp_path / "out"), partition_size=partition_size,
                           plan_files_per_task=files_per_task)
    before = FilesPlan(list_inputs(cfg), partition_size)
    plan = load_plan(cfg)
    assert isinstance(plan, StoredPlan) and plan.partitions == before.partitions > 0
    assert plan.records == sum(f.records for f in before.files) and plan.files == len(before.files)
    for partition in range(plan.partitions):
        assert _uri_segments(plan, partition, cfg) == _uri_segments(before, partition, cfg), partition
    stored = pq.read_table(tmp_path / "out" / "plan" / "inputs.parquet").to_pylist()
    assert [(r["uri"], r["format"], r["records"]) for r in stored] == [(f.uri, f.format, f.records)
                                                                       for f in before.files]


def test_rerun_reads_the_plan_back_and_a_partition_reads_its_row_groups_only(ray_local, tmp_path, monkeypatch):
    def _fabricated(batch, storage, manifest) -> list[int]:
        """Record counts made up from the names (no file is read): 0 to 6, so some files hold none."""
        return [int(uri.rsplit("-", 1)[1].split(".")[0]) % 7 for uri, _ in batch]

    files = [(f"fab://in/file-{i:06d}.jsonl", "jsonl") for i in range(5000)]
    cfg = PrecomputeConfig(input="fab://in", output=str(tmp_path / "out"), partition_size=9,
                           plan_files_per_task=500)
    plan = make_plan(cfg, files, count=_fabricated)
    in_memory = FilesPlan([InputFile(uri, fmt, n) for (uri, fmt), n in zip(files, _fabricated(files, None, None))],
                          9, input="fab://in")
    assert (plan.records, plan.partitions) == (sum(f.records for f in in_memory.files), in_memory.partitions)
    assert pq.read_metadata(tmp_path / "out" / "plan" / "inputs.parquet").num_row_groups == 5

    def no_counting(*args, **kwargs):
        raise AssertionError("a rerun must read the stored plan, not count again")

    monkeypatch.setattr(planning, "make_plan", no_counting)
    assert load_plan(cfg, committed=True) == plan
    read: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def recorded(self, groups, *args, **kwargs):
        read.append(list(groups))
        return real(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", recorded)
    for partition in (0, 1, plan.partitions // 2, plan.partitions - 1):
        assert _uri_segments(plan, partition, cfg) == _uri_segments(in_memory, partition, cfg), partition
    assert all(1 <= len(groups) <= 2 for groups in read) and read[0] == [0] and read[-1] == [4]


def test_plan_of_the_earlier_layout_resumes_and_damage_is_named(ray_local, corpora, tmp_path, lance_log):
    cfg = PrecomputeConfig(input=str(corpora["faults"]), output=str(tmp_path / "out"), partition_size=6)
    files = list_inputs(cfg)
    old = FilesPlan(files, 6)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "plan.json").write_text(json.dumps({
        "input": cfg.input, "partition_size": 6, "inputs": [f.__dict__ for f in files], "partitions": old.cut}))
    assert load_plan(cfg, committed=True) == FilesPlan(files, 6, old.cut, cfg.input)

    plan = load_plan(PrecomputeConfig(**{**cfg.model_dump(), "output": str(tmp_path / "new")}))
    (tmp_path / "new" / "plan" / "inputs.parquet").write_bytes(b"PAR1 cut short")
    new = cfg.model_copy(update={"output": str(tmp_path / "new")})
    with pytest.raises(DamagedFileError, match=r"inputs.parquet is damaged.*restore it"):
        load_plan(new, committed=True)
    assert load_plan(new) == plan and "planning again" in lance_log.getvalue()


def test_a_file_that_cannot_be_counted_fails_the_plan_and_leaves_no_output(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"uri": "x.jpg"}\n')
    (tmp_path / "in" / "b.csv").write_text("file,text\nx.jpg,a caption\n")
    cfg = PrecomputeConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), plan_files_per_task=1)
    with pytest.raises(ValueError, match=r"b.csv: no media URI column") as err:
        load_plan(cfg)
    assert "RayTaskError" not in type(err.value).__name__
    assert not (tmp_path / "out").exists()
