"""The read side of a latent shard root's manifest (written by pipelines/data/manifest.py): what training
and any other reader need, without the precompute's dependencies.

``manifest.json`` (schema ``lance-latent-shards/2``) names its segment files (``manifest/seg-*.parquet``), each
a table of shard entries (partition, shard, rows, bytes, sha256, inputs); schema /1 lists the entries in
``manifest.json`` itself.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import StorageConfig, filesystem, join_uri, open_input, with_retries

MANIFEST_FILE = "manifest.json"
MANIFEST_FOLDER = "manifest"
SCHEMA = "lance-latent-shards/2"
ENTRY_SCHEMA = pa.schema([("partition", pa.int64()), ("shard", pa.string()), ("rows", pa.int64()),
                          ("bytes", pa.int64()), ("sha256", pa.string()), ("inputs", pa.int64())])


def _segment_entries(path: str, storage: StorageConfig) -> list[dict]:
    def read() -> pa.Table:
        with open_input(path, storage) as fh:
            return pq.read_table(fh)

    return with_retries(f"reading {path}", storage, read).to_pylist()


def manifest_entries(root: str, index: dict, storage: StorageConfig) -> list[dict]:
    """The shard entries of the manifest whose ``manifest.json`` is ``index``, in partition order: listed in
    the index itself (schema /1) or read from its segments (/2). ValueError for an index that holds neither."""
    if "shards" not in index and "segments" not in index:
        raise ValueError(f"{join_uri(root, MANIFEST_FILE)} lists no shards (schema {index.get('schema')!r})")
    entries = list(index["shards"]) if "shards" in index else [
        entry for segment in index["segments"]
        for entry in _segment_entries(join_uri(root, segment["file"]), storage)]
    return sorted(entries, key=lambda entry: entry["partition"])


def read_manifest(root: str, storage: StorageConfig | None = None) -> tuple[dict, list[dict]]:
    """(``manifest.json``, its shard entries in partition order) of a latent shard root."""
    storage = storage or StorageConfig()
    path = join_uri(root, MANIFEST_FILE)
    fs = filesystem(root, storage)
    index = json.loads(with_retries(f"reading {path}", storage, lambda: fs.cat_file(path)))
    return index, manifest_entries(root, index, storage)
