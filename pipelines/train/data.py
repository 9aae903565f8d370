"""Shards into packed steps, on each worker: per-task row streams over the worker's share of the shard
files (pyarrow record batches, local or s3:// through fsspec), rows into interleaved samples
(``lance_core.packing`` builders), samples into one pack per step under a token budget.

Everything that decides what the next pack holds is explicit state (stream cursors, the random state of
task choice and conditioning dropout, the packer's waiting samples), snapshotted after every pack so
that a checkpoint taken after step k resumes with pack k + 1 exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lance_core.config import ModelConfig
from lance_core.encoders.vae import sample_posterior
from lance_core.packing import (
    GENERATION_TASKS,
    MAX_CONSECUTIVE_SKIPS,
    TASKS,
    PackedBatch,
    Sample,
    StepPacker,
    TokenBudgetError,
    VisualInput,
    build_generation_sample,
    build_understanding_sample,
    pack_samples,
)
from lance_core.shards import shard_rows, tensor
from lance_core.tokenizer import TextTokenizer
from pipelines.runtime.storage import StorageError, filesystem, open_input, with_retries

from .config import DataSection
from .plan import DataError, DataPlan, passes_resolution

log = logging.getLogger("lance.train")


# ---------------------------------------------------------------------------------------------- rows -> samples
def slot_latents(row: dict, slot: str, channels: int,
                 generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The slot's stored latents (the posterior mean); with a generator, a fresh draw mean + std * eps from
    the posterior whose std the shard stores beside it (``<slot>_vae_std``, normalised like the mean).
    ``row`` is a :func:`lance_core.shards.shard_rows` row (tensor cells as numpy arrays in their shape)."""
    latents = tensor(row, f"{slot}_vae")
    if latents is None:
        return None
    if latents.dim() != 4 or latents.shape[-1] != channels:
        raise ValueError(f"{slot}_vae has shape {tuple(latents.shape)}, expected (T, H, W, {channels})")
    if generator is not None:
        std = tensor(row, f"{slot}_vae_std")
        if std is None:
            raise ValueError(f"{slot}_vae_std is missing: data.sample_posterior needs shards precomputed "
                             "with encoders.store_posterior_std")
        latents = sample_posterior(latents, std, generator)
    return latents


def posterior_generator(data: DataSection, rng: random.Random) -> torch.Generator | None:
    """The noise stream of one row's posterior draws (seeded from the loader's random state, so a resumed
    run draws the same latents), or None when training on the posterior mean."""
    return torch.Generator().manual_seed(rng.getrandbits(63)) if data.sample_posterior else None


def slot_visual(row: dict, slot: str, cfg: ModelConfig,
                generator: torch.Generator | None = None) -> VisualInput | None:
    latents = slot_latents(row, slot, cfg.latent_channels, generator)
    grid = None
    vit = tensor(row, f"{slot}_vit")
    if vit is not None:
        grid = tuple(int(x) for x in row[f"{slot}_vit_grid"])
        if vit.dim() != 2 or vit.shape[1] != cfg.hidden_size or vit.shape[0] != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{slot}_vit has shape {tuple(vit.shape)} and grid {grid}; the model needs "
                             f"(t*h*w, {cfg.hidden_size})")
    if latents is None and vit is None:
        return None
    frames = latents.shape[0] if latents is not None else grid[0]
    return VisualInput(latents=latents, vit_features=vit, vit_grid=grid,
                       is_video=frames > 1 or bool(row.get(f"{slot}_fps")))


def row_to_sample(row: dict, tokenizer: TextTokenizer, cfg: ModelConfig, data: DataSection,
                  rng: random.Random) -> Sample:
    """One shard row -> one interleaved sample of its task (MODEL.md layouts), with CFG dropout."""
    task, key = row["task"], row["sample_id"]
    caption = row.get("caption") or ""
    generator = posterior_generator(data, rng)
    if task in ("i2t", "v2t"):
        media = slot_visual(row, "target", cfg, generator)
        if media is None or media.vit_features is None:
            raise ValueError("understanding row without target ViT features")
        return build_understanding_sample(tokenizer, task, media, row.get("question") or "",
                                          row.get("answer") or caption, key=key)
    target = slot_latents(row, "target", cfg.latent_channels, generator)
    if target is None:
        raise ValueError("generation row without target latents")
    if rng.random() < data.caption_dropout:
        caption = ""
    drop_condition = rng.random() < data.condition_dropout
    source = None if drop_condition else slot_visual(row, "source", cfg, generator)
    references = [] if drop_condition else [
        v for v in (slot_visual(row, f"ref_{i}", cfg, generator) for i in range(3)) if v]
    if task in ("i2i", "v2v") and source is None and not drop_condition:
        raise ValueError(f"{task} row without a source")
    return build_generation_sample(tokenizer, task, caption, target, source=source, references=references,
                                   first_frame_clean=task == "i2v" and target.shape[0] > 1, key=key)


