"""GRPO over two nodes. Placement: an in-process Ray cluster (ray.cluster_utils.Cluster) whose nodes offer
different custom resources, run in a subprocess so it never meets the session's local Ray. A whole run: two
learner ranks and the rollout and reward actors spread over the two-node ``ray start`` cluster of
test_cluster.py, submitted with ``lance submit grpo``; a node is killed mid-run and the resubmitted job resumes
from the run's latest checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_cluster import LocalCluster, lance_submit, submission_id

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    from ray.cluster_utils import Cluster
    from pipelines.rl.loop import run_grpo
    from tests.test_grpo import tiny_grpo

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"rollout_node": 2}, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"reward_node": 2})
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        cfg = tiny_grpo(
            epochs=1,
            rollout={"actors": {"count": 2, "num_cpus": 0.5, "resources": {"rollout_node": 1}}},
            rewards={"actors": {"count": 2, "num_cpus": 0.5, "resources": {"reward_node": 1}},
                     "terms": [{"name": "brightness", "kind": "brightness"}]},
            placement={"strategy": "SPREAD"})
        summary = run_grpo(cfg, tempfile.mkdtemp())
        print("RESULT " + json.dumps({"placement": summary["placement"],
                                      "count": summary["last"]["reward/count"],
                                      "nodes": {k: sorted(v) for k, v in nodes.items()}}))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


@pytest.mark.slow
def test_actors_spread_over_two_nodes_by_custom_resources():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    nodes = result["nodes"]
    rollout_node = next(n for n, res in nodes.items() if "rollout_node" in res)
    reward_node = next(n for n, res in nodes.items() if "reward_node" in res)
    assert rollout_node != reward_node
    placement = result["placement"]
    assert placement["rollout"] == [rollout_node, rollout_node]
    assert placement["reward"] == [reward_node, reward_node]
    assert result["count"] == 16


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


@pytest.mark.slow
def test_grpo_submitted_over_two_nodes_learns_and_resumes_after_a_node_loss(tmp_path):
    config, run = tmp_path / "grpo_nodes.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(GRPO_NODES))
    cluster = LocalCluster()
    try:
        cluster.start_head(num_cpus=2)
        cluster.wait_nodes(1)
        cluster.add_node("worker", num_cpus=2, resources={"worker_node": 1})
        cluster.wait_nodes(2)
        args = ("grpo", "--config", str(config), "--address", cluster.address, "--env", "DS_ACCELERATOR=cpu")
        first = lance_submit(cluster, *args, "--no-wait", "--", "--output", str(run))
        assert first.returncode == 0, first.stdout + first.stderr
        first_id = submission_id(first)
        latest, deadline = run / "checkpoints" / "latest", time.time() + 300
        while not (latest.is_file() and latest.read_text().strip() >= f"epoch_{KILL_AFTER_EPOCH:04d}"):
            assert time.time() < deadline and cluster.job(first_id)["status"] in ("PENDING", "RUNNING"), \
                cluster.job(first_id)
            time.sleep(0.2)
        cluster.kill_node("worker")  # a learner rank, a rollout and a reward actor go with it
        assert cluster.wait_job(first_id, timeout=240)["status"] == "FAILED"
        done = int(latest.read_text().strip().removeprefix("epoch_"))
        first_log = lance_submit(cluster, "logs", first_id, "--address", cluster.address).stdout
        assert "actors on 2 nodes ready" in first_log, first_log[-3000:]
        cluster.wait_nodes(1)
        cluster.add_node("replacement", num_cpus=2, resources={"worker_node": 1})
        cluster.wait_nodes(2)
        second = lance_submit(cluster, *args, "--", "--output", str(run), timeout=600)
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert f"(epoch {done} done)" in second.stdout, second.stdout[-4000:]
    finally:
        cluster.shutdown()
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
