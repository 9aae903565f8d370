"""s3:// inputs and outputs against a real S3 protocol server on loopback (moto's server)."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.config import PrecomputeConfig
from pipelines.data.synth import write_manifest, write_release_parquet
from pipelines.runtime.storage import StorageError

pytestmark = pytest.mark.slow
TINY = dict(partition_size=4, buckets=dict(image_area=64 * 64, video_area=64 * 96, vit_area=56 * 56),
            video=dict(max_seconds=1.0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("lance-test")
    local = tmp_path_factory.mktemp("s3src")
    fs.put(str(write_release_parquet(local / "t2i.parquet", "t2i", 6, seed=3)), "lance-test/raw/t2i.parquet")
    manifest = write_manifest(local / "manifest", "jsonl", 3, seed=4)
    fs.put(str(local / "manifest" / "media"), "lance-test/raw-manifest/media", recursive=True)
    lines = manifest.read_text().splitlines() + [json.dumps({"uri": "media/gone.jpg", "caption": "a missing key"})]
    fs.pipe_file("lance-test/raw-manifest/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    return fs


def test_s3_input_and_output(ray_local, s3_endpoint, bucket):
    from pipelines.data.pipeline import run_precompute

    # 10 kB blocks: every image leaves the read task in a block of its own, so each partition is written
    # from pieces kept in the bucket
    cfg = PrecomputeConfig(input="s3://lance-test/raw/t2i.parquet", output="s3://lance-test/latents/t2i",
                           storage=dict(endpoint_url=s3_endpoint), encoders=dict(block_mb=0.01), **TINY)
    result = run_precompute(cfg, progress=False)
    assert result.stats["inputs_written"] == 6
    assert not bucket.find("lance-test/latents/t2i/_pieces"), "pieces are removed once their shard is written"
    from pipelines.data.manifest import read_manifest

    _, shards = read_manifest("s3://lance-test/latents/t2i", cfg.storage)
    rows = 0
    for shard in shards:
        with bucket.open(f"lance-test/latents/t2i/{shard['shard']}", "rb") as fh:
            rows += pq.read_table(fh).num_rows
    assert rows == 6
    again = run_precompute(cfg, progress=False)
    assert again.committed_now == 0 and again.skipped == result.partitions


def test_s3_manifest_with_a_missing_key(ray_local, s3_endpoint, bucket, tmp_path):
    from pipelines.data.pipeline import run_precompute

    cfg = PrecomputeConfig(input="s3://lance-test/raw-manifest/manifest.jsonl", output=str(tmp_path / "out"),
                           storage=dict(endpoint_url=s3_endpoint, retries=1, backoff_seconds=0.05), **TINY)
    result = run_precompute(cfg, progress=False)
    assert result.stats["inputs_written"] == 3 and result.stats["inputs_quarantined"] == 1
    quarantine = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    assert quarantine[0]["reason"] == "missing_file" and quarantine[0]["stage"] == "read"


def test_unreachable_bucket_fails_clearly_before_writing(ray_local, tmp_path):
    from pipelines.data.pipeline import run_precompute

    cfg = PrecomputeConfig(input="s3://lance-test/raw/", output=str(tmp_path / "out"),
                           storage=dict(endpoint_url=f"http://127.0.0.1:{_free_port()}", retries=2,
                                        backoff_seconds=0.05), **TINY)
    with pytest.raises(StorageError, match="s3://lance-test/raw/.*unreachable after 3 attempts"):
        run_precompute(cfg, progress=False)
    assert not list((tmp_path / "out").rglob("*.parquet"))
