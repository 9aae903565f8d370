"""The precompute under faults a real crawl and a real cluster bring (issue 13): duplicates inside a
partition, across partitions and across a rerun (the index spread over two actors); a Parquet whose bytes
column holds text; a manifest whose URI is a number; a writer killed mid-commit (empty or cut commit records,
temporary files left behind); a damaged plan. The corpus is made here; after each run: inputs = written +
filtered + quarantined, and no sample (nor any content) is written twice."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.config import PrecomputeConfig

TINY = {"buckets": {"image_area": 64 * 64, "video_area": 64 * 96, "vit_area": 56 * 56}, "video": {"max_seconds": 1.0}}


def _jpeg(shade: int) -> bytes:
    """A 96x64 image of its own content for each ``shade``."""
    image = Image.new("RGB", (96, 64), (shade, 255 - shade, (shade * 7) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_fault_corpus(folder: Path) -> dict:
    """Inputs in plan order (partition_size 6):
    p0 ``a.jsonl``  A A B B B C      duplicates inside one partition (issue: 1 record written instead of 3)
    p1 ``b.parquet`` two rows whose image_bytes column is a string, then ``c.jsonl``: D, uri 5, A, D
    p2 ``d.jsonl``  E E F G
    Returns the media hashes by letter and the expected totals."""
    media = folder / "media"
    media.mkdir(parents=True)
    letters = "ABCDEFG"
    hashes = {}
    for shade, letter in enumerate(letters):
        data = _jpeg(30 * shade + 10)
        (media / f"{letter}.jpg").write_bytes(data)
        hashes[letter] = hashlib.sha256(data).hexdigest()

    def row(letter: str) -> dict:
        return {"uri": f"media/{letter}.jpg", "caption": f"a flat picture {letter}"}

    _write_jsonl(folder / "a.jsonl", [row(x) for x in "AABBBC"])
    pq.write_table(pa.table({"caption": ["text where bytes belong", "more text"],
                             "image_bytes": ["not bytes", "still not bytes"]}), folder / "b.parquet")
    _write_jsonl(folder / "c.jsonl", [row("D"), {"uri": 5, "caption": "a number where a URI belongs"}, row("A"),
                                      row("D")])
    _write_jsonl(folder / "d.jsonl", [row(x) for x in "EEFG"])
    plan = {0: [f"a.jsonl#{i}" for i in range(6)],
            1: ["b.parquet#0", "b.parquet#1"] + [f"c.jsonl#{i}" for i in range(4)],
            2: [f"d.jsonl#{i}" for i in range(4)]}
    letters_at = dict(zip(plan[0], "AABBBC")) | dict(zip(plan[1][2:], "D?AD")) | dict(zip(plan[2], "EEFG"))
    return {"hashes": hashes, "plan": plan, "letters_at": letters_at,
            "inputs": 16, "written": 7, "quarantined": 3, "duplicates": 6}


def _config(input_uri: Path, output: Path, **overrides) -> PrecomputeConfig:
    return PrecomputeConfig(input=str(input_uri), output=str(output),
                            **{"partition_size": 6, "filters": {"dedup": True, "dedup_actors": 2}, **TINY, **overrides})


def _committed_rows(output: Path) -> dict[int, list[dict]]:
    from pipelines.data.manifest import read_manifest

    return {s["partition"]: pq.read_table(output / s["shard"]).to_pylist() for s in read_manifest(str(output))[1]}


def _check_run(output: Path, expected: dict) -> dict[int, list[dict]]:
    """The invariant, each sample and each content written once, and the first occurrence of a content in
    plan order kept (inside a partition and across partitions)."""
    stats = json.loads((output / "stats.json").read_text())
    assert stats["partitions_committed"] == stats["partitions_planned"] == 3
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"]
    assert (stats["inputs"], stats["inputs_written"], stats["inputs_quarantined"]) == (
        expected["inputs"], expected["written"], expected["quarantined"])
    assert stats["filtered_by_reason"] == {"dedup:exact_duplicate": expected["duplicates"]}
    by_partition = _committed_rows(output)
    rows = [r for part in by_partition.values() for r in part]
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a sample was written twice"
    assert sorted(r["content_sha256"] for r in rows) == sorted(expected["hashes"].values()), "a content twice"
    letters = {h: letter for letter, h in expected["hashes"].items()}
    order = [name for partition in sorted(expected["plan"]) for name in expected["plan"][partition]]
    for partition, part in by_partition.items():
        for row in part:
            where = _name(row)
            assert expected["letters_at"][where] == letters[row["content_sha256"]]
            first = next(k for k in order if expected["letters_at"].get(k) == letters[row["content_sha256"]])
            assert where == first, f"partition {partition} kept {where}, not the first occurrence {first}"
    return by_partition


def _name(row: dict) -> str:
    """``file#index`` of a row's source URI."""
    return row["source_uri"].rsplit("/", 1)[-1]


