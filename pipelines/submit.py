"""Submitting the project's jobs to a Ray cluster through Ray's Job Submission API (``lance submit``).

What travels, as ``ray job submit`` takes it: a working directory (the project folder when lance-train runs from
a source checkout, another with ``--working-dir``, none when it is installed: site-packages is never uploaded,
and its packages travel as ``py_modules`` instead), further ``py_modules`` (a user's own reward module), and a
runtime env (``--runtime-env``: pip, env vars, ...) merged with what lance submit sets. Every folder uploaded
travels without what must not travel: virtual
environments, git data, run outputs, caches, large files, what .gitignore / .rayignore leave out (as Ray
does), and anything that looks like a credential, by name, by folder (``.aws/``, ``.config/gcloud/``, ... at
any depth) or by content (the head of each file is read for private keys, cloud keys and tokens). What
travels is decided here, once (:func:`plan_upload`), and copied into a temporary folder that is Ray's
working dir, so that the list ``--dry-run`` prints is exactly what is uploaded. Symlinks: a link to a file
inside the project that travels itself travels as a copy of that file; a symlinked folder is not followed,
and a link out of the project (or a broken one) stays behind. A config given as a local path travels with
the job. Data and weights are read by the job from shared storage (s3://); credentials come from the
cluster's environment or the platform's identity, never from the submission: a working dir that holds a
credential-like file is refused unless the user allows it, and even then the file stays behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import Field, field_validator

from lance_core.config import ConfigError, StrictModel

JobName = Literal["precompute", "train", "grpo", "tune"]
JOBS: tuple[str, ...] = JobName.__args__
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STAGING_DIR = ".lance-submit"
"""Folder of the upload where configs from outside the project (or left out of it) travel."""
MAX_FILE_BYTES = 16 * 2**20
"""Files above this size stay behind; data and weights belong on shared storage."""
EXCLUDES = (
    ".venv/", "venv/", ".git/", "runs/", "bench/results/", "__pycache__/", "*.pyc", ".pytest_cache/",
    ".ruff_cache/", ".mypy_cache/", "*.egg-info/", "build/", "dist/", ".cache/", f"{STAGING_DIR}/",
    "*.safetensors", "*.pth", "*.pt", "*.ckpt", "*.onnx", "*.parquet", "*.tar", "*.mp4",
)
"""What stays behind as a matter of course: a pattern ending in / is a folder at any depth (``a/b/`` the
folders b inside a folder a), any other a file name at any depth."""
SECRET_FILES = (
    ".env", ".env.*", ".envrc", ".aws/", ".ssh/", ".gnupg/", ".docker/", ".kube/", ".azure/", ".config/gcloud/",
    ".netrc", "_netrc", ".pgpass", ".npmrc", ".pypirc", ".git-credentials", ".htpasswd", "auth_token",
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx", "id_rsa*", "id_dsa*", "id_ecdsa*",
    "id_ed25519*", "credentials", "credentials.json", "service-account*.json", "secrets.*", "*.secret",
    "*.secrets", ".s3cfg", ".boto", "rclone.conf", "kaggle.json", ".kaggle/", ".vault-token", "*.tfstate",
    "*.tfstate.*", ".terraform/", "application_default_credentials.json", ".dockercfg", ".passwd-s3fs",
    ".oci/", ".databrickscfg", ".huggingface/",
)
"""Files that look like credentials (patterns as in :data:`EXCLUDES`): never uploaded, and a working dir that
holds one is refused unless ``allow_secret_files`` is set. cluster/Dockerfile.dockerignore keeps them out of
the image too."""
TEMPLATE_MARKERS = (".example", ".sample", ".template")
"""A credential-like name with one of these in it is a template (``.env.example``): left behind, not refused."""
CONTENT_HEAD_BYTES = 64 * 2**10
"""Bytes read from the head of each file that would travel, for :data:`SECRET_CONTENT` (keys and key files
start with what gives them away; a token further into a large file is not seen)."""
SECRET_CONTENT = tuple((label, re.compile(pattern)) for label, pattern in (
    ("a private key", rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    ("an S3 secret key", rb"(?i)\b(?:aws_)?secret_(?:access_)?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"),
    ("a cloud service-account key",
     rb'"type"\s*:\s*"(?:service_account|authorized_user|external_account|impersonated_service_account)"'),
    ("a GitHub token", rb"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{40,})"),
    ("a Slack token", rb"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    ("an AWS access key id", rb"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    ("a Vault token", rb"\bhvs\.[A-Za-z0-9_-]{24,}"),
    ("a Hugging Face token", rb"\bhf_[A-Za-z0-9]{34}\b"),
    ("a Google API key", rb"\bAIza[0-9A-Za-z_-]{35}"),
))
"""What a credential looks like inside a file, whatever its name."""
URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
"""A URL with a password in it (``https://user:pass@host/simple``, a pip index or a git remote)."""
SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|SESSION_KEY|API_KEY|(?:^|[_.-])TOKENS?(?:$|[_.-])",
    re.IGNORECASE)