# ---------------------------------------------------------------------------------------------- streams
def iter_rows(uri: str, start: int, data: DataSection) -> Iterator[tuple[int, dict]]:
    """(row index, row) of a shard from ``start`` on, one record batch at a time (a broken download of an
    S3 shard resumes)."""
    with open_input(uri, data.storage) as fh:
        pf = pq.ParquetFile(fh)
        offset, groups = 0, []
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if offset + rows > start or groups:
                groups.append(group)
            else:
                offset += rows
        if not groups:
            return
        row_no = offset
        for batch in pf.iter_batches(batch_size=data.read_batch_rows, row_groups=groups):
            for record in shard_rows(batch):
                if row_no >= start:
                    yield row_no, record
                row_no += 1


def shard_digest_verdict(entry, data: DataSection) -> str:
    """What the shard's sha256 says against the one its manifest recorded."""
    if not entry.sha256:
        return "its manifest records no sha256"
    try:
        digest = hashlib.sha256()
        with open_input(entry.uri, data.storage) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except Exception as err:  # noqa: BLE001 - the verdict only explains the skip
        return f"its sha256 could not be computed ({type(err).__name__})"
    if digest.hexdigest() == entry.sha256:
        return "its sha256 matches the manifest's: it was written so (a writer fault), not damaged since"
    return "its sha256 differs from the manifest's: damaged since it was written"