def _temporary_files(output: Path) -> list[Path]:
    return [p for p in output.rglob(".tmp-*")]


# ------------------------------------------------------------------------------------------- fast, no Ray
def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _records(names: list[str], numbers: list[int]) -> dict[int, tuple[str, str]]:
    return {number: (_digest(name), "") for name, number in zip(names, numbers)}


@pytest.mark.parametrize("actors", [1, 2, 4])
def test_first_claim_of_a_content_wins_and_a_retry_gets_the_same_answer(actors):
    from pipelines.data.dedup import DedupIndex, DedupShard

    index = DedupIndex([DedupShard() for _ in range(actors)], 0)
    index.add_committed([_digest("committed")])
    hashes, records = ["a", "a", "b", "b", "b", "c"], [0, 1, 2, 3, 4, 5]
    assert sorted(index.claim(0, _records(hashes, records))) == [1, 3, 4]
    assert sorted(index.claim(0, _records(hashes[::-1], records[::-1]))) == [1, 3, 4]  # a retried writer
    assert sorted(index.claim(1, _records(["c", "d", "committed", "d"], [0, 1, 2, 3]))) == [0, 2, 3]


@pytest.mark.parametrize("actors", [1, 2, 4])
def test_first_occurrence_in_plan_order_wins_whatever_order_partitions_are_written_in(actors):
    from pipelines.data.dedup import EXACT, DedupIndex, DedupShard

    index = DedupIndex([DedupShard(0, [3, 4, 5]) for _ in range(actors)], 0)
    index.add_committed([_digest("old")])
    index.register(5, _records(["x", "y"], [0, 1]))           # partition 5 read first
    assert index.unregistered_before(5) == [3, 4]             # its writer waits for 3 and 4
    index.register(4, _records(["y", "old"], [2, 0]))
    index.register(3, _records(["x"], [7]))
    assert index.unregistered_before(5) == []
    assert index.claim(5, _records(["x", "y"], [0, 1])) == {0: EXACT, 1: EXACT}  # x: owned by 3#7, y: by 4#2
    assert index.claim(4, _records(["y", "old"], [2, 0])) == {0: EXACT}  # "old": a committed shard's
    assert index.claim(3, _records(["x"], [7])) == {}


@pytest.mark.parametrize("actors", [1, 2])
def test_a_content_kept_by_one_claim_is_kept_by_no_other(actors):
    """A later partition that claims before an earlier one registered (a wait that ran out, a restarted actor)
    keeps a content; the earlier one then drops it instead of writing it a second time."""
    from pipelines.data.dedup import EXACT, DedupIndex, DedupShard

    index = DedupIndex([DedupShard() for _ in range(actors)], 0)
    assert index.claim(2, _records(["x", "y"], [0, 1])) == {}
    assert index.claim(1, _records(["x", "z"], [3, 4])) == {3: EXACT}
    assert index.claim(2, _records(["x", "y"], [0, 1])) == {}, "a retried writer gets the same answer"
    assert index.claim(1, _records(["x", "z"], [3, 4])) == {3: EXACT}


def _ok_rows(partition: int, letters: str):
    """Rows of a partition as they reach the writer, one per record, with content and near hashes by letter."""
    import pandas as pd

    from pipelines.data.filters import format_near_hash
    from pipelines.data.records import dropped

    rows = []
    for record, letter in enumerate(letters):
        row = dropped({"source_uri": f"mem://{partition}/{record}", "caption": "a picture", "task": "t2i"},
                      partition, record, "ok", "", "")
        row.update(content_sha256=_digest(letter), sample_id=f"{partition}-{record}", decode_seconds=0.0,
                   near_hash=format_near_hash([(ord(letter) * 0x9E3779B97F4A7C15) & (2**64 - 1)]))
        rows.append(row)
    return pd.DataFrame(rows)


