"""The cluster definitions under cluster/: they load, their entrypoints run real job modules with real
configs, the resources they provide match what those configs ask for, and nothing is exposed or holds a
credential."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_UP = CLUSTER / "ray-up"
INSTANCE_VCPUS = {"m7i.8xlarge": 32, "m7i.48xlarge": 192, "p5.48xlarge": 192}
INSTANCE_GPUS = {"p5.48xlarge": 8}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _rayjobs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(KUBERAY.glob("rayjob-*.yaml")) for doc in _docs(p)]


def _quantity(value: str | int) -> float:
    """Kubernetes quantity -> number (CPU cores, bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def _job_command(entrypoint: str) -> tuple[str, str, list[str]]:
    """``python -m jobs.<job> --config <path> [args]`` -> (module, config path, the other args)."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"], entrypoint
    args = words[3:]
    config = args[args.index("--config") + 1]
    rest = args[: args.index("--config")] + args[args.index("--config") + 2:]
    return words[2], config, rest


def _options(args: list[str]) -> dict[str, str]:
    return {flag.lstrip("-"): value for flag, value in zip(args[::2], args[1::2])}


def _demand(module: str, config: Path, args: list[str]) -> dict:
    """GPUs, CPUs and the largest single-node GPU share that a job config asks for."""
    data = yaml.safe_load(config.read_text())
    opts = _options([a for a in args if a != "--no-progress"])
    if module == "jobs.precompute":
        from pipelines.data.config import PrecomputeConfig

        enc = PrecomputeConfig.model_validate(data).encoders
        actors = enc.vae_actors + enc.vit_actors
        return {"gpus": actors * enc.num_gpus_per_actor, "cpus": actors * enc.cpus_per_actor, "node_gpus": 1}
    if module in ("jobs.train", "jobs.tune"):
        from jobs.config_io import FieldOverrides
        from pipelines.train.config import load_train_config

        fields = FieldOverrides()
        fields.flag("--output", "output", opts.get("output"))
        fields.flag("--workers", "scaling.workers", int(opts["workers"]) if "workers" in opts else None)
        cfg = load_train_config(fields.apply(data))
        assert cfg.scaling.use_gpu, f"{config.name} trains on CPU"
        return {"gpus": cfg.scaling.workers, "cpus": cfg.scaling.workers * cfg.scaling.cpus_per_worker,
                "cpus_per_gpu": cfg.scaling.cpus_per_worker, "node_gpus": 1}
    if module == "jobs.grpo":
        from pipelines.rl.config import load_grpo_config

        cfg = load_grpo_config(data)
        kinds = [cfg.rollout.actors, cfg.rewards.actors, cfg.learner.actor]
        demand = {"gpus": sum(a.count * a.num_gpus for a in kinds),
                  "cpus": sum(a.count * a.num_cpus for a in kinds), "node_gpus": 1}
        if cfg.placement.strategy in ("PACK", "STRICT_PACK"):
            demand["node_gpus"] = demand["gpus"]
        return demand
    raise AssertionError(f"no resource rule for {module}")


def _gpu_capacity(spec: dict) -> tuple[float, float, float]:
    """(GPUs of the cluster at its largest, GPUs per node, CPUs per GPU node)."""
    total, per_node, cpus = 0.0, 0.0, 0.0
    for group in spec.get("workerGroupSpecs", []):
        gpus = float(group["rayStartParams"].get("num-gpus", 0))
        total += gpus * group["maxReplicas"]
        if gpus:
            per_node, cpus = max(per_node, gpus), float(group["rayStartParams"]["num-cpus"])
    return total, per_node, cpus


def test_every_yaml_file_loads():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {
        "namespace.yaml", "raycluster.yaml", "rayjob-precompute.yaml", "rayjob-train.yaml",
        "rayjob-grpo.yaml", "rayjob-tune.yaml", "lance-aws.yaml"}
    for path in files:
        assert _docs(path), path


@pytest.mark.parametrize("name,job", _rayjobs(), ids=[n for n, _ in _rayjobs()])
def test_rayjob_entrypoint_runs_a_real_job_with_a_real_config(name, job):
    assert job["kind"] == "RayJob"
    module, config, args = _job_command(job["spec"]["entrypoint"])
    spec = importlib.util.find_spec(module)
    assert module.startswith("jobs.") and spec is not None, module
    assert config.startswith("jobs/configs/") and (ROOT / config).is_file(), config
    usage = io.StringIO()
    with contextlib.redirect_stdout(usage), pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"\s{re.escape(flag)}\b", usage.getvalue()), f"{module} has no option {flag}"
    assert name == f"rayjob-{module.split('.')[1]}.yaml"
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert runtime["working_dir"] == workdir, "the RayJob runs the project copy inside the image"
    job_spec = job["spec"]
    assert job_spec["shutdownAfterJobFinishes"] is True and job_spec["ttlSecondsAfterFinished"] > 0
    assert job_spec["activeDeadlineSeconds"] > 0 and job_spec["backoffLimit"] >= 1


@pytest.mark.parametrize("name,job", _rayjobs(), ids=[n for n, _ in _rayjobs()])
def test_rayjob_cluster_provides_what_the_job_config_asks_for(name, job):
    module, config, args = _job_command(job["spec"]["entrypoint"])
    demand = _demand(module, ROOT / config, args)
    total, per_node, node_cpus = _gpu_capacity(job["spec"]["rayClusterSpec"])
    # Actor pools and Ray Train groups are fixed in size: the cluster holds the fewest whole GPU nodes
    # that take them.
    nodes = math.ceil(demand["gpus"] / per_node)
    assert nodes * per_node == total, f"{name}: {demand['gpus']} GPUs asked, {total} in the cluster"
    assert demand["node_gpus"] <= per_node
    if "cpus_per_gpu" in demand:
        assert demand["cpus_per_gpu"] * per_node <= node_cpus, f"{name}: workers do not fit a node's CPUs"
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert demand["cpus"] <= sum(float(g["rayStartParams"]["num-cpus"]) * g["maxReplicas"] for g in groups)


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [("raycluster.yaml", doc["spec"]) for doc in _docs(KUBERAY / "raycluster.yaml")]
    return specs + [(name, job["spec"]["rayClusterSpec"]) for name, job in _rayjobs()]


@pytest.mark.parametrize("name,spec", _cluster_specs(), ids=[n for n, _ in _cluster_specs()])
def test_pods_are_sized_for_their_ray_resources(name, spec):
    docs = _docs(KUBERAY / "namespace.yaml")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for group in _groups(spec):
        params, pod = group["rayStartParams"], group["template"]["spec"]
        container = _containers(group)[0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, f"{name}: guaranteed pods (requests = limits)"
        assert pod["serviceAccountName"] in accounts
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        if "num-cpus" in params:
            assert float(params["num-cpus"]) <= _quantity(limits["cpu"])
        if "num-gpus" in params:
            assert float(params["num-gpus"]) == float(limits["nvidia.com/gpu"])
            toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            assert toleration in pod["tolerations"]
        if "object-store-memory" in params:
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory"
            store = float(params["object-store-memory"])
            assert store <= _quantity(shm["sizeLimit"]) < _quantity(limits["memory"])
        if "object-spilling-directory" in params:
            spill = volumes[mounts[params["object-spilling-directory"]]]
            assert "emptyDir" in spill and "medium" not in spill["emptyDir"], "spilling goes to local disk"
        if group is not spec["headGroupSpec"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no tasks on the head"
    assert spec["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("name,spec", _cluster_specs(), ids=[n for n, _ in _cluster_specs()])
def test_kuberay_clusters_are_not_exposed_and_need_a_token(name, spec):
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for group in _groups(spec):
        for container in _containers(group):
            for env in container.get("env", []):
                assert not (SECRET_NAME.search(env["name"]) and "value" in env), env["name"]


def _operator_namespace() -> str:
    """The namespace cluster/README.md installs the KubeRay operator into."""
    install = re.search(r"helm install kuberay-operator .*", (CLUSTER / "README.md").read_text()).group(0)
    return re.search(r"--namespace[ =](\S+)", install).group(1)


def _policies() -> dict[str, dict]:
    """NetworkPolicies by the Ray node type their pods carry (ray.io/node-type)."""
    docs = [d for d in _docs(KUBERAY / "namespace.yaml") if d["kind"] == "NetworkPolicy"]
    return {d["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"]: d for d in docs}


def test_head_and_workers_accept_traffic_from_their_namespace_only():
    policies = _policies()
    assert set(policies) == {"head", "worker"}, "every Ray pod is behind a NetworkPolicy"
    for node_type, policy in policies.items():
        assert policy["metadata"]["namespace"] == "lance" and policy["spec"]["policyTypes"] == ["Ingress"]
        rules = policy["spec"]["ingress"]
        assert {"from": [{"podSelector": {}}]} in rules, f"{node_type}: pods of the namespace reach it"
        for rule in rules:
            peers = rule.get("from")
            assert peers, f"{node_type}: a rule without 'from' admits every source"
            for peer in peers:
                assert "ipBlock" not in peer, f"{node_type}: no address ranges"
                if "namespaceSelector" in peer:
                    assert node_type == "head", "only the head admits another namespace"
    every_kind = {d["kind"] for p in CLUSTER.rglob("*.yaml") for d in _docs(p) if "kind" in d}
    assert not every_kind & {"Ingress", "Service", "Gateway", "Route"}, "nothing routes the job API outwards"


def test_kuberay_operator_reaches_the_job_api_and_nothing_else():
    head = _policies()["head"]["spec"]["ingress"]
    foreign = [rule for rule in head if any("namespaceSelector" in peer for peer in rule["from"])]
    assert len(foreign) == 1
    [rule] = foreign
    [peer] = rule["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": _operator_namespace()}}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}], "the job API only, not GCS or the client port"
    text = (CLUSTER / "README.md").read_text()
    assert "8265" in text and _operator_namespace() in text.split("helm install", 1)[1]


def _token_commands() -> list[str]:
    cfg = yaml.safe_load((RAY_UP / "lance-aws.yaml").read_text())
    commands = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key]
                if "auth_token" in c]
    assert len(commands) == 2, "the head and the workers write the token file"
    return commands


@pytest.mark.parametrize("old_mode", [None, 0o644], ids=["new", "left-from-an-older-start"])
def test_ray_up_token_file_is_0600_from_the_start(tmp_path, old_mode):
    """Run the token command of each node with a stand-in for python (it records the file's mode while its
    output is being written, then prints a token) under the default umask 022."""
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(f"#!{sys.executable}\n"
                    "import os, stat\n"
                    "path = os.path.expanduser('~/.ray/auth_token')\n"
                    "with open(os.path.expanduser('~/mode-while-writing'), 'w') as fh:\n"
                    "    fh.write(oct(stat.S_IMODE(os.stat(path).st_mode)))\n"
                    "print('t' * 64, end='')\n")
    shim.chmod(0o755)
    for command in _token_commands():
        assert "chmod" not in command, "no window between writing the file and restricting it"
        home = tmp_path / f"home-{len(list(tmp_path.iterdir()))}"
        (home / ".ray").mkdir(parents=True)
        if old_mode is not None:
            (home / ".ray" / "auth_token").write_text("old")
            (home / ".ray" / "auth_token").chmod(old_mode)
        env = {**os.environ, "HOME": str(home), "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run(["bash", "-c", f"umask 022; {command}"], env=env, check=True, timeout=30)
        token = home / ".ray" / "auth_token"
        assert token.read_text() == "t" * 64
        assert (home / "mode-while-writing").read_text() == "0o600"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_no_credentials_anywhere_in_cluster():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        assert not re.search(r"(aws_secret_access_key|aws_access_key_id)\s*[:=]", text, re.IGNORECASE), path
        assert not re.search(r"RAY_AUTH_TOKEN\s*[:=]\s*[\w+/]{16,}", text), path


def test_ray_up_cluster_is_private_and_sized():
    cfg = yaml.safe_load((RAY_UP / "lance-aws.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    for rule in cfg["provider"]["security_group"]["IpPermissions"]:
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22)
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])
    for name, node in cfg["available_node_types"].items():
        conf = node["node_config"]
        assert "IamInstanceProfile" in conf, f"{name}: nodes act through an instance profile"
        assert node["resources"].get("CPU", 0) <= INSTANCE_VCPUS[conf["InstanceType"]]
        assert node["resources"].get("GPU", 0) == INSTANCE_GPUS.get(conf["InstanceType"], 0)
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"] == 0
    gpus = sum(n["resources"].get("GPU", 0) * n["max_workers"] for n in cfg["available_node_types"].values()
               if "max_workers" in n)
    for _, job in _rayjobs():
        module, config, args = _job_command(job["spec"]["entrypoint"])
        assert _demand(module, ROOT / config, args)["gpus"] <= gpus, f"{module} does not fit the cluster"


def test_readme_walks_through_every_manifest():
    text = (CLUSTER / "README.md").read_text()
    for path in sorted(CLUSTER.rglob("*.yaml")) + [CLUSTER / "Dockerfile"]:
        assert path.name in text, f"cluster/README.md does not mention {path.name}"
    for command in ("lance submit", "kubectl -n lance port-forward", "ray up", "ray dashboard"):
        assert command in text


def test_credential_like_files_stay_out_of_the_image():
    from pipelines.submit import SECRET_FILES

    ignored = {line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()}
    missing = [p for p in SECRET_FILES if "**/" + p.rstrip("/") not in ignored]
    assert not missing, f"Dockerfile.dockerignore lets these into the image: {missing}"
