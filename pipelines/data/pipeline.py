"""The precompute pipeline on Ray Data: plan -> (read + decode + filter + bucket) -> scoring pool -> VAE pool
-> ViT pool -> per-partition shard writer, as one streaming execution: the actor pools start once, and
Ray Data's backpressure bounds memory whatever the dataset size.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import ray
from ray.data import ActorPoolStrategy

from .config import PrecomputeConfig
from .encode import VAEEncoder, ViTEncoder
from .records import ROW_DEFAULTS, process_record, to_arrow
from .scores import ScoreFilter
from .sources import InputFile, list_inputs, plan_partitions, read_segment
from .writer import committed_hashes, read_commits, read_json, write_json, write_partition


@ray.remote(num_cpus=0)
class DedupIndex:
    """Content hashes claimed so far; the first claim of a hash wins."""

    def __init__(self, hashes: list[str]) -> None:
        self.owner = {h: "committed" for h in hashes}

    def claim(self, hashes: list[str], keys: list[str]) -> list[str]:
        """Return the hashes among ``hashes`` already owned by another key."""
        taken = []
        for digest, key in zip(hashes, keys):
            owner = self.owner.setdefault(digest, key)
            if owner != key:
                taken.append(digest)
        return taken


def load_plan(cfg: PrecomputeConfig) -> tuple[list[InputFile], list]:
    """The stored plan of the output folder, or a new one; a rerun with other inputs is refused."""
    stored = read_json(cfg.output, "plan.json", cfg)
    if stored is not None:
        files = [InputFile(**f) for f in stored["inputs"]]
        if stored["input"] != cfg.input or stored["partition_size"] != cfg.partition_size:
            raise ValueError(f"output {cfg.output!r} was planned for input {stored['input']!r} with partition_size "
                             f"{stored['partition_size']}; use a new output folder for other inputs")
        return files, [[tuple(s) for s in p] for p in stored["partitions"]]
    files = list_inputs(cfg)
    partitions = plan_partitions(files, cfg.partition_size)
    write_json(cfg.output, "plan.json", {
        "input": cfg.input, "partition_size": cfg.partition_size,
        "inputs": [f.__dict__ for f in files], "partitions": partitions}, cfg)
    return files, partitions


def _partition_rows(items, files: list[InputFile], cfg_json: str):
    """A batch of partition items -> the Arrow table of all their rows."""
    cfg = PrecomputeConfig.model_validate_json(cfg_json)
    rows = []
    for partition, segments in zip(items["partition"], items["segments"]):
        rows += _rows_of_partition(int(partition), json.loads(segments), files, cfg)
    columns = {name: [row.get(name, ROW_DEFAULTS.get(name)) for row in rows]
               for name in [*ROW_DEFAULTS, "decode_seconds"]}
    return to_arrow(columns)


def _rows_of_partition(partition: int, segments, files: list[InputFile], cfg: PrecomputeConfig) -> list[dict]:
    rows = []
    index = 0
    for file_index, start, stop in segments:
        for record in read_segment(files[file_index], start, stop, cfg):
            started = time.perf_counter()
            produced = process_record(record, partition, index, cfg)
            seconds = (time.perf_counter() - started) / len(produced)
            for row in produced:
                row["decode_seconds"] = seconds
            rows += produced
            index += 1
    return rows


@dataclass
class PrecomputeResult:
    output: str
    partitions: int
    committed_now: int
    skipped: int
    stats: dict


def _prepare_output(cfg: PrecomputeConfig) -> None:
    from .sources import filesystem, with_retries

    fs = filesystem(cfg.output, cfg.storage)
    for sub in ("", "/shards", "/quarantine", "/_commits"):
        with_retries(f"writing {cfg.output}", cfg.storage,
                     lambda sub=sub: fs.makedirs(cfg.output.rstrip("/") + sub, exist_ok=True))


def reserved_cpus(cfg: PrecomputeConfig) -> float:
    """CPUs held by the actor pools for the whole run, plus one read/decode or writer task."""
    enc = cfg.encoders
    actors = enc.vae_actors + enc.vit_actors + (cfg.filters.score_actors if cfg.filters.scoring else 0)
    return actors * enc.cpus_per_actor + enc.cpus_per_task


def check_cpu_budget(cfg: PrecomputeConfig, cluster_cpus: float, autoscaling: bool) -> None:
    """Actor pools that leave no room for a read or writer task would wait forever: say so up front."""
    needed = reserved_cpus(cfg)
    if needed <= cluster_cpus:
        return
    message = (f"the actor pools and one task reserve {needed:g} CPUs (encoders.cpus_per_actor x actors + "
               f"encoders.cpus_per_task) but the cluster has {cluster_cpus:g}; lower encoders.cpus_per_actor, "
               "encoders.cpus_per_task or the actor counts")
    if not autoscaling:
        raise ValueError(message)
    print(f"precompute: warning: {message} (waiting for the autoscaler to add nodes)", flush=True)


def run_precompute(cfg: PrecomputeConfig, progress: bool = True) -> PrecomputeResult:
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        # RAY_ADDRESS (a submitted job) joins its cluster; otherwise a new local Ray, never another one's.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    check_cpu_budget(cfg, ray.cluster_resources().get("CPU", 0.0), autoscaling=joined)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 8 * 2**30)
    _prepare_output(cfg)
    files, partitions = load_plan(cfg)
    commits = read_commits(cfg.output, cfg)
    todo = [p for p in range(len(partitions)) if p not in commits]
    skipped = len(partitions) - len(todo)
    dedup = DedupIndex.remote(committed_hashes(cfg.output, commits, cfg) if cfg.filters.dedup else [])
    started = time.perf_counter()
    if todo:
        since_manifest = 0
        for row in _build_dataset(cfg, files, partitions, todo, dedup).iter_rows():
            record = json.loads(row["commit"])
            commits[record["partition"]] = record
            since_manifest += 1
            if since_manifest >= cfg.manifest_every:
                write_manifest(cfg, commits, len(partitions), time.perf_counter() - started)
                since_manifest = 0
    stats = write_manifest(cfg, commits, len(partitions), time.perf_counter() - started)
    return PrecomputeResult(cfg.output, len(partitions), len(todo), skipped, stats)


def _build_dataset(cfg: PrecomputeConfig, files: list[InputFile], partitions: list, todo: list[int], dedup):
    """All stages over the partitions still to do; each yielded row is one partition's commit record."""
    cfg_json = cfg.model_dump_json()
    enc = cfg.encoders
    gpu = enc.num_gpus_per_actor or None
    items = [{"partition": p, "segments": json.dumps(partitions[p])} for p in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(todo))
    # The memory reservation also keeps decode in its own tasks: Ray Data fuses a task stage into the
    # next actor stage when their remote args match, which would run decode and encode one after the other.
    ds = ds.map_batches(_partition_rows, fn_args=(files, cfg_json), batch_size=1, batch_format="numpy",
                        num_cpus=enc.cpus_per_task, memory=int(enc.memory_per_task_gb * 2**30),
                        concurrency=enc.max_decode_tasks)
    # One block per partition from the read stage to the writer: the actor stages take whole blocks
    # (batch_size=None) and blocks are never split, so no shuffle is needed to regroup partitions.
    stages = [(ScoreFilter, cfg.filters.score_actors)] if cfg.filters.scoring else []
    stages += [(VAEEncoder, enc.vae_actors), (ViTEncoder, enc.vit_actors)]
    for stage, actors in stages:
        ds = ds.map_batches(stage, fn_constructor_args=(cfg_json,), batch_size=None, batch_format="pandas",
                            compute=ActorPoolStrategy(size=actors), num_cpus=enc.cpus_per_actor, num_gpus=gpu)
    return ds.map_batches(write_partition, fn_args=(cfg_json, cfg.output, dedup), batch_size=None,
                          batch_format="pandas", num_cpus=enc.cpus_per_task)


