"""Peak memory of one read + decode task against the length of its video.

    python bench/video_memory.py [--quick] [--out FILE]

Videos of 15, 30, 60 and 120 s at 1920x1080, 24 fps (quick: 3, 6, 12 and 24 s at 320x180, 12 fps) are made
with ffmpeg (one keyframe a second; the shorter ones are cut from the longest without re-encoding). Each is
one partition of a t2v manifest, run through the read task's own generator (``_partition_rows``) with the
config defaults but 128 MiB blocks, one 69 x 480 x 848 x 3 clip (84 MB) each, so that every video, the
shortest too, fills its blocks (quick: the tiny buckets and 1 MiB blocks, one clip each): the video is read
from disk, its size, aspect and duration read from the container, then its clips decoded, bucketed to
480x848 and handed on in blocks of about ``encoders.block_mb``, each dropped once handed on, as Ray Data's
object store takes it.

Figures (in one fresh process, after a warm-up run, with glibc told to return large blocks to the OS on
free so the resident set follows live memory; peaks sampled at 2 kHz, see ``bench/common.py``):
- ``peak``: largest growth of the resident set during the task; ``peak x`` its ratio to the shortest video's;
- ``video``: the file's bytes, which the task reads and holds once (a record's input, as tar members and
  Parquet cells arrive); ``beside video`` = peak - video, the decoded side, the figure that must stay flat;
  ``beside x`` its ratio to the shortest video's in the same run;
- ``blocks``, ``largest block``: what the task hands on;
- ``one block``: every clip of the partition, what the task held before its rows left in blocks (a computed
  size: the sum of the blocks); ``one block x`` its ratio to the streaming peak;
- ``source first``: the shortest video through the path before streaming decode (every clip decoded and
  held at source resolution, then bucketed clip by clip), its peak as a ratio to the streaming peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, peak_rss_increase, print_table, write_json  # noqa: E402

FULL = dict(seconds=(15, 30, 60, 120), size=(1920, 1080), fps=24, config=dict(encoders=dict(block_mb=128.0)))
QUICK = dict(seconds=(3, 6, 12, 24), size=(320, 180), fps=12,
             config=dict(buckets=dict(image_area=64 * 64, video_area=64 * 96, vit_area=56 * 56),
                         encoders=dict(block_mb=1.0)))
MIB = 2**20


def make_videos(folder: Path, seconds: tuple[int, ...], size: tuple[int, int], fps: int) -> dict[int, Path]:
    """The longest video encoded once; the others are its first seconds, cut at keyframes (one a second)."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is not installed (scripts/setup.sh installs it)")
    longest = folder / f"{max(seconds)}s.mp4"
    base = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    subprocess.run(base + ["-f", "lavfi", "-i", f"testsrc2=size={size[0]}x{size[1]}:rate={fps}",
                           "-t", str(max(seconds)), "-c:v", "libx264", "-preset", "ultrafast", "-g", str(fps),
                           "-pix_fmt", "yuv420p", str(longest)], check=True)
    videos = {max(seconds): longest}
    for length in seconds:
        if length != max(seconds):
            videos[length] = folder / f"{length}s.mp4"
            subprocess.run(base + ["-i", str(longest), "-t", str(length), "-c", "copy", str(videos[length])],
                           check=True)
    return videos


def _source_first(data: bytes, cfg) -> list[bytes]:
    """The read + decode stage as it was: all clips decoded at source resolution, then each bucketed."""
    from pipelines.data.buckets import bucket_for, resize_center_crop
    from pipelines.data.decode import decode_video

    v = cfg.video
    clips = list(decode_video(data, v.fps, v.max_seconds, v.stride_seconds, v.min_frames, v.max_clips_per_video,
                              v.max_clip_seconds))
    out = []
    for clip in clips:
        _, width, height = bucket_for(clip.frames.shape[2], clip.frames.shape[1], cfg.buckets.video_area)
        out.append((resize_center_crop(clip.frames, width, height) * 255).round().byte()
                   .permute(0, 2, 3, 1).numpy().tobytes())
    return out


def _read_task(path: str, cfg) -> list[tuple[int, int]]:
    """The read task over a one-record partition naming ``path``: (rows, bytes) of each block it hands on."""
    from pipelines.data.pipeline import _partition_rows
    from pipelines.data.plan import FilesPlan
    from pipelines.data.sources import InputFile

    manifest = Path(path).with_suffix(".jsonl")
    manifest.write_text(json.dumps({"uri": Path(path).name, "caption": "a test pattern", "task": "t2v"}) + "\n")
    plan = FilesPlan([InputFile(str(manifest), "jsonl", 1)], 1)
    blocks = []
    for table in _partition_rows({"partition": [0]}, plan, cfg.model_dump_json()):
        if set(table.column("status").to_pylist()) != {"ok"}:
            raise RuntimeError(f"{path}: {table.select(['status', 'reason', 'error']).to_pylist()[:3]}")
        blocks.append((table.num_rows, table.nbytes))
        del table
    return blocks


