"""Storage access through fsspec (local paths and s3://) for every job: timeouts, retries of transient
failures only, errors that say what happened, and URI joining.

On S3 every request has a connect and a read timeout, and botocore's own retry mode (``standard`` or
``adaptive``) retries the transient failures of a request: timeouts, refused or reset connections, 5xx and
throttling. s3fs's retry loop is cut to one pass, so a failing request is tried ``retries + 1`` times in all,
not that many times per s3fs retry per caller retry. :func:`with_retries` adds retries only where botocore
makes none: filesystems other than S3, and a download stream that breaks off after the request succeeded
(:func:`open_input` reads on from the offset where it broke off).
Not found, access denied, missing credentials and corrupt objects are never retried.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Literal

import fsspec
from pydantic import Field

from lance_core.config import StrictModel


class StorageConfig(StrictModel):
    endpoint_url: str | None = None
    """S3-compatible endpoint; credentials come from the environment (never from this file)."""
    region: str | None = None
    connect_timeout_seconds: float = Field(5.0, gt=0)
    """Longest wait for a connection to the S3 endpoint, per attempt."""
    read_timeout_seconds: float = Field(20.0, gt=0)
    """Longest wait for the next bytes of an answer, per attempt: an endpoint that accepts and never answers
    fails after (retries + 1) x this, instead of hanging."""
    retries: int = Field(3, ge=0)
    """Retries of a transient failure (timeout, refused or reset connection, 5xx, throttling) after the first
    attempt; on S3 botocore makes them in ``retry_mode``. Not found, access denied, missing credentials and
    corrupt objects fail at once."""
    retry_mode: Literal["standard", "adaptive"] = "standard"
    """botocore's retry mode (adaptive also slows the client down while S3 throttles it)."""
    backoff_seconds: float = Field(0.5, ge=0)
    """First wait before a retry botocore does not make (other filesystems, a broken download); doubles."""


TRANSIENT_KINDS = frozenset({"timeout", "connection", "server_error", "throttled", "broken_stream"})
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
                            "RequestThrottled", "RequestLimitExceeded", "TooManyRequestsException",
                            "ProvisionedThroughputExceededException", "BandwidthLimitExceeded"})


class StorageError(RuntimeError):
    """A storage call failed; the message names the URI and what happened.

    ``kind`` is one of: credentials, access_denied, timeout, connection, server_error, throttled,
    broken_stream, corrupt, io_error.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class ObjectNotFound(FileNotFoundError):
    """A missing file or object (404); the message names the URI."""


def filesystem(uri: str, storage: StorageConfig):
    """The fsspec filesystem of ``uri``; on S3 with the timeouts and the retry mode of ``storage``."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol != "s3":
        return fsspec.filesystem(protocol)
    client = {}
    if storage.endpoint_url:
        client["endpoint_url"] = storage.endpoint_url
    if storage.region:
        client["region_name"] = storage.region
    config = {"connect_timeout": storage.connect_timeout_seconds,
              "read_timeout": storage.read_timeout_seconds,
              "retries": {"total_max_attempts": storage.retries + 1, "mode": storage.retry_mode}}
    fs = fsspec.filesystem("s3", client_kwargs=client, config_kwargs=config, skip_instance_cache=True)
    fs.retries = 1  # one pass of s3fs's own loop: botocore's retry mode above makes the retries
    return fs


def path_exists(fs, path: str) -> bool:
    """Whether ``path`` exists; unlike ``fs.exists`` (which answers False for a bucket on any error), a
    timeout, missing credentials or a refused access raise."""
    try:
        fs.info(path)
        return True
    except FileNotFoundError:
        return False


def join_uri(root: str, *parts: str) -> str:
    """``root`` (a local path or a URI; a trailing slash dropped) and the non-empty ``parts`` joined with
    ``/``: ``join_uri("s3://b/run/", "shards", "x.parquet")`` -> ``s3://b/run/shards/x.parquet``,
    ``join_uri("s3://b/run/", "")`` -> ``s3://b/run``."""
    return "/".join([root.rstrip("/"), *(part for part in parts if part)])


def with_protocol(like: str, path: str) -> str:
    """``path`` as fsspec lists it (``bucket/key``: no protocol) made a URI of ``like``'s protocol
    (``s3://bucket/key``); unchanged when ``like`` has none (a local path)."""
    return f"{like.split('://', 1)[0]}://{path}" if "://" in like else path


