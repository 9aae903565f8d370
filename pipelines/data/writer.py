"""Output root: ``shards/part-NNNNN.parquet``, ``quarantine/part-NNNNN.parquet`` and
``filtered/part-NNNNN.parquet`` (the records dropped, each with its reason and media: report.py),
``_commits/part-NNNNN.json``, ``plan.json`` + ``plan/inputs.parquet`` (pipelines/data/plan.py),
``manifest.json`` + ``manifest/seg-*.parquet`` (pipelines/data/manifest.py), ``stats.json``.

A partition commits in this order: quarantine and filtered lists, shard (written under a temporary name,
then moved into place), then its commit record. The commit record is the truth: a rerun skips partitions
that have a readable one and redoes the others (a damaged record counts as none), overwriting any
half-written files of theirs, so no sample is written twice. JSON files (commit records, plan, manifest, stats) are written
whole: under a temporary name and renamed on a local disk, with one PUT on an object store (atomic there).
A partition whose rows reach the writer in several blocks (a long video's clips) is kept in
``_pieces/part-NNNNN/`` until its last block arrives, then written and committed as above and its pieces
removed. Temporary files and pieces of an attempt that died (``.tmp-*``, ``_pieces/``) are removed when the
next run starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lance_core.shards import STORAGE_DTYPES, parquet_options, shard_table
from pipelines.runtime.shard_manifest import shard_counts
from pipelines.runtime.storage import filesystem, join_uri, with_retries

from .config import PrecomputeConfig
from .dedup import claim_partition, near_footer
from .media import SLOTS
from .report import DROPPED_FOLDERS, dropped_table

COMMITS = "_commits"
PIECES = "_pieces"
TMP_PREFIX = ".tmp-"
COMMIT_FIELDS = ("partition", "shard", "rows", "bytes", "sha256", "inputs", "inputs_written", "filtered",
                 "quarantined", "filtered_inputs", "quarantined_inputs")
OUTPUT_FOLDERS = ("", "shards", *DROPPED_FOLDERS, COMMITS, "plan", "manifest")


class DamagedFileError(ValueError):
    """A file of the output folder cannot be parsed; the message names it."""


def part_name(partition: int) -> str:
    return f"part-{partition:05d}"


def _number(value) -> float | None:
    """A float column value, None where it was not computed (NaN)."""
    return None if value is None or value != value else float(value)


def _stored(row: dict, name: str, shape_name: str, dtype: str):
    """An encoder stage's stored bytes -> the tensor in its shape (None where the stage left none)."""
    data = row.get(name)
    if data is None or not len(data):
        return None
    return np.frombuffer(data, dtype=dtype).reshape([int(s) for s in row[shape_name]])


def _info(ok: pd.DataFrame, name: str) -> dict | None:
    """An encoder stage's description (the same on every row), for the shard's metadata."""
    values = [v for v in ok[name] if v] if name in ok else []
    return json.loads(values[0]) if values else None


def _shard_table(ok: pd.DataFrame, cfg: PrecomputeConfig) -> pa.Table:
    dtype = STORAGE_DTYPES[cfg.latent_dtype]
    rows = []
    for row in ok.to_dict("records"):
        out = {
            "sample_id": row["sample_id"], "source_uri": row["source_uri"], "content_sha256": row["content_sha256"],
            "task": row["task"], "caption": row["caption"], "system": row["system"] or None,
            "question": row["question"] or None, "answer": row["answer"] or None, "clip_index": row["clip_index"],
            "clip_score": _number(row.get("clip_score")),
            "clip_embedding": np.frombuffer(row["clip_embedding"], dtype=np.float32)
            if row.get("clip_embedding") else None,
            "scores": json.dumps({name: None if _number(row.get(name)) is None else round(float(row[name]), 5)
                                  for name in ("motion", "text_area")}),
        }
        for slot in SLOTS:
            vae = _stored(row, f"{slot}_vae", f"{slot}_vae_shape", dtype)
            vit = _stored(row, f"{slot}_vit", f"{slot}_vit_feat_shape", dtype)
            has = vae is not None
            out.update({
                f"{slot}_vae": vae,
                f"{slot}_vae_std": _stored(row, f"{slot}_vae_std", f"{slot}_vae_shape", dtype) if has
                else None,
                f"{slot}_vit": vit,
                f"{slot}_vit_grid": list(row[f"{slot}_vit_grid"]) if vit is not None else None,
                f"{slot}_width": row[f"{slot}_width"] if has else None,
                f"{slot}_height": row[f"{slot}_height"] if has else None,
                f"{slot}_frames": row[f"{slot}_frames"] if has else None,
                f"{slot}_fps": row[f"{slot}_fps"] if has else None,
            })
        rows.append(out)
    return shard_table(rows, cfg.latent_dtype, latents=_info(ok, "vae_info"), vit=_info(ok, "vit_info"))


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def put_whole(fs, final: str, data: bytes) -> None:
    """Write ``data`` to ``final`` so that readers see the old file or the new one, never a part of it:
    a temporary name in the same folder, then a rename on a local disk; one PUT on an object store."""
    if not _is_local(fs):
        fs.pipe_file(final, data)
        return
    suffix = final.rsplit(".", 1)[-1] if "." in final.rsplit("/", 1)[-1] else "part"
    tmp = final.rsplit("/", 1)[0] + f"/{TMP_PREFIX}{uuid.uuid4().hex}.{suffix}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, final)
    except BaseException:
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise


