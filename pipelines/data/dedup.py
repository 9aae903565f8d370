"""The duplicate index of the precompute: exact duplicates (the same content hash) and near duplicates
(perceptual hashes within ``filters.near_dedup_distance`` bits), spread over ``filters.dedup_actors`` actors.

The rule, for both kinds: a record is a duplicate when a record before it in plan order (partition, record
number), or a record of a shard committed by an earlier run, has the same content (exact) or is within the
distance on every hashed frame (near). Read tasks register their records as soon as a partition is read; a
writer first waits until every earlier partition of the run has registered (they were read before it: reads
start in plan order), then claims. So the first occurrence in plan order is kept whatever order partitions
are written in, across partitions and reruns, and a writer retried after a crash gets the same answer.
A near duplicate is judged against every earlier registered record, kept or not (as SemDedup does), so its
outcome does not depend on the order in which other records were decided.

Sharding: a content hash goes to the actor its leading hex digits name. A near hash's first frame is cut into
``distance + 1`` bands (:func:`~.filters.band_masks`); two hashes within the distance agree exactly on at
least one band, so the actor that holds that band value holds both, and it checks the full distance over
every frame. Each actor holds about 1/K of the content hashes and of the band entries.

Resume: the content hashes of committed shards own their content outright (as when they were written).
The near hashes of every record a committed partition registered (written or not) are in its shard's footer
(``lance.near_hashes``): the written ones own their neighbourhood outright, the others come back at their
own plan position, so a rerun decides as one uninterrupted run would.

A content a claim keeps is marked kept by that record, and no other record keeps it after that, whatever its
plan position: a content is written once even when a later partition claims before an earlier one has
registered (a wait that ran out, or a restart).

Restarts: an actor that dies (its process or its node) is restarted by Ray up to :data:`MAX_RESTARTS` times,
and the calls made to it meanwhile are retried on the new one. The new actor rebuilds its slice of the index
from what is committed, as a rerun would: the shards committed so far, by this run too, each owning its
content outright except towards its own partition, so that a retried writer of a committed partition gets its
answer again. What the lost actor held of partitions read but not committed is gone: those partitions register
again when they claim (the rows reaching the writer carry their hashes), and for the rest of the run writers
no longer wait for earlier partitions, so a duplicate among them keeps the copy claimed first rather than the
first in plan order; each content is still written once. When the restarts are used up the run ends with
:class:`DedupIndexLost`, and running it again resumes it.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from pipelines.runtime.storage import filesystem, join_uri, with_retries

from .config import PrecomputeConfig
from .filters import band_keys, parse_near_hash, within

COMMITTED = -1
"""Plan position of what committed shards hold: before every record of the run."""
NO_OWNER = np.iinfo(np.int64).max
ANY_RECORD = 0xFFFFFFFF
"""Record number of a kept mark that stands for a committed partition's written records (numbers not kept)."""
MAX_RESTARTS = 3
"""Restarts of a dedup actor (each rebuilt from the committed shards) before the run ends with
:class:`DedupIndexLost`."""
NEAR_FOOTER = b"lance.near_hashes"
EXACT = "exact_duplicate"
NEAR = "near_duplicate"
IN_FLIGHT = 8
"""Batches of committed hashes sent to the actors before waiting for them."""


class DedupIndexLost(RuntimeError):
    """A dedup actor died and could not be restarted; the message says what a rerun does."""


def plan_position(partition: int, record: int) -> int:
    return partition << 32 | record


def kept_mark(position: int) -> int:
    """The owner value of a content kept by the record at ``position`` (below COMMITTED: no position replaces
    it). ``plan_position(p, ANY_RECORD)``: kept by a record of committed partition p."""
    return -2 - position


def kept_by(owner: int) -> int | None:
    """The position a kept mark names, else None."""
    return -2 - owner if owner < COMMITTED else None


def _before(other: int, position: int) -> bool:
    """Whether an entry at ``other`` (a position, COMMITTED, or a committed partition's kept mark) comes
    before the record at ``position``: a committed partition's written records come before every record but
    its own partition's."""
    if other >= 0:
        return other < position
    kept = kept_by(other)
    return kept is None or kept >> 32 != position >> 32


