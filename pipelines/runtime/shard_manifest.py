"""The read side of a latent shard root's manifest (written by pipelines/data/manifest.py): what training
and any other reader need, without the precompute's dependencies.

``manifest.json`` (schema ``lance-latent-shards/3``) names its segment files (``manifest/seg-*.parquet``), each
a table of shard entries (partition, shard, rows, bytes, sha256, inputs, task_rows, classes); schema /2 wrote
the same segments without the two counts, /1 lists the entries in ``manifest.json`` itself.

``task_rows`` counts a shard's rows per task, ``classes`` per resolution class
(``task|TxHxW|is_video`` of the target latent, ``task||0`` without one): what training's data plan needs to
apply ``data.resolution`` without reading rows. A shard's rows fall into a few classes (the precompute buckets
its targets), so the counts stay small.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import StorageConfig, filesystem, join_uri, open_input, with_retries

MANIFEST_FILE = "manifest.json"
MANIFEST_FOLDER = "manifest"
SCHEMA = "lance-latent-shards/3"
COUNTS = ("task_rows", "classes")
"""Entry fields that count a shard's rows (absent from entries written before they were recorded)."""
ENTRY_SCHEMA = pa.schema([("partition", pa.int64()), ("shard", pa.string()), ("rows", pa.int64()),
                          ("bytes", pa.int64()), ("sha256", pa.string()), ("inputs", pa.int64()),
                          *((name, pa.map_(pa.string(), pa.int64())) for name in COUNTS)])
CLASS_COLUMNS = ("task", "target_vae_shape", "target_fps")
"""The shard columns a row's resolution class is made of."""


def target_is_video(shape, fps) -> bool:
    """Whether a target latent of ``shape`` (frames first) at ``fps`` is a video."""
    return int(shape[0]) > 1 or (fps is not None and fps > 0)


def resolution_class(task: str, shape, fps) -> str:
    """``task|TxHxW|is_video`` of a row's target latent; ``task||0`` for a row without one."""
    if shape is None:
        return f"{task}||0"
    frames, height, width = (int(x) for x in shape[:3])
    return f"{task}|{frames}x{height}x{width}|{int(target_is_video(shape, fps))}"


def parse_class(key: str) -> tuple[str, tuple[int, int, int] | None, bool]:
    """(task, target shape or None, is_video) of a :func:`resolution_class` key."""
    task, dims, video = key.rsplit("|", 2)
    shape = tuple(int(x) for x in dims.split("x")) if dims else None
    return task, shape, video == "1"


def class_counts(rows: Iterable[tuple[str, object, object]]) -> Counter:
    """Resolution class -> rows, of (task, target shape, target fps) triples."""
    return Counter(resolution_class(task, shape, fps) for task, shape, fps in rows)


def shard_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """The count fields of a shard's manifest entry (``task_rows``, ``classes``) from its table; a column no
    row fills (not written) reads as None."""
    columns = [table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
               for name in CLASS_COLUMNS]
    classes = class_counts(zip(*columns))
    return {"task_rows": dict(Counter(table.column("task").to_pylist())), "classes": dict(classes)}


def _segment_entries(path: str, storage: StorageConfig, batch_rows: int) -> Iterator[dict]:
    """A segment's entries, ``batch_rows`` at a time; the count maps as dicts, left out where the entry has
    none."""
    def read() -> pa.Table:
        with open_input(path, storage) as fh:
            return pq.read_table(fh)

    for batch in with_retries(f"reading {path}", storage, read).to_batches(max_chunksize=batch_rows):
        for entry in batch.to_pylist():
            for name in COUNTS:
                if name in entry:
                    counts = entry.pop(name)
                    if counts is not None:
                        entry[name] = dict(counts)
            yield entry


def iter_entries(root: str, index: dict, storage: StorageConfig, batch_rows: int = 8192) -> Iterator[dict]:
    """The shard entries of the manifest whose ``manifest.json`` is ``index``, segment by segment (not in
    partition order), without holding them all: listed in the index itself (schema /1) or read from its
    segments (/2, /3). ValueError (at once) for an index that holds neither."""
    if "shards" not in index and "segments" not in index:
        raise ValueError(f"{join_uri(root, MANIFEST_FILE)} lists no shards (schema {index.get('schema')!r})")
    if "shards" in index:
        return iter(list(index["shards"]))
    return (entry for segment in index["segments"]
            for entry in _segment_entries(join_uri(root, segment["file"]), storage, batch_rows))


def manifest_entries(root: str, index: dict, storage: StorageConfig) -> list[dict]:
    """The shard entries of the manifest whose ``manifest.json`` is ``index``, in partition order (see
    :func:`iter_entries`)."""
    return sorted(iter_entries(root, index, storage), key=lambda entry: entry["partition"])


def read_manifest(root: str, storage: StorageConfig | None = None) -> tuple[dict, list[dict]]:
    """(``manifest.json``, its shard entries in partition order) of a latent shard root."""
    storage = storage or StorageConfig()
    path = join_uri(root, MANIFEST_FILE)
    fs = filesystem(root, storage)
    index = json.loads(with_retries(f"reading {path}", storage, lambda: fs.cat_file(path)))
    return index, manifest_entries(root, index, storage)