def _write_parquet(fs, table: pa.Table, final: str) -> int:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", **parquet_options(table.schema))
    data = buffer.getvalue()
    put_whole(fs, final, data)
    return len(data)


def remove_temporary_files(output: str, cfg: PrecomputeConfig) -> list[str]:
    """Remove what attempts which died left in the output folders: ``.tmp-*`` files and the pieces of
    partitions they did not commit (``_pieces/``); return their paths."""
    fs = filesystem(output, cfg.storage)
    removed = []
    pieces = join_uri(output, PIECES)
    if with_retries(f"reading {output}", cfg.storage, lambda: fs.exists(pieces)):
        removed += with_retries(f"listing {pieces}", cfg.storage, lambda: fs.find(pieces))
        with_retries(f"writing {output}", cfg.storage, lambda: fs.rm(pieces, recursive=True))
    for sub in OUTPUT_FOLDERS:
        folder = join_uri(output, sub)
        if not with_retries(f"reading {output}", cfg.storage, lambda folder=folder: fs.exists(folder)):
            continue
        names = with_retries(f"listing {folder}", cfg.storage,
                             lambda folder=folder: fs.ls(folder, detail=False))
        for path in names:
            if path.rstrip("/").rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                with_retries(f"writing {output}", cfg.storage, lambda path=path: fs.rm_file(path))
                removed.append(path)
    return removed


def write_blocks(block: pd.DataFrame, cfg_json: str, output: str, dedup_index=None) -> pd.DataFrame:
    """The writer stage: for each partition in the block, its commit record when the block holds all of the
    partition's rows (``partition_rows`` of them), else the rows written as a piece (see
    :func:`write_piece`). One output row per partition: ``commit`` or ``piece`` (JSON) set."""
    cfg = PrecomputeConfig.model_validate_json(cfg_json)
    out = []
    for partition, rows in block.groupby("partition", sort=True):
        total = int(rows["partition_rows"].max())
        if total == len(rows):
            out.append({"partition": int(partition), "piece": "",
                        "commit": json.dumps(write_partition(rows, cfg, output, dedup_index))})
        else:
            out.append({"partition": int(partition), "commit": "",
                        "piece": json.dumps(write_piece(rows, cfg, output, int(partition), total))})
    return pd.DataFrame(out, columns=["partition", "commit", "piece"])


def _piece_folder(output: str, partition: int) -> str:
    return join_uri(output, PIECES, part_name(partition))


