"""Storage and tar faults of issue 13: an endpoint that accepts and never answers, 5xx and throttling answers,
a missing object, refused and missing credentials, a corrupt object (each with a bounded wait and a message
that says what happened), a gzip bomb named .tar, and a tar member above the configured cap.

Every server here listens on 127.0.0.1: a socket that accepts and never answers, a small HTTP server that
answers every request with one S3 error, and moto's S3 server."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.config import PrecomputeConfig
from pipelines.data.records import process_record
from pipelines.data.sources import list_inputs, read_segment
from pipelines.runtime.storage import (
    ResumingReader,
    StorageConfig,
    StorageError,
    classify,
    fetch_bytes,
    with_retries,
)

TINY = {"partition_size": 4, "buckets": {"image_area": 64 * 64, "video_area": 64 * 96, "vit_area": 56 * 56},
        "video": {"max_seconds": 1.0}}
FAST = {"connect_timeout_seconds": 1, "read_timeout_seconds": 1, "backoff_seconds": 0.01}


# ------------------------------------------------------------------------------------------------ servers
class HungEndpoint:
    """Accepts connections on 127.0.0.1 and never answers; counts the connections."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
                self.held.append(conn)
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.server.close()


@pytest.fixture
def hung():
    endpoint = HungEndpoint()
    yield endpoint
    endpoint.close()


def _error_server(status: int, code: str):
    """An HTTP server on 127.0.0.1 that answers every request with one S3 error; counts the requests."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code} from the test '
            f'server</Message></Error>').encode()
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            requests.append(self.command)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return server, requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto(env: dict[str, str] | None = None):
    """moto's S3 server on 127.0.0.1 (as in test_precompute_s3.py), with extra environment."""
    import os

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def moto_endpoint():
    server, endpoint = _moto()
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


# ------------------------------------------------------------------------------------------------ storage
@pytest.mark.timeout(60)
@pytest.mark.parametrize("uri", ["s3://lance-test/raw/", "s3://lance-test"])
def test_hung_endpoint_times_out_in_seconds_and_says_so(hung, uri):
    cfg = PrecomputeConfig(input=uri, storage=dict(endpoint_url=hung.url, retries=1, **FAST))
    with pytest.raises(StorageError) as err:
        list_inputs(cfg)
    message = str(err.value)
    assert err.value.kind == "timeout"
    assert message.startswith(f"listing {uri}: timed out at {hung.url} after 2 attempts")
    assert "read_timeout_seconds=1" in message and "unreachable" not in message
    # Two attempts of one second each plus botocore's backoff: no second retry layer multiplies them.
    assert len(hung.held) == 2, f"{len(hung.held)} connections: retries multiplied"


@pytest.mark.timeout(60)
def test_hung_endpoint_while_fetching_media_is_a_timeout(hung):
    storage = StorageConfig(endpoint_url=hung.url, retries=0, **FAST)
    with pytest.raises(StorageError, match=r"reading s3://b/media/x\.jpg: timed out .* after 1 attempt "):
        fetch_bytes("s3://b/media/x.jpg", storage)
    assert len(hung.held) == 1, f"{len(hung.held)} connections for one attempt"


@pytest.mark.timeout(60)
def test_media_the_storage_cannot_deliver_now_fails_the_task_instead_of_quarantining(hung, tmp_path):
    """A timeout while fetching a record's media is the storage's failure: the read task fails (Ray retries
    it, a rerun redoes the partition) and the record is not quarantined for good; a missing object is the
    record's and is quarantined."""
    from pipelines.data.pipeline import _rows_of_partition
    from pipelines.data.sources import InputFile

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": "s3://b/media/x.jpg", "caption": "a photo of a red bicycle"}) + "\n")
    cfg = PrecomputeConfig(storage=dict(endpoint_url=hung.url, retries=0, **FAST))
    with pytest.raises(StorageError, match="timed out"):
        list(_rows_of_partition(0, [(0, 0, 1)], [InputFile(str(manifest), "jsonl", 1)], cfg))
    manifest.write_text(json.dumps({"uri": str(tmp_path / "gone.jpg"), "caption": "a photo of a red bicycle"})
                        + "\n")
    [row] = _rows_of_partition(0, [(0, 0, 1)], [InputFile(str(manifest), "jsonl", 1)], cfg)
    assert (row["status"], row["reason"]) == ("quarantined", "missing_file")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status,code,kind", [(503, "SlowDown", "throttled"), (500, "InternalError", "server_error")])
