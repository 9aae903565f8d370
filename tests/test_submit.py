"""``lance submit`` without a cluster: what travels, the entrypoint, config staging, option checks, and the
calls made to the Job Submission API (a recording stand-in for JobSubmissionClient)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lance_core.config import ConfigError, load_config
from pipelines import submit as api

ROOT = Path(__file__).resolve().parents[1]


class RecordingClient:
    def __init__(self, logs: list[str] | None = None, status: str = "SUCCEEDED") -> None:
        self.submitted: list[dict] = []
        self.logs = logs or []
        self.status = status
        self.staged_seen: list[bool] = []
        self.root = ROOT

    def submit_job(self, **kwargs):
        config = kwargs["metadata"]["config"]
        self.staged_seen.append(bool(config) and (self.root / config).is_file())
        self.submitted.append(kwargs)
        return kwargs["submission_id"]

    async def tail_job_logs(self, submission_id):
        for chunk in self.logs:
            yield chunk

    def get_job_status(self, submission_id):
        from ray.job_submission import JobStatus

        return JobStatus(self.status)


@pytest.fixture
def recording(monkeypatch):
    client = RecordingClient(logs=["line one\n", "line two\n"])
    monkeypatch.setattr(api, "client", lambda address: client)
    return client


def test_entrypoint_is_the_job_module_with_its_config_and_quoted_args():
    args = ("--data", "s3://b/x y", "--steps", "2")
    command = api.entrypoint("train", "jobs/configs/train tiny.yaml", args)
    assert shlex.split(command) == ["python", "-m", "jobs.train", "--config", "jobs/configs/train tiny.yaml",
                                    "--data", "s3://b/x y", "--steps", "2"]
    assert api.entrypoint("precompute", None) == "python -m jobs.precompute"


@pytest.mark.parametrize("path,left_out", [
    (".venv/lib/python3.11/site.py", True), (".git/HEAD", True), ("runs/latents/x.parquet", True),
    ("bench/results/a.json", True), ("pipelines/__pycache__/a.pyc", True),
    ("lance_train.egg-info/PKG-INFO", True), ("weights/model.safetensors", True),
    ("jobs/configs/train_tiny.yaml", False), ("pipelines/submit.py", False),
    ("bench/precompute.py", False),
])
def test_what_stays_behind(path, left_out):
    assert api.excluded(Path(path)) is left_out


def test_large_files_stay_behind(tmp_path):
    (tmp_path / "small.py").write_text("x = 1\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blob.bin").write_bytes(b"\0" * 2048)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "huge.bin").write_bytes(b"\0" * 4096)
    assert api.large_files(tmp_path, limit=1024) == ["data/blob.bin"]
    runtime = api.runtime_env(tmp_path, {})
    assert runtime["working_dir"] == str(tmp_path)
    assert "/data/blob.bin" not in runtime["excludes"], "only files above MAX_FILE_BYTES are listed"
    assert {".venv/", ".git/", "runs/", "bench/results/"} <= set(runtime["excludes"])


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    (root / "jobs" / "configs").mkdir(parents=True)
    (root / "jobs" / "configs" / "a.yaml").write_text("steps: 2\n")
    return root


def test_config_outside_the_project_is_staged_then_removed(project, tmp_path):
    outside = tmp_path / "my run.yaml"
    outside.write_text("steps: 3\n")
    with api.staged_config(str(outside), project) as config:
        assert config.startswith(f"{api.STAGING_DIR}/") and config.endswith("my run.yaml")
        assert (project / config).read_text() == "steps: 3\n"
        assert not api.excluded(Path(config)), "the staged copy must travel"
    assert not (project / config).exists() and not (project / api.STAGING_DIR).exists()


def test_config_in_an_excluded_folder_is_staged(project):
    (project / "runs").mkdir()
    (project / "runs" / "b.yaml").write_text("steps: 1\n")
    with api.staged_config(str(project / "runs" / "b.yaml"), project) as config:
        assert config.startswith(f"{api.STAGING_DIR}/")
    with api.staged_config(str(project / "jobs" / "configs" / "a.yaml"), project) as config:
        assert config == "jobs/configs/a.yaml"


def test_missing_config_is_named():
    with pytest.raises(api.SubmitError, match="nope.yaml"), api.staged_config("nope.yaml", ROOT):
        pass


def test_options_refuse_credentials_and_the_gcs_address():
    with pytest.raises(ConfigError) as err:
        load_config(api.SubmitOptions, {"job": "train", "address": "10.0.0.1:6379",
                                        "env": {"AWS_SECRET_ACCESS_KEY": "x"}}, prefix="submit")
    text = str(err.value)
    assert "submit.address" in text and "submit.env" in text and "AWS_SECRET_ACCESS_KEY" in text
    assert "'x'" not in text, "a credential value is never echoed"
    with pytest.raises(ConfigError, match="submit.job"):
        load_config(api.SubmitOptions, {"job": "demo"}, prefix="submit")


def test_default_address(monkeypatch):
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert api.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert api.default_address() == "http://127.0.0.1:8265", "a GCS address is not the job API"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert api.default_address() == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert api.default_address() == "http://api:8265"


def test_submit_sends_the_working_dir_the_entrypoint_and_the_resources(recording, project, tmp_path):
    outside = tmp_path / "cfg.yaml"
    outside.write_text("partition_size: 4\n")
    opts = api.SubmitOptions(job="precompute", config=str(outside), job_args=("--input", "s3://b/raw"),
                             env={"DS_ACCELERATOR": "cpu"}, entrypoint_resources={"worker_node": 1},
                             entrypoint_num_cpus=1)
    recording.root = project
    submission_id = api.submit(opts, root=project)
    call = recording.submitted[0]
    assert submission_id.startswith("lance-precompute-") and call["submission_id"] == submission_id
    assert call["entrypoint"].startswith("python -m jobs.precompute --config .lance-submit/")
    assert call["entrypoint"].endswith("--input s3://b/raw")
    assert call["runtime_env"]["working_dir"] == str(project)
    assert call["runtime_env"]["env_vars"] == {"DS_ACCELERATOR": "cpu"}
    assert call["entrypoint_resources"] == {"worker_node": 1} and call["entrypoint_num_cpus"] == 1
    assert call["entrypoint_num_gpus"] is None
    assert call["metadata"]["lance_job"] == "precompute"
    assert recording.staged_seen == [True], "the staged config exists while the upload runs"
    assert not (project / call["metadata"]["config"]).exists()


def test_follow_prints_the_logs_and_returns_the_final_status(recording, capsys):
    assert api.follow("http://x:8265", "id") == "SUCCEEDED"
    assert capsys.readouterr().out == "line one\nline two\n"


def test_cli_exit_codes(recording, capsys):
    from jobs import submit as cli

    recording.status = "FAILED"
    config = str(ROOT / "jobs/configs/precompute_tiny.yaml")
    assert cli.main(["precompute", "--config", config, "--address", "http://x:8265",
                     "--", "--input", "runs/synth", "--output", "s3://b/out"]) == 1
    captured = capsys.readouterr()
    assert "submitted lance-precompute-" in captured.out and ": FAILED" in captured.out
    assert "--input runs/synth is a local path" in captured.err and "s3://b/out" not in captured.err
    recording.status = "SUCCEEDED"
    assert cli.main(["train", "--config", str(ROOT / "jobs/configs/train_tiny.yaml"), "--no-wait"]) == 0
    assert cli.main(["tune", "--env", "GITHUB_TOKEN=abc"]) == 2
    assert "GITHUB_TOKEN looks like a credential" in capsys.readouterr().err
    assert cli.main(["grpo", "--entrypoint-resources", "{bad"]) == 2


def test_unreachable_job_api_is_reported():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "status", "some-id", "--address",
                          "http://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 1
    assert "cannot reach the Ray job API at http://127.0.0.1:9" in out.stderr


def test_refused_token_is_reported(recording, monkeypatch, capsys):
    from ray.exceptions import AuthenticationError

    from jobs import submit as cli

    def refuse(submission_id):
        raise AuthenticationError("Authentication failed: Forbidden: Invalid authentication token")

    recording.get_job_info = refuse
    assert cli.main(["status", "some-id", "--address", "http://x:8265"]) == 1
    assert "lance submit: http://x:8265: Authentication failed" in capsys.readouterr().err


SECRETS = [".env", ".env.production", ".aws/credentials", ".ssh/id_ed25519", "deploy/tls.key", "certs/server.pem",
           "nested/secrets.yaml", ".git-credentials", "keys/store.p12", "gcp/credentials.json"]


@pytest.fixture
def project_with_secrets(project) -> Path:
    for name in [*SECRETS, ".env.example", ".venv/lib/certifi/cacert.pem", "runs/out/.env", "pipelines/keys.py"]:
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("AWS_SECRET_ACCESS_KEY=not-a-real-one\n")
    return project


def _uploaded(root: Path, excludes: list[str]) -> set[str]:
    """The files Ray's own packaging of the working dir takes, with ``excludes`` (without .gitignore)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: set[str] = set()
    _dir_travel(root, [_get_excludes(root, excludes)],
                lambda p: files.add(p.relative_to(root).as_posix()) if p.is_file() else None, include_gitignore=False)
    return files


