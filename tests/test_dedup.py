"""The duplicate index without Ray (its actors called in place): the perceptual hash on variants of real media,
the band lookup (every pair within the distance found, none beyond it), plan order across partitions, the
frames of a video, committed shards, and the same answers however many actors hold the index."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest

from pipelines.data.config import PrecomputeConfig
from pipelines.data.dedup import COMMITTED, EXACT, NEAR, DedupIndex, DedupShard, plan_position
from pipelines.data.filters import band_keys, format_near_hash, hamming, parse_near_hash
from pipelines.data.records import process_record
from tests.near_media import KEPT, image_variants
from tests.near_media import NEAR as NEAR_OF

TINY = {"buckets": {"image_area": 64 * 64, "video_area": 64 * 96, "vit_area": 56 * 56},
        "video": {"max_seconds": 1.0}, "filters": {"near_dedup": True}}
DISTANCE = PrecomputeConfig(**TINY).filters.near_dedup_distance


def _index(actors: int, distance: int = DISTANCE, pending=()) -> DedupIndex:
    return DedupIndex([DedupShard(distance, pending) for _ in range(actors)], distance, exact=True, near=True)


def _hashes(data: bytes, name: str, task: str = "t2i") -> tuple[int, ...]:
    record = {"source_uri": name, "task": task, "caption": "a test picture", "target_bytes": data,
              "target_name": name}
    rows = process_record(record, 0, 0, PrecomputeConfig(**TINY))
    assert rows and all(r["status"] == "ok" for r in rows), rows[0].get("error")
    assert len({r["near_hash"] for r in rows}) == 1, "every clip of a record carries the record's hash"
    return parse_near_hash(rows[0]["near_hash"])


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    assert len(a) == len(b)
    return max(hamming(x, y) for x, y in zip(a, b))


def test_perceptual_hash_finds_reencodes_resizes_and_watermarks_of_real_images(shared_dir):
    variants = image_variants(shared_dir / "media")
    hashes = {name: _hashes(data, f"{name}.img") for name, data in variants.items()}
    assert all(len(h) == 1 for h in hashes.values())
    for variant, original in NEAR_OF.items():
        assert _distance(hashes[variant], hashes[original]) <= DISTANCE, variant
    for i, a in enumerate(KEPT):
        for b in KEPT[i + 1:]:
            assert _distance(hashes[a], hashes[b]) > 2 * DISTANCE, (a, b)


def _reencoded(data: bytes, crf: int) -> bytes:
    import av

    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(out, mode="w", format="mp4") as target:
        video = source.streams.video[0]
        stream = target.add_stream("libx264", rate=round(float(video.average_rate)))
        stream.width, stream.height, stream.pix_fmt = video.width // 2 * 2, video.height // 2 * 2, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in source.decode(video):
            for packet in stream.encode(frame.reformat(width=stream.width, height=stream.height, format="yuv420p")):
                target.mux(packet)
        for packet in stream.encode():
            target.mux(packet)
    return out.getvalue()


def test_a_video_is_hashed_on_three_frames_and_a_reencode_matches_them(shared_dir):
    clip_a = (shared_dir / "media" / "clip_a.mp4").read_bytes()
    clip_b = (shared_dir / "media" / "clip_b.mp4").read_bytes()
    a, b = _hashes(clip_a, "a.mp4", "t2v"), _hashes(clip_b, "b.mp4", "t2v")
    again = _hashes(_reencoded(clip_a, 40), "a-crf40.mp4", "t2v")
    assert len(a) == len(b) == len(again) == 3
    assert _distance(a, again) <= DISTANCE
    assert _distance(a, b) > DISTANCE
    index = _index(2)
    index.register(0, {0: ("", format_near_hash(list(a))), 1: ("", format_near_hash(list(b)))})
    index.register(1, {0: ("", format_near_hash(list(again)))})
    assert index.claim(0, {1: ("", format_near_hash(list(b)))}) == {}
    assert index.claim(1, {0: ("", format_near_hash(list(again)))}) == {0: NEAR}
    # a clip whose first frame matches but whose later frames do not is not a near duplicate
    mixed = format_near_hash([a[0], b[1], b[2]])
    assert index.claim(2, {0: ("", mixed)}) == {}


def _flipped(value: int, bits: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), bits):
        value ^= 1 << bit
    return value


@pytest.mark.parametrize("distance", [0, 3, 6, 10])
def test_bands_find_every_pair_within_the_distance_and_none_beyond(distance):
    rng = random.Random(distance)
    for actors in (1, 3):
        index = _index(actors, distance)
        base = [rng.getrandbits(64) for _ in range(40)]
        index.register(0, {r: ("", format_near_hash([h])) for r, h in enumerate(base)})
        for trial in range(200):
            record = trial % len(base)
            bits = rng.randint(0, min(64, 2 * distance + 2))
            probe = _flipped(base[record], bits, rng)
            if bits <= distance:  # pigeonhole: distance + 1 bands, at most `bits` of them touched
                assert set(band_keys(probe, distance)) & set(band_keys(base[record], distance))
            near = any(hamming(probe, h) <= distance for h in base)
            found = index.claim(1, {trial: ("", format_near_hash([probe]))})
            assert found == ({trial: NEAR} if near else {}), (bits, distance, actors)
            if bits <= distance:
                assert near


def test_the_first_in_plan_order_is_kept_whatever_order_partitions_claim_in():
    """Partitions register and claim out of order; near hashes from a committed shard: a written record owns its
    neighbourhood outright, one the shard did not write keeps its own plan position."""
    h = {name: random.Random(name).getrandbits(64) for name in ("x", "y", "old", "dropped", "z")}
    near_of = {name: format_near_hash([value ^ 0b101]) for name, value in h.items()}  # 2 bits away
    answers = []
    for actors in (1, 2, 4):
        index = _index(actors, pending=[3, 4, 5])
        index.add_committed([], [(COMMITTED, format_near_hash([h["old"]])),
                                 (plan_position(6, 0), format_near_hash([h["dropped"]]))])
        index.register(5, {0: ("", near_of["x"]), 1: ("", near_of["y"]), 2: ("", near_of["dropped"])})
        assert index.unregistered_before(5) == [3, 4]
        index.register(4, {2: ("", format_near_hash([h["y"]])), 0: ("", near_of["old"])})
        index.register(3, {7: ("", format_near_hash([h["x"]])), 8: ("", format_near_hash([h["z"]]))})
        assert index.unregistered_before(5) == []
        answers.append([
            index.claim(5, {0: ("", near_of["x"]), 1: ("", near_of["y"]), 2: ("", near_of["dropped"])}),
            index.claim(4, {2: ("", format_near_hash([h["y"]])), 0: ("", near_of["old"])}),
            index.claim(3, {7: ("", format_near_hash([h["x"]])), 8: ("", format_near_hash([h["z"]]))}),
        ])
    assert answers[0] == [{0: NEAR, 1: NEAR}, {0: NEAR}, {}]  # "dropped" (6#0) comes after 5#2: 5#2 is kept
    assert answers[1] == answers[0] and answers[2] == answers[0]


def test_an_exact_duplicate_is_counted_once_as_exact():
    index = _index(2)
    digest = "ab" * 32
    text = format_near_hash([12345])
    index.register(0, {0: (digest, text), 1: (digest, text), 2: ("cd" * 32, text)})
    assert index.claim(0, {0: (digest, text), 1: (digest, text), 2: ("cd" * 32, text)}) == {1: EXACT, 2: NEAR}


def test_owner_table_keeps_the_smallest_position_of_each_key_through_growth():
    from pipelines.data.dedup import NO_OWNER, OwnerTable, content_keys

    rng = random.Random(0)
    digests = [f"{rng.getrandbits(256):064x}" for _ in range(3000)]
    table, expected = OwnerTable(capacity=16), {}
    for _ in range(60):
        batch = [rng.choice(digests) for _ in range(rng.randint(0, 200))]  # repeats inside a batch too
        positions = [rng.randrange(10**12) for _ in batch]
        table.set_min(content_keys(batch), np.array(positions, dtype=np.int64))
        for digest, position in zip(batch, positions):
            expected[digest] = min(expected.get(digest, NO_OWNER), position)
    assert len(table) == len(expected) and len(table.keys) >= len(expected) / OwnerTable.MAX_LOAD
    probe = digests[:500] + [f"{rng.getrandbits(256):064x}" for _ in range(50)]
    assert table.get(content_keys(probe)).tolist() == [expected.get(d, NO_OWNER) for d in probe]