def content_keys(digests: list[str]) -> np.ndarray:
    """(n, 2) uint64: the first 128 bits of each sha256 hex digest, the lowest bit set so that no key is 0 (the
    empty slot). Two contents share a key with probability about n^2 / 2^128 (3e-21 at 1e9)."""
    keys = np.frombuffer(b"".join(bytes.fromhex(d[:32]) for d in digests), dtype=">u8").astype(np.uint64)
    keys = keys.reshape(-1, 2)
    keys[:, 1] |= np.uint64(1)
    return keys


class OwnerTable:
    """Content key -> owner plan position in numpy arrays: open addressing with linear probing, a slot holding a
    128-bit key (two uint64, 0 when empty) and an int64 position, 24 bytes; the slots double once more than
    MAX_LOAD of them are used, so a key costs 34-69 bytes. A batch of keys is placed at once."""

    MAX_LOAD = 0.7

    def __init__(self, capacity: int = 1 << 10) -> None:
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.keys = np.zeros((capacity, 2), dtype=np.uint64)
        self.positions = np.full(capacity, NO_OWNER, dtype=np.int64)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def _slots(self, keys: np.ndarray, insert: bool) -> np.ndarray:
        """The slot of each key; a missing key takes the first empty slot of its probe sequence (``insert``) or
        gets -1. Keys that find the same empty slot in a round: the first takes it, the others look again."""
        mask = len(self.keys) - 1
        slots = np.full(len(keys), -1, dtype=np.int64)
        probe = ((keys[:, 1] >> np.uint64(1)) & np.uint64(mask)).astype(np.int64)
        todo = np.arange(len(keys))
        while todo.size:
            at = probe[todo]
            held = self.keys[at]
            match = (held == keys[todo]).all(axis=1)
            empty = ~held.any(axis=1)
            slots[todo[match]] = at[match]
            done = match.copy()
            if insert and empty.any():
                taken, first = np.unique(at[empty], return_index=True)
                winners = todo[empty][first]
                self.keys[taken] = keys[winners]
                slots[winners] = taken
                self.count += len(taken)
                done[np.flatnonzero(empty)[first]] = True
            elif not insert:
                done |= empty
            step = ~match & ~empty
            probe[todo[step]] = (at[step] + 1) & mask
            todo = todo[~done]
        return slots

    def set_min(self, keys: np.ndarray, positions: np.ndarray) -> None:
        """Each key's position becomes the smaller of the held one and the one given."""
        if self.count + len(keys) > self.MAX_LOAD * len(self.keys):
            used = self.keys.any(axis=1)
            old_keys, old_positions = self.keys[used], self.positions[used]
            capacity = len(self.keys)
            while self.count + len(keys) > self.MAX_LOAD * capacity:
                capacity *= 2
            self._allocate(capacity)
            self.positions[self._slots(old_keys, insert=True)] = old_positions
        np.minimum.at(self.positions, self._slots(keys, insert=True), positions)

    def mark_kept(self, keys: np.ndarray, positions: np.ndarray) -> None:
        """Each (present) key becomes kept by the record at its position (:func:`kept_mark`)."""
        self.positions[self._slots(keys, insert=True)] = -2 - positions

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The position held for each key (NO_OWNER where none)."""
        slots = self._slots(keys, insert=False)
        return np.where(slots >= 0, self.positions[np.maximum(slots, 0)], NO_OWNER)


class DedupShard:
    """One actor's slice of the index: content key -> owner position (:class:`OwnerTable`), band key ->
    [(position, frame hashes)]. ``rebuild`` = (config JSON, this actor's number, actor count): when Ray
    restarts the actor, it rebuilds its slice from the committed shards (see the module's docstring)."""

    def __init__(self, distance: int = 0, pending=(), rebuild: tuple[str, int, int] | None = None) -> None:
        self.distance = distance
        self.owner = OwnerTable()
        self.buckets: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        self.pending = set(pending)
        self.near_registered: set[int] = set()
        self.rebuilt = False
        if rebuild is not None and ray.get_runtime_context().was_current_actor_reconstructed:
            cfg_json, actor, actors = rebuild
            self.rebuild_from_commits(PrecomputeConfig.model_validate_json(cfg_json), actor, actors)

    def rebuild_from_commits(self, cfg: PrecomputeConfig, actor: int, actors: int) -> None:
        """Start again from the shards committed so far (this actor's slice, ``actor`` of ``actors``); writers
        no longer wait for earlier partitions."""
        from .writer import read_commits

        f = cfg.filters
        index = DedupIndex([None] * actors, f.near_dedup_distance, f.dedup, f.near_dedup)
        fs = filesystem(cfg.output, cfg.storage)
        for partition, commit in sorted(read_commits(cfg.output, cfg).items()):
            path = join_uri(cfg.output, commit["shard"])
            digests, near = with_retries(f"reading {path}", cfg.storage,
                                         lambda p=path, n=partition: index._committed_of(fs, p, n))
            self.add_committed(*index._split_committed(digests, near)[actor], partition=partition)
        self.pending.clear()
        self.rebuilt = True
        logging.getLogger("lance.precompute").warning(
            "dedup actor %d of %d was restarted and rebuilt from the committed shards", actor, actors)

    def was_rebuilt(self) -> bool:
        return self.rebuilt

    def add_committed(self, digests: list[str], near: list[tuple[int, int, tuple[int, ...]]],
                      partition: int | None = None) -> None:
        """Content hashes of committed shards (of ``partition``: kept by it; else owned outright), and
        (position, band key, frame hashes) of their near hashes."""
        owner = COMMITTED if partition is None else kept_mark(plan_position(partition, ANY_RECORD))
        self.owner.set_min(content_keys(digests), np.full(len(digests), owner, dtype=np.int64))
        for position, key, hashes in near:
            self.buckets.setdefault(key, []).append((position, hashes))

    def _register_exact(self, partition: int, exact: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        keys = content_keys([digest for digest, _ in exact])
        positions = np.array([plan_position(partition, record) for _, record in exact], dtype=np.int64)
        self.owner.set_min(keys, positions)
        return keys, positions

    def _register_near(self, partition: int, near: list[tuple[int, int, tuple[int, ...]]]) -> None:
        if partition not in self.near_registered:
            self.near_registered.add(partition)
            for record, key, hashes in near:
                self.buckets.setdefault(key, []).append((plan_position(partition, record), hashes))

    def register(self, partition: int, exact: list[tuple[str, int]],
                 near: list[tuple[int, int, tuple[int, ...]]]) -> None:
        """The partition's (content hash, record) and (record, band key, frame hashes) routed to this actor;
        a retried read registers again without adding entries twice."""
        self._register_exact(partition, exact)
        self._register_near(partition, near)
        self.pending.discard(partition)

    def unregistered_before(self, partition: int) -> list[int]:
        """Partitions of this run before ``partition`` whose records are not registered here yet."""
        return sorted(p for p in self.pending if p < partition)

    def claim(self, partition: int, exact: list[tuple[str, int]],
              near: list[tuple[int, int, tuple[int, ...]]]) -> tuple[list[int], list[int]]:
        """(records whose content an earlier record owns or another record kept, records with an earlier near
        duplicate). The contents of the others become kept by them; a retried claim gets the same answer. The
        partition's records are registered too (they are already, unless a restart lost them)."""
        self._register_near(partition, near)
        self.pending.discard(partition)
        if not exact:
            exact_dups = []
        else:
            keys, positions = self._register_exact(partition, exact)
            owners = self.owner.get(keys)
            whole = plan_position(partition, ANY_RECORD)
            first: dict[bytes, int] = {}
            for (_, record), key in zip(exact, keys):
                first[key.tobytes()] = min(record, first.get(key.tobytes(), record))
            keep = np.array([owner == position or kept_by(owner) == position
                             or (kept_by(owner) == whole and first[key.tobytes()] == record)
                             for (_, record), key, owner, position in zip(exact, keys, owners, positions)],
                            dtype=bool)
            self.owner.mark_kept(keys[keep], positions[keep])
            exact_dups = sorted({record for (_, record), kept in zip(exact, keep) if not kept})
        near_dups = sorted({record for record, key, hashes in near
                            if self._earlier_near(plan_position(partition, record), key, hashes)})
        return exact_dups, near_dups

    def _earlier_near(self, position: int, key: int, hashes: tuple[int, ...]) -> bool:
        first, distance = hashes[0], self.distance
        for other, other_hashes in self.buckets.get(key, ()):
            if _before(other, position) and (first ^ other_hashes[0]).bit_count() <= distance \
                    and within(hashes, other_hashes, distance):
                return True
        return False

    def stored(self) -> dict:
        """What this actor holds, and the resident memory of its process (the bench)."""
        import os

        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return {"hashes": len(self.owner), "band_entries": sum(len(b) for b in self.buckets.values()),
                "rss_bytes": rss}


DedupActor = ray.remote(num_cpus=0, max_restarts=MAX_RESTARTS, max_task_retries=-1)(DedupShard)


def exact_actor(digest: str, actors: int) -> int:
    """By the digest's leading 32 bits (an actor places its keys by bits 65-127, independent of these)."""
    return int(digest[:8], 16) % actors


def band_actor(key: int, actors: int) -> int:
    """Band keys are not uniform (low bands of similar images agree): mixed by a Fibonacci hash first."""
    return (((key * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 32) % actors


class DedupIndex:
    """The index as read and writer tasks use it: the actors (Ray actor handles, or :class:`DedupShard`
    objects called in place) and the routing of hashes to them. Picklable, so it travels with the tasks."""

    def __init__(self, actors: list, distance: int, exact: bool = True, near: bool = False) -> None:
        self.actors, self.distance, self.exact, self.near = actors, distance, exact, near

    @classmethod
    def start(cls, cfg: PrecomputeConfig, commits: dict[int, dict], todo: list[int]) -> DedupIndex | None:
        """The actors of a run (None when neither exact nor near dedup is on), loaded with what the committed
        shards hold."""
        f = cfg.filters
        if not f.any_dedup:
            return None
        cfg_json = cfg.model_dump_json()
        actors = [DedupActor.remote(f.near_dedup_distance, todo, (cfg_json, k, f.dedup_actors))
                  for k in range(f.dedup_actors)]
        index = cls(actors, f.near_dedup_distance, f.dedup, f.near_dedup)
        index.load_committed(cfg.output, commits, cfg)
        return index

    def rebuilt(self) -> list[int]:
        """The actors that were restarted (and rebuilt from the committed shards) during the run."""
        return [k for k, done in enumerate(self._get([self._call(k, "was_rebuilt") for k in range(len(self.actors))]))
                if done]

    def lost(self) -> list[int]:
        """The actors that are dead for good (their restarts used up)."""
        dead = []
        for k, actor in enumerate(self.actors):
            try:
                ray.get(actor.was_rebuilt.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(k)
        return dead

    # ------------------------------------------------------------------------------------------ calls
    def _call(self, actor: int, method: str, *args):
        target = self.actors[actor]
        if isinstance(target, DedupShard):
            return getattr(target, method)(*args)
        return getattr(target, method).remote(*args)

    def _get(self, results: list) -> list:
        return list(results) if all(isinstance(a, DedupShard) for a in self.actors) else ray.get(results)

    def _split(self, records: dict[int, tuple[str, str]]) -> list[tuple[list, list]]:
        """record -> (content hash, near hash text) into each actor's (exact, near) items."""
        per = [([], []) for _ in self.actors]
        for record, (digest, near_text) in records.items():
            if self.exact and digest:
                per[exact_actor(digest, len(self.actors))][0].append((digest, record))
            hashes = parse_near_hash(near_text) if self.near else ()
            if hashes:
                for key in band_keys(hashes[0], self.distance):
                    per[band_actor(key, len(self.actors))][1].append((record, key, hashes))
        return per

    # ------------------------------------------------------------------------------------------ the run
    def register(self, partition: int, records: dict[int, tuple[str, str]]) -> None:
        """Register a partition's records (record -> (content hash, near hash text)) with every actor (those
        given nothing learn that the partition is registered)."""
        per = self._split(records)
        self._get([self._call(k, "register", partition, *items) for k, items in enumerate(per)])

    def unregistered_before(self, partition: int) -> list[int]:
        waiting = self._get([self._call(k, "unregistered_before", partition) for k in range(len(self.actors))])
        return sorted(set().union(*waiting))

    def wait_for_earlier(self, partition: int, timeout: float) -> None:
        """Until every earlier partition of the run has registered its records with every actor."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while waiting := self.unregistered_before(partition):
            if time.monotonic() > deadline:
                logging.getLogger(__name__).warning(
                    "partition %d: partitions %s did not register their hashes within %.0f s; duplicates shared "
                    "with them keep the copy claimed first, not necessarily the first in plan order",
                    partition, waiting[:5], timeout)
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def claim(self, partition: int, records: dict[int, tuple[str, str]]) -> dict[int, str]:
        """record -> EXACT or NEAR for the records (record -> (content hash, near hash text)) that an earlier
        record duplicates; an exact duplicate is reported as such even when it is also a near one."""
        per = self._split(records)
        asked = [k for k, (exact, near) in enumerate(per) if exact or near]
        answers = self._get([self._call(k, "claim", partition, *per[k]) for k in asked])
        found: dict[int, str] = {}
        for _, near_dups in answers:
            found.update(dict.fromkeys(near_dups, NEAR))
        for exact_dups, _ in answers:
            found.update(dict.fromkeys(exact_dups, EXACT))
        return found

    def add_committed(self, digests: list[str], near: list[tuple[int, str]] = (), partition: int | None = None) -> None:
        """Content hashes that committed shards hold (of ``partition``, see :meth:`DedupShard.add_committed`),
        and (plan position, near hash text) of their records."""
        self._get(self._send_committed(digests, near, partition))

    def _send_committed(self, digests: list[str], near: list[tuple[int, str]], partition: int | None) -> list:
        per = self._split_committed(digests, near)
        return [self._call(k, "add_committed", *items, partition) for k, items in enumerate(per) if any(items)]

    def load_committed(self, output: str, commits: dict[int, dict], cfg: PrecomputeConfig) -> None:
        """The content hashes (written rows) and near hashes (footer) of the committed shards, shard by shard,
        a few batches in flight."""
        fs = filesystem(output, cfg.storage)
        pending: list = []
        for partition in sorted(commits):
            path = join_uri(output, commits[partition]["shard"])
            digests, near = with_retries(f"reading {path}", cfg.storage,
                                         lambda p=path, n=partition: self._committed_of(fs, p, n))
            pending += self._send_committed(digests, near, partition)
            if len(pending) >= IN_FLIGHT * len(self.actors):
                self._get(pending)
                pending = []
        self._get(pending)

    def _committed_of(self, fs, path: str, partition: int) -> tuple[list[str], list[tuple[int, str]]]:
        digests: list[str] = []
        near: list[tuple[int, str]] = []
        with fs.open(path, "rb") as fh:
            shard = pq.ParquetFile(fh)
            if self.exact:
                digests = sorted(set(shard.read(columns=["content_sha256"]).column(0).to_pylist()))
            footer = (shard.metadata.metadata or {}).get(NEAR_FOOTER) if self.near else None
        if footer:
            hashes = json.loads(footer)
            near = [(kept_mark(plan_position(partition, ANY_RECORD)), text) for text in hashes["written"]]
            near += [(plan_position(partition, int(record)), text) for record, text in hashes["dropped"].items()]
        return digests, near

    def _split_committed(self, digests: list[str], near: list[tuple[int, str]]) -> list[tuple[list, list]]:
        per = [([], []) for _ in self.actors]
        for digest in digests:
            per[exact_actor(digest, len(self.actors))][0].append(digest)
        for position, text in near:
            hashes = parse_near_hash(text)
            for key in band_keys(hashes[0], self.distance):
                per[band_actor(key, len(self.actors))][1].append((position, key, hashes))
        return per


# ---------------------------------------------------------------------------------------------- the writer's side
def partition_records(rows: pd.DataFrame) -> dict[int, tuple[str, str]]:
    """record -> (content hash, near hash text) of the first row of each record in ``rows``."""
    first = rows.drop_duplicates("record_index")
    near = first["near_hash"] if "near_hash" in first else [""] * len(first)
    return {int(r): (d, n or "") for r, d, n in zip(first["record_index"], first["content_sha256"], near)}


def claim_partition(index: DedupIndex | None, partition: int, ok: pd.DataFrame,
                    cfg: PrecomputeConfig) -> dict[int, str]:
    """record -> EXACT / NEAR for the records of ``ok`` (rows passing every other stage) that are
    duplicates; waits for the earlier partitions of the run to register first."""
    if index is None or not len(ok):
        return {}
    index.wait_for_earlier(partition, cfg.filters.dedup_wait_seconds)
    return index.claim(partition, partition_records(ok))


def near_footer(rows: pd.DataFrame, written: set[int]) -> dict[bytes, bytes]:
    """The shard footer entry holding the near hashes of every record of the partition that registered one:
    those written, and by record number those that were not."""
    hashes = {r: n for r, (_, n) in partition_records(rows[rows["near_hash"] != ""]).items()} \
        if "near_hash" in rows else {}
    return {NEAR_FOOTER: json.dumps({
        "written": [n for r, n in sorted(hashes.items()) if r in written],
        "dropped": {str(r): n for r, n in sorted(hashes.items()) if r not in written}}).encode()}