def write_piece(rows: pd.DataFrame, cfg: PrecomputeConfig, output: str, partition: int, total: int) -> dict:
    """Rows of a partition that reached the writer in several blocks (a long video's clips), kept as an Arrow
    IPC file under ``_pieces/part-N/`` until the last one arrives. The name comes from the rows' numbers, so
    a retried writer overwrites its own piece instead of adding one."""
    from .records import frame_to_arrow

    seqs = [int(x) for x in rows["row_seq"]]
    path = join_uri(_piece_folder(output, partition), f"rows-{min(seqs):07d}-{max(seqs):07d}-{len(seqs)}.arrow")
    sink = pa.BufferOutputStream()
    table = frame_to_arrow(rows)
    with pa.ipc.new_file(sink, table.schema) as ipc:
        ipc.write_table(table)
    fs = filesystem(output, cfg.storage)
    if _is_local(fs):
        fs.makedirs(_piece_folder(output, partition), exist_ok=True)
    with_retries(f"writing {output}", cfg.storage, lambda: put_whole(fs, path, sink.getvalue().to_pybytes()))
    return {"path": path, "rows": len(seqs), "total": total if total > 0 else -1}


def assemble_partition(cfg_json: str, output: str, partition: int, paths: list[str], dedup_index=None) -> str:
    """The pieces of a partition (every row, checked by number) written as its shard and committed; the
    pieces are then removed. Returns the commit record as JSON."""
    cfg = PrecomputeConfig.model_validate_json(cfg_json)
    fs = filesystem(output, cfg.storage)
    frames = []
    for path in paths:
        data = with_retries(f"reading {path}", cfg.storage, lambda path=path: fs.cat_file(path))
        frames.append(pa.ipc.open_file(pa.py_buffer(data)).read_all().to_pandas())
    rows = pd.concat(frames, ignore_index=True)
    total = int(rows["partition_rows"].max())
    if sorted(int(x) for x in rows["row_seq"]) != list(range(total)):
        raise RuntimeError(f"partition {partition}: its pieces hold rows {len(rows)} of {total} (or some twice)")
    record = write_partition(rows, cfg, output, dedup_index)
    folder = _piece_folder(output, partition)
    with_retries(f"writing {output}", cfg.storage, lambda: fs.rm(folder, recursive=True))
    return json.dumps(record)


def write_partition(group: pd.DataFrame, cfg: PrecomputeConfig, output: str, dedup_index=None) -> dict:
    """Write one partition (all its rows) and return its commit record."""
    fs = filesystem(output, cfg.storage)
    partitions = group["partition"].unique()
    if len(partitions) != 1:
        raise RuntimeError(f"rows of partitions {sorted(partitions)} were given to one partition's writer")
    partition = int(partitions[0])
    name = part_name(partition)
    group = group.sort_values(["record_index", "clip_index"], kind="stable")
    # A record that failed while it was read or decoded (a video whose later clips are corrupt) is
    # quarantined whole, its clips decoded before the failure with it.
    broken = group[(group["status"] == "quarantined") & group["stage"].isin(("read", "decode"))]
    ok = group[(group["status"] == "ok") & ~group["record_index"].isin(set(broken["record_index"]))]
    duplicates = claim_partition(dedup_index, partition, ok, cfg)
    dup_records = set(duplicates)
    ok = ok[~ok["record_index"].isin(dup_records)]
    # Each input record has one outcome: written if any of its rows (clips) is written (a clip the encoders
    # could not store is quarantined alone), else an exact or near duplicate of an earlier record, else
    # quarantined if any row was, else filtered (reasons counted once per record).
    written_records = set(ok["record_index"])
    settled = written_records | dup_records
    quarantined = group[(group["status"] == "quarantined") & ~group["record_index"].isin(settled)]
    quarantined_records = set(quarantined["record_index"])
    filtered_rows = group[(group["status"] == "filtered") & ~group["record_index"].isin(settled
                                                                                      | quarantined_records)]
    filtered_rows = filtered_rows.drop_duplicates("record_index")
    filtered = Counter(f"{s}:{r}" for s, r in zip(filtered_rows["stage"], filtered_rows["reason"]))
    filtered.update(f"dedup:{reason}" for reason in duplicates.values())
    inputs = group["record_index"].nunique()

    duplicate_rows = group[group["record_index"].isin(dup_records)].drop_duplicates("record_index")
    lists = {"quarantine": dropped_table(quarantined, partition),
             "filtered": pa.concat_tables([dropped_table(filtered_rows, partition),
                                           dropped_table(duplicate_rows, partition, duplicates, "dedup")])}
    for folder, listed in lists.items():
        if _is_local(fs):  # an output folder made before the list was written has no filtered/ folder
            fs.makedirs(join_uri(output, folder), exist_ok=True)
        with_retries(f"writing {output}", cfg.storage, lambda folder=folder, listed=listed: _write_parquet(
            fs, listed, join_uri(output, folder, f"{name}.parquet")))
    table = _shard_table(ok, cfg)
    if cfg.filters.near_dedup:
        table = table.replace_schema_metadata({**table.schema.metadata, **near_footer(group, written_records)})
    shard_path = join_uri(output, "shards", f"{name}.parquet")
    size = with_retries(f"writing {output}", cfg.storage, lambda: _write_parquet(fs, table, shard_path))
    checksum = hashlib.sha256(fs.cat_file(shard_path)).hexdigest()
    record = {
        "partition": partition, "shard": f"shards/{name}.parquet", "rows": len(ok), "bytes": size,
        "sha256": checksum, **shard_counts(table), "inputs": int(inputs),
        "inputs_written": int(ok["record_index"].nunique()),
        "filtered": dict(filtered), "quarantined": dict(Counter(f"{s}:{r}" for s, r in
                                                                zip(quarantined["stage"], quarantined["reason"]))),
        "filtered_inputs": int(sum(filtered.values())),
        "quarantined_inputs": len(quarantined_records),
        "seconds": {stage: float(group[col].sum()) for stage, col in
                    (("decode", "decode_seconds"), ("score", "score_seconds"), ("vae", "vae_seconds"),
                     ("vit", "vit_seconds")) if col in group},
        "committed_at": time.time(),
    }
    with_retries(f"writing {output}", cfg.storage, lambda: put_whole(
        fs, join_uri(output, COMMITS, f"{name}.json"), json.dumps(record).encode()))
    return record