def test_5xx_and_throttling_are_retried_by_botocore_alone(status, code, kind):
    server, requests = _error_server(status, code)
    try:
        storage = StorageConfig(endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", retries=2, **FAST)
        with pytest.raises(StorageError) as err:
            fetch_bytes("s3://b/k.jpg", storage)
    finally:
        server.shutdown()
        server.server_close()
    assert err.value.kind == kind
    assert "after 3 attempts" in str(err.value) and f"HTTP {status}" in str(err.value)
    assert len(requests) == 3, f"{len(requests)} requests for 3 attempts: a second retry layer"


@pytest.fixture
def backoffs(monkeypatch) -> list[float]:
    """The waits ``with_retries`` makes before each retry (recorded, not slept)."""
    import types

    from pipelines.runtime import storage

    waits: list[float] = []
    monkeypatch.setattr(storage, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def test_missing_object_is_a_404_named_with_its_uri(moto_endpoint, backoffs):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}, skip_instance_cache=True).mkdir("faults")
    storage = StorageConfig(endpoint_url=moto_endpoint, retries=3, **{**FAST, "backoff_seconds": 5})
    with pytest.raises(FileNotFoundError, match=r"reading s3://faults/gone\.jpg: not found: "):
        fetch_bytes("s3://faults/gone.jpg", storage)
    assert not backoffs, "a 404 is not retried"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(PrecomputeConfig(input="s3://faults/raw/", storage=storage))


@pytest.mark.timeout(120)
def test_refused_credentials_say_access_denied():
    server, endpoint = _moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # every request needs a known key
    try:
        cfg = PrecomputeConfig(input="s3://faults/raw/", storage=dict(endpoint_url=endpoint, retries=3, **FAST))
        with pytest.raises(StorageError) as err:
            list_inputs(cfg)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert err.value.kind == "access_denied"
    assert str(err.value).startswith(f"listing s3://faults/raw/: access denied at {endpoint}")
    assert "403" in str(err.value)