def worker(videos: dict[int, str], config: dict) -> dict:
    """In the child process: each video through the read task, shortest first, then the pre-streaming path."""
    import torch

    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.decode import probe_video

    torch.set_num_threads(1)  # one decode task holds one CPU
    cfg = PrecomputeConfig(**config)
    _read_task(videos[min(videos)], cfg)  # codec and kernel set-up is not the task's memory
    _source_first(Path(videos[min(videos)]).read_bytes(), cfg)
    rows = []
    for seconds in sorted(videos):
        result: dict = {}
        started = time.perf_counter()
        peak = peak_rss_increase(lambda path=videos[seconds]: result.update(blocks=_read_task(path, cfg)))
        wall = time.perf_counter() - started
        blocks = result["blocks"]
        info = probe_video(Path(videos[seconds]).read_bytes())
        rows.append({"seconds": seconds, "source": f"{info.width}x{info.height}", "source_fps": info.fps,
                     "clips": sum(n for n, _ in blocks), "blocks": len(blocks), "peak_mib": peak / MIB,
                     "largest_block_mib": max(b for _, b in blocks) / MIB,
                     "one_block_mib": sum(b for _, b in blocks) / MIB,
                     "video_mib": os.path.getsize(videos[seconds]) / MIB, "wall_s": wall})
    shortest = min(videos)
    data = Path(videos[shortest]).read_bytes()
    result = {}
    started = time.perf_counter()
    peak = peak_rss_increase(lambda: result.update(out=_source_first(data, cfg)))
    source_first = {"seconds": shortest, "peak_mib": peak / MIB,
                    "handed_on_mib": sum(len(b) for b in result.pop("out")) / MIB,
                    "wall_s": time.perf_counter() - started}
    return {"rows": rows, "source_first": source_first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small videos and buckets: finishes in seconds")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/video_memory.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker({int(k): v for k, v in spec["videos"].items()}, spec["config"])))
        return

    setting = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        videos = make_videos(Path(tmp), setting["seconds"], setting["size"], setting["fps"])
        make_seconds = time.perf_counter() - started
        spec = json.dumps({"videos": {str(k): str(v) for k, v in videos.items()}, "config": setting["config"]})
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
        run = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env,
                             check=False)
        if run.returncode != 0:
            raise SystemExit(f"the measuring process failed:\n{run.stderr[-3000:]}")
        measured = json.loads(run.stdout.strip().splitlines()[-1])

    rows = measured["rows"]
    base = rows[0]
    for row in rows:
        row["peak_ratio"] = row["peak_mib"] / base["peak_mib"]
        row["beside_video_mib"] = row["peak_mib"] - row["video_mib"]
        row["beside_ratio"] = row["beside_video_mib"] / (base["peak_mib"] - base["video_mib"])
        row["one_block_ratio"] = row["one_block_mib"] / row["peak_mib"]
    source_first = measured["source_first"]
    source_first["ratio_to_streaming"] = source_first["peak_mib"] / base["peak_mib"]
    print(f"peak memory of one read + decode task ({rows[0]['source']}, {rows[0]['source_fps']:g} fps; "
          f"baseline: the {base['seconds']} s video)")
    print_table(rows, [("seconds", "video s", "d"), ("clips", "clips", "d"), ("blocks", "blocks", "d"),
                       ("peak_mib", "peak MiB", ".0f"), ("peak_ratio", "peak x", ".2f"),
                       ("video_mib", "video MiB", ".0f"), ("beside_video_mib", "beside video MiB", ".0f"),
                       ("beside_ratio", "beside x", ".2f"), ("largest_block_mib", "largest block MiB", ".0f"),
                       ("one_block_mib", "one block MiB", ".0f"), ("one_block_ratio", "one block x", ".2f"),
                       ("wall_s", "wall s", ".1f")])
    print(f"source first (all clips at source resolution, then bucketed), {source_first['seconds']} s video: "
          f"peak {source_first['peak_mib']:.0f} MiB = {source_first['ratio_to_streaming']:.2f} x streaming")
    write_json("video_memory", {
        "quick": args.quick, "source_size": list(setting["size"]), "source_fps": setting["fps"],
        "config": setting["config"], "make_videos_s": make_seconds, "load_average": load_average(),
        "rows": rows, "source_first": source_first,
        "flat": max(r["beside_ratio"] for r in rows),
    }, args.out)


if __name__ == "__main__":
    main()
