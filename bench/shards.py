"""Latent shard layouts: version 2 (flat float16 / float32 lists with a shape column) against version 1 (raw
bfloat16 bytes with shape and dtype columns), on the same latents.

    python bench/shards.py [--quick] [--reps N] [--out FILE]

Data: one shard per latent shape, of the tiny precompute's sizes (a 64² image: 1 x 4 x 4 x 48; a 13-frame
64 x 96 clip: 4 x 4 x 6 x 48) and, without ``--quick``, of the release's (a 512² image: 1 x 32 x 32 x 48;
a 6 s 480p clip: 18 x 30 x 53 x 48). Values are random normal, as incompressible as real normalised latents
(which zstd shrinks about as little); every row has the identity and caption columns of a t2i/t2v row.

Rows, per shape and layout: the shard's bytes (zstd, the writer's options) and their ratio to version 1;
read throughput of the training read path (``ParquetFile.iter_batches`` -> rows with tensors -> float32
torch tensors) in rows/s and MB/s of latent values (at 2 bytes each, whatever the layout), and its ratio to
version 1 read as before this layout (``to_pylist`` + the bfloat16 bytes viewed through torch); and a plain
``pyarrow.parquet.read_table``. Layouts: ``v1 bf16`` (baseline, old reader), ``v1 bf16 now`` (a version-1
shard through today's reader), ``v2 bf16`` (bfloat16 values in float16, the default), ``v2 fp16``,
``v2 fp32``. The layouts are read in turn within each repetition and the median taken, so the drift of a
shared machine's load hits them alike; torch runs one thread, as in a training worker's loader.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.common import load_average, print_table, write_json  # noqa: E402
from lance_core.shards import (  # noqa: E402
    LEGACY_SCHEMA,
    parquet_options,
    shard_rows,
    shard_table,
    tensor,
    tensor_to_bytes,
)

QUICK = {"tiny image": ((1, 4, 4, 48), 512), "tiny clip": ((4, 4, 6, 48), 256)}
FULL = {"tiny image": ((1, 4, 4, 48), 4096), "tiny clip": ((4, 4, 6, 48), 2048),
        "512² image": ((1, 32, 32, 48), 256), "480p 6 s clip": ((18, 30, 53, 48), 16)}
LAYOUTS = ("v1 bf16", "v1 bf16 now", "v2 bf16", "v2 fp16", "v2 fp32")
BATCH_ROWS = 32
"""Rows per record batch, as training reads (``data.read_batch_rows``)."""


def make_rows(shape: tuple, count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    task = "t2v" if shape[0] > 1 else "t2i"
    return [{"sample_id": f"{k:032x}", "source_uri": f"bench://{k}", "content_sha256": f"{k:064x}",
             "task": task, "caption": f"a caption of sample {k}", "clip_index": 0, "scores": "{}",
             "target_vae": torch.randn(*shape, generator=gen), "target_width": 96, "target_height": 64,
             "target_frames": 4 * shape[0] - 3, "target_fps": 12.0 if shape[0] > 1 else 0.0}
            for k in range(count)]


def legacy_table(rows: list[dict]) -> pa.Table:
    """Version 1, as the writer made it: bfloat16 bytes, shape and dtype columns, every column written."""
    old = [{**row, "target_vae": tensor_to_bytes(row["target_vae"], "bfloat16"),
            "target_vae_shape": list(row["target_vae"].shape), "target_vae_dtype": "bfloat16"}
           for row in rows]
    return pa.Table.from_pylist(old, schema=LEGACY_SCHEMA)


def shard_bytes(layout: str, rows: list[dict]) -> bytes:
    if layout.startswith("v1"):
        table, options = legacy_table(rows), {}
    else:
        table = shard_table(rows, layout.split()[1])
        options = parquet_options(table.schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", **options)
    return buffer.getvalue()


def read_as_before(data: bytes) -> int:
    """Version 1 through the reader it had: rows as Python objects, bfloat16 bytes viewed through torch."""
    count = 0
    for batch in pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            raw = torch.from_numpy(np.frombuffer(row["target_vae"], dtype="<i2").copy())
            raw.view(torch.bfloat16).float().reshape(row["target_vae_shape"])
            count += 1
    return count


def read_now(data: bytes) -> int:
    """Today's training read path: rows with tensors (:func:`shard_rows`), then float32 torch tensors."""
    count = 0
    for batch in pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=BATCH_ROWS):
        for row in shard_rows(batch):
            tensor(row, "target_vae")
            count += 1
    return count


def measure(shapes: dict, reps: int) -> list[dict]:
    results = []
    for name, (shape, count) in shapes.items():
        rows = make_rows(shape, count, seed=len(results))
        files = {layout: shard_bytes(layout, rows) for layout in LAYOUTS}
        readers = {layout: read_as_before if layout == "v1 bf16" else read_now for layout in LAYOUTS}
        for layout, data in files.items():  # warm-up, and every layout reads back every row
            assert readers[layout](data) == count, layout
        read_s = {layout: [] for layout in LAYOUTS}
        table_s = {layout: [] for layout in LAYOUTS}
        for _ in range(reps):
            for layout, data in files.items():
                start = time.perf_counter()
                readers[layout](data)
                read_s[layout].append(time.perf_counter() - start)
                start = time.perf_counter()
                pq.read_table(io.BytesIO(data))
                table_s[layout].append(time.perf_counter() - start)
        latent_mb = count * int(np.prod(shape)) * 2 / 1e6
        base_bytes, base_s = len(files["v1 bf16"]), statistics.median(read_s["v1 bf16"])
        for layout in LAYOUTS:
            seconds = statistics.median(read_s[layout])
            results.append({
                "shape": name, "latent_shape": list(shape), "layout": layout, "rows": count,
                "bytes": len(files[layout]), "bytes_per_row": len(files[layout]) / count,
                "bytes_ratio": len(files[layout]) / base_bytes, "read_s": seconds,
                "read_rows_per_s": count / seconds, "read_mb_per_s": latent_mb / seconds,
                "read_speedup": base_s / seconds, "read_table_ms": 1000 * statistics.median(table_s[layout]),
            })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny shapes only, fewer rows: seconds")
    parser.add_argument("--reps", type=int, default=None, help="timed reads per layout (default 3 quick, 7)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/shards.json)")
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    torch.set_num_threads(1)  # as in a training worker (scaling.threads_per_worker); steadier when shared
    rows = measure(QUICK if args.quick else FULL, reps)
    print("shard size and training read path: each layout against version 1 read as before (same latents)")
    print_table(rows, [("shape", "latents", "s"), ("layout", "layout", "s"), ("rows", "rows", "d"),
                       ("bytes_per_row", "bytes/row", ".0f"), ("bytes_ratio", "size x", ".3f"),
                       ("read_rows_per_s", "rows/s", ".0f"), ("read_mb_per_s", "MB/s", ".1f"),
                       ("read_speedup", "read x", ".2f"), ("read_table_ms", "read_table ms", ".1f")])
    write_json("shards", {"quick": args.quick, "reps": reps, "batch_rows": BATCH_ROWS,
                          "load_average": load_average(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