def parse_commit(data: bytes, path: str) -> dict:
    """A commit record from its file's bytes; DamagedFileError (naming ``path``) unless it is whole."""
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"commit record {path} is damaged ({type(err).__name__}: {err})") from None
    missing = [key for key in COMMIT_FIELDS if not isinstance(record, dict) or key not in record]
    if missing:
        raise DamagedFileError(f"commit record {path} is damaged (no {', '.join(missing)})")
    expected = path.rstrip("/").rsplit("/", 1)[-1]
    if not isinstance(record["partition"], int) or f"{part_name(record['partition'])}.json" != expected:
        raise DamagedFileError(f"commit record {path} is damaged (partition {record['partition']!r} "
                               f"does not match the file name)")
    return record


def read_commits(output: str, cfg: PrecomputeConfig) -> dict[int, dict]:
    """The readable commit records by partition. A damaged one (a writer killed mid-write, a full disk)
    means that partition is not committed: it is reported and the partition is redone."""
    fs = filesystem(output, cfg.storage)
    folder = join_uri(output, COMMITS)
    if not with_retries(f"reading {output}", cfg.storage, lambda: fs.exists(folder)):
        return {}
    commits = {}
    for path in with_retries(f"listing {folder}", cfg.storage, lambda: fs.find(folder)):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not name.endswith(".json") or name.startswith(TMP_PREFIX):
            continue
        data = with_retries(f"reading {path}", cfg.storage, lambda path=path: fs.cat_file(path))
        try:
            record = parse_commit(data, path)
        except DamagedFileError as err:
            logging.getLogger("lance.precompute").warning(f"{err}; that partition is not committed and will be redone")
            continue
        commits[record["partition"]] = record
    return commits


def write_json(output: str, name: str, payload: dict, cfg: PrecomputeConfig) -> None:
    fs = filesystem(output, cfg.storage)
    with_retries(f"writing {output}", cfg.storage, lambda: put_whole(
        fs, join_uri(output, name), json.dumps(payload, indent=2).encode()))


def read_json(output: str, name: str, cfg: PrecomputeConfig) -> dict | None:
    """``output/name`` parsed, None if there is none; DamagedFileError (naming the file) if it cannot be parsed."""
    fs = filesystem(output, cfg.storage)
    path = join_uri(output, name)
    if not with_retries(f"reading {output}", cfg.storage, lambda: fs.exists(path)):
        return None
    data = with_retries(f"reading {path}", cfg.storage, lambda: fs.cat_file(path))
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"{path} is damaged ({type(err).__name__}: {err})") from None