def test_an_index_rebuilt_from_the_commits_writes_each_content_once(tmp_path):
    """What a restarted dedup actor does, in place: partitions 0 and 1 registered, 0 committed, then the actors
    are lost and rebuilt from the commit records. Partition 1's registration is gone: it registers when it
    claims, no writer waits for it, and a retried writer of committed partition 0 gets its answer again."""
    from pipelines.data.dedup import DedupIndex, DedupShard, claim_partition
    from pipelines.data.writer import write_partition

    cfg = PrecomputeConfig(output=str(tmp_path / "out"), filters={"dedup": True, "near_dedup": True,
                                                                  "dedup_actors": 2})
    for folder in ("shards", "quarantine", "_commits"):
        (tmp_path / "out" / folder).mkdir(parents=True)
    distance = cfg.filters.near_dedup_distance
    index = DedupIndex([DedupShard(distance, [0, 1, 2]) for _ in range(2)], distance, exact=True, near=True)
    letters = {0: "AAB", 1: "CA", 2: "BDC"}
    index.register(0, {i: (_digest(x), _ok_rows(0, x)["near_hash"][0]) for i, x in enumerate(letters[0])})
    index.register(1, {i: (_digest(x), _ok_rows(1, x)["near_hash"][0]) for i, x in enumerate(letters[1])})
    first = write_partition(_ok_rows(0, letters[0]), cfg, cfg.output, index)
    assert (first["inputs_written"], first["filtered"]) == (2, {"dedup:exact_duplicate": 1})

    index.actors = [DedupShard(distance, [0, 1, 2]) for _ in range(2)]  # lost, then restarted
    for k, shard in enumerate(index.actors):
        shard.rebuild_from_commits(cfg, k, 2)
    assert index.unregistered_before(2) == [], "nobody waits for a registration the lost actor held"
    third = write_partition(_ok_rows(2, letters[2]), cfg, cfg.output, index)
    second = write_partition(_ok_rows(1, letters[1]), cfg, cfg.output, index)
    assert claim_partition(index, 0, _ok_rows(0, letters[0]), cfg) == {1: "exact_duplicate"}, "a retried writer"
    assert (third["inputs_written"], second["inputs_written"]) == (2, 0)
    written = [r for p in range(3) for r in pq.read_table(tmp_path / "out" / "shards" / f"part-{p:05d}.parquet")
               .to_pylist()]
    assert sorted(r["content_sha256"] for r in written) == sorted(_digest(x) for x in "ABCD"), "each content once"


def test_malformed_records_are_quarantined_one_by_one(tmp_path):
    from pipelines.data.pipeline import _rows_of_partition
    from pipelines.data.sources import InputFile

    build_fault_corpus(tmp_path / "in")
    (tmp_path / "in" / "e.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")  # not readable as Parquet
    cfg = _config(tmp_path / "in", tmp_path / "out")
    folder = tmp_path / "in"
    files = [InputFile(str(folder / "b.parquet"), "parquet", 2), InputFile(str(folder / "c.jsonl"), "jsonl", 5),
             InputFile(str(folder / "e.parquet"), "parquet", 2)]
    rows = list(_rows_of_partition(0, [(0, 0, 2), (1, 0, 5), (2, 0, 2)], files, cfg))
    assert [r["record_index"] for r in rows] == list(range(9)), "every planned record has exactly one row"
    outcome = {r["source_uri"].rsplit("/", 1)[-1]: (r["status"], r["reason"], r["error"]) for r in rows}
    for key in ("b.parquet#0", "b.parquet#1"):
        status, reason, error = outcome[key]
        assert (status, reason) == ("quarantined", "bad_record")
        assert "TypeError" in error and "image_bytes is str" in error, error
    assert outcome["c.jsonl#1"][:2] == ("quarantined", "bad_record") and "URI is int" in outcome["c.jsonl#1"][2]
    assert [outcome[f"c.jsonl#{i}"][0] for i in (0, 2, 3)] == ["ok"] * 3
    assert outcome["c.jsonl#4"][:2] == ("quarantined", "missing_record")  # planned 5, the file holds 4
    for key in ("e.parquet#0", "e.parquet#1"):
        status, reason, error = outcome[key]
        assert (status, reason) == ("quarantined", "unreadable_input") and re.match(r"\w+: .", error), error


