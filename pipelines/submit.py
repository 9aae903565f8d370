"""Submitting the project's jobs to a Ray cluster through Ray's Job Submission API (``lance submit``).

The project folder travels as the job's working directory (without what must not travel: virtual
environments, git data, run outputs, caches, large files, and files that look like credentials); a config
given as a local path travels with it. Data and weights are read by the job from shared storage (s3://);
credentials come from the cluster's environment or the platform's identity, never from the submission: a
working dir that holds a credential-like file is refused unless the user allows it, and even then the file
stays behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TextIO

from pydantic import Field, field_validator

from lance_core.config import StrictModel

JobName = Literal["precompute", "train", "grpo", "tune"]
JOBS: tuple[str, ...] = JobName.__args__
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STAGING_DIR = ".lance-submit"
"""Folder (inside the working dir) where configs from outside the project wait for the upload."""
MAX_FILE_BYTES = 16 * 2**20
"""Files above this size stay behind; data and weights belong on shared storage."""
EXCLUDES = (
    ".venv/", "venv/", ".git/", "runs/", "bench/results/", "__pycache__/", "*.pyc", ".pytest_cache/",
    ".ruff_cache/", ".mypy_cache/", "*.egg-info/", "build/", "dist/", ".cache/",
    "*.safetensors", "*.pth", "*.pt", "*.ckpt", "*.onnx", "*.parquet", "*.tar", "*.mp4",
)
SECRET_FILES = (
    ".env", ".env.*", ".envrc", ".aws/", ".ssh/", ".gnupg/", ".docker/", ".kube/", ".azure/", ".config/gcloud/",
    ".netrc", "_netrc", ".pgpass", ".npmrc", ".pypirc", ".git-credentials", ".htpasswd", "auth_token",
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", "id_rsa*", "id_dsa*", "id_ecdsa*",
    "id_ed25519*", "credentials", "credentials.json", "service-account*.json", "secrets.*", "*.secret",
    "*.secrets",
)
"""Files that look like credentials (patterns as in :data:`EXCLUDES`): never uploaded, and a working dir that
holds one is refused unless ``allow_secret_files`` is set. cluster/Dockerfile.dockerignore keeps them out of
the image too."""
TEMPLATE_MARKERS = (".example", ".sample", ".template")
"""A credential-like name with one of these in it is a template (``.env.example``): left behind, not refused."""
SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|SESSION_KEY|API_KEY", re.IGNORECASE)
DATA_FLAGS = ("--input", "--output", "--data", "--checkpoint", "--weights")


class SubmitError(RuntimeError):
    """The submission cannot be made as asked; the message says why."""


class SubmitOptions(StrictModel):
    job: JobName
    """Which job to run: its entrypoint is ``python -m jobs.<job>``."""
    config: str | None = None
    """Job config (YAML): a path inside the project, or outside it (then copied in for the upload)."""
    job_args: tuple[str, ...] = ()
    """Further arguments of the job entrypoint (``lance submit train --config X -- --steps 10``)."""
    address: str = DEFAULT_ADDRESS
    """Ray job API (the dashboard's HTTP address), e.g. http://127.0.0.1:8265 through a port-forward."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables for the job; names that look like credentials are refused."""
    submission_id: str | None = None
    entrypoint_num_cpus: float = Field(0.0, ge=0)
    """CPUs reserved for the job's driver (0: it runs on the head and only coordinates)."""
    entrypoint_num_gpus: float = Field(0.0, ge=0)
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)
    """Custom resources for the driver, e.g. {"cpu_node": 1} to keep it off the head."""
    allow_secret_files: bool = False
    """Submit although the working dir holds credential-like files (:data:`SECRET_FILES`); they stay behind."""

    @field_validator("address")
    @classmethod
    def _http_address(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("give the job API, http://HOST:8265 (the dashboard port), not the GCS address")
        return value.rstrip("/")

    @field_validator("env")
    @classmethod
    def _no_credentials(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if SECRET_NAME.search(name):
                raise ValueError(f"{name} looks like a credential; give the cluster its credentials through "
                                 "its environment or the platform's identity (IRSA, workload identity, "
                                 "instance profile), never through a submission")
        return value


def default_address() -> str:
    """``RAY_API_SERVER_ADDRESS``, else an http ``RAY_ADDRESS``, else the local job API."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def job_module(job: str) -> str:
    return f"jobs.{job}"


def excluded(relative: Path) -> bool:
    """Whether a path inside the project stays behind: it matches :data:`EXCLUDES` or :data:`SECRET_FILES`."""
    return _matches(relative, EXCLUDES) or _matches(relative, SECRET_FILES)


def _matches(relative: Path, patterns: tuple[str, ...]) -> bool:
    """Whether a path inside the project matches one of ``patterns`` the way Ray's excludes match it: a
    pattern ending in / names a folder at any depth (or a path from the root when it holds a /), any other a
    file name at any depth."""
    parts = relative.parts
    for pattern in patterns:
        if pattern.endswith("/"):
            name = pattern.rstrip("/")
            if "/" in name:
                if relative.as_posix().startswith(name + "/"):
                    return True
            elif any(Path(part).match(name) for part in parts[:-1]):
                return True
        elif relative.match(pattern):
            return True
    return False


def large_files(root: Path, limit: int = MAX_FILE_BYTES) -> list[str]:
    """Files under ``root`` above ``limit`` bytes that the excludes do not already leave out."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not excluded(rel_folder / d / "x")]
        for name in files:
            rel = rel_folder / name
            if not excluded(rel) and (Path(folder) / name).stat().st_size > limit:
                found.append(rel.as_posix())
    return sorted(found)


def secret_files(root: Path) -> list[str]:
    """Files under ``root`` that look like credentials and would otherwise travel (templates aside)."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not _matches(rel_folder / d / "x", EXCLUDES)]
        for name in files:
            rel = rel_folder / name
            if (_matches(rel, SECRET_FILES) and not _matches(rel, EXCLUDES)
                    and not any(marker in name for marker in TEMPLATE_MARKERS)):
                found.append(rel.as_posix())
    return sorted(found)


def check_no_secrets(root: Path, allow: bool) -> None:
    """Refuse a working dir that holds credential-like files, unless ``allow`` (they stay behind either way)."""
    found = secret_files(root)
    if found and not allow:
        shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        raise SubmitError(f"the working dir {root} holds files that look like credentials: {shown}. They are "
                          "never uploaded, but move them out of the project (the cluster's identity gives the "
                          "job its access), or pass --allow-secret-files to submit anyway")


def runtime_env(root: Path, env: dict[str, str]) -> dict:
    excludes = list(EXCLUDES) + list(SECRET_FILES) + ["/" + path for path in large_files(root)]
    runtime = {"working_dir": str(root), "excludes": excludes}
    if env:
        runtime["env_vars"] = dict(env)
    return runtime


@contextmanager
def staged_config(config: str | None, root: Path) -> Iterator[str | None]:
    """The config path relative to the working dir, for the time of the upload.

    A config inside the project (and not in an excluded folder) travels as it is; one outside is copied into
    :data:`STAGING_DIR` under a content-addressed name and removed once the upload is done.
    """
    if config is None:
        yield None
        return
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise SubmitError(f"config file {config!r} does not exist")
    if _matches(Path(path.name), SECRET_FILES):
        raise SubmitError(f"config file {config!r} has the name of a credential file; it would travel with the job")
    root = root.resolve()
    if path.is_relative_to(root) and not excluded(path.relative_to(root)):
        yield path.relative_to(root).as_posix()
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    staged = root / STAGING_DIR / f"{digest}-{os.getpid()}-{path.name}"
    staged.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, staged)
    try:
        yield staged.relative_to(root).as_posix()
    finally:
        staged.unlink(missing_ok=True)
        try:
            staged.parent.rmdir()
        except OSError:
            pass


def entrypoint(job: str, config: str | None, job_args: tuple[str, ...] = ()) -> str:
    command = ["python", "-m", job_module(job)]
    if config is not None:
        command += ["--config", config]
    return shlex.join([*command, *job_args])


def local_data_paths(job_args: tuple[str, ...]) -> list[str]:
    """Values of data flags that are local paths: every node must see them (a shared filesystem)."""
    paths = []
    for flag, value in itertools.pairwise(job_args):
        if flag in DATA_FLAGS and "://" not in value:
            paths.append(f"{flag} {value}")
    return paths


@contextmanager
def api_errors(address: str) -> Iterator[None]:
    """Failures of the job API (unreachable, refused token, unknown job) as :class:`SubmitError`."""
    import requests
    from ray.exceptions import RayError

    try:
        yield
    except (ConnectionError, requests.RequestException) as err:
        raise SubmitError(f"cannot reach the Ray job API at {address}: {err}") from None
    except (RayError, RuntimeError) as err:
        if isinstance(err, SubmitError):
            raise
        raise SubmitError(f"{address}: {err}") from None


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    with api_errors(address):
        return JobSubmissionClient(address)


def new_submission_id(job: str) -> str:
    return f"lance-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"


def submit(opts: SubmitOptions, root: Path | None = None) -> str:
    """Upload the working dir (default: the project) and submit the job; returns the submission id."""
    import importlib.util

    root = root or PROJECT_ROOT
    if importlib.util.find_spec(job_module(opts.job)) is None:
        raise SubmitError(f"{job_module(opts.job)} is not part of this project")
    check_no_secrets(root, opts.allow_secret_files)
    api = client(opts.address)
    with staged_config(opts.config, root) as config:
        return api.submit_job(
            entrypoint=entrypoint(opts.job, config, opts.job_args),
            runtime_env=runtime_env(root, opts.env),
            submission_id=opts.submission_id or new_submission_id(opts.job),
            metadata={"lance_job": opts.job, "config": config or ""},
            entrypoint_num_cpus=opts.entrypoint_num_cpus or None,
            entrypoint_num_gpus=opts.entrypoint_num_gpus or None,
            entrypoint_resources=opts.entrypoint_resources or None,
        )


def follow(address: str, submission_id: str, out: TextIO | None = None) -> str:
    """Print the job's logs as they come until it ends; returns its final status (SUCCEEDED, FAILED, ...)."""
    api = client(address)
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in api.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    status = api.get_job_status(submission_id)
    while not status.is_terminal():
        time.sleep(1.0)
        status = api.get_job_status(submission_id)
    return str(status.value)


def job_status(address: str, submission_id: str) -> dict:
    info = client(address).get_job_info(submission_id)
    return {"submission_id": submission_id, "status": str(info.status.value), "entrypoint": info.entrypoint,
            "message": info.message or "", "driver_exit_code": info.driver_exit_code}


def stop_job(address: str, submission_id: str) -> bool:
    return client(address).stop_job(submission_id)


def job_logs(address: str, submission_id: str) -> str:
    return client(address).get_job_logs(submission_id)


def list_jobs(address: str) -> list[dict]:
    rows = []
    for info in client(address).list_jobs():
        rows.append({"submission_id": info.submission_id, "status": str(info.status.value),
                     "job": (info.metadata or {}).get("lance_job", ""), "entrypoint": info.entrypoint})
    return rows