"""A variable name that holds a credential (TOKEN as a part of the name: ``HF_TOKEN`` is one,
``TOKENIZERS_PARALLELISM`` is not)."""
CLUSTER_SIDE = ("give the cluster its credentials on its own side: the environment of its nodes (a Kubernetes "
                "Secret in the Ray pods' env, the environment `ray start` runs in) or the platform's identity "
                "(IRSA, workload identity, instance profile), never through a submission, which Ray records with "
                "the job (see cluster/README.md)")
DATA_FLAGS = ("--input", "--output", "--data", "--checkpoint", "--weights")
PACKAGES = ("jobs", "pipelines", "lance_core")
"""lance-train's own packages: what ``python -m jobs.<job>`` needs on the cluster."""
SITE_FOLDERS = ("site-packages", "dist-packages")
OWN_KEYS = ("working_dir", "py_modules", "excludes")
"""Keys of a runtime env that lance submit fills itself: the working dir and the py_modules are temporary
copies of what their plans let travel, and ``excludes`` is applied to those plans (see :func:`plan_upload`)."""
log = logging.getLogger("lance.submit")


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
    """Submit although the working dir or a py_modules folder holds credential-like files
    (:data:`SECRET_FILES`, :data:`SECRET_CONTENT`); they stay behind."""
    working_dir: str | None = None
    """Folder uploaded as the job's working dir (default: see :func:`choose_working_dir`)."""
    py_modules: tuple[str, ...] = ()
    """Local package folders or .py modules (checked and copied like the working dir), or URIs, for the
    runtime env's ``py_modules``."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """A runtime env as ``ray job submit --runtime-env`` reads it (pip, env_vars, excludes, ...), merged with what
    lance submit sets (:func:`merged_runtime_env`)."""

    @field_validator("address")
    @classmethod
    def _http_address(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("give the job API, http://HOST:8265 (the dashboard port), not the GCS address")
        return value.rstrip("/")

    @field_validator("env")
    @classmethod
    def _no_credentials(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if SECRET_NAME.search(name):
                raise ValueError(f"{name} looks like a credential; {CLUSTER_SIDE}")
            if label := credential_label(f"{name}={text}"):
                raise ValueError(f"{name} holds {label}; {CLUSTER_SIDE}")
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


def installed(folder: Path) -> bool:
    """Whether ``folder`` is an installation (inside site-packages or dist-packages), not a source checkout:
    uploading it would send every package of the environment."""
    return any(part in SITE_FOLDERS for part in Path(folder).parts)


def _is_uri(value: str) -> bool:
    """A remote location (``s3://b/pkg.zip``, ``https://...``) that Ray fetches itself, not a local path."""
    return "://" in value


def excluded(relative: Path) -> bool:
    """Whether a path inside the project stays behind by its name: it matches :data:`EXCLUDES` or
    :data:`SECRET_FILES`."""
    return bool(_matches(relative, EXCLUDES) or _matches(relative, SECRET_FILES))


def _matches(relative: Path, patterns: tuple[str, ...]) -> str | None:
    """The first of ``patterns`` that a path inside the project matches (see :data:`EXCLUDES`), else None."""
    parts = relative.parts
    for pattern in patterns:
        if pattern.endswith("/"):
            names = pattern.rstrip("/").split("/")
            folders = parts[:-1]
            for start in range(len(folders) - len(names) + 1):
                if all(fnmatchcase(folders[start + k], name) for k, name in enumerate(names)):
                    return pattern
        elif relative.match(pattern):
            return pattern
    return None


def secret_content(path: Path) -> str | None:
    """What credential the head of a file holds (a label of :data:`SECRET_CONTENT`), else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(CONTENT_HEAD_BYTES)
    except OSError:
        return None
    return next((label for label, pattern in SECRET_CONTENT if pattern.search(head)), None)


def credential_label(text: str) -> str | None:
    """What credential a string holds (a label of :data:`SECRET_CONTENT`, or a password in a URL), else None."""
    data = text.encode("utf-8", "replace")
    label = next((label for label, pattern in SECRET_CONTENT if pattern.search(data)), None)
    return label or ("a password in a URL" if URL_PASSWORD.search(text) else None)


def _ignore_rules(folder: Path) -> list:
    """Ray's own rules from the .gitignore (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore of
    ``folder``: Ray applies them to the upload, so they are applied here to list what travels."""
    try:
        from ray._private.runtime_env.packaging import get_excludes_from_ignore_files
    except ImportError:
        return []
    include = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    return get_excludes_from_ignore_files(folder, include_gitignore=include, logger=_QUIET)


_QUIET = logging.getLogger("lance.submit.ignore_files")
_QUIET.setLevel(logging.WARNING)  # Ray logs each ignore file it reads


@dataclass
class Upload:
    """What travels from a working dir (or a py_modules folder or file), and what stays behind and why."""

    root: Path | None
    """The folder planned; None for a working dir that is no folder of this machine (it holds at most the
    staged config)."""
    files: dict[str, int] = field(default_factory=dict)
    """Relative path -> bytes, of every file uploaded."""
    sources: dict[str, Path] = field(default_factory=dict)
    """Relative path -> the file its bytes are copied from (itself; a symlink's target; a staged config)."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Relative path (a folder ends in /) -> why it stays behind."""
    secrets: list[str] = field(default_factory=list)
    """Credential-like files (name, folder or content; templates aside): the submission is refused."""

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def add(self, relative: str, source: Path) -> None:
        self.files[relative] = source.stat().st_size
        self.sources[relative] = source

    def leave(self, relative: str, reason: str, secret: bool = False) -> None:
        self.left_out[relative] = reason
        if secret:
            self.secrets.append(relative)


def _runtime_excludes(root: Path, excludes: Sequence[str]) -> Callable[[Path], bool]:
    """The runtime env's ``excludes`` (gitignore patterns relative to ``root``) as Ray applies them."""
    if not excludes:
        return lambda path: False
    from ray._private.runtime_env.packaging import _get_excludes

    return _get_excludes(root, list(excludes))


def plan_upload(root: Path, limit: int = MAX_FILE_BYTES, excludes: Sequence[str] = ()) -> Upload:
    """Decide, file by file, what of ``root`` travels (see the module's docstring), the runtime env's
    ``excludes`` applied here too; nothing is copied."""
    root = Path(root).resolve()
    upload = Upload(root)
    links: list[tuple[str, Path]] = []
    by_excludes = _runtime_excludes(root, excludes)

    def hidden_by(path: Path, rules: list) -> str | None:
        """Why the runtime env's excludes or an ignore file hide ``path``, else None."""
        if by_excludes(path):
            return "left out by the runtime env's excludes"
        return "left out by .gitignore / .rayignore" if any(rule(path) for rule in rules) else None

    def by_name(relative: str) -> bool:
        """Leave a path out by its name; False when its name lets it travel."""
        rel = Path(relative)
        if pattern := _matches(rel, EXCLUDES):
            upload.leave(relative, f"excluded ({pattern})")
        elif pattern := _matches(rel, SECRET_FILES):
            template = any(marker in rel.name for marker in TEMPLATE_MARKERS)
            upload.leave(relative, f"{'template of a ' if template else ''}credential-like name ({pattern})",
                         secret=not template)
        else:
            return False
        return True

    def visit(folder: Path, relative: str, rules: list, ignored: bool) -> None:
        rules = rules + _ignore_rules(folder)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            rel = f"{relative}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if pattern := _matches(Path(rel, "x"), EXCLUDES):
                    upload.leave(f"{rel}/", f"excluded ({pattern})")
                    continue
                reason = None if ignored else hidden_by(path, rules)
                if reason:
                    upload.leave(f"{rel}/", reason)
                visit(path, f"{rel}/", rules, ignored or bool(reason))  # still walked: credential-like names are reported
            elif by_name(rel) or ignored:
                continue
            elif reason := hidden_by(path, rules):
                upload.leave(rel, reason)
            elif entry.is_symlink():
                links.append((rel, path))
            elif not entry.is_file(follow_symlinks=False):
                upload.leave(rel, "not a regular file")
            elif entry.stat(follow_symlinks=False).st_size > limit:
                upload.leave(rel, f"larger than {limit / 2**20:g} MiB")
            elif label := secret_content(path):
                upload.leave(rel, f"holds {label}", secret=True)
            else:
                upload.add(rel, path)

    visit(root, "", [], False)
    for rel, path in links:
        target = Path(os.path.realpath(path))
        inside = target.relative_to(root).as_posix() if target.is_relative_to(root) else None
        if not target.exists():
            upload.leave(rel, "broken symlink")
        elif inside is None:
            upload.leave(rel, "symlink to outside the working dir")
        elif target.is_dir():
            upload.leave(rel, "symlinked folder (not followed)")
        elif inside not in upload.files:
            upload.leave(rel, f"symlink to {inside}, which stays behind")
        else:
            upload.add(rel, target)
    upload.secrets.sort()
    return upload


def plan_file(path: Path, limit: int = MAX_FILE_BYTES) -> Upload:
    """The plan of one file sent on its own (a .py module of py_modules), by the rules of :func:`plan_upload`:
    a credential's name or content, or a size above ``limit``, keeps it behind."""
    upload = Upload(path.parent)
    name = path.name
    if pattern := _matches(Path(name), SECRET_FILES):
        upload.leave(name, f"credential-like name ({pattern})", secret=True)
    elif path.stat().st_size > limit:
        upload.leave(name, f"larger than {limit / 2**20:g} MiB")
    elif label := secret_content(path):
        upload.leave(name, f"holds {label}", secret=True)
    else:
        upload.add(name, path)
    return upload


def large_files(root: Path, limit: int = MAX_FILE_BYTES) -> list[str]:
    """Files under ``root`` above ``limit`` bytes that would otherwise travel."""
    left_out = plan_upload(root, limit).left_out
    return sorted(path for path, reason in left_out.items() if reason.startswith("larger than"))


def secret_files(root: Path) -> list[str]:
    """Files under ``root`` that look like credentials, by name, folder or content (templates aside)."""
    return plan_upload(root).secrets


def _refusal(upload: Upload, what: str | None = None) -> str:
    shown = ", ".join(f"{path} ({upload.left_out[path]})" for path in upload.secrets[:10])
    more = f" and {len(upload.secrets) - 10} more" if len(upload.secrets) > 10 else ""
    return (f"{what or f'the working dir {upload.root}'} holds files that look like credentials: {shown}{more}. They are "
            "never uploaded, but move them out of the project (the cluster's identity gives the job its access), "
            "or pass --allow-secret-files to submit anyway")


def check_no_secrets(root: Path | Upload, allow: bool) -> None:
    """Refuse a working dir that holds credential-like files, unless ``allow`` (they stay behind either way)."""
    upload = root if isinstance(root, Upload) else plan_upload(root)
    if upload.secrets and not allow:
        raise SubmitError(_refusal(upload))


def add_config(upload: Upload, config: str | None) -> str | None:
    """The config's path in the upload: its own path when it travels anyway, else a copy under
    :data:`STAGING_DIR` (a config from outside the project, or one the project leaves out) added to ``upload``.
    A config with a credential's name or content is refused: it would travel with the job."""
    if config is None:
        return None
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise SubmitError(f"config file {config!r} does not exist")
    if _matches(Path(path.name), SECRET_FILES):
        raise SubmitError(f"config file {config!r} has the name of a credential file; it would travel with the job")
    if label := secret_content(path):
        raise SubmitError(f"config file {config!r} holds {label}; it would travel with the job")
    root = upload.root
    if root is not None and path.is_relative_to(root) and (relative := path.relative_to(root).as_posix()) in upload.files:
        return relative
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    # a package of its own per submission: Ray removes an unpacked working dir when the job using it ends, even
    # while another job of the same content starts in it
    staged = f"{STAGING_DIR}/{digest}-{os.getpid()}-{path.name}"
    upload.add(staged, path)
    return staged


def _copy(upload: Upload, folder: Path) -> None:
    """Copy exactly the files of ``upload`` into ``folder`` (created, even when nothing travels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for relative, source in upload.sources.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


@contextmanager
def staged_working_dir(upload: Upload) -> Iterator[Path]:
    """A temporary folder holding a copy of exactly the files of ``upload``: Ray's working dir, removed once
    the upload is done."""
    folder = Path(tempfile.mkdtemp(prefix="lance-submit-"))
    try:
        _copy(upload, folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def runtime_env(working_dir: Path | None, env: dict[str, str], py_modules: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> dict:
    """The runtime env sent with the job: ``base`` (the user's, see :func:`merged_runtime_env`) with the working
    dir, the py_modules and ``env`` as env vars."""
    runtime = {key: value for key, value in (base or {}).items() if key not in OWN_KEYS}
    if working_dir is not None:
        runtime["working_dir"] = str(working_dir)
    if py_modules:
        runtime["py_modules"] = list(py_modules)
    env_vars = {**(runtime.get("env_vars") or {}), **env}
    if env_vars:
        runtime["env_vars"] = env_vars
    return runtime


def load_runtime_env(path: str | None = None, text: str | None = None) -> dict[str, Any]:
    """A runtime env as ``ray job submit`` reads it: a YAML or JSON file (``--runtime-env``) or inline JSON
    (``--runtime-env-json``), at most one of them. Relative paths in it (working_dir, py_modules, a pip
    requirements file) are relative to the current folder, as for ``ray job submit``. A parse error names the
    line, never the content (which may hold what must not be shown)."""
    import yaml

    if path is not None and text is not None:
        raise ConfigError("submit.runtime_env: give --runtime-env or --runtime-env-json, not both")
    if path is not None:
        flag = "--runtime-env"
        try:
            data = yaml.safe_load(Path(path).expanduser().read_text())
        except OSError as err:
            raise ConfigError(f"submit.runtime_env ({flag}): cannot read {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"submit.runtime_env ({flag}): {path} is not YAML or JSON{where}") from None
    elif text is not None:
        flag = "--runtime-env-json"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"submit.runtime_env ({flag}): not JSON (line {err.lineno}, column {err.colno})") \
                from None
    else:
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"submit.runtime_env ({flag}): give a mapping (pip:, env_vars:, ...), "
                          f"not a {type(data).__name__}")
    return data


def merged_runtime_env(user: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The user's runtime env without :data:`OWN_KEYS`, its ``env_vars`` merged with ``--env``; a variable set
    differently by both is refused, by name."""
    merged = {key: value for key, value in user.items() if key not in OWN_KEYS}
    given = merged.get("env_vars") or {}
    if not isinstance(given, dict):
        raise SubmitError("the runtime env's env_vars: give a mapping NAME: value")
    clash = sorted(name for name in set(given) & set(env) if given[name] != env[name])
    if clash:
        raise SubmitError(f"{', '.join(clash)}: set differently by --env and by the runtime env's env_vars; "
                          "give each variable once")
    if given or env:
        merged["env_vars"] = {**given, **env}
    return merged


def validated_runtime_env(runtime: dict[str, Any]) -> dict[str, Any]:
    """``runtime`` as Ray records it (a pip requirements file read into its list, ...), checked by Ray's own
    ``RuntimeEnv`` here rather than at the upload: a bad field is named before anything travels."""
    from ray.runtime_env import RuntimeEnv

    try:
        return RuntimeEnv(**runtime).to_dict()
    except (TypeError, ValueError, OSError) as err:
        raise SubmitError(f"the runtime env: {err}") from None


def recorded_secrets(runtime: dict[str, Any], command: str) -> list[str]:
    """Credentials the job's record would hold, by where (never by value): Ray keeps every job's entrypoint
    and runtime env, and the dashboard and ``ray job list`` show them. An env var whose name looks like a
    credential (:data:`SECRET_NAME`, as ``--env`` refuses), and any string of the runtime env or of the
    command that holds one (:func:`credential_label`)."""
    found = []
    for name, value in (runtime.get("env_vars") or {}).items():
        if SECRET_NAME.search(str(name)):
            found.append(f"env_vars.{name} (a credential's name)")
        elif label := credential_label(f"{name}={value}"):
            found.append(f"env_vars.{name} (holds {label})")
    rest = {key: value for key, value in runtime.items() if key != "env_vars"}
    found += [f"{where} (holds {label})" for where, text in _strings(rest) if (label := credential_label(text))]
    if label := credential_label(command):
        found.append(f"the job's command line (holds {label})")
    return found


def masked(runtime: Any, name: str = "") -> Any:
    """``runtime`` with every value :func:`recorded_secrets` finds replaced by ``<masked>`` (for printing)."""
    if isinstance(runtime, dict):
        return {key: masked(value, str(key)) for key, value in runtime.items()}
    if isinstance(runtime, list):
        return [masked(value) for value in runtime]
    if isinstance(runtime, str) and (SECRET_NAME.search(name) or credential_label(f"{name}={runtime}")):
        return "<masked>"
    return runtime


def masked_command(command: str) -> str:
    """``command`` with every argument that holds a credential replaced by ``<masked>`` (for printing)."""
    return shlex.join("<masked>" if credential_label(arg) else arg for arg in shlex.split(command))


def choose_working_dir(given: str | None, from_env: Any, root: Path) -> Path | None:
    """The folder uploaded as the working dir: ``--working-dir`` or the runtime env's ``working_dir`` (the same
    folder when both are given), else ``root`` (the folder holding lance-train's packages) when it is a source
    checkout, else none: an installed lance-train's site-packages is never uploaded."""
    chosen = [_local_folder(value, what) for value, what in ((given, "--working-dir"),
                                                            (from_env, "the runtime env's working_dir"))
              if value is not None]
    if len(chosen) == 2 and chosen[0] != chosen[1]:
        raise SubmitError(f"two working dirs: --working-dir {chosen[0]} and the runtime env's working_dir "
                          f"{chosen[1]}; give one")
    if chosen:
        return chosen[0]
    return None if installed(root) else root


def _local_folder(value: Any, what: str) -> Path:
    """``value`` as a local folder to upload; a URI, a file or an installation's site-packages is refused."""
    if not isinstance(value, str) or _is_uri(value):
        raise SubmitError(f"{what}: give a local folder (lance submit uploads it itself, to check what leaves "
                          f"this machine), not {value!r}")
    folder = Path(value).expanduser().resolve()
    if not folder.is_dir():
        raise SubmitError(f"{what} {value!r} is not a folder")
    if installed(folder):
        raise SubmitError(f"{what} {value!r} is inside an installation ({'/'.join(SITE_FOLDERS)}): give a "
                          "project folder")
    return folder


@dataclass(frozen=True)
class Module:
    """One entry of the runtime env's ``py_modules``."""

    source: str
    """As given: a local package folder, a .py file, or a URI."""
    path: Path | None = None
    """The local folder or file (its links not resolved: its name is the one imported); None for a URI."""
    upload: Upload | None = None
    """What of it travels (a file's plan holds that file); None for a URI, which Ray fetches itself."""

    @property
    def is_file(self) -> bool:
        """A single .py module rather than a package folder."""
        return self.path is not None and self.path.is_file()

    @property
    def name(self) -> str:
        """The name it is imported by on the cluster: the folder's name or the file's stem (a URI's source)."""
        if self.path is None:
            return self.source
        return self.path.stem if self.is_file else self.path.name


def plan_module(source: str, excludes: Sequence[str] = ()) -> Module:
    """The plan of one py_modules entry: a folder by :func:`plan_upload`, a .py file by :func:`plan_file`, a
    URI as it is. A local wheel is refused: it travels whole and its content is not checked here."""
    if _is_uri(source):
        return Module(source)
    path = Path(os.path.abspath(Path(source).expanduser()))
    if path.is_dir():
        return Module(source, path, plan_upload(path, excludes=excludes))
    if path.suffix == ".py" and path.is_file():
        upload = plan_file(path)
        if not upload.files:
            raise SubmitError(f"py_modules entry {source!r} cannot travel: {upload.left_out[path.name]}")
        return Module(source, path, upload)
    if path.suffix == ".whl":
        raise SubmitError(f"py_modules entry {source!r}: a local wheel travels whole and is not checked here; give "
                          "the package's folder, or a URI of the wheel on storage the cluster reads")
    if not path.exists():
        raise SubmitError(f"py_modules entry {source!r} does not exist")
    raise SubmitError(f"py_modules entry {source!r}: give a package folder, a .py file or a URI")


def package_modules(root: Path, working_dir: Path | None) -> list[Path]:
    """lance-train's packages (:data:`PACKAGES`) under ``root`` that travel as py_modules: none when the working
    dir is ``root`` itself (a source checkout, whose upload holds them), else each one found."""
    if working_dir == root:
        return []
    return [root / name for name in PACKAGES if (root / name).is_dir()]


def plan_modules(sources: Sequence[str], excludes: Sequence[str] = ()) -> list[Module]:
    """The plans of ``sources``, an entry given twice taken once; two entries imported by the same name are
    refused (one would hide the other on the cluster)."""
    modules: list[Module] = []
    seen: set[str] = set()
    by_name: dict[str, Module] = {}
    for source in sources:
        module = plan_module(source, excludes)
        key = str(module.path.resolve()) if module.path else module.source
        if key in seen:
            continue
        seen.add(key)
        if module.path is not None and (other := by_name.get(module.name)):
            raise SubmitError(f"py_modules: {other.source} and {module.source} would both be imported as "
                              f"{module.name}; give one")
        by_name[module.name] = module
        modules.append(module)
    return modules


def _module_sources(user: dict[str, Any], given: Sequence[str]) -> list[str]:
    """The runtime env's py_modules, then ``--py-modules``."""
    listed = user.get("py_modules") or []
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise SubmitError("the runtime env's py_modules: give a list of paths or URIs")
    return [*listed, *given]


def how_code_travels(root: Path, working_dir: Path | None, packages: list[Path]) -> str:
    """One line: how lance-train's own code reaches the cluster."""
    if not packages:
        return (f"lance-train travels in the working dir (the source checkout {root})" if working_dir == root else
                f"lance-train's packages are not found under {root}: the cluster's image must hold them")
    names = ", ".join(path.name for path in packages)
    if installed(root):
        return (f"lance-train is installed (not a source checkout): {root} is not uploaded; its packages {names} "
                "travel as py_modules")
    return f"lance-train's packages {names} travel as py_modules from the source checkout {root}"


def _upload_lines(upload: Upload) -> list[str]:
    lines = [f"  {_size(size):>10}  {path}" for path, size in sorted(upload.files.items())]
    lines.append(f"left out ({len(upload.left_out)}):")
    lines += [f"  {path}  -- {reason}" for path, reason in sorted(upload.left_out.items())]
    return lines


def describe(submission: Submission) -> str:
    """The ``--dry-run`` report: every file uploaded (working dir, then each py_modules entry) with its size,
    the total, what stays behind and why, how lance-train's code travels, and the runtime env as it would be
    sent (the working dir and py_modules as the local paths copied from; credentials masked)."""
    upload, command = submission.upload, masked_command(submission.entrypoint)
    amount = f"{len(upload.files)} files, {_size(upload.total_bytes)}"
    if upload.root is not None:
        lines = [f"would upload {amount}, from {upload.root}, and run: {command}", *_upload_lines(upload)]
    elif upload.files:
        lines = [f"would upload {amount} as the working dir (the config only), and run: {command}",
                 *_upload_lines(upload)]
    else:
        lines = [f"no working dir; would run: {command}"]
    lines.append(submission.code)
    for module in submission.modules:
        if module.upload is None:
            lines.append(f"py_modules {module.source}: a URI, sent as it is")
            continue
        moved = module.upload
        lines.append(f"py_modules {module.name}: would upload {len(moved.files)} files, "
                     f"{_size(moved.total_bytes)}, from {module.path}")
        lines += _upload_lines(moved)
    sent = runtime_env(upload.root, {}, [str(m.path or m.source) for m in submission.modules], submission.runtime_env)
    if upload.root is None and upload.files:
        sent["working_dir"] = "<a temporary folder holding only the config>"
    lines.append("runtime env (credentials masked):")
    lines += [f"  {line}" for line in json.dumps(masked(sent), indent=2, sort_keys=True).splitlines()]
    return "\n".join(lines)


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def entrypoint(job: str, config: str | None, job_args: tuple[str, ...] = ()) -> str:
    command = ["python", "-m", job_module(job)]
    if config is not None:
        command += ["--config", config]
    return shlex.join([*command, *job_args])


class JobArgumentsError(ValueError):
    """The job's own config or arguments do not validate (checked on this machine before submitting)."""


def resolved_job_config(job: str, config: str | None, job_args: tuple[str, ...]) -> tuple[dict, list[str]]:
    """The job's config as the cluster will resolve it (its file, arguments and defaults), validated here first,
    and the paths in it that are relative: resolved on the cluster against Ray's temporary copy of the working
    directory, so what a job writes there is lost. The job is loaded with ``--print-config`` (it runs nothing)
    inside an empty folder, so a relative path shows as one under that folder."""
    import importlib

    import yaml

    main = importlib.import_module(f"jobs.{job}").main
    if config and Path(config).is_file():
        config = str(Path(config).resolve())
    argv = [*(["--config", config] if config else []), *job_args, "--print-config"]
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="lance-submit-") as probe:
        probe = os.path.realpath(probe)
        try:
            os.chdir(probe)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        finally:
            os.chdir(before)
        if code:
            raise JobArgumentsError(f"the {job} job refuses its config or arguments: "
                                    f"{(err.getvalue() or out.getvalue()).strip()[-2000:]}")
        resolved = yaml.safe_load(out.getvalue()) or {}
        relative = [f"{name}: {value.replace(probe + os.sep, '')}" for name, value in _strings(resolved)
                    if value == probe or value.startswith(probe + os.sep)]
    return resolved, relative


def _strings(value, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted field, string) of every string in a nested config."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{prefix}[{index}]")
    elif isinstance(value, str):
        yield prefix, value


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


@dataclass(frozen=True)
class Submission:
    upload: Upload
    """The working dir (its root None: no folder of this machine; it holds at most the staged config)."""
    config: str | None
    """The config's path inside the upload."""
    entrypoint: str
    modules: tuple[Module, ...] = ()
    """The runtime env's py_modules, lance-train's packages first when they travel that way."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """The user's runtime env merged with ``--env`` (:func:`merged_runtime_env`)."""
    recorded: tuple[str, ...] = ()
    """Credentials the job's record would hold (:func:`recorded_secrets`): the submission is refused."""
    code: str = ""
    """How lance-train's own code reaches the cluster (:func:`how_code_travels`)."""


def prepare(opts: SubmitOptions, root: Path | None = None) -> Submission:
    """What a submission of ``opts`` uploads and runs. ``root`` is the folder holding lance-train's packages
    (default: :data:`PROJECT_ROOT`): the working dir unless another is given, and, when it is not the working
    dir (an installation, or another working dir), where the packages that travel as py_modules come from."""
    import importlib.util

    if importlib.util.find_spec(job_module(opts.job)) is None:
        raise SubmitError(f"{job_module(opts.job)} is not part of this project")
    root = Path(root or PROJECT_ROOT).resolve()
    user = dict(opts.runtime_env)
    excludes = user.get("excludes") or []
    if not isinstance(excludes, list) or not all(isinstance(item, str) for item in excludes):
        raise SubmitError("the runtime env's excludes: give a list of patterns")
    folder = choose_working_dir(opts.working_dir, user.get("working_dir"), root)
    upload = plan_upload(folder, excludes=excludes) if folder is not None else Upload(None)
    config = add_config(upload, opts.config)
    packages = package_modules(root, folder)
    modules = plan_modules([*map(str, packages), *_module_sources(user, opts.py_modules)], excludes)
    merged = merged_runtime_env(user, opts.env)
    command = entrypoint(opts.job, config, opts.job_args)
    recorded = recorded_secrets(validated_runtime_env(merged), command)
    code = how_code_travels(root, folder, packages)
    log.info(code)
    return Submission(upload, config, command, tuple(modules), merged, tuple(recorded), code)


def refusal(submission: Submission, allow_secret_files: bool) -> str | None:
    """Why ``submission`` must not be made, else None: credentials its record would hold (never allowed), or
    credential-like files in the working dir or a py_modules entry (unless ``allow_secret_files``; they stay
    behind either way)."""
    if submission.recorded:
        return (f"credentials would be recorded with the job (Ray keeps its command line and runtime env, which "
                f"the dashboard and `ray job list` show): {', '.join(submission.recorded)}; {CLUSTER_SIDE}")
    if allow_secret_files:
        return None
    if submission.upload.secrets:
        return _refusal(submission.upload)
    for module in submission.modules:
        if module.upload is not None and module.upload.secrets:
            return _refusal(module.upload, f"the py_modules entry {module.path}")
    return None


def dry_run(opts: SubmitOptions, root: Path | None = None) -> tuple[str, str | None]:
    """(the report of :func:`describe`, why the submission would be refused or None); nothing is submitted."""
    prepared = prepare(opts, root)
    return describe(prepared), refusal(prepared, opts.allow_secret_files)


@contextmanager
def staged_runtime_env(submission: Submission) -> Iterator[dict[str, Any]]:
    """The runtime env to send: the merged one with the working dir and every local py_modules entry as a
    temporary copy of exactly what its plan lets travel (a folder keeps its name: Ray imports it by that name),
    removed once the upload is done."""
    temp = Path(tempfile.mkdtemp(prefix="lance-submit-"))
    try:
        upload = submission.upload
        working_dir = None
        if upload.root is not None or upload.files:
            working_dir = temp / "working_dir"
            _copy(upload, working_dir)
        entries = []
        for index, module in enumerate(submission.modules):
            if module.upload is None:
                entries.append(module.source)
                continue
            folder = temp / "py_modules" / str(index)
            _copy(module.upload, folder if module.is_file else folder / module.name)
            entries.append(str(folder / module.path.name if module.is_file else folder / module.name))
        yield runtime_env(working_dir, {}, entries, submission.runtime_env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def submit(opts: SubmitOptions, root: Path | None = None) -> str:
    """Upload the working dir and the py_modules (see :func:`prepare`) and submit the job; returns the
    submission id."""
    prepared = prepare(opts, root)
    if refused := refusal(prepared, opts.allow_secret_files):
        raise SubmitError(refused)
    api = client(opts.address)
    with staged_runtime_env(prepared) as sent:
        return api.submit_job(
            entrypoint=prepared.entrypoint,
            runtime_env=sent,
            submission_id=opts.submission_id or new_submission_id(opts.job),
            metadata={"lance_job": opts.job, "config": prepared.config or ""},
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
    """Every job of the cluster, submitted or not. ``id`` is what names it: the submission id, else (a driver
    started by ``ray.init`` or through Ray Client, which has none) its Ray job id, else ``-``."""
    rows = []
    for info in client(address).list_jobs():
        ident = info.submission_id or getattr(info, "job_id", None) or "-"
        rows.append({"id": ident, "submission_id": info.submission_id, "type": _job_type(info),
                     "status": str(info.status.value), "job": (info.metadata or {}).get("lance_job", ""),
                     "entrypoint": info.entrypoint or ""})
    return rows


def _job_type(info) -> str:
    """SUBMISSION or DRIVER (Ray's JobType), lower case; ``submission`` when the API does not say."""
    kind = getattr(info, "type", None)
    return str(getattr(kind, "value", kind) or "submission").lower()
