"""The cluster definitions under cluster/: they load, their entrypoints run real job modules with real
configs, the resources they provide match what those configs ask for, and nothing is exposed or holds a
credential."""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
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
        from pipelines.train.config import apply_overrides, load_train_config

        workers = int(opts["workers"]) if "workers" in opts else None
        cfg = load_train_config(apply_overrides(data, output=opts.get("output"), workers=workers))
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
    source = Path(spec.origin).read_text()
    for flag in (a for a in args if a.startswith("--")):
        assert f'add_argument("{flag}"' in source, f"{module} has no option {flag}"
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


def test_head_accepts_traffic_from_its_namespace_only():
    docs = _docs(KUBERAY / "namespace.yaml")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]
    every_kind = {d["kind"] for p in CLUSTER.rglob("*.yaml") for d in _docs(p) if "kind" in d}
    assert not every_kind & {"Ingress", "Service", "Gateway", "Route"}, "nothing routes the job API outwards"


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