class ShardPrefetcher:
    """Shards fetched ahead of their turn by a small thread pool: a remote shard (s3://) is downloaded whole
    into a local cache folder, a local one read once into the page cache (a network filesystem's read-ahead).
    :meth:`local` gives the cached copy when its download finished, else None (the stream then reads the
    shard directly, as without prefetch)."""

    def __init__(self, data: DataSection, workers: int) -> None:
        self.data, self.workers = data, workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-prefetch") if workers else None
        self._jobs: dict[str, Future] = {}
        self._cache = Path(tempfile.mkdtemp(prefix="lance-shards-")) if workers else None

    def want(self, uris: list[str]) -> None:
        """Fetch ``uris`` (the next shards of a stream) unless already fetched or fetching."""
        if self._pool is None:
            return
        for uri in uris:
            if uri not in self._jobs:
                self._jobs[uri] = self._pool.submit(self._fetch, uri)

    def _fetch(self, uri: str) -> Path | None:
        if "://" not in uri:
            with open(uri, "rb") as fh:
                while fh.read(8 << 20):
                    pass
            return None
        target = self._cache / hashlib.sha1(uri.encode()).hexdigest()
        partial = target.with_suffix(".partial")
        fs = filesystem(uri, self.data.storage)
        with_retries(f"downloading {uri}", self.data.storage, lambda: fs.get_file(uri, str(partial)))
        os.replace(partial, target)
        return target

    def local(self, uri: str) -> str:
        """Where to read ``uri`` from now: its downloaded copy (waiting for a download under way: one whole-object
        read beats the many ranged reads of a Parquet reader), else ``uri`` itself (a failed download is read
        directly, where its error, if it persists, is handled as any read error)."""
        job = self._jobs.get(uri)
        if job is None or "://" not in uri:
            return uri
        try:
            return str(job.result() or uri)
        except Exception:  # noqa: BLE001 - the direct read below meets the same fault and reports it
            return uri

    def release(self, uri: str) -> None:
        """The stream is done with ``uri``: drop its cached copy."""
        job = self._jobs.pop(uri, None)
        if job is not None and job.done() and job.exception() is None and job.result() is not None:
            job.result().unlink(missing_ok=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            shutil.rmtree(self._cache, ignore_errors=True)
            self._pool = None


@dataclass
class OpenShard:
    """A shard a stream is reading: its index in the plan, the next row to read, the rows kept so far (which
    decide, when the slots share shards, which slot a kept row goes to)."""

    shard: int
    row: int = 0
    kept: int = 0


@dataclass
class StreamState:
    epoch: int = 0
    shard_pos: int = 0
    """Next shard of the epoch's order to open."""
    open: list[OpenShard] = field(default_factory=list)
    turn: int = 0
    """Which open shard gives the next row (round robin)."""
    buffer: list[tuple[int, int]] = field(default_factory=list)
    """(shard, row) of the rows waiting in the shuffle buffer."""
    rng: tuple | None = None
    yielded_in_epoch: int = 0


class TaskStream:
    """Rows of one task for one pack slot, epoch after epoch, shuffled at the sample level: the slot reads
    ``data.shuffle_shards`` of its shards side by side into a buffer of ``data.shuffle_buffer`` rows and each
    draw takes a random one (seeded; the buffer's rows are saved by their place and read again at resume).
    With at least as many shards as slots, each slot reads its own shard files (the order reshuffled every
    epoch); otherwise every slot reads the task's shards and keeps its share of the rows. An epoch's rows
    are all drawn before the next epoch's are read: no row twice in an epoch."""

    def __init__(self, task: str, plan: DataPlan, rank: int, world: int, seed: int, data: DataSection,
                 prefetcher: ShardPrefetcher | None = None) -> None:
        self.task, self.plan, self.rank, self.world, self.seed, self.data = task, plan, rank, world, seed, data
        self.prefetcher = prefetcher
        self.shards = plan.task_shards(task)
        self.unreadable: set[int] = set()
        """Shards that failed to read: skipped from then on (counted)."""
        self.by_shard = len(self.shards) >= world
        self.held = {(s, r) for s, r in plan.holdout.get(task, [])} | plan.excluded_rows()
        self.rng = random.Random(seed * 1_000_003 + rank * 7919 + TASKS.index(task) + 17)
        self.state = StreamState()
        self._rows: dict[int, Iterator[tuple[int, dict]]] = {}
        self._buffered: dict[tuple[int, int], dict] = {}
        self.filtered = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch * 7919 + TASKS.index(self.task)).shuffle(order)
        return order[self.rank::self.world] if self.by_shard else order

    def _keep(self, shard: int, row_no: int, row: dict) -> bool:
        if row["task"] != self.task or (shard, row_no) in self.held:
            return False
        if not passes_resolution(self.task, row.get("target_vae_shape"), row.get("target_fps"),
                                 self.data.resolution):
            self.filtered += 1
            return False
        return True

    def _prefetch_next(self, order: list[int]) -> None:
        """The shards about to be opened and the next ``data.prefetch_shards`` after them."""
        if self.prefetcher is not None:
            room = self.data.shuffle_shards - len(self.state.open) + self.prefetcher.workers
            ahead = [s for s in order[self.state.shard_pos:self.state.shard_pos + room] if s not in self.unreadable]
            self.prefetcher.want([self.plan.shards[s].uri for s in ahead])

    def _open_more(self, order: list[int]) -> None:
        st = self.state
        self._prefetch_next(order)
        while len(st.open) < self.data.shuffle_shards and st.shard_pos < len(order):
            shard = order[st.shard_pos]
            st.shard_pos += 1
            if shard not in self.unreadable:
                st.open.append(OpenShard(shard))
        self._prefetch_next(order)

    def _close(self, opened: OpenShard) -> None:
        self.state.open.remove(opened)
        self._rows.pop(opened.shard, None)
        if self.prefetcher is not None:
            self.prefetcher.release(self.plan.shards[opened.shard].uri)

    def _read_one(self, opened: OpenShard) -> bool:
        """The next row of the slot's share from ``opened`` into the buffer; False when the shard is done."""
        shard = opened.shard
        rows = self._rows.get(shard)
        if rows is None:
            uri = self.plan.shards[shard].uri
            source = self.prefetcher.local(uri) if self.prefetcher is not None else uri
            rows = self._rows[shard] = iter_rows(source, opened.row, self.data)
        try:
            for row_no, row in rows:
                opened.row = row_no + 1
                if not self._keep(shard, row_no, row):
                    continue
                opened.kept += 1
                if not self.by_shard and (opened.kept - 1 + shard) % self.world != self.rank:
                    continue
                self.state.buffer.append((shard, row_no))
                self._buffered[(shard, row_no)] = row
                return True
        except StorageError as err:
            if err.kind not in ("corrupt", "io_error"):
                raise  # the storage cannot deliver now (timeout, access): a retry or rerun, not a bad shard
            self._skip_unreadable(shard, err)
        except (OSError, ValueError, pa.ArrowException) as err:
            self._skip_unreadable(shard, err)
        self._close(opened)
        return False

    def _fill(self) -> None:
        """Top the buffer up from the open shards (opening the next ones of the epoch as they end)."""
        st = self.state
        order = self._order(st.epoch)
        self._open_more(order)
        while len(st.buffer) < self.data.shuffle_buffer and st.open:
            opened = st.open[st.turn % len(st.open)]
            if self._read_one(opened):
                st.turn += 1
            else:
                self._open_more(order)

    def _restore_buffered(self) -> None:
        """After a resume: the rows the buffer held, read again by their place."""
        missing = [ref for ref in self.state.buffer if ref not in self._buffered]
        if missing:
            for ref, row in zip(missing, read_rows(self.plan, missing, self.data)):
                self._buffered[ref] = row

    def next_row(self) -> dict:
        st = self.state
        while True:
            self._fill()
            if st.buffer:
                self._restore_buffered()
                index = self.rng.randrange(len(st.buffer))
                st.buffer[index], st.buffer[-1] = st.buffer[-1], st.buffer[index]
                st.yielded_in_epoch += 1
                return self._buffered.pop(st.buffer.pop())
            if st.yielded_in_epoch == 0:
                raise DataError(f"task {self.task!r}: a whole pass over the shards gave pack slot {self.rank} "
                                "no trainable row")
            st.epoch, st.shard_pos, st.turn, st.yielded_in_epoch = st.epoch + 1, 0, 0, 0

    def _skip_unreadable(self, shard: int, err: BaseException) -> None:
        """A shard whose body fails to read (a corrupt page, a truncated file) is named, checked against the
        digest its manifest records, and skipped for the rest of the run (counted)."""
        entry = self.plan.shards[shard]
        self.unreadable.add(shard)
        log.error(f"shard {entry.uri} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  f"{shard_digest_verdict(entry, self.data)}; skipped (task {self.task}, slot {self.rank})")

    def get_state(self) -> dict:
        st = self.state
        return {"epoch": st.epoch, "shard_pos": st.shard_pos, "turn": st.turn,
                "open": [[o.shard, o.row, o.kept] for o in st.open], "buffer": [list(ref) for ref in st.buffer],
                "rng": self.rng.getstate(), "yielded_in_epoch": st.yielded_in_epoch,
                "unreadable": sorted(self.unreadable)}

    def set_state(self, state: dict) -> None:
        self.unreadable = set(state.get("unreadable", ()))
        if "open" not in state:
            raise ValueError("the checkpoint's data position is of an older stream format (no shuffle buffer); "
                             "it cannot be resumed exactly: start a new run or resume with the version that wrote it")
        self.state = StreamState(epoch=state["epoch"], shard_pos=state["shard_pos"], turn=state["turn"],
                                 open=[OpenShard(*o) for o in state["open"]],
                                 buffer=[tuple(ref) for ref in state["buffer"]],
                                 yielded_in_epoch=state["yielded_in_epoch"])
        self.rng.setstate(_as_tuple(state["rng"]))
        self._rows, self._buffered = {}, {}


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def read_rows(plan: DataPlan, refs: list[tuple[int, int]], data: DataSection) -> list[dict]:
    """The rows at (shard index, row) of ``refs`` (the held-out rows), in that order."""
    wanted: dict[int, set[int]] = {}
    for shard, row in refs:
        wanted.setdefault(shard, set()).add(row)
    found: dict[tuple[int, int], dict] = {}
    for shard, rows in wanted.items():
        for row_no, row in iter_rows(plan.shards[shard].uri, min(rows), data):
            if row_no in rows:
                found[(shard, row_no)] = row
            if row_no >= max(rows):
                break
    return [found[ref] for ref in refs]


# ---------------------------------------------------------------------------------------------- loader
@dataclass
class Pack:
    batch: PackedBatch
    keys: list[str]
    weights: dict[str, float]
    build_seconds: float
    state: dict = field(repr=False, default_factory=dict)
    """Loader state right after this pack: what a checkpoint taken after training on it stores."""


class PackLoader:
    """Builds packs on a background thread, one per ticket (step, mixture weights), in ticket order."""

    def __init__(self, plan: DataPlan, data: DataSection, model_cfg: ModelConfig, tokenizer: TextTokenizer,
                 rank: int, world: int, seed: int, need_generation: bool, pin_memory: bool = False) -> None:
        """``pin_memory``: packs come in page-locked memory (for a GPU: asynchronous copies)."""
        self.plan, self.data, self.model_cfg, self.tokenizer = plan, data, model_cfg, tokenizer
        self.need_generation, self.pin_memory = need_generation, pin_memory
        self.prefetcher = ShardPrefetcher(data, data.prefetch_shards)
        self.streams = {t: TaskStream(t, plan, rank, world, seed, data, self.prefetcher) for t in plan.task_rows}
        self.rng = random.Random(seed * 7919 + rank)
        self.packer = StepPacker(data.token_budget, data.buffer_size)
        self.counters: Counter = Counter()
        self._tickets: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"streams": {t: s.get_state() for t, s in self.streams.items()}, "rng": self.rng.getstate(),
                "buffer": list(self.packer.buffer), "skipped": self.packer.skipped,
                "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        for task, stream_state in state["streams"].items():
            if task in self.streams:
                self.streams[task].set_state(stream_state)
        self.rng.setstate(state["rng"])
        self.packer.buffer = list(state["buffer"])
        self.packer.skipped = state["skipped"]
        self.counters = Counter(state["counters"])

    # building ---------------------------------------------------------------------------------
    def _draw(self, weights: dict[str, float], generation: bool) -> Sample:
        tasks = [t for t in self.streams if weights.get(t, 0) > 0 and (not generation or t in GENERATION_TASKS)]
        if not tasks:
            raise DataError("the mixture gives no weight to a task with trainable rows"
                            + (" among the generation tasks" if generation else ""))
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            task = self.rng.choices(tasks, [weights[t] for t in tasks])[0]
            row = self.streams[task].next_row()
            try:
                return row_to_sample(row, self.tokenizer, self.model_cfg, self.data, self.rng)
            except ValueError as err:
                self.counters["bad_rows"] += 1
                if self.counters["bad_rows"] == 1:
                    log.warning(f"skipping bad row {row.get('sample_id')} ({task}): {err}")
        raise DataError(f"{MAX_CONSECUTIVE_SKIPS} rows in a row could not be turned into samples")

    def build_pack(self, weights: dict[str, float]) -> Pack:
        started = time.perf_counter()
        try:
            samples = self.packer.next_pack(lambda gen: self._draw(weights, gen), self.need_generation)
        except TokenBudgetError as err:
            raise DataError(f"{err}: raise data.token_budget or lower the resolution") from None
        batch = pack_samples(samples, self.model_cfg,
                             pad_to=self.data.token_budget if self.data.pad_to_budget else None)
        if self.pin_memory:
            batch = batch.pin_memory()
        self.counters["filtered_rows"] = sum(s.filtered for s in self.streams.values())
        self.counters["unreadable_shards"] = len(set().union(*(s.unreadable for s in self.streams.values())))
        return Pack(batch, [s.key for s in samples], dict(weights), time.perf_counter() - started,
                    self.state_dict())

    def _run(self) -> None:
        while True:
            weights = self._tickets.get()
            if weights is None:
                return
            try:
                self._out.put(self.build_pack(weights))
            except BaseException as err:  # noqa: BLE001 - handed to the training thread, which raises it
                self._out.put(err)
                return

    def submit(self, weights: dict[str, float]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pack-loader", daemon=True)
            self._thread.start()
        self._tickets.put(dict(weights))

    def next(self) -> Pack:
        item = self._out.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self._thread is not None:
            self._tickets.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        self.prefetcher.close()
