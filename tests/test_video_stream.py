"""Long and odd videos in the read + decode stage (issue: every clip was decoded and held at source
resolution before the first was encoded; a 4880x416 video was decoded whole only to be dropped).

Videos are made with ffmpeg at 1 fps (640x360) so a source of a minute costs seconds. Memory is measured with
tracemalloc, which sees the numpy buffers (decoded RGB frames, clip buffers, row bytes) the stage holds."""

import shutil
import subprocess
import tracemalloc

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
