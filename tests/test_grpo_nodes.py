"""GRPO placement over two nodes: an in-process Ray cluster (ray.cluster_utils.Cluster) whose nodes offer
different custom resources, run in a subprocess so it never meets the session's local Ray. The whole GRPO run
over two nodes with a node loss is in test_cluster.py, on that module's two-node cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

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