@dataclass(frozen=True)
class StorageFailure:
    """What a failed storage call means: its kind (see :class:`StorageError`) and a one-line detail."""

    kind: str
    detail: str
    retried_by_client: bool
    """botocore already made ``retries + 1`` attempts (its retry mode covers this kind)."""


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (s3fs keeps the botocore error as the cause). Only
    causes: an error raised while another was handled (a timeout of the listing s3fs tries after a 404 of
    the object) is not about that other one."""
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__
    return chain


def _from_botocore(chain: list[BaseException]) -> bool:
    return any(type(e).__module__.split(".")[0] in ("botocore", "aiobotocore") for e in chain)


def _client_error(chain: list[BaseException]):
    """The botocore ClientError (an HTTP error answer) in the chain, if any: (status, code, message)."""
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            error = response["Error"]
            return status, str(error.get("Code", "")), str(error.get("Message", ""))
    return None


def _botocore_types() -> dict[str, tuple[type, ...]]:
    try:
        from botocore import exceptions as bx
    except ImportError:  # no S3 support installed: no botocore errors to classify
        return {name: () for name in ("credentials", "timeout", "connection", "broken_stream", "corrupt")}
    return {
        "credentials": (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                        bx.UnknownCredentialError),
        "timeout": (bx.ConnectTimeoutError, bx.ReadTimeoutError),
        "connection": (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectionError),
        "broken_stream": (bx.ResponseStreamingError, bx.IncompleteReadError),
        "corrupt": (bx.ChecksumError, bx.FlexibleChecksumError),
    }


def _corrupt_types() -> tuple[type, ...]:
    import pyarrow as pa

    return (pa.ArrowInvalid, tarfile.TarError, zlib.error, EOFError, UnicodeDecodeError, json.JSONDecodeError,
            csv.Error)


def _broken_stream_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (http.client.IncompleteRead,)
    try:
        from aiohttp import ClientPayloadError

        types += (ClientPayloadError,)
    except ImportError:
        pass
    try:
        from botocore.parsers import ResponseParserError  # truncated XML answers under throttling

        types += (ResponseParserError,)
    except ImportError:
        pass
    return types


ENVIRONMENT_KINDS = TRANSIENT_KINDS | {"credentials", "access_denied"}


def is_environment_failure(err: BaseException) -> bool:
    """A failure of the storage or its access rather than of the data (timeouts, lost connections, server
    errors, throttling, credentials): the work that met it fails (retried by Ray, then by a rerun) instead
    of quarantining its records for good. Corrupt or missing input is the data's."""
    kind = err.kind if isinstance(err, StorageError) else getattr(classify(err), "kind", None)
    return kind in ENVIRONMENT_KINDS


def classify(err: BaseException) -> StorageFailure | None:
    """What a storage failure means; None for an exception that is no storage failure (a bug) or one this
    module already described (both are re-raised as they are)."""
    if isinstance(err, (StorageError, ObjectNotFound)):
        return None
    chain = _chain(err)
    botocore = _botocore_types()
    from_botocore = _from_botocore(chain)
    detail = f"{type(err).__name__}: {err}"
    if isinstance(err, botocore["credentials"]):
        return StorageFailure("credentials", detail, False)
    answer = _client_error(chain)
    status, code, message = answer if answer else (0, "", "")
    if answer:
        detail = f"HTTP {status}{f' {code}' if code and code != str(status) else ''}: {message or err}"
    if isinstance(err, FileNotFoundError) or status == 404:
        return StorageFailure("not_found", detail, False)
    if isinstance(err, PermissionError) or status in (401, 403):
        return StorageFailure("access_denied", detail, False)
    if isinstance(err, (*botocore["timeout"], TimeoutError)) or code == "RequestTimeout":
        return StorageFailure("timeout", detail, from_botocore)
    if isinstance(err, botocore["broken_stream"] + _broken_stream_types()):
        return StorageFailure("broken_stream", detail, False)
    if isinstance(err, (*botocore["connection"], ConnectionError)):
        return StorageFailure("connection", detail, from_botocore)
    if code in THROTTLE_CODES or status in (429, 503):  # S3 answers 503 Slow Down when it throttles
        return StorageFailure("throttled", detail, from_botocore)
    if status >= 500:
        return StorageFailure("server_error", detail, from_botocore)
    if isinstance(err, botocore["corrupt"] + _corrupt_types()):
        return StorageFailure("corrupt", detail, False)
    if isinstance(err, OSError) or answer:
        return StorageFailure("io_error", detail, False)
    return None