def test_missing_credentials_say_so(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata lookup off this machine
    storage = StorageConfig(endpoint_url=f"http://127.0.0.1:{_free_port()}", retries=3, **FAST)
    with pytest.raises(StorageError) as err:
        fetch_bytes("s3://faults/x.jpg", storage)
    assert err.value.kind == "credentials"
    assert str(err.value).startswith("reading s3://faults/x.jpg: no S3 credentials found")


def test_corrupt_input_is_named_and_not_retried(tmp_path, backoffs):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 this is not parquet at all")
    cfg = PrecomputeConfig(input=str(tmp_path / "in"), storage={"retries": 3, "backoff_seconds": 5})
    with pytest.raises(StorageError) as err:
        list_inputs(cfg)
    assert err.value.kind == "corrupt" and "broken.parquet: corrupt object" in str(err.value)
    assert not backoffs, "a corrupt object is not retried"


def test_only_transient_failures_are_retried():
    storage = StorageConfig(retries=3, backoff_seconds=0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "read"

    assert with_retries("reading x", storage, flaky) == "read" and len(calls) == 3
    for error, kind in ((PermissionError("denied"), "access_denied"), (pa.ArrowInvalid("bad footer"), "corrupt"),
                        (OSError(5, "I/O error"), "io_error")):
        calls.clear()

        def fail(error=error):
            calls.append(1)
            raise error

        with pytest.raises(StorageError) as err:
            with_retries("reading x", storage, fail)
        assert err.value.kind == kind and len(calls) == 1, kind
    calls.clear()

    def bug():
        calls.append(1)
        raise TypeError("a bug, not a storage failure")

    with pytest.raises(TypeError):
        with_retries("reading x", storage, bug)
    assert len(calls) == 1
    assert classify(ValueError("x")) is None


class _BreakingFiles:
    """A filesystem of one object whose first download breaks off after ``cut`` bytes (IncompleteRead)."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut, self.opens, self.broken = data, cut, 0, False

    def open(self, path: str, mode: str):
        self.opens += 1
        files = self

        class Handle(io.BytesIO):
            def read(self, size=-1):
                if not files.broken and self.tell() + (size if size >= 0 else len(files.data)) > files.cut:
                    files.broken = True
                    raise http.client.IncompleteRead(b"", 1)
                return super().read(size)

        return Handle(self.data)


def test_a_broken_download_resumes_where_it_stopped(tmp_path):
    table = pa.table({"caption": [f"row {i}" for i in range(2000)], "n": list(range(2000))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=500)
    files = _BreakingFiles(buffer.getvalue(), cut=len(buffer.getvalue()) // 3)
    reader = io.BufferedReader(ResumingReader(files, "s3://b/x.parquet", StorageConfig(retries=2, backoff_seconds=0)))
    assert pq.read_table(reader).equals(table)
    assert files.broken and files.opens == 2, "opened again once, read on from the same offset"


# ------------------------------------------------------------------------------------------------ tars
def _jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (shade, 255 - shade, (shade * 7) % 256)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else size
    tar.addfile(info, io.BytesIO(data) if data is not None else _Zeros(size))


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, made as they are read (a bomb member never sits in the test's memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def write_gzip_bomb(path: Path, member_bytes: int = 48 * 2**20) -> Path:
    """A gzip stream of a tar with one ``member_bytes`` member of zeros (≈ 1000:1), under ``path``'s name."""
    with gzip.open(path, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        _add(tar, "0000.jpg", size=member_bytes)
        _add(tar, "0000.txt", b"a picture of nothing at all")
    return path


def write_tar_with_oversize_member(path: Path, big: int) -> Path:
    with tarfile.open(path, "w") as tar:
        for index in range(3):
            if index == 1:
                _add(tar, "0001.mp4", size=big)
            else:
                _add(tar, f"{index:04d}.jpg", _jpeg(40 * index + 20))
            _add(tar, f"{index:04d}.txt", f"sample number {index} of the tar".encode())
    return path


class CountingFile(io.RawIOBase):
    """A seekable file that counts the bytes read from it."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "rb")  # noqa: SIM115 - closed with this object
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.fh.readinto(buffer)
        self.bytes_read += count
        return count

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def close(self) -> None:
        self.fh.close()
        super().close()


def test_gzip_bomb_named_tar_is_refused_without_decompressing(tmp_path):
    bomb = write_gzip_bomb(tmp_path / "bomb.tar")
    assert bomb.stat().st_size < 200_000
    cfg = PrecomputeConfig(input=str(bomb), **TINY)
    files = list_inputs(cfg)
    assert [f.records for f in files] == [1], "the refused tar counts as one record"
    records = list(read_segment(files[0], 0, 1, cfg))
    assert len(records) == 1 and records[0]["error_reason"] == "tar_compression"
    assert "a gz stream named .tar" in records[0]["error"] and ".tar.gz" in records[0]["error"]
    row = process_record(records[0], 0, 0, cfg)[0]
    assert (row["status"], row["stage"], row["reason"]) == ("quarantined", "read", "tar_compression")


def test_declared_compressed_tar_is_read_and_its_huge_member_quarantined(tmp_path):
    bomb = write_gzip_bomb(tmp_path / "bomb.tar.gz", member_bytes=8 * 2**20)
    cfg = PrecomputeConfig(input=str(bomb), max_tar_member_mb=1, **TINY)
    files = list_inputs(cfg)
    assert [(f.format, f.records) for f in files] == [("webdataset", 1)]
    [record] = read_segment(files[0], 0, 1, cfg)
    assert record["error_reason"] == "member_too_large"
    assert "0000.jpg is 8388608 bytes, above max_tar_member_mb (1 MiB)" in record["error"]


def test_oversize_member_is_quarantined_with_its_size_and_never_read(tmp_path):
    from pipelines.data import sources

    big = 4 * 2**20
    path = write_tar_with_oversize_member(tmp_path / "samples.tar", big)
    cfg = PrecomputeConfig(input=str(path), max_tar_member_mb=0.1, **TINY)
    [file] = list_inputs(cfg)
    assert file.records == 3
    counting = CountingFile(path)
    with sources._open_tar(counting, file.uri) as tar:
        records = list(sources._tar_samples(tar, file.uri, 0, 3, cfg))
    assert counting.bytes_read < big / 4, "the over-size member was read"
    assert [r.get("error_reason") for r in records] == [None, "member_too_large", None]
    assert records[1]["source_uri"] == f"{file.uri}#0001"
    assert f"0001.mp4 is {big} bytes, above max_tar_member_mb (0.1 MiB)" in records[1]["error"]
    assert records[0]["caption"] == "sample number 0 of the tar" and records[2]["target_bytes"][:2] == b"\xff\xd8"


@pytest.mark.slow
def test_precompute_quarantines_bad_tars_and_keeps_the_invariant(ray_local, tmp_path):
    from pipelines.data.pipeline import run_precompute

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_gzip_bomb(inputs / "a-bomb.tar")
    write_tar_with_oversize_member(inputs / "b-samples.tar", 2**20)
    output = tmp_path / "out"
    cfg = PrecomputeConfig(input=str(inputs), output=str(output), max_tar_member_mb=0.5, **TINY)
    stats = run_precompute(cfg, progress=False).stats
    assert stats["inputs"] == 4
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"]
    assert stats["inputs_written"] == 2
    assert stats["quarantined_by_reason"] == {"read:tar_compression": 1, "read:member_too_large": 1}
    quarantine = pq.read_table(output / "quarantine").to_pylist()
    sizes = [q["error"] for q in quarantine if q["reason"] == "member_too_large"]
    assert len(sizes) == 1 and "0001.mp4 is 1048576 bytes" in sizes[0]
    from pipelines.data.manifest import read_manifest

    rows = sum(pq.read_metadata(output / s["shard"]).num_rows for s in read_manifest(str(output))[1])
    assert rows == 2

