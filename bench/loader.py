"""The training loader's row streams with and without shard prefetch, from local disk and from S3.

    python bench/loader.py [--quick] [--out FILE]

Shards in the latent shard schema (``write_synthetic_shards``: image latents of 32x32x48 in bf16 and ViT
features, 32 rows a shard) are read by one pack slot's ``TaskStream`` (shuffle buffer over 4 shards), from
local disk and from moto's S3 server on loopback, with ``data.prefetch_shards`` 0 and 2. Two figures each:
rows/s read flat out, and the share of time a consumer that spends ``--compute-ms`` per row (a training step's
work) waits for rows. ratio = rows/s with prefetch / without, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, print_table, write_json
from lance_core.config import model_preset
from pipelines.train.config import DataSection
from pipelines.train.data import ShardPrefetcher, TaskStream
from pipelines.train.plan import make_plan
from pipelines.train.synthetic_shards import write_synthetic_shards

MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""moto's server on loopback accepts any credentials; these are not real ones."""


def _moto() -> tuple[subprocess.Popen, str]:
    for key, value in MOTO_ENV.items():
        os.environ.setdefault(key, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return server, f"http://127.0.0.1:{port}"


def measure(data: DataSection, rows: int, compute_s: float) -> dict:
    """rows/s read flat out, and the wait share of a consumer spending ``compute_s`` per row."""
    plan = make_plan(data, {"t2i": 1.0})
    results = {}
    for name, pause in (("flat", 0.0), ("with_compute", compute_s)):
        prefetcher = ShardPrefetcher(data, data.prefetch_shards)
        stream = TaskStream("t2i", plan, 0, 1, 0, data, prefetcher)
        waited, started = 0.0, time.perf_counter()
        for _ in range(rows):
            began = time.perf_counter()
            stream.next_row()
            waited += time.perf_counter() - began
            if pause:
                time.sleep(pause)
        total = time.perf_counter() - started
        prefetcher.close()
        results[name] = {"rows_per_s": rows / total, "wait_share": waited / total}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compute-ms", type=float, default=40.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    shards, rows_per_shard = (6, 16) if args.quick else (24, 32)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    root = write_synthetic_shards(work / "latents", model_preset("tiny"), tasks=("t2i",),
                                  rows_per_task=shards * rows_per_shard, rows_per_shard=rows_per_shard,
                                  latent_side=32)
    rows = shards * rows_per_shard - 1
    server, endpoint = _moto()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench-loader")
        fs.put(str(root), "bench-loader/latents", recursive=True)
        table = []
        for source, uri, storage in (("local", str(root), {}),
                                     ("s3", "s3://bench-loader/latents", {"endpoint_url": endpoint})):
            base = None
            for prefetch in (0, 2):
                data = DataSection(uris=(uri,), holdout_per_task=0, shuffle_buffer=64, shuffle_shards=4,
                                   prefetch_shards=prefetch, storage=storage)
                got = measure(data, rows, args.compute_ms / 1000)
                base = base or got["flat"]["rows_per_s"]
                table.append({"source": source, "prefetch_shards": prefetch,
                              "rows_per_s": got["flat"]["rows_per_s"],
                              "ratio": got["flat"]["rows_per_s"] / base,
                              "compute_ms_per_row": args.compute_ms,
                              "wait_share": got["with_compute"]["wait_share"]})
    finally:
        server.terminate()
        server.wait(timeout=10)
    print_table(table, [("source", "source", "s"), ("prefetch_shards", "prefetch", "d"),
                        ("rows_per_s", "rows/s", ".0f"), ("ratio", "ratio", ".2f"),
                        ("compute_ms_per_row", "compute ms/row", ".1f"), ("wait_share", "wait share", ".1%")])
    write_json("loader", {"rows": table, "shards": shards, "rows_per_shard": rows_per_shard,
                          "row_latents": [1, 32, 32, 48], "load_average": load_average(), "quick": args.quick},
               args.out)


if __name__ == "__main__":
    main()
