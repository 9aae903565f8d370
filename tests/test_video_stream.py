"""Long and odd videos in the read + decode stage (issue: every clip was decoded and held at source
resolution before the first was encoded; a 4880x416 video was decoded whole only to be dropped).

Videos are made with ffmpeg at 1 fps (640x360) so a source of a minute costs seconds. Memory is measured with
tracemalloc, which sees the numpy buffers (decoded RGB frames, clip buffers, row bytes) the stage holds."""

import json
import shutil
import subprocess
import tracemalloc

import numpy as np
import pytest

from pipelines.data import decode as decode_module
from pipelines.data import media as media_module
from pipelines.data.config import PrecomputeConfig
from pipelines.data.decode import decode_video, plan_clips, probe_video
from pipelines.data.records import process_record

SOURCE = (640, 360)
FRAME = SOURCE[0] * SOURCE[1] * 3
TINY = dict(buckets=dict(image_area=64 * 64, video_area=64 * 96, vit_area=56 * 56))


def _ffmpeg_video(path, width: int, height: int, seconds: float, fps: float) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (scripts/setup.sh installs it)")
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc2=size={width}x{height}:rate={fps}", "-t", str(seconds), "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-y", str(path)], check=True, timeout=120)
    return path.read_bytes()


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    return {seconds: _ffmpeg_video(folder / f"{seconds}s.mp4", *SOURCE, seconds, 1) for seconds in (12, 48)}