def test_secret_like_files_are_found_and_never_travel(project_with_secrets):
    root = project_with_secrets
    assert api.secret_files(root) == sorted(SECRETS), "templates and already excluded folders are not reported"
    uploaded = _uploaded(root, api.runtime_env(root, {})["excludes"])
    assert not uploaded & {*SECRETS, ".env.example"}, sorted(uploaded)
    assert {"jobs/configs/a.yaml", "pipelines/keys.py"} <= uploaded
    for name in SECRETS:
        assert api.excluded(Path(name)), name


def test_the_project_itself_holds_no_secret_like_file():
    assert api.secret_files(ROOT) == []


def test_submit_refuses_a_working_dir_with_secrets_unless_allowed(recording, project_with_secrets):
    root = project_with_secrets
    recording.root = root
    with pytest.raises(api.SubmitError) as err:
        api.submit(api.SubmitOptions(job="train"), root=root)
    text = str(err.value)
    assert ".env" in text and ".aws/credentials" in text and "--allow-secret-files" in text
    assert ".env.example" not in text and "not-a-real-one" not in text
    assert recording.submitted == [], "nothing was submitted"
    api.submit(api.SubmitOptions(job="train", allow_secret_files=True), root=root)
    excludes = recording.submitted[0]["runtime_env"]["excludes"]
    assert not _uploaded(root, excludes) & set(SECRETS), "allowed, but still left behind"


def test_cli_flag_allows_secret_files(recording, project_with_secrets, monkeypatch, capsys):
    from jobs import submit as cli

    monkeypatch.setattr(api, "PROJECT_ROOT", project_with_secrets)
    recording.root = project_with_secrets
    assert cli.main(["train", "--no-wait"]) == 1
    assert "look like credentials" in capsys.readouterr().err and recording.submitted == []
    assert cli.main(["train", "--no-wait", "--allow-secret-files"]) == 0
    assert len(recording.submitted) == 1


def test_a_config_named_like_a_credential_is_refused(project):
    (project / "secrets.yaml").write_text("steps: 1\n")
    with pytest.raises(api.SubmitError, match="name of a credential file"), \
            api.staged_config(str(project / "secrets.yaml"), project):
        pass
