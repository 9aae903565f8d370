"""``lance submit`` without a cluster: what travels, the entrypoint, config staging, option checks, and the
calls made to the Job Submission API (a recording stand-in for JobSubmissionClient)."""

from __future__ import annotations

import logging
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
        self.uploaded: list[set[str]] = []
        self.modules: list[dict[str, set[str] | None]] = []

    def submit_job(self, **kwargs):
        """Records what Ray's own packaging would take from the working dir (none: an empty set) and from each
        py_modules entry (by the name it is imported by; a URI: None), while they exist."""
        config = kwargs["metadata"]["config"]
        runtime = kwargs["runtime_env"]
        working_dir = Path(runtime["working_dir"]) if "working_dir" in runtime else None
        self.staged_seen.append(bool(config) and working_dir is not None and (working_dir / config).is_file())
        self.uploaded.append(_uploaded(working_dir) if working_dir else set())
        self.modules.append({_module_name(entry): _module_files(entry) for entry in runtime.get("py_modules", [])})
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
    upload = api.plan_upload(tmp_path, limit=1024)
    assert upload.files == {"small.py": 6} and upload.left_out["runs/"] == "excluded (runs/)"
    with api.staged_working_dir(upload) as working_dir:
        assert _uploaded(working_dir) == {"small.py"}
        assert api.runtime_env(working_dir, {}) == {"working_dir": str(working_dir)}
    assert not working_dir.exists(), "the staged copy is removed after the upload"


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    (root / "jobs" / "configs").mkdir(parents=True)
    (root / "jobs" / "configs" / "a.yaml").write_text("steps: 2\n")
    return root


def test_config_outside_the_project_travels_in_the_staging_dir(project, tmp_path):
    outside = tmp_path / "my run.yaml"
    outside.write_text("steps: 3\n")
    upload = api.plan_upload(project)
    config = api.add_config(upload, str(outside))
    assert config.startswith(f"{api.STAGING_DIR}/") and config.endswith("my run.yaml")
    assert not (project / api.STAGING_DIR).exists(), "nothing is written into the project"
    with api.staged_working_dir(upload) as working_dir:
        assert (working_dir / config).read_text() == "steps: 3\n"
        assert config in _uploaded(working_dir), "the staged copy must travel"
    assert not working_dir.exists()


def test_config_in_an_excluded_folder_is_staged(project):
    (project / "runs").mkdir()
    (project / "runs" / "b.yaml").write_text("steps: 1\n")
    upload = api.plan_upload(project)
    assert api.add_config(upload, str(project / "runs" / "b.yaml")).startswith(f"{api.STAGING_DIR}/")
    assert api.add_config(upload, str(project / "jobs" / "configs" / "a.yaml")) == "jobs/configs/a.yaml"


def test_missing_config_is_named():
    with pytest.raises(api.SubmitError, match="nope.yaml"):
        api.add_config(api.Upload(ROOT), "nope.yaml")


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
    submission_id = api.submit(opts, root=project)
    call = recording.submitted[0]
    assert submission_id.startswith("lance-precompute-") and call["submission_id"] == submission_id
    assert call["entrypoint"].startswith("python -m jobs.precompute --config .lance-submit/")
    assert call["entrypoint"].endswith("--input s3://b/raw")
    assert recording.uploaded == [{"jobs/configs/a.yaml", call["metadata"]["config"]}]
    assert call["runtime_env"]["env_vars"] == {"DS_ACCELERATOR": "cpu"}
    assert call["entrypoint_resources"] == {"worker_node": 1} and call["entrypoint_num_cpus"] == 1
    assert call["entrypoint_num_gpus"] is None
    assert call["metadata"]["lance_job"] == "precompute"
    assert recording.staged_seen == [True], "the staged config exists while the upload runs"
    assert not Path(call["runtime_env"]["working_dir"]).exists() and not (project / api.STAGING_DIR).exists()


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