def test_an_exception_inside_one_record_quarantines_that_record_only(tmp_path, monkeypatch):
    from pipelines.data import pipeline

    real = pipeline.record_rows

    def flaky(record, partition, index, cfg):
        if index == 1:
            raise AttributeError("'int' object has no attribute 'lower'")
        yield from real(record, partition, index, cfg)

    monkeypatch.setattr(pipeline, "record_rows", flaky)
    folder = tmp_path / "in"
    build_fault_corpus(folder)
    from pipelines.data.sources import InputFile

    rows = list(pipeline._rows_of_partition(3, [(0, 0, 3)], [InputFile(str(folder / "d.jsonl"), "jsonl", 4)],
                                            _config(folder, tmp_path / "out")))
    assert [(r["record_index"], r["status"]) for r in rows] == [(0, "ok"), (1, "quarantined"), (2, "ok")]
    assert rows[1]["reason"] == "record_error" and rows[1]["error"].startswith("AttributeError: 'int' object")
    assert rows[1]["source_uri"].endswith("d.jsonl#1")


def test_commit_records_and_json_are_written_whole_and_damaged_ones_are_not_commits(tmp_path, lance_log):
    from pipelines.data.writer import parse_commit, read_commits, remove_temporary_files, write_json

    cfg = _config(tmp_path / "in", tmp_path / "out")
    out = tmp_path / "out"
    (out / "_commits").mkdir(parents=True)
    (out / "shards").mkdir()
    good = {"partition": 0, "shard": "shards/part-00000.parquet", "rows": 1, "bytes": 10, "sha256": "x", "inputs": 1,
            "inputs_written": 1, "filtered": {}, "quarantined": {}, "filtered_inputs": 0, "quarantined_inputs": 0}
    write_json(str(out), "_commits/part-00000.json", good, cfg)
    (out / "_commits" / "part-00001.json").write_bytes(b"")  # killed before the first byte
    (out / "_commits" / "part-00002.json").write_text(json.dumps({**good, "partition": 2})[:40])  # cut short
    (out / "_commits" / "part-00003.json").write_text(json.dumps({"partition": 3}))  # fields missing
    (out / "_commits" / "part-00004.json").write_text(json.dumps({**good, "partition": 7}))  # not its name
    (out / "_commits" / ".tmp-0123.json").write_text("{")
    (out / "shards" / ".tmp-dead.parquet").write_bytes(b"PAR1")
    (out / ".tmp-beef.json").write_text("{")
    (out / "_pieces" / "part-00003").mkdir(parents=True)  # a partition whose last block never arrived
    (out / "_pieces" / "part-00003" / "rows-0000000-0000001-2.arrow").write_bytes(b"ARROW1")
    assert list(read_commits(str(out), cfg)) == [0]
    printed = lance_log.getvalue()
    for name in ("part-00001.json", "part-00002.json", "part-00003.json", "part-00004.json"):
        assert f"{name} is damaged" in printed, printed
    with pytest.raises(ValueError, match="part-00009.json is damaged"):
        parse_commit(b"", str(out / "_commits" / "part-00009.json"))
    removed = remove_temporary_files(str(out), cfg)
    assert len(removed) == 4 and not _temporary_files(out) and not (out / "_pieces").exists()
    assert json.loads((out / "_commits" / "part-00000.json").read_text()) == good


def test_nothing_written_names_the_reasons_and_passes_a_run_that_wrote():
    from pipelines.data.report import nothing_written

    def stats(inputs: int, written: int, quarantined: dict, filtered: dict) -> dict:
        return {"inputs": inputs, "inputs_written": written, "quarantined_by_reason": quarantined,
                "filtered_by_reason": filtered}

    assert nothing_written(stats(4, 1, {"decode:corrupt_media": 3}, {}), "out") is None
    assert nothing_written(stats(0, 0, {}, {}), "out") is None, "no input: nothing to write"
    message = nothing_written(stats(5, 0, {"decode:corrupt_media": 3, "read:missing_file": 1},
                                    {"caption:missing_caption": 1}), "s3://b/out/")
    assert message.startswith("no record was written: all 5 inputs were dropped (quarantined "
                              "decode:corrupt_media=3, read:missing_file=1; filtered caption:missing_caption=1)")
    assert "s3://b/out/quarantine" in message and "manifest.caption_column" in message
    assert "caption_column" not in nothing_written(stats(1, 0, {"decode:corrupt_media": 1}, {}), "out")


def test_without_progress_bars_a_line_every_few_partitions():
    from pipelines.data.report import PartitionProgress

    def lines(todo: int, planned: int) -> list[tuple[int, str]]:
        progress = PartitionProgress(todo, planned)
        record = {"inputs": 4, "inputs_written": 3, "rows": 5}
        return [(n, line) for n in range(1, todo + 1) if (line := progress.note(record))]

    assert [n for n, _ in lines(25, 30)] == [*range(2, 25, 2), 25], "a tenth of the run, and its last"
    assert [n for n, _ in lines(3, 3)] == [1, 2, 3]
    assert [n for n, _ in lines(5000, 5000)][:2] == [100, 200], "at least every 100 partitions"
    assert lines(25, 30)[-1][1].startswith("committed 25/25 partitions of this run (30 planned): "
                                           "75 of 100 inputs written, 125 samples, ")