def _peak_while(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = fn()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_long_video_streams_clip_by_clip(long_videos, monkeypatch):
    """Clips come out one at a time, each as soon as its last frame is decoded; only the frame being resized
    is ever at source resolution, and the peak does not grow with the video's length."""
    info = probe_video(long_videos[48])
    assert (info.width, info.height, info.frames) == (*SOURCE, 48)
    converted = []
    real_views = decode_module._frame_views
    monkeypatch.setattr(decode_module, "_frame_views", lambda frame, sizes: (converted.append(1),
                                                                              real_views(frame, sizes))[1])

    def consume(data):
        seen = []
        for clip in decode_video(data, sizes=((96, 64),)):
            assert clip.frames.shape == (69, 64, 96, 3)
            seen.append((clip.clip_index, len(converted), clip.indices[-1]))
        return seen

    peaks = {}
    for seconds, data in long_videos.items():
        converted.clear()
        peaks[seconds], seen = _peak_while(lambda data=data: consume(data))
        plans = plan_clips(seconds, 1.0)
        assert [k for k, _, _ in seen] == list(range(len(plans)))
        # when clip k is handed on, the decoder has converted no frame past clip k's last one
        assert all(count == last + 1 for _, count, last in seen)
    assert len(plan_clips(48, 1.0)) == 8
    # one bucketed clip and a few source frames; a 6 s clip's 69 frames at source resolution would be 48 MB
    assert peaks[48] < 69 * 64 * 96 * 3 + 4 * FRAME, peaks
    assert peaks[48] < 1.25 * peaks[12] + FRAME / 4, peaks


def test_long_video_record_holds_only_its_bucketed_rows(long_videos):
    """Through the read + decode stage: one row per clip, and the peak is the bucketed rows handed on plus
    about one source frame, not the clips at source resolution."""
    cfg = PrecomputeConfig(**TINY)
    record = {"source_uri": "mem://long", "task": "t2v", "caption": "a test pattern",
              "target_bytes": long_videos[48]}
    peak, rows = _peak_while(lambda: process_record(record, 0, 0, cfg))
    assert [r["status"] for r in rows] == ["ok"] * 8
    assert [r["clip_index"] for r in rows] == list(range(8))
    handed_on = sum(len(r["target_pixels"]) for r in rows)
    assert peak < handed_on + 3 * FRAME, (peak, handed_on)


def test_extreme_aspect_video_is_dropped_from_its_metadata(tmp_path, monkeypatch):
    data = _ffmpeg_video(tmp_path / "wide.mp4", 4880, 416, 1, 4)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(media_module, "decode_video", no_decoding)
    monkeypatch.setattr(decode_module, "_frame_views", no_decoding)
    info = probe_video(data)
    assert (info.width, info.height) == (4880, 416)
    rows = process_record({"source_uri": "mem://wide", "task": "t2v", "caption": "a very wide video",
                           "target_bytes": data}, 0, 0, PrecomputeConfig())
    assert [(r["status"], r["stage"], r["reason"]) for r in rows] == [("filtered", "size", "extreme_aspect")]
    # the same for an edit source, and for a video shorter than the duration filter
    ok = _ffmpeg_video(tmp_path / "ok.mp4", 128, 96, 1, 12)
    rows = process_record({"source_uri": "mem://v2v", "task": "v2v", "caption": "make it wide",
                           "target_bytes": ok, "source_bytes": data}, 0, 0, PrecomputeConfig())
    assert [(r["status"], r["reason"]) for r in rows] == [("filtered", "extreme_aspect")]
    cfg = PrecomputeConfig(filters=dict(min_duration_seconds=2.0))
    rows = process_record({"source_uri": "mem://short", "task": "t2v", "caption": "a short video",
                           "target_bytes": ok}, 0, 0, cfg)
    assert [(r["status"], r["stage"], r["reason"]) for r in rows] == [("filtered", "duration", "too_short")]


def test_a_video_whose_frames_exceed_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """The video counterpart of Pillow's bomb limit (issue: a 4.8 MB 12000x12000 MJPEG took 4.95 GB and 148 s
    for one record): the frame size the container declares is checked before any frame is decoded."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (scripts/setup.sh installs it)")
    path = tmp_path / "big.avi"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=12", "-t", "1", "-c:v", "mjpeg", "-y", str(path)],
                   check=True, timeout=120)
    data = path.read_bytes()
    assert decode_module.MAX_VIDEO_FRAME_PIXELS == decode_module.MAX_IMAGE_PIXELS
    monkeypatch.setattr(decode_module, "MAX_VIDEO_FRAME_PIXELS", 320 * 240 - 1)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(media_module, "decode_video", no_decoding)
    monkeypatch.setattr(decode_module, "_frame_views", no_decoding)
    rows = process_record({"source_uri": "mem://big", "task": "t2v", "caption": "a test pattern",
                           "target_bytes": data, "target_name": "big.avi"}, 0, 0, PrecomputeConfig(**TINY))
    assert [(r["status"], r["stage"], r["reason"]) for r in rows] == [("quarantined", "decode", "decompression_bomb")]
    assert "320x240" in rows[0]["error"]
    with pytest.raises(decode_module.DecodeError, match="decompression_bomb"):
        next(decode_video(data))
    monkeypatch.setattr(decode_module, "MAX_VIDEO_FRAME_PIXELS", 320 * 240)
    assert probe_video(data).width == 320, "a frame at the limit is read"


def _read_task_blocks(cfg: PrecomputeConfig, manifest, records: int):
    """The read task's own generator over one partition of ``manifest``: its Arrow blocks, one at a time."""
    from pipelines.data.pipeline import _partition_rows
    from pipelines.data.plan import FilesPlan
    from pipelines.data.sources import InputFile

    plan = FilesPlan([InputFile(str(manifest), "jsonl", records)], records)
    return _partition_rows({"partition": [0]}, plan, cfg.model_dump_json())


def _video_manifest(folder, videos: dict[str, bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, data in videos.items():
        (folder / f"{name}.mp4").write_bytes(data)
        lines.append(json.dumps({"uri": f"{name}.mp4", "caption": f"a test pattern ({name})", "task": "t2v"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def test_read_task_hands_on_blocks_as_they_fill(long_videos, tmp_path):
    """A partition leaves the read task in blocks of about ``encoders.block_mb``: the task's peak is a block
    and one source frame or so, the same for a 12 s and a 48 s video (before: every clip of the partition
    in one block). Rows carry their number in the partition; the last block carries the partition's count."""
    clip = 69 * 64 * 96 * 3
    cfg = PrecomputeConfig(**TINY, encoders=dict(block_mb=2.5 * clip / 2**20))
    peaks, blocks = {}, {}
    for seconds, data in [(12, long_videos[12]), *long_videos.items()]:  # the first pass warms up the codecs
        manifest = _video_manifest(tmp_path / f"v{seconds}", {"clip": data})

        def consume(manifest=manifest):
            return [(t.num_rows, t.column("row_seq").to_pylist(), t.column("partition_rows").to_pylist())
                    for t in _read_task_blocks(cfg, manifest, 1)]

        peaks[seconds], blocks[seconds] = _peak_while(consume)
    assert [n for n, _, _ in blocks[48]] == [2, 2, 2, 2]
    assert [s for _, seqs, _ in blocks[48] for s in seqs] == list(range(8))
    assert [set(c) for _, _, c in blocks[48]] == [{-1}, {-1}, {-1}, {8}]
    file_bytes = len(long_videos[48])
    # the block being filled and its Arrow copy, a few source frames, the video's bytes
    assert peaks[48] < 4 * clip + 3 * FRAME + file_bytes, peaks
    assert peaks[48] < 1.25 * peaks[12] + FRAME + file_bytes, peaks


@pytest.mark.slow
def test_partitions_written_from_several_blocks_equal_one_block(ray_local, long_videos, tmp_path):
    """The whole precompute with every clip in its own block (pieces, then one shard per partition) writes the
    same shards and figures as with one block per partition; exact dedup still keeps the first copy, and
    no piece is left behind."""
    import pyarrow.parquet as pq

    from pipelines.data.pipeline import run_precompute

    manifest = _video_manifest(tmp_path / "in", {"a": long_videos[12], "b": long_videos[48]})
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n")  # a duplicate of a, after b

    def run(name: str, **encoders):
        cfg = PrecomputeConfig(input=str(manifest), output=str(tmp_path / name), partition_size=3,
                               encoders=encoders, filters=dict(dedup=True), **TINY)
        run_precompute(cfg, progress=False)
        out = tmp_path / name
        table = pq.read_table(out / "shards" / "part-00000.parquet")
        return out, table, json.loads((out / "stats.json").read_text())

    whole, whole_table, whole_stats = run("whole")
    split, split_table, split_stats = run("split", block_mb=69 * 64 * 96 * 3 / 2**20)
    assert split_table.column("sample_id").to_pylist() == whole_table.column("sample_id").to_pylist()
    from lance_core.shards import shard_rows

    for a, b in zip(shard_rows(split_table), shard_rows(whole_table)):  # encoded in batches of other sizes
        assert np.allclose(np.asarray(a["target_vae"], np.float32), np.asarray(b["target_vae"], np.float32),
                           atol=2e-2)
    assert split_table.num_rows == 2 + 8
    for key in ("inputs", "inputs_written", "samples_written", "filtered_by_reason"):
        assert split_stats[key] == whole_stats[key], key
    assert split_stats["filtered_by_reason"] == {"dedup:exact_duplicate": 1}
    assert not (split / "_pieces").exists() or not any((split / "_pieces").iterdir())


def test_a_record_that_fails_part_way_is_quarantined_whole(tmp_path):
    """Clips decoded before a video's decode error are not written: the record is quarantined, once."""
    import pandas as pd
    import pyarrow.parquet as pq

    from pipelines.data.records import dropped
    from pipelines.data.writer import write_partition

    cfg = PrecomputeConfig(output=str(tmp_path / "out"), **TINY)
    for folder in ("shards", "quarantine", "_commits"):
        (tmp_path / "out" / folder).mkdir(parents=True)
    record = {"source_uri": "mem://broken", "caption": "x", "task": "t2v"}
    rows = [dropped(record, 0, 0, "ok", "", "") for _ in range(2)]
    rows.append(dropped(record, 0, 0, "quarantined", "decode", "corrupt_video", "frame 140: invalid data"))
    for k, row in enumerate(rows):
        row.update(clip_index=k, sample_id=f"s{k}", content_sha256="c", decode_seconds=0.0)
    commit = write_partition(pd.DataFrame(rows), cfg, cfg.output)
    assert (commit["rows"], commit["inputs_written"], commit["quarantined_inputs"]) == (0, 0, 1)
    assert commit["quarantined"] == {"decode:corrupt_video": 1}
    assert pq.read_table(tmp_path / "out" / "quarantine" / "part-00000.parquet").num_rows == 1