def test_usage_shows_the_job_arguments_after_the_double_dash(capsys):
    from jobs import submit as cli

    for argv in (["--help"], ["train", "--help"], ["precompute", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        usage = capsys.readouterr().out.split("\n\n", 1)[0]
        assert usage.startswith("usage: lance submit") and usage.endswith(" [-- JOB ARGS ...]"), usage
    with pytest.raises(SystemExit):
        cli.main(["list", "--help"])
    assert "JOB ARGS" not in capsys.readouterr().out, "list takes no job arguments"


def test_list_shows_jobs_without_a_submission_id(recording, capsys):
    """A driver started by ``ray.init`` (or through Ray Client) has no submission id: it is listed by its Ray
    job id, a job with neither by ``-``."""
    from ray.job_submission import JobDetails, JobStatus, JobType

    from jobs import submit as cli

    recording.list_jobs = lambda: [
        JobDetails(type=JobType.SUBMISSION, job_id="02000000", submission_id="lance-train-1",
                   status=JobStatus.SUCCEEDED, entrypoint="python -m jobs.train", metadata={"lance_job": "train"}),
        JobDetails(type=JobType.DRIVER, job_id="01000000", submission_id=None, status=JobStatus.RUNNING,
                   entrypoint="python notebook.py"),
        JobDetails(type=JobType.DRIVER, job_id=None, submission_id=None, status=JobStatus.FAILED, entrypoint=""),
    ]
    assert cli.main(["list", "--address", "http://x:8265"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [["lance-train-1", "submission", "SUCCEEDED", "python", "-m", "jobs.train"],
                     ["01000000", "driver", "RUNNING", "python", "notebook.py"], ["-", "driver", "FAILED"]]
    assert [row["submission_id"] for row in api.list_jobs("http://x:8265")] == ["lance-train-1", None, None]


SECRETS = [".env", ".env.production", ".aws/credentials", ".ssh/id_ed25519", "deploy/tls.key", "certs/server.pem",
           "nested/secrets.yaml", ".git-credentials", "keys/store.p12", "gcp/credentials.json"]


@pytest.fixture
def project_with_secrets(project) -> Path:
    for name in [*SECRETS, ".env.example", ".venv/lib/certifi/cacert.pem", "runs/out/.env", "pipelines/keys.py"]:
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("AWS_SECRET_ACCESS_KEY=not-a-real-one\n")
    return project


def _uploaded(root: Path) -> set[str]:
    """The files Ray's own packaging of a working dir takes (with .gitignore, as ``ray job submit`` does)."""
    from ray._private.runtime_env.packaging import _dir_travel

    files: set[str] = set()
    _dir_travel(root, [], lambda p: files.add(p.relative_to(root).as_posix()) if p.is_file() else None,
                include_gitignore=True)
    return files


def _module_name(entry: str) -> str:
    return entry if "://" in entry else Path(entry).name


def _module_files(entry: str) -> set[str] | None:
    """What Ray's packaging takes from a py_modules entry: a folder's files, a file itself, nothing of a URI."""
    if "://" in entry:
        return None
    path = Path(entry)
    return _uploaded(path) if path.is_dir() else {path.name}


def _staged(root: Path) -> set[str]:
    """What travels from ``root``: Ray's packaging of the staged copy, which must equal the plan's list."""
    upload = api.plan_upload(root)
    with api.staged_working_dir(upload) as working_dir:
        files = _uploaded(working_dir)
    assert files == set(upload.files)
    return files


def test_secret_like_files_are_found_and_never_travel(project_with_secrets):
    root = project_with_secrets
    assert api.secret_files(root) == sorted(SECRETS), "templates and already excluded folders are not reported"
    uploaded = _staged(root)
    assert not uploaded & {*SECRETS, ".env.example"}, sorted(uploaded)
    assert {"jobs/configs/a.yaml", "pipelines/keys.py"} <= uploaded
    for name in SECRETS:
        assert api.excluded(Path(name)), name


def test_the_project_itself_holds_no_secret_like_file():
    assert api.secret_files(ROOT) == []


def test_submit_refuses_a_working_dir_with_secrets_unless_allowed(recording, project_with_secrets):
    root = project_with_secrets
    with pytest.raises(api.SubmitError) as err:
        api.submit(api.SubmitOptions(job="train"), root=root)
    text = str(err.value)
    assert ".env" in text and ".aws/credentials" in text and "--allow-secret-files" in text
    assert ".env.example" not in text and "not-a-real-one" not in text
    assert recording.submitted == [], "nothing was submitted"
    api.submit(api.SubmitOptions(job="train", allow_secret_files=True), root=root)
    assert recording.uploaded[0] and not recording.uploaded[0] & set(SECRETS), "allowed, but still left behind"


def test_cli_flag_allows_secret_files(recording, project_with_secrets, monkeypatch, capsys):
    from jobs import submit as cli

    monkeypatch.setattr(api, "PROJECT_ROOT", project_with_secrets)
    assert cli.main(["train", "--no-wait"]) == 1
    assert "look like credentials" in capsys.readouterr().err and recording.submitted == []
    assert cli.main(["train", "--no-wait", "--allow-secret-files"]) == 0
    assert len(recording.submitted) == 1


def test_a_config_named_like_a_credential_or_holding_one_is_refused(project, tmp_path):
    (project / "secrets.yaml").write_text("steps: 1\n")
    with pytest.raises(api.SubmitError, match="name of a credential file"):
        api.add_config(api.plan_upload(project), str(project / "secrets.yaml"))
    (tmp_path / "run.yaml").write_text(f"steps: 1\ntoken: {GITHUB_TOKEN}\n")
    with pytest.raises(api.SubmitError, match="run.yaml' holds a GitHub token"):
        api.add_config(api.plan_upload(project), str(tmp_path / "run.yaml"))


# Made up here, so that no file of the project holds one (test_the_project_itself_holds_no_secret_like_file).
PRIVATE_KEY = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7x\n-----END RSA PRIVATE KEY-----\n"
SERVICE_ACCOUNT = '{"type": ' + '"service_account", "project_id": "p", "private_key_id": "0"}'
GITHUB_TOKEN = "gh" + "p_" + "a1B2c3D4" * 4 + "e5F6"
SLACK_TOKEN = "xo" + "xb-" + "1234567890-0987654321-AbCdEfGhIjKlMnOp"
AWS_KEY_ID = "AK" + "IA" + "Q3EXAMPLEZ7KEY42"
VAULT_TOKEN = "hv" + "s." + "CAESIJ2x" * 4
S3_SECRET = "aws_secret_access_key" + " = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"

CREDENTIALS = {  # path: content; each is found by its name, its folder, or what it holds
    ".s3cfg": "[default]\naccess_key = x\n", ".boto": "[Credentials]\n", "tools/rclone.conf": "[s3]\ntype = s3\n",
    "kaggle.json": '{"username": "u", "key": "k"}', ".vault-token": "x", "infra/terraform.tfstate": "{}",
    "infra/prod.tfstate.backup": "{}", "ops/.config/gcloud/credentials.db": "x",
    "ops/.config/gcloud/application_default_credentials.json": "{}", "deploy/.kube/config": "apiVersion: v1\n",
    "deploy/.docker/config.json": '{"auths": {}}', "home/.netrc": "machine x\n", "sub/.aws/config": "[default]\n",
    "deploy/ci-runner.json": SERVICE_ACCOUNT, "keys/deploy": PRIVATE_KEY, "scripts/notify.py": f"TOKEN = '{SLACK_TOKEN}'\n",
    "notes/setup.md": f"export GH={GITHUB_TOKEN}\n", "conf/aws.ini": f"id = {AWS_KEY_ID}\n",
    "conf/vault.txt": f"token: {VAULT_TOKEN}\n", "conf/storage.cfg": f"[remote]\n{S3_SECRET}\n",
}
HARMLESS = {  # what mentions credentials without holding one travels
    "pipelines/aws.py": 'os.environ["AWS_SECRET_ACCESS_KEY"]\nsecret_key = config.secret_key\n',
    "certs/ca.crt": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "docs/tokens.md": "GitHub tokens start with ghp_, Slack ones with xoxb-.\n", ".s3cfg.example": "[default]\n",
}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_credentials_by_name_folder_and_content_never_travel_and_are_refused(project):
    """Issue: .s3cfg, .boto, rclone.conf, kaggle.json, .vault-token, terraform.tfstate, a gcloud folder below
    the root and a service-account key under another name were uploaded."""
    _write(project, CREDENTIALS | HARMLESS)
    upload = api.plan_upload(project)
    assert upload.secrets == sorted(CREDENTIALS)
    assert upload.left_out["deploy/ci-runner.json"] == "holds a cloud service-account key"
    assert upload.left_out["keys/deploy"] == "holds a private key"
    assert upload.left_out["conf/storage.cfg"] == "holds an S3 secret key"
    assert upload.left_out["ops/.config/gcloud/credentials.db"] == "credential-like name (.config/gcloud/)"
    uploaded = _staged(project)
    assert not uploaded & set(CREDENTIALS)
    assert set(HARMLESS) | {"jobs/configs/a.yaml"} <= uploaded
    with pytest.raises(api.SubmitError) as err:
        api.check_no_secrets(project, allow=False)
    text = str(err.value)
    assert "deploy/ci-runner.json (holds a cloud service-account key)" in text and "and 10 more" in text
    assert "conf/aws.ini (holds an AWS access key id)" in text and ".boto (credential-like name (.boto))" in text
    assert "RSA" not in str(err.value) and GITHUB_TOKEN not in str(err.value), "no content is echoed"


def test_only_the_head_of_a_file_is_read_for_credentials(project, monkeypatch):
    monkeypatch.setattr(api, "CONTENT_HEAD_BYTES", 4096)
    _write(project, {"data/head.txt": GITHUB_TOKEN + "\n" + "x" * 8000,
                     "data/tail.txt": "x" * 8000 + "\n" + GITHUB_TOKEN})
    read: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, size=-1):
            read.append(size)
            return self.fh.read(size)

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: Counting(real_open(path, mode, *a, **k))
                        if mode == "rb" else real_open(path, mode, *a, **k))
    upload = api.plan_upload(project)
    assert upload.secrets == ["data/head.txt"] and "data/tail.txt" in upload.files
    assert read and all(0 < size <= 4096 for size in read), read


def test_symlinks_out_of_the_working_dir_never_travel(project, tmp_path):
    """Issue: a file and a folder symlinked from outside the project were uploaded. A link to a file inside the
    project that travels itself travels as a copy; nothing else a link points to does."""
    outside = tmp_path / "home"
    _write(outside, {"notes.txt": "private notes\n", "photos/a.txt": "a\n"})
    _write(project, {"pipelines/tool.py": "x = 1\n", "runs/out.txt": "run output\n"})
    links = {"notes.txt": outside / "notes.txt", "photos": outside / "photos", "tool_link.py": project / "pipelines/tool.py",
             "inner_dir": project / "pipelines", "to_runs.txt": project / "runs/out.txt",
             "dangling.txt": tmp_path / "nothing", "up.txt": project / ".." / "home" / "notes.txt"}
    for name, target in links.items():
        (project / name).symlink_to(target)
    upload = api.plan_upload(project)
    assert {name: upload.left_out.get(name) for name in links} == {
        "notes.txt": "symlink to outside the working dir", "photos": "symlink to outside the working dir",
        "tool_link.py": None, "inner_dir": "symlinked folder (not followed)",
        "to_runs.txt": "symlink to runs/out.txt, which stays behind", "dangling.txt": "broken symlink",
        "up.txt": "symlink to outside the working dir"}
    uploaded = _staged(project)
    assert uploaded == {"jobs/configs/a.yaml", "pipelines/tool.py", "tool_link.py"}
    with api.staged_working_dir(upload) as working_dir:
        assert (working_dir / "tool_link.py").read_text() == "x = 1\n"
        assert not any(p.is_symlink() for p in working_dir.rglob("*")), "Ray would follow a link"


def test_dry_run_lists_what_travels_and_what_not_and_submits_nothing(project, monkeypatch, capsys):
    from jobs import submit as cli

    def no_client(address):
        raise AssertionError("--dry-run must not reach the job API")

    monkeypatch.setattr(api, "client", no_client)
    monkeypatch.setattr(api, "PROJECT_ROOT", project)
    _write(project, {"pipelines/tool.py": "x = 1\n" * 100, ".venv/lib/a.py": "", "keys/deploy": PRIVATE_KEY})
    (project / "linked").symlink_to(project.parent)
    config = project / "jobs" / "configs" / "a.yaml"
    assert cli.main(["train", "--config", str(config), "--dry-run", "--", "--steps", "2"]) == 1
    out, err = capsys.readouterr()
    assert "would upload 2 files, 609 B, from" in out
    assert "python -m jobs.train --config jobs/configs/a.yaml --steps 2" in out
    assert "     9 B  jobs/configs/a.yaml\n" in out and "   600 B  pipelines/tool.py\n" in out
    assert "left out (3):" in out and ".venv/  -- excluded (.venv/)" in out
    assert "keys/deploy  -- holds a private key" in out and "linked  -- symlink to outside the working dir" in out
    assert "nothing submitted (--dry-run)" in out
    assert "would be refused" in err and "--allow-secret-files" in err
    assert cli.main(["train", "--config", str(config), "--dry-run", "--allow-secret-files"]) == 0
    (project / "keys" / "deploy").unlink()
    assert cli.main(["train", "--config", str(config), "--dry-run"]) == 0
    assert "would be refused" not in capsys.readouterr().err


def test_the_jobs_config_is_resolved_and_validated_here_and_relative_paths_named():
    from pipelines.submit import JobArgumentsError, resolved_job_config

    config = str(ROOT / "jobs" / "configs" / "precompute_tiny.yaml")
    resolved, relative = resolved_job_config("precompute", config, ())
    assert resolved["output"].endswith("runs/latents")
    assert relative == ["input: runs/synth/parquet", "output: runs/latents"]  # the default output too, not only flags
    _, relative = resolved_job_config("precompute", config, ("--input", "s3://bucket/in", "--output", "/shared/out"))
    assert relative == []
    with pytest.raises(JobArgumentsError, match=r"train.optim.lrr \(--set optim.lrr\)"):
        resolved_job_config("train", "train_tiny", ("--set", "optim.lrr=1"))


@pytest.fixture
def site_packages(tmp_path) -> Path:
    """lance-train installed non-editable: its packages beside every other one of the environment."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    _write(site, {"jobs/__init__.py": "", "jobs/configs/a.yaml": "steps: 2\n", "jobs/__pycache__/a.cpython-311.pyc": "",
                  "pipelines/__init__.py": "", "pipelines/submit.py": "x = 1\n", "lance_core/__init__.py": "",
                  "certifi/cacert.pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                  "requests/__init__.py": "", "lance_train-0.1.0.dist-info/RECORD": ""})
    return site


def test_an_installed_lance_train_uploads_no_site_packages(recording, site_packages, tmp_path, caplog):
    """Issue: installed non-editable, the project folder found from the package is site-packages: every package
    of the environment was to be uploaded, and was refused for the CA bundles in it. Now nothing of it is the
    working dir; lance-train's own packages travel as py_modules, and a log line says so."""
    caplog.set_level(logging.INFO, logger="lance.submit")
    config = str(site_packages / "jobs" / "configs" / "a.yaml")
    api.submit(api.SubmitOptions(job="train", config=config), root=site_packages)
    staged = recording.submitted[0]["metadata"]["config"]
    assert staged.startswith(f"{api.STAGING_DIR}/") and recording.uploaded == [{staged}], "the config only"
    assert recording.staged_seen == [True]
    assert recording.modules == [{"jobs": {"__init__.py", "configs/a.yaml"}, "pipelines": {"__init__.py", "submit.py"},
                                  "lance_core": {"__init__.py"}}]
    assert f"{site_packages} is not uploaded; its packages jobs, pipelines, lance_core travel as py_modules" in caplog.text
    api.submit(api.SubmitOptions(job="train"), root=site_packages)
    assert "working_dir" not in recording.submitted[1]["runtime_env"], "no config: no working dir at all"
    assert set(recording.modules[1]) == {"jobs", "pipelines", "lance_core"}
    _write(tmp_path, {"mine/jobs/__init__.py": ""})
    with pytest.raises(api.SubmitError, match="would both be imported as jobs"):
        api.prepare(api.SubmitOptions(job="train", py_modules=(str(tmp_path / "mine" / "jobs"),)), root=site_packages)
    with pytest.raises(api.SubmitError, match="inside an installation"):
        api.prepare(api.SubmitOptions(job="train", working_dir=str(site_packages)), root=site_packages)


def test_working_dir_option_uploads_that_folder_by_the_same_rules(recording, project, tmp_path):
    """--working-dir uploads another folder (a user's own reward module) under the rules of the project's
    upload; lance-train's code then travels as py_modules from its source checkout."""
    mine = tmp_path / "mine"
    _write(mine, {"my_reward/__init__.py": "def score(images, prompts): ...\n", ".env": "X=1\n", "runs/a.txt": "x"})
    (mine / "home").symlink_to(tmp_path)
    opts = api.SubmitOptions(job="grpo", working_dir=str(mine), config=str(project / "jobs" / "configs" / "a.yaml"))
    with pytest.raises(api.SubmitError, match=rf"the working dir {mine} holds .*\.env \(credential-like name"):
        api.submit(opts, root=project)
    (mine / ".env").unlink()
    assert api.plan_upload(mine).left_out["home"] == "symlink to outside the working dir"
    api.submit(opts, root=project)
    config = recording.submitted[0]["metadata"]["config"]
    assert config.startswith(f"{api.STAGING_DIR}/"), "a config outside the working dir is carried in"
    assert recording.uploaded == [{"my_reward/__init__.py", config}]
    assert recording.modules == [{"jobs": {"configs/a.yaml"}}], "lance-train's code travels as py_modules"
    api.submit(opts.model_copy(update={"working_dir": str(project)}), root=project)
    assert recording.modules[1] == {}, "the source checkout as working dir holds the code itself"
    for bad, message in ((mine / "my_reward" / "__init__.py", "is not a folder"), (tmp_path / "nope", "not a folder"),
                         ("s3://bucket/wd.zip", "give a local folder")):
        with pytest.raises(api.SubmitError, match=message):
            api.prepare(api.SubmitOptions(job="train", working_dir=str(bad)), root=project)


def test_py_modules_travel_by_the_rules_of_the_working_dir(recording, project, tmp_path):
    """--py-modules: a package folder travels as the working dir does (credential files and links out stay
    behind, and refuse the submission unless allowed), a .py module is checked by name and content, a URI is
    sent as it is, a local wheel (not checkable) is refused, and two entries imported by one name too."""
    rewards = tmp_path / "src" / "rewards"
    _write(rewards, {"__init__.py": "", "ocr.py": "x = 1\n", "keys/deploy": PRIVATE_KEY, ".aws/credentials": "[x]\n",
                     "__pycache__/ocr.cpython-311.pyc": ""})
    (tmp_path / "notes.txt").write_text("private\n")
    (rewards / "notes.txt").symlink_to(tmp_path / "notes.txt")
    scorer = tmp_path / "scorer.py"
    scorer.write_text("def score(images, prompts): ...\n")
    opts = api.SubmitOptions(job="grpo", py_modules=(str(rewards), str(scorer), "s3://bucket/pkg.zip"))
    with pytest.raises(api.SubmitError) as err:
        api.submit(opts, root=project)
    text = str(err.value)
    assert f"the py_modules entry {rewards} holds" in text and "keys/deploy (holds a private key)" in text
    assert ".aws/credentials (credential-like name (.aws/))" in text and "--allow-secret-files" in text
    assert "BEGIN" not in text and recording.submitted == []
    api.submit(opts.model_copy(update={"allow_secret_files": True}), root=project)
    assert recording.modules == [{"rewards": {"__init__.py", "ocr.py"}, "scorer.py": {"scorer.py"},
                                  "s3://bucket/pkg.zip": None}]
    assert recording.uploaded == [{"jobs/configs/a.yaml"}], "the project is still the working dir"
    (tmp_path / "notify.py").write_text(f"TOKEN = '{GITHUB_TOKEN}'\n")
    (tmp_path / "secrets.py").write_text("x = 1\n")
    (tmp_path / "pkg-0.1-py3-none-any.whl").write_bytes(b"PK")
    (tmp_path / "other" / "rewards").mkdir(parents=True)
    for entry, message in (("notify.py", "notify.py' cannot travel: holds a GitHub token"),
                           ("secrets.py", r"secrets.py' cannot travel: credential-like name \(secrets\.\*\)"),
                           ("pkg-0.1-py3-none-any.whl", "a local wheel travels whole"),
                           ("other/rewards", "would both be imported as rewards"), ("missing", "does not exist")):
        with pytest.raises(api.SubmitError, match=message):
            api.prepare(api.SubmitOptions(job="grpo", py_modules=(str(rewards), str(tmp_path / entry))),
                        root=project)


def test_the_runtime_env_is_merged_with_what_lance_submit_sets(recording, project, tmp_path):
    """--runtime-env as for ray job submit: pip and the rest pass through, env_vars merge with --env, its
    working_dir and py_modules are planned like --working-dir and --py-modules, its excludes apply to the plans;
    what both set differently is refused, by name."""
    mine = tmp_path / "mine"
    _write(mine, {"my_reward.py": "x = 1\n", "notes/draft.txt": "x\n"})
    _write(tmp_path, {"helpers/__init__.py": "", "helpers/notes/a.txt": "x\n"})
    user = {"pip": ["scikit-learn==1.5.0"], "env_vars": {"A": "1", "B": "2"}, "working_dir": str(mine),
            "py_modules": [str(tmp_path / "helpers")], "excludes": ["notes/"], "config": {"setup_timeout_seconds": 900}}
    opts = api.SubmitOptions(job="train", runtime_env=user, env={"B": "2", "C": "3"})
    api.submit(opts, root=project)
    sent = recording.submitted[0]["runtime_env"]
    assert sent["pip"] == ["scikit-learn==1.5.0"] and sent["config"] == {"setup_timeout_seconds": 900}
    assert sent["env_vars"] == {"A": "1", "B": "2", "C": "3"} and "excludes" not in sent, "excludes applied here"
    assert recording.uploaded == [{"my_reward.py"}]
    assert recording.modules == [{"jobs": {"configs/a.yaml"}, "helpers": {"__init__.py"}}]
    api.submit(opts.model_copy(update={"working_dir": str(mine), "py_modules": (str(tmp_path / "helpers"),)}),
               root=project)
    assert recording.modules[1] == recording.modules[0], "the same folder given twice is one"
    for update, message in (
            ({"env": {"B": "9", "C": "3"}}, "^B: set differently by --env and by the runtime env's env_vars"),
            ({"working_dir": str(project)}, f"two working dirs: --working-dir {project} and the runtime env's .* {mine}"),
            ({"runtime_env": {"working_dir": "s3://b/wd.zip"}}, "the runtime env's working_dir: give a local folder"),
            ({"runtime_env": {"pip": ["x"], "conda": {"dependencies": ["y"]}}}, "the runtime env: The 'pip' field"),
            ({"runtime_env": {"py_modules": "helpers"}}, "py_modules: give a list")):
        with pytest.raises(api.SubmitError, match=message):
            api.prepare(opts.model_copy(update=update), root=project)


def test_a_runtime_env_file_is_read_as_ray_job_submit_reads_it(tmp_path):
    (tmp_path / "env.yaml").write_text("pip: [scikit-learn]\nenv_vars: {MODE: fast}\n")
    assert api.load_runtime_env(str(tmp_path / "env.yaml")) == {"pip": ["scikit-learn"], "env_vars": {"MODE": "fast"}}
    (tmp_path / "env.json").write_text('{"pip": ["scikit-learn"]}')
    assert api.load_runtime_env(str(tmp_path / "env.json")) == {"pip": ["scikit-learn"]}
    assert api.load_runtime_env(text='{"env_vars": {"MODE": "fast"}}') == {"env_vars": {"MODE": "fast"}}
    assert api.load_runtime_env() == {}
    (tmp_path / "bad.yaml").write_text(f"env_vars:\n  GH: [{GITHUB_TOKEN}\n")
    (tmp_path / "list.yaml").write_text("- pip\n")
    for kwargs, message in (({"path": str(tmp_path / "bad.yaml")}, r"bad.yaml is not YAML or JSON \(line"),
                            ({"path": str(tmp_path / "list.yaml")}, "give a mapping"),
                            ({"path": str(tmp_path / "nope.yaml")}, "cannot read"),
                            ({"text": "{bad"}, r"--runtime-env-json\): not JSON"),
                            ({"path": str(tmp_path / "env.yaml"), "text": "{}"}, "not both")):
        with pytest.raises(ConfigError, match=message) as err:
            api.load_runtime_env(**kwargs)
        assert GITHUB_TOKEN not in str(err.value)


def test_credentials_in_the_runtime_env_or_the_command_are_refused(recording, project):
    """Ray records every job's runtime env and command line (the dashboard and ray job list show them): a
    credential there is refused even with --allow-secret-files, naming where it is (never its value) and the
    cluster-side way to give it."""
    url = "https://deploy:" + "hunter2hunter2" + "@pypi.internal/simple"
    cases = [({"env_vars": {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"}}, (),
              "env_vars.AWS_SECRET_ACCESS_KEY (a credential's name)", "wJalrXUtnFEMI"),
             ({"env_vars": {"GH": GITHUB_TOKEN}}, (), "env_vars.GH (holds a GitHub token)", GITHUB_TOKEN),
             ({"pip": [f"--index-url {url}", "scikit-learn"]}, (), "pip.packages[0] (holds a password in a URL)",
              "hunter2"),
             ({}, ("--set", f"rewards.token={GITHUB_TOKEN}"), "the job's command line (holds a GitHub token)",
              GITHUB_TOKEN)]
    for runtime, job_args, where, value in cases:
        opts = api.SubmitOptions(job="train", runtime_env=runtime, job_args=job_args, allow_secret_files=True)
        with pytest.raises(api.SubmitError) as err:
            api.submit(opts, root=project)
        text = str(err.value)
        assert where in text and "Kubernetes Secret" in text and value not in text, text
        report, refused = api.dry_run(opts, root=project)
        assert refused == text and value not in report
    assert recording.submitted == []
    with pytest.raises(ConfigError) as err:
        load_config(api.SubmitOptions, {"job": "train", "env": {"GH": GITHUB_TOKEN}}, prefix="submit")
    assert "GH holds a GitHub token" in str(err.value) and GITHUB_TOKEN not in str(err.value)


def test_dry_run_shows_the_working_dir_the_py_modules_and_the_runtime_env(project, tmp_path, monkeypatch, capsys):
    from jobs import submit as cli

    def no_client(address):
        raise AssertionError("--dry-run must not reach the job API")

    monkeypatch.setattr(api, "client", no_client)
    monkeypatch.setattr(api, "PROJECT_ROOT", project)
    _write(tmp_path, {"rewards/__init__.py": "x = 1\n",
                      "runtime.yaml": f"pip: [scikit-learn]\nenv_vars: {{MODE: fast, GITHUB_TOKEN: {GITHUB_TOKEN}}}\n"})
    config = str(project / "jobs" / "configs" / "a.yaml")
    args = ["train", "--config", config, "--dry-run", "--py-modules", str(tmp_path / "rewards"),
            "--env", "DS_ACCELERATOR=cpu"]
    assert cli.main([*args, "--runtime-env", str(tmp_path / "runtime.yaml")]) == 1
    out, err = capsys.readouterr()
    assert f"would upload 1 files, 9 B, from {project}, and run: python -m jobs.train --config jobs/configs/a.yaml" in out
    assert f"lance-train travels in the working dir (the source checkout {project})" in out
    assert f"py_modules rewards: would upload 1 files, 6 B, from {tmp_path / 'rewards'}\n" in out
    assert '"GITHUB_TOKEN": "<masked>"' in out and '"MODE": "fast"' in out and '"DS_ACCELERATOR": "cpu"' in out
    assert f'"working_dir": "{project}"' in out and f'"{tmp_path / "rewards"}"' in out and '"scikit-learn"' in out
    assert "credentials would be recorded with the job" in err and GITHUB_TOKEN not in out + err
    assert cli.main([*args, "--runtime-env-json", '{"env_vars": {"MODE": "fast"}}', "--working-dir",
                     str(tmp_path / "rewards")]) == 0
    out, err = capsys.readouterr()
    assert f"from {tmp_path / 'rewards'}, and run: python -m jobs.train --config .lance-submit/" in out
    assert "py_modules jobs: would upload 1 files" in out and "would be refused" not in err
    with pytest.raises(SystemExit):
        cli.main([*args, "--runtime-env", str(tmp_path / "runtime.yaml"), "--runtime-env-json", "{}"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_variable_named_like_a_credential_is_told_from_an_ordinary_one():
    from pipelines.submit import SECRET_NAME

    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DB_PASSWORD", "OPENAI_API_KEY", "TOKEN"):
        assert SECRET_NAME.search(name), name
    for name in ("TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "OMP_NUM_THREADS"):
        assert not SECRET_NAME.search(name), name
