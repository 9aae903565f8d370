"""The precompute pipeline with the tiny encoders on the local Ray.

    python bench/precompute.py [--quick] [--images N] [--out FILE]

Figures (each a ratio against a baseline measured in the same run):
- images/s and video clips/s end to end (Ray Data, all stages, writer included; Ray start excluded);
- pipeline throughput / throughput of its slowest stage run alone on the same data with the same resources
  (decode + filter + bucket in one single-thread process; each encoder as its actor pool on Ray Data over
  blocks decoded beforehand). Both are steady-state rates: samples after the first output block over the
  time from the first to the last, so actor start-up cancels; near 1 means the stages overlap and the
  pipeline keeps up with its slowest stage. The slowest stage alone and the pipeline are run alternately and
  each pipeline run is compared with the stage runs either side of it (the load of a shared host drifts by
  more than the effect measured); the figure is the median of those paired ratios. The VAE actors' busy
  share of the window says the same without that noise: near 1, the slowest stage never waits for the
  others. The start-up (run start to first commit) is reported apart, and so is the end-to-end ratio with
  start-up included;
- our video decode (PyAV, the release's frame sampler, clip cutting) / a bare PyAV decode loop of the same files;
- peak memory (summed PSS of the driver and its local Ray processes, sampled at 2 Hz in runs of their own, as
  the sampling costs CPU) at N and 4N images: near 1 means the job streams.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from bench.common import print_table, write_json  # noqa: E402

BUCKETS = dict(image_area=128 * 128, video_area=64 * 96, vit_area=56 * 56)
IMAGE_SIZE = (192, 128)
"""Source images a little larger than their 128 x 128 bucket, so the encoders (not Ray's fixed per-block
costs) carry most of the work, as they do at full size."""
ENCODERS = dict(batch_size=16, vae_actors=1, vit_actors=1, cpus_per_actor=0.5, cpus_per_task=0.5)
"""Single-thread encoder actors and half-CPU decode and writer tasks. On a 2-core machine the VAE actor
(the slowest stage) has one core to itself and the other stages share the second, as encoders on GPUs
and decode on CPUs do at full size: the pipeline keeps up with its VAE only if the stages overlap."""


class ClusterMemory:
    """Peak of the summed proportional set sizes (PSS: shared pages such as the libraries and the object
    store counted once) of this process and its descendants (the local Ray it started)."""

    def __init__(self) -> None:
        self.peak = 0
        self.processes_at_peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._done.is_set():
            total, count = me.memory_full_info().pss, 1
            for proc in me.children(recursive=True):  # the local Ray: GCS, raylet, workers, actors
                try:
                    total += proc.memory_full_info().pss
                    count += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if total > self.peak:
                self.peak, self.processes_at_peak = total, count
            time.sleep(0.5)  # reading PSS walks every mapping: sample gently

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


def steady_rate(arrivals: list[tuple[float, int]]) -> float:
    """Samples per second after the first output block: (samples of later blocks) / (last - first arrival)."""
    arrivals = sorted(arrivals)
    if len(arrivals) < 2:
        return float("nan")
    return sum(n for _, n in arrivals[1:]) / max(arrivals[-1][0] - arrivals[0][0], 1e-9)


def pipeline_run(input_uri: Path, workdir: Path, partition_size: int) -> dict:
    """Throughput of one run, with nothing else sampling the processes."""
    from pipelines.data.pipeline import run_precompute

    output = Path(tempfile.mkdtemp(dir=workdir))
    started = time.time()
    result = run_precompute(_cfg(input_uri, output, partition_size), progress=False)
    seconds = time.time() - started
    commits = [json.loads(p.read_text()) for p in (output / "_commits").glob("*.json")]
    arrivals = [(c["committed_at"], c["rows"]) for c in commits]
    written = result.stats["samples_written"]
    window = max(t for t, _ in arrivals) - min(t for t, _ in arrivals)
    vae_busy = result.stats["stage_seconds"].get("vae", 0.0) / ENCODERS["vae_actors"]
    return {"rate": written / seconds, "written": written, "seconds": seconds,
            "vae_busy": vae_busy / window if window else float("nan"),
            "steady": steady_rate(arrivals), "startup": min(t for t, _ in arrivals) - started}


def pipeline_memory(input_uri: Path, workdir: Path, partition_size: int) -> dict:
    """Peak memory of a run of its own: reading PSS walks every mapping of ~16 processes (~0.1 s of CPU per
    sweep here), which would slow the run it measures."""
    from pipelines.data.pipeline import run_precompute

    with ClusterMemory() as memory:
        run_precompute(_cfg(input_uri, Path(tempfile.mkdtemp(dir=workdir)), partition_size), progress=False)
    return {"peak": memory.peak, "processes": memory.processes_at_peak}


def decoded_blocks(input_uri: Path, workdir: Path, partition_size: int) -> tuple[list, float]:
    """The decoded rows of every partition as Arrow blocks, and the single-thread decode rate."""
    import torch

    from pipelines.data.records import ROW_DEFAULTS, process_record, to_arrow
    from pipelines.data.sources import list_inputs, read_segment

    cfg = _cfg(input_uri, workdir / "unused", partition_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a decode task of the pipeline
    rows, started = [], time.perf_counter()
    for file in list_inputs(cfg):
        for index, record in enumerate(read_segment(file, 0, file.records, cfg)):
            rows += process_record(record, index // partition_size, index, cfg)
    rate = len(rows) / (time.perf_counter() - started)
    torch.set_num_threads(threads)
    blocks = []
    for start in range(0, len(rows), partition_size):
        part = rows[start:start + partition_size]
        blocks.append(to_arrow({k: [r.get(k, ROW_DEFAULTS.get(k)) for r in part] for k in ROW_DEFAULTS}))
    return blocks, rate


def encoder_alone(blocks: list, stage, actors: int, cfg_json: str) -> tuple[float, list]:
    """Steady-state samples/s of one encoder actor pool alone on Ray Data, and its output blocks."""
    import ray
    from ray.data import ActorPoolStrategy

    enc = ENCODERS
    ds = ray.data.from_arrow(blocks).map_batches(
        stage, fn_constructor_args=(cfg_json,), batch_size=None, batch_format="pandas",
        compute=ActorPoolStrategy(size=actors), num_cpus=enc["cpus_per_actor"])
    arrivals, out = [], []
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        arrivals.append((time.time(), block.num_rows))
        out.append(block)
    return steady_rate(arrivals), out


def stage_rates(blocks: list, cfg_json: str) -> dict[str, float]:
    """The encoders alone on the decoded blocks, with the resources they have in the pipeline: samples/s."""
    from pipelines.data.encode import VAEEncoder, ViTEncoder

    vae, encoded = encoder_alone(blocks, VAEEncoder, ENCODERS["vae_actors"], cfg_json)
    vit, _ = encoder_alone(encoded, ViTEncoder, ENCODERS["vit_actors"], cfg_json)
    return {"vae": vae, "vit": vit}


def vae_alone(blocks: list, cfg_json: str) -> float:
    from pipelines.data.encode import VAEEncoder

    return encoder_alone(blocks, VAEEncoder, ENCODERS["vae_actors"], cfg_json)[0]


def overlap_rounds(large: Path, workdir: Path, partition_size: int, rounds: int, on_fresh_ray) -> dict:
    """The VAE alone and the whole pipeline at 4N, alternated (alone, pipeline, alone, ..., alone): each
    pipeline run is compared with the mean of the VAE runs either side of it, and the median of those ratios
    is the figure, so the drifting load of a shared host cancels."""
    blocks, decode = decoded_blocks(large, workdir, partition_size)
    cfg_json = _cfg(large, workdir / "unused", partition_size).model_dump_json()
    stages = on_fresh_ray(stage_rates, blocks, cfg_json)
    alone, runs = [stages["vae"]], []
    for _ in range(rounds):
        runs.append(on_fresh_ray(pipeline_run, large, workdir, partition_size=partition_size))
        # one round (quick): the stage run before it stands on both sides
        alone.append(on_fresh_ray(vae_alone, blocks, cfg_json) if rounds > 1 else alone[-1])
    ratios = [run["steady"] / ((before + after) / 2) for run, before, after in zip(runs, alone, alone[1:])]
    return {"stages": {"decode": decode, "vae": statistics.median(alone), "vit": stages["vit"]},
            "vae_alone": alone, "runs": runs, "ratios": ratios, "ratio": statistics.median(ratios)}


def decode_ratio(videos: list[bytes], reps: int = 9) -> tuple[float, float]:
    """Bare PyAV decode seconds / ours, and our clips/s: medians of ``reps`` alternating passes."""
    import io

    import av

    from pipelines.data.decode import decode_video

    def bare() -> None:
        for data in videos:
            with av.open(io.BytesIO(data)) as container:
                for frame in container.decode(video=0):
                    frame.to_ndarray(format="rgb24")

    def ours() -> int:
        return sum(sum(1 for _ in decode_video(data, fps=12.0, max_seconds=1.0)) for data in videos)

    clips, bare_s, ours_s = ours(), [], []  # the first pass warms the caches
    for _ in range(reps):
        for fn, times in ((bare, bare_s), (ours, ours_s)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(bare_s) / statistics.median(ours_s), clips / statistics.median(ours_s)


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
    images_per_partition = 8 if args.quick else 64
    workdir = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    small = write_release_parquet(workdir / "img-n" / "data.parquet", "t2i", n, seed=1, size=IMAGE_SIZE)
    # quick: the smallest point only, N standing in for 4N (the figures only show that the code runs)
    large = small if args.quick else \
        write_release_parquet(workdir / "img-4n" / "data.parquet", "t2i", 4 * n, seed=2, size=IMAGE_SIZE)
    videos = write_release_parquet(workdir / "vid" / "data.parquet", "t2v", max(4, n // 20), seed=3)

    def on_fresh_ray(fn, *fn_args, **kwargs):
        """Each measurement on its own local Ray: no idle workers or objects left by the one before (quick:
        one Ray for all, whose figures only show that the code runs)."""
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            return fn(*fn_args, **kwargs)
        finally:
            if not args.quick:
                ray.shutdown()

    overlap = overlap_rounds(large, workdir, images_per_partition, 1 if args.quick else 3, on_fresh_ray)
    run_4n = sorted(overlap["runs"], key=lambda run: run["steady"])[len(overlap["runs"]) // 2]
    run_n = run_4n if args.quick else on_fresh_ray(pipeline_run, small, workdir, partition_size=images_per_partition)
    memory_n = on_fresh_ray(pipeline_memory, small, workdir, partition_size=images_per_partition)
    memory_4n = memory_n if args.quick else \
        on_fresh_ray(pipeline_memory, large, workdir, partition_size=images_per_partition)
    videos_run = on_fresh_ray(pipeline_run, videos, workdir, partition_size=8)
    stages = overlap["stages"]
    slowest = min(stages, key=stages.get)
    rng = random.Random(0)
    raw_videos = [render_video(rng, 96, 64, frames=49)[0] for _ in range(8 if args.quick else 40)]
    decode_vs_bare, decode_clip_rate = decode_ratio(raw_videos)
    rows = [
        {"figure": "images/s end to end (N)", "value": run_n["rate"], "baseline": None, "ratio": None},
        {"figure": "images/s end to end (4N)", "value": run_4n["rate"], "baseline": None, "ratio": None},
        {"figure": "video clips/s end to end", "value": videos_run["rate"], "baseline": None, "ratio": None},
        {"figure": f"pipeline steady state (4N) / slowest stage alone ({slowest}), median of "
                   f"{len(overlap['ratios'])} paired rounds", "value": run_4n["steady"], "baseline": stages[slowest],
         "ratio": overlap["ratio"]},
        {"figure": "  paired-round ratios, lowest and highest", "value": min(overlap["ratios"]),
         "baseline": None, "ratio": max(overlap["ratios"])},
        {"figure": "VAE actors busy / steady window (4N)", "value": run_4n["vae_busy"], "baseline": None,
         "ratio": None},
        {"figure": f"end to end with start-up (4N) / slowest stage ({slowest})", "value": run_4n["rate"],
         "baseline": stages[slowest], "ratio": run_4n["rate"] / stages[slowest]},
        {"figure": "start-up seconds: run start to first commit (N, 4N)", "value": run_n["startup"],
         "baseline": run_4n["startup"], "ratio": None},
        {"figure": "decode / bare PyAV loop (clips/s)", "value": decode_clip_rate, "baseline": None,
         "ratio": decode_vs_bare},
        {"figure": "peak MiB (PSS) at 4N / at N", "value": memory_4n["peak"] / 2**20,
         "baseline": memory_n["peak"] / 2**20, "ratio": memory_4n["peak"] / memory_n["peak"]},
        {"figure": "processes at the memory peak (4N, N)", "value": memory_4n["processes"],
         "baseline": memory_n["processes"], "ratio": None},
    ]
    print_table(rows, [("figure", "figure", "s"), ("value", "value", ".2f"), ("baseline", "baseline", ".2f"),
                       ("ratio", "ratio", ".2f")])
    write_json("precompute", {"images": n, "written": [run_n["written"], run_4n["written"]],
                              "clips": videos_run["written"], "stage_rates": stages,
                              "vae_alone_runs": overlap["vae_alone"],
                              "pipeline_steady_runs": [run["steady"] for run in overlap["runs"]],
                              "overlap_ratios": overlap["ratios"],
                              "rows": rows}, args.out)


if __name__ == "__main__":
    main()
