"""Memory and claim rate of the precompute's duplicate index (pipelines/data/dedup.py) over K = 1, 2, 4 actors.

    python bench/dedup.py [--quick] [--hashes N] [--out FILE]

Exact index: N random sha256 content hashes (1 % of records repeat an earlier one) registered in partitions
of 1,024 records, then the first 100,000 (quick: 50,000 hashes, 5,000 claimed, K = 1 and 2) claimed again by CLAIMERS Ray tasks at once in
partitions of 64 records (the default ``partition_size``), as the writer tasks of a run claim. Near index
(``filters.near_dedup_distance`` 6):
N / 4 random 64-bit perceptual hashes (a quarter of them a few bits from an earlier one), each stored once
per band (7 bands), registered and a quarter as many claimed the same way. A claim's cost grows with the
index: the records sharing a band value are compared one by one.

Per K: the hashes (band entries) each actor holds and the growth of its resident set while they were
registered, so bytes per stored item per actor (the exact index: numpy open-addressing tables; the near
index: Python lists of entries); claims/s (records claimed per wall second) and its ratio to K = 1 in the
same run. Then a line fitted through (items held, growth) of every actor separates the bytes per item from a
fixed amount per actor, and gives the memory per actor at 10^8 and 10^9 records and the actors a run needs
at 8 GB each. Actors are real Ray actors with 0 CPUs, as in a run; the host may be shared, so the claim
rates are noisy and the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from bench.common import load_average, print_table, write_json  # noqa: E402
from pipelines.data.dedup import DedupActor, DedupIndex  # noqa: E402
from pipelines.data.filters import format_near_hash  # noqa: E402

ACTORS = (1, 2, 4)
DISTANCE = 6
REGISTER_BATCH = 1024
CLAIM_BATCH = 64
CLAIMERS = 4
ACTOR_MEMORY_GB = 8
GROWTH_HEADROOM = 1.5
"""Peak over steady memory while the exact table doubles (its old and new slots are held at once)."""
SCALES = (10**8, 10**9)


def exact_records(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    digests: list[str] = []
    for k in range(count):
        if digests and rng.random() < 0.01:
            digests.append(rng.choice(digests))
        else:
            digests.append(hashlib.sha256(f"{seed}-{k}".encode()).hexdigest())
    return [(d, "") for d in digests]


def near_records(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    values: list[int] = []
    for _ in range(count):
        if values and rng.random() < 0.25:
            value = rng.choice(values)
            for bit in rng.sample(range(64), rng.randint(0, 2 * DISTANCE)):
                value ^= 1 << bit
        else:
            value = rng.getrandbits(64)
        values.append(value)
    return [("", format_near_hash([v])) for v in values]


def partitions(records: list[tuple[str, str]], size: int) -> list[tuple[int, dict[int, tuple[str, str]]]]:
    return [(p, {r: records[p * size + r] for r in range(min(size, len(records) - p * size))})
            for p in range(math.ceil(len(records) / size))]


@ray.remote(num_cpus=0)
def claim_all(index: DedupIndex, batches: list[tuple[int, dict]]) -> int:
    dropped = 0
    for partition, records in batches:
        dropped += len(index.claim(partition, records))
    return dropped


def measure(kind: str, records: list[tuple[str, str]], actors: int, claim_count: int) -> dict:
    exact = kind == "exact"
    handles = [DedupActor.remote(DISTANCE) for _ in range(actors)]
    index = DedupIndex(handles, DISTANCE, exact=exact, near=not exact)
    before = ray.get([a.stored.remote() for a in handles])
    started = time.perf_counter()
    refs = []
    for partition, batch in partitions(records, REGISTER_BATCH):
        per = index._split(batch)
        refs += [index._call(k, "register", partition, *items) for k, items in enumerate(per)]
    ray.get(refs)
    register_s = time.perf_counter() - started
    after = ray.get([a.stored.remote() for a in handles])
    key = "hashes" if exact else "band_entries"
    stored = [a[key] for a in after]
    grown = [a["rss_bytes"] - b["rss_bytes"] for a, b in zip(after, before)]
    # claim as a run's writers do: 64-record partitions numbered after the registered ones, several at once
    claimed = records[:claim_count]
    claims = [(p + len(records), batch) for p, batch in partitions(claimed, CLAIM_BATCH)]
    started = time.perf_counter()
    dropped = sum(ray.get([claim_all.remote(index, claims[w::CLAIMERS]) for w in range(CLAIMERS)]))
    claim_s = time.perf_counter() - started
    for handle in handles:
        ray.kill(handle)
    return {
        "index": kind, "actors": actors, "records": len(records), "stored_per_actor": max(stored),
        "stored_total": sum(stored), "rss_growth_per_actor_mb": max(grown) / 2**20,
        "bytes_per_item": sum(grown) / max(sum(stored), 1), "bytes_per_record": sum(grown) / len(records),
        "register_per_s": len(records) / register_s, "claimed": len(claimed),
        "claims_per_s": len(claimed) / claim_s, "duplicates_found": dropped,
        "actor_stored": stored, "actor_rss_growth": grown,
    }


def fit(rows: list[dict], kind: str) -> tuple[float, float, float]:
    """(bytes per stored item, fixed bytes per actor, items per record): a least-squares line through the
    (items held, resident growth) of every actor of every K, which separates what each item costs from what an
    actor holds whatever its share (message buffers, allocator arenas)."""
    kind_rows = [r for r in rows if r["index"] == kind]
    stored = np.array([s for r in kind_rows for s in r["actor_stored"]], dtype=np.float64)
    grown = np.array([g for r in kind_rows for g in r["actor_rss_growth"]], dtype=np.float64)
    per_item, fixed = np.polyfit(stored, grown, 1)
    return float(per_item), float(fixed), kind_rows[0]["stored_total"] / kind_rows[0]["records"]


def extrapolate(rows: list[dict]) -> list[dict]:
    """Memory per actor at 10^8 / 10^9 records from the fitted bytes per item, and the actors a run needs at
    ACTOR_MEMORY_GB each with GROWTH_HEADROOM for the table doubling (old and new slots held at once)."""
    out = []
    for kind in ("exact", "near"):
        per_item, fixed, items = fit(rows, kind)
        for scale in SCALES:
            total = per_item * items * scale
            out.append({"index": kind, "records": scale, "bytes_per_item": per_item, "items_per_record": items,
                        "bytes_per_record": per_item * items, "fixed_mb_per_actor": fixed / 2**20,
                        "total_gb": total / 1e9, **{f"gb_per_actor_k{k}": total / k / 1e9 for k in ACTORS},
                        "actors_at_8gb": math.ceil(total * GROWTH_HEADROOM / (ACTOR_MEMORY_GB * 1e9 - fixed))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50,000 hashes, 1 and 2 actors: seconds")
    parser.add_argument("--hashes", type=int, default=None, help="content hashes registered (default 2,000,000)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/dedup.json)")
    args = parser.parse_args()
    count = args.hashes or (50_000 if args.quick else 2_000_000)
    claim_count = 5_000 if args.quick else 100_000
    actor_counts = ACTORS[:2] if args.quick else ACTORS
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    exact, near = exact_records(count, 0), near_records(count // 4, 1)
    rows = []
    for kind, records in (("exact", exact), ("near", near)):
        for actors in actor_counts:
            claimed = claim_count if kind == "exact" else claim_count // 4
            rows.append(measure(kind, records, actors, min(len(records), claimed)))
        base = next(r for r in rows if r["index"] == kind and r["actors"] == 1)
        for row in rows:
            if row["index"] == kind:
                row["claims_ratio"] = row["claims_per_s"] / base["claims_per_s"]
                row["memory_per_actor_ratio"] = row["rss_growth_per_actor_mb"] / base["rss_growth_per_actor_mb"]
    ray.shutdown()
    print(f"duplicate index over K actors ({count:,} content hashes, {count // 4:,} near hashes at distance "
          f"{DISTANCE}: {DISTANCE + 1} band entries each; claims by {CLAIMERS} tasks in {CLAIM_BATCH}-record "
          "partitions)")
    print_table(rows, [("index", "index", "s"), ("actors", "K", "d"), ("stored_per_actor", "stored/actor", ",d"),
                       ("rss_growth_per_actor_mb", "MB/actor", ".1f"), ("memory_per_actor_ratio", "mem x", ".2f"),
                       ("bytes_per_item", "B/item", ".0f"), ("bytes_per_record", "B/record", ".0f"),
                       ("register_per_s", "register/s", ",.0f"), ("claims_per_s", "claims/s", ",.0f"),
                       ("claims_ratio", "claims x", ".2f")])
    scale = extrapolate(rows)
    print(f"\nextrapolated from the bytes per item fitted over every actor; actors needed at {ACTOR_MEMORY_GB} GB "
          f"each, with x{GROWTH_HEADROOM} headroom for a table doubling")
    print_table(scale, [("index", "index", "s"), ("records", "records", ".0e"), ("bytes_per_item", "B/item", ".0f"),
                        ("bytes_per_record", "B/record", ".0f"), ("fixed_mb_per_actor", "fixed MB/actor", ".0f"),
                        ("total_gb", "total GB", ",.1f"), *[(f"gb_per_actor_k{k}", f"GB/actor K={k}", ",.1f")
                                                           for k in ACTORS],
                        ("actors_at_8gb", f"actors at {ACTOR_MEMORY_GB} GB", "d")])
    write_json("dedup", {"quick": args.quick, "hashes": count, "distance": DISTANCE, "claimers": CLAIMERS,
                         "claim_batch": CLAIM_BATCH, "load_average": load_average(), "rows": rows,
                         "extrapolation": scale}, args.out)


if __name__ == "__main__":
    main()