def write_manifest(cfg: PrecomputeConfig, commits: dict[int, dict], total: int, seconds: float) -> dict:
    ordered = [commits[p] for p in sorted(commits)]
    write_json(cfg.output, "manifest.json", {
        "schema": "lance-latent-shards/1", "partitions_planned": total, "partitions_committed": len(ordered),
        "shards": [{k: c[k] for k in ("partition", "shard", "rows", "bytes", "sha256", "inputs")} for c in ordered],
    }, cfg)
    stats = summarize(ordered, total, seconds)
    write_json(cfg.output, "stats.json", stats, cfg)
    return stats


def summarize(commits: list[dict], total: int, seconds: float) -> dict:
    filtered, quarantined, stage_seconds = Counter(), Counter(), Counter()
    for c in commits:
        filtered.update(c["filtered"])
        quarantined.update(c["quarantined"])
        stage_seconds.update(c.get("seconds", {}))
    inputs = sum(c["inputs"] for c in commits)
    return {
        "partitions_planned": total, "partitions_committed": len(commits),
        "inputs": inputs, "inputs_written": sum(c["inputs_written"] for c in commits),
        "inputs_filtered": sum(c["filtered_inputs"] for c in commits),
        "inputs_quarantined": sum(c["quarantined_inputs"] for c in commits),
        "samples_written": sum(c["rows"] for c in commits), "bytes_written": sum(c["bytes"] for c in commits),
        "filtered_by_reason": dict(filtered), "quarantined_by_reason": dict(quarantined),
        "stage_seconds": dict(stage_seconds), "wall_seconds": seconds,
    }