def _describe(failure: StorageFailure, storage: StorageConfig, attempts: int) -> str:
    at = f" at {storage.endpoint_url}" if storage.endpoint_url else ""
    tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
    return {
        "credentials": "no S3 credentials found (give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                       "AWS_PROFILE, or the node's identity: IRSA, workload identity, instance profile)",
        "access_denied": f"access denied{at} (check the credentials and the bucket policy)",
        "timeout": (f"timed out{at} {tries} (connect_timeout_seconds={storage.connect_timeout_seconds:g}, "
                    f"read_timeout_seconds={storage.read_timeout_seconds:g})"),
        "connection": f"{storage.endpoint_url or 'the storage endpoint'} unreachable {tries}",
        "server_error": f"server error{at} {tries}",
        "throttled": f"throttled{at} {tries} (too many requests: lower the concurrency or raise the limit)",
        "broken_stream": f"the download broke off {tries}",
        "corrupt": "corrupt object (not readable as the format its name says)",
        "io_error": "storage error",
    }[failure.kind] + f": {failure.detail}"


def with_retries(what: str, storage: StorageConfig, fn, before_retry=None):
    """Run ``fn``; retry the transient failures botocore did not already retry, with exponential backoff
    (``before_retry()`` runs before each retry).

    Raises ObjectNotFound (a FileNotFoundError; the message names ``what``) for a missing object,
    StorageError for every other storage failure, and anything else unchanged.
    """
    delay = storage.backoff_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as err:  # classified below; what is no storage failure is re-raised as it is
            failure = classify(err)
            if failure is None:
                raise
            retry_here = failure.kind in TRANSIENT_KINDS and not failure.retried_by_client
            if retry_here and attempt <= storage.retries:
                time.sleep(delay)
                delay *= 2
                if before_retry is not None:
                    before_retry()
                continue
            if failure.kind == "not_found":
                raise ObjectNotFound(f"{what}: not found: {failure.detail}") from None
            attempts = storage.retries + 1 if failure.retried_by_client else attempt
            raise StorageError(f"{what}: {_describe(failure, storage, attempts)}", failure.kind) from None


class ResumingReader(io.RawIOBase):
    """A read-only object whose reads resume where a broken download left off: the object is opened again
    and read on from the same offset (what s3fs's own loop did before it was cut to one pass)."""

    def __init__(self, fs, path: str, storage: StorageConfig) -> None:
        self.fs, self.path, self.storage = fs, path, storage
        self.fh = None
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _handle(self):
        if self.fh is None:
            self.fh = self.fs.open(self.path, "rb")
            self.fh.seek(self.position)
        return self.fh

    def _drop_handle(self) -> None:
        if self.fh is not None:
            try:
                self.fh.close()
            except Exception:  # noqa: BLE001, S110 - the broken handle is dropped either way
                pass
        self.fh = None

    def readinto(self, buffer) -> int:
        data = with_retries(f"reading {self.path}", self.storage, lambda: self._handle().read(len(buffer)),
                            before_retry=self._drop_handle)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = with_retries(f"reading {self.path}", self.storage,
                                     lambda: self._handle().seek(offset, whence), before_retry=self._drop_handle)
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        super().close()


def open_input(uri: str, storage: StorageConfig):
    """``uri`` opened for reading; on S3 a broken download resumes (:class:`ResumingReader`)."""
    fs = filesystem(uri, storage)
    if not uri.startswith("s3://"):
        return fs.open(uri, "rb")
    return io.BufferedReader(ResumingReader(fs, uri, storage), buffer_size=2**20)


def fetch_bytes(uri: str, storage: StorageConfig) -> bytes:
    """The whole object at ``uri`` (retried as :func:`with_retries` does)."""
    fs = filesystem(uri, storage)
    return with_retries(f"reading {uri}", storage, lambda: fs.cat_file(uri))