def test_damaged_plan_is_named_and_made_again_only_while_nothing_is_committed(ray_local, tmp_path, lance_log):
    from pipelines.data.plan import load_plan
    from pipelines.data.writer import DamagedFileError

    build_fault_corpus(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    cfg = _config(tmp_path / "in", out)
    (out / "plan.json").write_text('{"input": "')
    with pytest.raises(DamagedFileError, match=str(out / "plan.json")):
        load_plan(cfg, committed=True)
    (out / "plan.json").write_text(json.dumps({"input": cfg.input, "partition_size": 6}))  # no partitions
    with pytest.raises(DamagedFileError, match="plan.json is damaged"):
        load_plan(cfg, committed=True)
    plan = load_plan(cfg, committed=False)
    assert "planning again" in lance_log.getvalue()
    records = pq.read_table(out / "plan" / "inputs.parquet").column("records").to_pylist()
    assert records == [6, 2, 4, 4] and plan.partitions == 3
    assert load_plan(cfg, committed=True) == plan  # the new plan was stored whole
    assert not _temporary_files(out)


# ------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_a_run_that_writes_nothing_exits_non_zero_with_the_reasons(ray_local, tmp_path, capsys):
    """Every medium corrupt and the one sound image without a caption: ``lance precompute`` fails, naming the
    drops, and so does a rerun of that output (it still holds no record)."""
    from jobs.cli import main

    media = tmp_path / "in" / "media"
    media.mkdir(parents=True)
    for name in ("a", "b"):
        (media / f"{name}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (media / "c.jpg").write_bytes(_jpeg(40))
    manifest = _write_jsonl(tmp_path / "in" / "list.jsonl", [
        {"uri": "media/a.jpg", "caption": "a broken picture"}, {"uri": "media/b.jpg", "caption": "another"},
        {"uri": "media/c.jpg", "alt": "a caption under another name"}])
    config = tmp_path / "precompute.yaml"
    config.write_text(json.dumps({**TINY, "partition_size": 4, "filters": {"dedup": False}}))
    argv = ["precompute", "--config", str(config), "--input", str(manifest), "--output", str(tmp_path / "out"),
            "--no-progress"]
    for run in range(2):
        assert main(argv) == 1
        captured = capsys.readouterr()
        if run == 0:  # --no-progress: progress lines instead of the bars; the rerun runs nothing
            assert "committed 1/1 partitions of this run (1 planned): 0 of 3 inputs written" in captured.err
        assert "inputs      3 = written 0 + filtered 1 + quarantined 2" in captured.out
        reasons = re.search(r"no record was written: all 3 inputs were dropped \(quarantined (.*); filtered "
                            r"caption:missing_caption=1\)", captured.err)
        assert reasons and reasons.group(1).startswith("decode:") and reasons.group(1).endswith("=2"), captured.err
        assert "manifest.caption_column" in captured.err


@pytest.mark.slow
def test_fault_corpus_then_a_writer_killed_mid_commit(ray_local, tmp_path):
    from pipelines.data.pipeline import run_precompute
    from pipelines.data.writer import DamagedFileError

    expected = build_fault_corpus(tmp_path / "in")
    out = tmp_path / "out"
    run_precompute(_config(tmp_path / "in", out), progress=False)
    by_partition = _check_run(out, expected)
    a_hash = expected["hashes"]["A"]
    assert [_name(r) for r in by_partition[0] if r["content_sha256"] != a_hash] == ["a.jsonl#2", "a.jsonl#5"]
    assert [_name(r) for r in by_partition[2]] == ["d.jsonl#0", "d.jsonl#2", "d.jsonl#3"]
    quarantine = pq.read_table(out / "quarantine").to_pylist()
    assert sorted((_name(q), q["stage"], q["reason"]) for q in quarantine) == [
        ("b.parquet#0", "read", "bad_record"), ("b.parquet#1", "read", "bad_record"),
        ("c.jsonl#1", "read", "bad_record")]
    assert all("TypeError" in q["error"] for q in quarantine)

    # A writer killed mid-commit: the partition holding the dropped copy of A and partition 2 lose their
    # commit records (one empty, one cut short), and temporary files of the dead attempt stay behind.
    owner = next(p for p, rows in by_partition.items() if any(r["content_sha256"] == a_hash for r in rows))
    other = 1 - owner
    (out / "_commits" / f"part-{other:05d}.json").write_bytes(b"")
    cut = (out / "_commits" / "part-00002.json").read_bytes()[:30]
    (out / "_commits" / "part-00002.json").write_bytes(cut)
    for leftover in ("shards/.tmp-dead.parquet", "quarantine/.tmp-dead.parquet", "_commits/.tmp-dead.json",
                     ".tmp-dead.json"):
        (out / leftover).write_bytes(b"half")
    rerun = run_precompute(_config(tmp_path / "in", out), progress=False)
    assert (rerun.skipped, rerun.committed_now) == (1, 2)
    assert not _temporary_files(out)
    again = _check_run(out, expected)
    assert again[owner] == by_partition[owner]
    assert a_hash not in {r["content_sha256"] for r in again[other]}  # the committed copy of A is kept

    # A damaged plan with partitions committed against it: refused, naming the file.
    (out / "plan.json").write_text('{"input": "')
    with pytest.raises(DamagedFileError, match=str(out / "plan.json")):
        run_precompute(_config(tmp_path / "in", out), progress=False)


def _check_totals(output: Path, expected: dict) -> None:
    """The invariant, the corpus' figures, and each sample and each content written once (which copy of a
    duplicate is kept may differ from plan order after a restart)."""
    stats = json.loads((output / "stats.json").read_text())
    assert stats["partitions_committed"] == stats["partitions_planned"]
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"]
    assert (stats["inputs"], stats["inputs_written"], stats["inputs_quarantined"]) == (
        expected["inputs"], expected["written"], expected["quarantined"])
    assert stats["filtered_by_reason"] == {"dedup:exact_duplicate": expected["duplicates"]}
    rows = [r for part in _committed_rows(output).values() for r in part]
    assert len({r["sample_id"] for r in rows}) == len(rows), "a sample was written twice"
    assert sorted(r["content_sha256"] for r in rows) == sorted(expected["hashes"].values()), "a content twice"


@pytest.mark.slow
def test_a_dedup_actor_killed_mid_run_is_restarted_or_the_run_ends_with_a_message(ray_local, tmp_path, monkeypatch,
                                                                                lance_log):
    """Issue: losing a dedup actor ended the whole precompute with a 120-line traceback. Killed (Ray may
    restart it) once the first partition is committed, it is rebuilt from the committed shards and the run
    finishes; killed for good, the run ends with one paragraph, and running it again resumes it."""
    import ray

    from pipelines.data import pipeline
    from pipelines.data.dedup import DedupIndex, DedupIndexLost

    expected = build_fault_corpus(tmp_path / "in")
    started, kills = {}, []
    real_start, real_add = DedupIndex.start.__func__, pipeline.ManifestWriter.add

    def start(cls, cfg, commits, todo):
        started["index"] = real_start(cls, cfg, commits, todo)
        return started["index"]

    def add(self, record):
        if not kills:
            kills.append(record["partition"])
            ray.kill(started["index"].actors[0], no_restart=started["for_good"])
        return real_add(self, record)

    monkeypatch.setattr(DedupIndex, "start", classmethod(start))
    monkeypatch.setattr(pipeline.ManifestWriter, "add", add)

    started["for_good"] = False
    out = tmp_path / "restarted"
    result = pipeline.run_precompute(_config(tmp_path / "in", out, partition_size=2), progress=False)
    assert kills and result.committed_now == result.partitions == 8
    assert started["index"].rebuilt() == [0] and started["index"].lost() == []
    assert "dedup actor 0 of 2 died and was restarted from the committed shards" in lance_log.getvalue()
    _check_totals(out, expected)

    started["for_good"], kills[:] = True, []
    out = tmp_path / "lost"
    with pytest.raises(DedupIndexLost) as err:
        pipeline.run_precompute(_config(tmp_path / "in", out, partition_size=2), progress=False)
    message = str(err.value)
    assert "lost actor 0 of 2" in message and "run the same command again to resume" in message
    assert "\n" not in message and "Traceback" not in message
    committed = len(list((out / "_commits").glob("part-*.json")))
    assert 1 <= committed < 8
    kills.append("none")  # the rerun runs untouched
    rerun = pipeline.run_precompute(_config(tmp_path / "in", out, partition_size=2), progress=False)
    assert (rerun.skipped, rerun.committed_now) == (committed, 8 - committed)
    _check_totals(out, expected)
