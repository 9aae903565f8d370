"""Jobs on a real two-node Ray cluster on this machine, submitted with ``lance submit`` through the Jobs API.

The cluster is private to the test: its own temp dir (``ray.init()`` elsewhere never finds it), its own free
ports, token authentication, the dashboard on 127.0.0.1. Each node is a ``ray start --block`` process in its
own session; the test talks to the cluster only over HTTP and through subprocesses, and tears down only the
processes it started. One cluster for the module (its start is the costly part): a worker node is killed
mid-precompute and the job resubmitted (nothing is lost or written twice); a training job reads the shards;
a GRPO run over both nodes loses one and its resubmission resumes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

PRECOMPUTE = {
    # One partition per sample, decoded one at a time: the run is paced so the node loss lands mid-run.
    "partition_size": 1, "manifest_every": 1, "filters": {"dedup": False}, "video": {"max_seconds": 1.0},
    "buckets": {"image_area": 64 * 64, "video_area": 64 * 96, "vit_area": 56 * 56},
    "model": {"preset": "tiny"}, "encoders": {"vae_actors": 1, "vit_actors": 1, "batch_size": 8,
                 "cpus_per_actor": 0.5, "max_decode_tasks": 1},
}
INPUTS = 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """A multi-node Ray cluster made of ``ray start --block`` processes on this machine."""

    def __init__(self) -> None:
        # Short root: Ray's unix sockets live under it and their paths are limited to ~100 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lrc-"))
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        ours = ("RAY_ADDRESS", "RAY_AUTH", "RAY_API")
        env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
        self.env = {
            **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
            # A lost node is declared dead after ~3 s instead of ~30 s.
            "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
            "RAY_health_check_failure_threshold": "5",
        }
        self.nodes: dict[str, subprocess.Popen] = {}

    def _ports(self) -> list[str]:
        names = ("node-manager-port", "object-manager-port", "metrics-export-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
        return [f"--{name}={_free_port()}" for name in names]

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.temp_dir / f"{name}.log", "w") as log:
            self.nodes[name] = subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
                 "--object-store-memory=200000000", *self._ports(), *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir)

    def start_head(self, num_cpus: int) -> None:
        self._start("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                             f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={_free_port()}", f"--num-cpus={num_cpus}"])

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> None:
        self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1",
                           f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}"])

    def get(self, path: str, token: str | None = "") -> dict:
        headers = {} if token is None else {"Authorization": f"Bearer {token or self.token}"}
        request = urllib.request.Request(self.address + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> int:
        nodes = self.get("/nodes?view=summary")["data"]["summary"]
        return sum(1 for node in nodes if node["raylet"]["state"] == "ALIVE")

    def wait_nodes(self, count: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    log = (self.temp_dir / f"{name}.log").read_text()
                    raise RuntimeError(f"ray node {name} exited:\n{log}")
            try:
                if self.alive_nodes() == count:
                    return
            except (urllib.error.URLError, ConnectionError, OSError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the cluster did not reach {count} live nodes")

    def kill_node(self, name: str) -> None:
        """SIGKILL a node's processes at once: its process group and everything the raylet started."""
        proc = self.nodes.pop(name)
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()

    def job(self, submission_id: str) -> dict:
        return self.get(f"/api/jobs/{submission_id}")

    def wait_job(self, submission_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(submission_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {submission_id} did not finish in {timeout} s")

    def shutdown(self) -> None:
        """SIGTERM each node's `ray start --block` (it drains and stops its node), workers before the head,
        then kill whatever is left of the processes they started."""
        children = []
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            proc = self.nodes[name]
            if proc.poll() is not None:
                continue
            try:
                children += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    # Two CPUs per node: the two encoder actors take 0.5 CPU each and a task 1 CPU, so the job still fits
    # on the head alone when the other node is gone.
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=2)
        cluster.wait_nodes(1)  # a node that joins before the head is registered gives up
        cluster.add_node("worker", num_cpus=2, resources={"worker_node": 1})
        cluster.wait_nodes(2)
        yield cluster
    finally:
        cluster.shutdown()


def lance_submit(cluster: LocalCluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def submission_id(out: subprocess.CompletedProcess) -> str:
    for line in out.stdout.splitlines():
        if line.startswith("submitted "):
            return line.split()[1]
    raise AssertionError(f"no submission id in:\n{out.stdout}\n{out.stderr}")


def check_shards(output: Path, inputs: int) -> dict:
    """inputs = written + filtered + quarantined, every partition committed, no sample_id twice."""
    from pipelines.data.manifest import read_manifest

    stats = json.loads((output / "stats.json").read_text())
    manifest, shards = read_manifest(str(output))
    assert stats["inputs"] == inputs
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"]
    assert manifest["partitions_committed"] == manifest["partitions_planned"]
    tables = [pq.read_table(output / shard["shard"]) for shard in shards]
    ids = [i for table in tables for i in table.column("sample_id")]
    assert len(ids) == len(set(ids)) == stats["samples_written"], "a sample was lost or written twice"
    return stats


@pytest.fixture(scope="module")
def precompute_config(tmp_path_factory) -> Path:
    """A config outside the project: ``lance submit`` carries it into the working dir for the upload."""
    path = tmp_path_factory.mktemp("cfg") / "precompute_cluster.yaml"
    path.write_text(yaml.safe_dump(PRECOMPUTE))
    return path


@pytest.fixture(scope="module")
def node_loss(cluster, precompute_config, tmp_path_factory) -> dict:
    """Precompute with its driver on the worker node; the node is killed after the first commit; a replacement
    node joins (as KubeRay or the autoscaler would bring one) and the job is resubmitted."""
    from pipelines.data.synth import write_release_parquet

    root = tmp_path_factory.mktemp("precompute")
    images = write_release_parquet(root / "raw" / "t2i.parquet", "t2i", INPUTS, seed=3)
    output = root / "latents"
    job_args = ("--", "--input", str(images), "--output", str(output), "--no-progress")
    first = lance_submit(cluster, "precompute", "--config", str(precompute_config), "--address",
                         cluster.address, "--no-wait", "--entrypoint-resources", '{"worker_node": 1}',
                         *job_args)
    assert first.returncode == 0, first.stdout + first.stderr
    first_id = submission_id(first)
    deadline = time.time() + 240
    while not list(output.glob("_commits/*.json")):
        status = cluster.job(first_id)["status"]
        assert time.time() < deadline and status in ("PENDING", "RUNNING"), cluster.job(first_id)
        time.sleep(0.2)
    cluster.kill_node("worker")
    first_info = cluster.wait_job(first_id, timeout=120)
    committed = len(list(output.glob("_commits/*.json")))
    cluster.wait_nodes(1)
    cluster.add_node("replacement", num_cpus=2, resources={})
    second = lance_submit(cluster, "precompute", "--config", str(precompute_config), "--address",
                          cluster.address, *job_args)
    return {"images": images, "output": output, "first": first_info, "committed_before": committed,
            "second": second}


def test_job_api_needs_the_token_and_listens_on_loopback(cluster):
    with pytest.raises(urllib.error.HTTPError) as err:
        cluster.get("/api/jobs/", token=None)
    assert err.value.code == 401
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "list", "--address", cluster.address],
                         cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 1 and "Authentication failed" in out.stderr, out.stdout + out.stderr
    listening = {c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    assert ("127.0.0.1", cluster.dashboard_port) in listening
    assert ("0.0.0.0", cluster.dashboard_port) not in listening


def test_node_lost_mid_precompute_then_resubmitted_loses_and_duplicates_nothing(cluster, node_loss):
    assert node_loss["first"]["status"] == "FAILED", node_loss["first"]
    committed = node_loss["committed_before"]
    assert 1 <= committed < INPUTS // PRECOMPUTE["partition_size"], "the node loss should land mid-run"
    out = node_loss["second"]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    sid = submission_id(out)
    assert f"{sid}: SUCCEEDED" in out.stdout
    assert f"skipped as already committed {committed})" in out.stdout, "the job's log reaches the follower"
    stats = check_shards(node_loss["output"], inputs=INPUTS)
    assert stats["inputs_written"] == INPUTS
    info = cluster.job(sid)
    assert info["entrypoint"].startswith("python -m jobs.precompute --config .lance-submit/")
    assert not (ROOT / ".lance-submit").exists(), "the staged config is removed after the upload"
    status = lance_submit(cluster, "status", sid, "--address", cluster.address)
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = lance_submit(cluster, "logs", sid, "--address", cluster.address)
    assert f"inputs      {INPUTS} = written {INPUTS}" in logs.stdout


def _train_config() -> Path | None:
    if importlib.util.find_spec("jobs.train") is None:
        return None
    path = ROOT / "jobs" / "configs" / "train_tiny.yaml"
    return path if path.is_file() else None


@pytest.mark.deepspeed
@pytest.mark.skipif(_train_config() is None, reason="jobs/train.py or jobs/configs/train_tiny.yaml missing")
def test_train_on_the_cluster_reads_the_shards(cluster, node_loss, tmp_path):
    cluster.wait_nodes(2)
    run = tmp_path / "train"
    out = lance_submit(cluster, "train", "--config", "jobs/configs/train_tiny.yaml", "--address",
                       cluster.address, "--env", "DS_ACCELERATOR=cpu", "--", "--data",
                       str(node_loss["output"]), "--output", str(run), "--steps", "2", "--workers", "1",
                       timeout=420)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert cluster.job(submission_id(out))["entrypoint"].startswith(
        "python -m jobs.train --config jobs/configs/train_tiny.yaml")
    metrics = [json.loads(line) for line in (run / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in metrics) == 2
    assert (run / "tiny" / "model.safetensors").is_file()


def test_list_logs_and_stop_map_to_the_job_api(cluster, node_loss, precompute_config, tmp_path):
    out = lance_submit(cluster, "precompute", "--config", str(precompute_config), "--address", cluster.address,
                       "--no-wait", "--", "--input", str(node_loss["images"]), "--output", str(tmp_path / "x"))
    sid = submission_id(out)
    deadline = time.time() + 120
    while cluster.job(sid)["status"] == "PENDING":
        assert time.time() < deadline
        time.sleep(0.2)
    stop = lance_submit(cluster, "stop", sid, "--address", cluster.address)
    assert stop.returncode == 0 and f"{sid}: stop requested" in stop.stdout, stop.stdout + stop.stderr
    assert cluster.wait_job(sid, timeout=60)["status"] == "STOPPED"
    listed = lance_submit(cluster, "list", "--address", cluster.address)
    assert sid in listed.stdout and "STOPPED" in listed.stdout
    logs = lance_submit(cluster, "logs", sid, "--address", cluster.address)
    assert f"Running entrypoint for job {sid}" in logs.stdout


GRPO_NODES = {
    # test_grpo.tiny_grpo with two learner ranks (ZeRO-2 over them), two rollout and two reward actors
    "model": {"preset": "tiny"}, "epochs": 12, "gallery_size": 0, "tensorboard": False, "prompts": {"eval_count": 1},
    "rollout": {"group_size": 8, "prompts_per_epoch": 2, "image_size": 64,
                "sampler": {"steps": 6, "window_size": 2, "window_range": [0, 4]},
                "actors": {"count": 2, "num_cpus": 0.5}},
    "rewards": {"actors": {"count": 2, "num_cpus": 0.25}, "terms": [{"name": "brightness", "kind": "brightness"}]},
    "optim": {"lr": 5e-3}, "deepspeed": {"zero_stage": 2}, "checkpoint": {"every_epochs": 1},
    "learner": {"clip_range": 0.2, "kl_weight": 0.0, "ranks": 2, "actor": {"num_cpus": 0.5}},
    "placement": {"strategy": "SPREAD"},
}
KILL_AFTER_EPOCH = 3


@pytest.mark.deepspeed
def test_grpo_submitted_over_two_nodes_learns_and_resumes_after_a_node_loss(cluster, node_loss, tmp_path):
    """Two learner ranks and the rollout and reward actors spread over the two nodes; the node that is not the
    head is killed mid-run and the resubmitted job resumes from the run's latest checkpoint."""
    config, run = tmp_path / "grpo_nodes.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(GRPO_NODES))
    cluster.wait_nodes(2)
    other = next(name for name in cluster.nodes if name != "head")
    args = ("grpo", "--config", str(config), "--address", cluster.address, "--env", "DS_ACCELERATOR=cpu")
    first = lance_submit(cluster, *args, "--no-wait", "--", "--output", str(run))
    assert first.returncode == 0, first.stdout + first.stderr
    first_id = submission_id(first)
    latest, deadline = run / "checkpoints" / "latest", time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= f"epoch_{KILL_AFTER_EPOCH:04d}"):
        assert time.time() < deadline and cluster.job(first_id)["status"] in ("PENDING", "RUNNING"), \
            cluster.job(first_id)
        time.sleep(0.2)
    cluster.kill_node(other)  # a learner rank, a rollout and a reward actor go with it
    assert cluster.wait_job(first_id, timeout=240)["status"] == "FAILED"
    done = int(latest.read_text().strip().removeprefix("epoch_"))
    first_log = lance_submit(cluster, "logs", first_id, "--address", cluster.address).stdout
    assert "actors on 2 nodes ready" in first_log, first_log[-3000:]
    cluster.wait_nodes(1)
    cluster.add_node(f"{other}-after-grpo", num_cpus=2, resources={})
    cluster.wait_nodes(2)
    second = lance_submit(cluster, *args, "--", "--output", str(run), timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert f"(epoch {done} done)" in second.stdout, second.stdout[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    placement = summary["placement"]
    assert len(set(placement["learner"])) == 2 and len(set(placement["rollout"])) == 2, placement
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = GRPO_NODES["epochs"]
    assert [r["epoch"] for r in history] == list(range(epochs)) and summary["last"]["updates"] == epochs
    assert all(r["groups_trained"] == 2 and r["reward/count"] == 16 for r in history)
    start = np.mean([r["reward/mean"] for r in history[:3]])
    end = np.mean([r["reward/mean"] for r in history[-3:]])
    spread = np.mean([r["reward/std"] for r in history[:3]])
    assert end > start + 2 * spread, (start, end, spread)
