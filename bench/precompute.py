"""The precompute pipeline with the tiny encoders on the local Ray.

    python bench/precompute.py [--quick] [--out FILE]

Figures (each a ratio against a baseline measured in the same run):
- images/s and video clips/s end to end (Ray Data, waves, writer included; Ray start excluded);
- pipeline throughput / throughput of its slowest stage run alone in one process on the same data
  (decode + filter + bucket, VAE encode, ViT encode), end to end at N and in the steady state (the extra 3N
  samples of the 4N run over its extra time, so the fixed start-up of actor pools and planning cancels):
  near 1 means the stages overlap and the pipeline keeps up with its slowest stage;
- our video decode (PyAV, 12 fps resampling, clip cutting) / a bare PyAV decode loop of the same files;
- peak memory (sum of the resident sets of the driver and its local Ray processes, sampled at 10 Hz) at N and 4N
  images: near 1 means the job streams.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from bench.common import print_table, write_json  # noqa: E402

BUCKETS = dict(image_area=64 * 64, video_area=64 * 96, vit_area=56 * 56)
ENCODERS = dict(batch_size=16, vae_actors=2, vit_actors=1, cpus_per_actor=0.5, cpus_per_task=0.5)
"""Two single-thread VAE actors and half-CPU decode tasks: every core busy on a 2-core machine."""


class ClusterMemory:
    """Peak of the summed resident sets of this process and its descendants (the local Ray it started)."""

    def __init__(self) -> None:
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._done.is_set():
            total = me.memory_info().rss
            for proc in me.children(recursive=True):  # the local Ray: GCS, raylet, workers, actors
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def _cfg(input_uri: Path, output: Path, partition_size: int):
    from pipelines.data.config import PrecomputeConfig

    return PrecomputeConfig(input=str(input_uri), output=str(output), partition_size=partition_size,
                            buckets=BUCKETS, video=dict(max_seconds=1.0), filters=dict(dedup=False),
                            encoders=ENCODERS)


def pipeline_rate(input_uri: Path, workdir: Path, partition_size: int) -> tuple[float, int, int]:
    from pipelines.data.pipeline import run_precompute

    output = Path(tempfile.mkdtemp(dir=workdir))
    with ClusterMemory() as memory:
        started = time.perf_counter()
        result = run_precompute(_cfg(input_uri, output, partition_size), progress=False)
        seconds = time.perf_counter() - started
    return result.stats["samples_written"] / seconds, result.stats["samples_written"], memory.peak, seconds


def stage_rates(input_uri: Path, workdir: Path) -> dict[str, float]:
    """Each stage alone, in this process, on the same records: samples per second."""
    import pandas as pd

    from pipelines.data.encode import VAEEncoder, ViTEncoder
    from pipelines.data.records import ROW_DEFAULTS, process_record
    from pipelines.data.sources import list_inputs, read_segment

    cfg = _cfg(input_uri, workdir / "unused", 10**9)
    whole_machine = cfg.encoders.model_copy(update={"threads_per_actor": os.cpu_count()})
    cfg = cfg.model_copy(update={"encoders": whole_machine})  # a stage alone gets every core
    rows = []
    started = time.perf_counter()
    for file in list_inputs(cfg):
        for index, record in enumerate(read_segment(file, 0, file.records, cfg)):
            rows += process_record(record, 0, index, cfg)
    decode = len(rows) / (time.perf_counter() - started)
    frame = pd.DataFrame([{k: r.get(k, ROW_DEFAULTS.get(k)) for k in ROW_DEFAULTS} for r in rows])
    rates = {"decode": decode}
    for name, encoder in (("vae", VAEEncoder(cfg.model_dump_json())), ("vit", ViTEncoder(cfg.model_dump_json()))):
        started = time.perf_counter()
        out = []
        for start in range(0, len(frame), 16):
            out.append(encoder(frame.iloc[start:start + 16].reset_index(drop=True)).to_pandas())
        rates[name] = len(frame) / (time.perf_counter() - started)
        frame = pd.concat(out, ignore_index=True)
    return rates


def decode_ratio(videos: list[bytes]) -> tuple[float, float]:
    import io

    import av

    from pipelines.data.decode import decode_video

    started = time.perf_counter()
    for data in videos:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(video=0):
                frame.to_ndarray(format="rgb24")
    bare = time.perf_counter() - started
    started = time.perf_counter()
    clips = 0
    for data in videos:
        clips += sum(1 for _ in decode_video(data, fps=12.0, max_seconds=1.0))
    ours = time.perf_counter() - started
    return bare / ours, clips / ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=1000, help="N (the memory check also runs 4N)")
    parser.add_argument("--out")
    args = parser.parse_args()
    import random

    import ray

    from pipelines.data.synth import render_video, write_release_parquet

    n = 32 if args.quick else args.images
    workdir = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    small = write_release_parquet(workdir / "img-n" / "data.parquet", "t2i", n, seed=1)
    large = write_release_parquet(workdir / "img-4n" / "data.parquet", "t2i", 4 * n, seed=2)
    videos = write_release_parquet(workdir / "vid" / "data.parquet", "t2v", max(4, n // 20), seed=3)
    rate_n, written_n, peak_n, seconds_n = pipeline_rate(small, workdir, partition_size=64)
    rate_4n, written_4n, peak_4n, seconds_4n = pipeline_rate(large, workdir, partition_size=64)
    clip_rate, clips, _, _ = pipeline_rate(videos, workdir, partition_size=8)
    # Steady state: the extra 3N samples over the extra time, the fixed start-up (actor pools, planning) cancelled.
    marginal = (written_4n - written_n) / max(seconds_4n - seconds_n, 1e-9)
    stages = stage_rates(small, workdir)
    slowest = min(stages, key=stages.get)
    rng = random.Random(0)
    raw_videos = [render_video(rng, 96, 64, frames=49)[0] for _ in range(8 if args.quick else 40)]
    decode_vs_bare, decode_clip_rate = decode_ratio(raw_videos)
    rows = [
        {"figure": "images/s end to end (N)", "value": rate_n, "baseline": None, "ratio": None},
        {"figure": "images/s end to end (4N)", "value": rate_4n, "baseline": None, "ratio": None},
        {"figure": "video clips/s end to end", "value": clip_rate, "baseline": None, "ratio": None},
        {"figure": f"pipeline / slowest stage alone ({slowest})", "value": rate_n, "baseline": stages[slowest],
         "ratio": rate_n / stages[slowest]},
        {"figure": f"pipeline steady state (4N - N) / slowest stage ({slowest})", "value": marginal,
         "baseline": stages[slowest], "ratio": marginal / stages[slowest]},
        {"figure": "fixed start-up seconds (N run minus N / steady rate)", "value": seconds_n - written_n / marginal,
         "baseline": None, "ratio": None},
        {"figure": "decode / bare PyAV loop (clips/s)", "value": decode_clip_rate, "baseline": None,
         "ratio": decode_vs_bare},
        {"figure": "peak MiB at 4N / at N", "value": peak_4n / 2**20, "baseline": peak_n / 2**20,
         "ratio": peak_4n / peak_n},
    ]
    print_table(rows, [("figure", "figure", "s"), ("value", "value", ".2f"), ("baseline", "baseline", ".2f"),
                       ("ratio", "ratio", ".2f")])
    write_json("precompute", {"images": n, "written": [written_n, written_4n], "clips": clips,
                              "stage_rates": stages, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
