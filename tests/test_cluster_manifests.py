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
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
OVERLAY = CLUSTER / "overlays" / "example"
RAY_UP = CLUSTER / "ray-up"
INSTANCE_VCPUS = {"m7i.8xlarge": 32, "m7i.48xlarge": 192, "p5.48xlarge": 192}
INSTANCE_GPUS = {"p5.48xlarge": 8}
INSTANCE_EFA = {"p4d.24xlarge": 4, "p5.48xlarge": 32}   # EFA-capable network cards
GPU_PRODUCT_INSTANCE = {"NVIDIA-H100-80GB-HBM3": "p5.48xlarge", "NVIDIA-A100-SXM4-40GB": "p4d.24xlarge"}
# The site-specific values of the example overlay: each is set in exactly one place (settings.env).
EXAMPLE_SITE_VALUES = ("my-registry.example.com/lance-train:0.1.0", "arn:aws:iam::111122223333:role/lance-ray",
                       "us-east-1", "fsx-lustre")
# Node-local disk a pod may request on a GPU node with an ordinary root volume (500 GiB, as the ray-up nodes
# have): what is left after the image, the system and the kubelet's eviction threshold.
DEFAULT_NODE_EPHEMERAL = 350 * 2**30
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


# --- the kustomize base and overlay (cluster/kuberay, cluster/overlays/example) ---------------------------------

def _env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: KEY=value lines, whole-line comments."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key == key.strip() and value == value.strip() and key not in values, line
        values[key] = value
    return values


def _split_field_path(path: str) -> list[str]:
    """kustomize's field path: dot-separated; ``[name=x]`` selects list items, ``[a.b/c]`` is one key."""
    parts, part, depth = [], "", 0
    for char in path:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "." and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += char
    parts.append(part)
    return [p[1:-1] if p.startswith("[") and "=" not in p else p for p in parts]


def _fields(node, parts: list[str]) -> list[tuple[object, object]]:
    """(container, key) of every field that the path matches: ``*`` every item, ``[k=v]`` the items with k = v."""
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = list(enumerate(node)) if isinstance(node, list) else []
    elif head.startswith("[") and "=" in head:
        key, value = head[1:-1].split("=", 1)
        items = [(i, x) for i, x in enumerate(node) if isinstance(x, dict) and str(x.get(key)) == value] \
            if isinstance(node, list) else []
    else:
        items = [(head, node[head])] if isinstance(node, dict) and head in node else []
    if not rest:
        return [(node, key) for key, _ in items]
    return [hit for _, child in items for hit in _fields(child, rest)]


def _selected(doc: dict, selector: dict) -> bool:
    assert set(selector) <= {"kind", "name", "namespace"}, selector
    meta = doc.get("metadata", {})
    return all({"kind": doc.get("kind"), "name": meta.get("name"), "namespace": meta.get("namespace")}[k] == v
               for k, v in selector.items())


def _kustomize(root: Path) -> list[dict]:
    """Render a kustomization as kustomize does, for the features the cluster's use (resources,
    configMapGenerator from env files, replacements). Stricter than kustomize: every field path of a
    replacement must match a field in every object its target selects."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(spec) <= {"apiVersion", "kind", "resources", "configMapGenerator", "replacements"}, set(spec)
    docs: list[dict] = []
    for resource in spec.get("resources", []):
        path = root / resource
        docs += _kustomize(path) if path.is_dir() else _docs(path)
    for generator in spec.get("configMapGenerator", []):
        assert set(generator) <= {"name", "namespace", "envs", "options"}, generator
        options = generator.get("options", {})
        assert set(options) <= {"disableNameSuffixHash", "labels"} and options.get("disableNameSuffixHash") is True
        data: dict[str, str] = {}
        for env in generator["envs"]:
            data.update(_env_file(root / env))
        meta = {"name": generator["name"], "namespace": generator.get("namespace"),
                "labels": options.get("labels")}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "data": data,
                     "metadata": {k: v for k, v in meta.items() if v is not None}})
    for replacement in spec.get("replacements", []):
        source = replacement["source"]
        [origin] = [d for d in docs if _selected(d, {k: v for k, v in source.items() if k != "fieldPath"})]
        [(container, key)] = _fields(origin, _split_field_path(source["fieldPath"]))
        for target in replacement["targets"]:
            chosen = [d for d in docs if _selected(d, target["select"])]
            assert chosen, target["select"]
            for doc in chosen:
                for field_path in target["fieldPaths"]:
                    hits = _fields(doc, _split_field_path(field_path))
                    assert hits, f"{field_path} matches nothing in {doc['kind']} {doc['metadata']['name']}"
                    for parent, name in hits:
                        parent[name] = container[key]
    return docs


def _scalars(node, path=()):
    """(path, value) of every scalar value."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _scalars(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _scalars(value, (*path, index))
    else:
        yield path, node


def _settings() -> dict[str, str]:
    return _env_file(OVERLAY / "settings.env")


def test_site_values_live_in_the_overlay_once_and_nowhere_in_the_base():
    base = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    listed = base["resources"]
    assert sorted(listed) == sorted(p.name for p in KUBERAY.glob("*.yaml") if p.name != "kustomization.yaml")
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert (OVERLAY / overlay["resources"][0]).resolve() == KUBERAY.resolve(), "the overlay builds on the base"
    overlay_text = "".join(p.read_text() for p in sorted(OVERLAY.iterdir()) if p.is_file())
    base_text = "".join((KUBERAY / name).read_text() for name in listed)
    for value in EXAMPLE_SITE_VALUES:
        assert overlay_text.count(value) == 1, f"{value!r}: once in the overlay"
        assert value not in base_text, f"{value!r} in the base"
    for raw in ("example.com", "arn:aws:iam::", "us-east-1", "fsx-lustre", "gserviceaccount.com"):
        assert raw not in base_text, f"{raw!r} in the base"
    settings = _settings()
    assert set(EXAMPLE_SITE_VALUES) <= set(settings.values())
    markers = {v for name in listed for doc in _docs(KUBERAY / name) for _, v in _scalars(doc)
               if isinstance(v, str) and "LANCE_" in v}
    assert markers == set(settings), "the base holds exactly the settings' names, as whole values"


def test_overlay_sets_every_field_that_names_a_setting():
    settings = _settings()
    base = _kustomize(KUBERAY)
    rendered = _kustomize(OVERLAY)
    assert [(d["kind"], d["metadata"]["name"]) for d in rendered[:len(base)]] == \
        [(d["kind"], d["metadata"]["name"]) for d in base]
    changed = 0
    for before, after in zip(base, rendered):
        old, new = dict(_scalars(before)), dict(_scalars(after))
        assert old.keys() == new.keys()
        for path, value in old.items():
            if isinstance(value, str) and "LANCE_" in value:
                assert new[path] == settings[value], (before["kind"], path)
                changed += 1
            else:
                assert new[path] == value, (before["kind"], path)
    assert changed, "the overlay sets the base's LANCE_* fields"
    for doc in rendered:
        assert not any(isinstance(v, str) and "LANCE_" in v for _, v in _scalars(doc)), doc["metadata"]["name"]
    [config_map] = rendered[len(base):]
    assert config_map["data"] == settings
    parts = {doc["metadata"]["labels"]["lance.io/part"] for doc in rendered}
    assert parts == {"setup", "raycluster", "precompute", "train", "grpo", "tune"}
    readme = (CLUSTER / "README.md").read_text()
    assert "kubectl apply -k cluster/overlays/" in readme and "kubectl apply -f cluster/kuberay" not in readme
    for part in parts:
        assert f"lance.io/part={part}" in readme or f"`{part}`" in readme, part


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl: kustomize's own build not run")
def test_kubectl_kustomize_renders_what_the_parsing_renders():
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])
    real = sorted((d for d in yaml.safe_load_all(out) if d), key=key)
    assert real == sorted(_kustomize(OVERLAY), key=key)


def _worker_groups(rendered: bool) -> list[tuple[str, dict]]:
    """(object name, worker group) of every Ray cluster: as the overlay renders them, or of the base."""
    if not rendered:
        return [(name, group) for name, spec in _cluster_specs() for group in spec["workerGroupSpecs"]]
    docs = _kustomize(OVERLAY)
    specs = [(d["metadata"]["name"], d["spec"]) for d in docs if d["kind"] == "RayCluster"]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in docs if d["kind"] == "RayJob"]
    return [(name, group) for name, spec in specs for group in spec["workerGroupSpecs"]]


def test_worker_pods_fit_ordinary_nodes_and_nvme_is_a_setting():
    settings = _settings() if (OVERLAY / "settings.env").is_file() else {}
    for name, group in _worker_groups(rendered=False):   # the base, with the example overlay's values
        pod = group["template"]["spec"]
        resources = _containers(group)[0]["resources"]
        disk = _quantity(settings.get(resources["requests"]["ephemeral-storage"],
                                      resources["requests"]["ephemeral-storage"]))
        assert disk <= DEFAULT_NODE_EPHEMERAL, f"{name} {group['groupName']}: Pending on an ordinary node"
        for volume in pod["volumes"]:
            if "emptyDir" in volume and "medium" not in volume["emptyDir"]:
                assert _quantity(volume["emptyDir"].get("sizeLimit", disk)) <= disk
    for name in ("raycluster.yaml", "rayjob-train.yaml"):
        for doc in _docs(KUBERAY / name):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            for group in spec["workerGroupSpecs"]:
                disk = _containers(group)[0]["resources"]["requests"]["ephemeral-storage"]
                assert disk in _settings(), f"{name}: the local disk of {group['groupName']} is a setting"
    settings_text = (OVERLAY / "settings.env").read_text()
    readme = (CLUSTER / "README.md").read_text()
    for text in (settings_text, readme):
        assert "LANCE_GPU_LOCAL_DISK" in text and "instance store" in text and "RAID0" in text


def test_gpu_workers_request_every_efa_interface_and_need_them():
    checked = 0
    for name, group in _worker_groups(rendered=False):
        container = _containers(group)[0]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if "num-gpus" not in group["rayStartParams"]:
            assert "vpc.amazonaws.com/efa" not in limits
            continue
        instance = GPU_PRODUCT_INSTANCE[group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]]
        assert int(requests["vpc.amazonaws.com/efa"]) == int(limits["vpc.amazonaws.com/efa"]) \
            == INSTANCE_EFA[instance], f"{name}: every EFA interface of a {instance}"
        assert env.get("NCCL_NET") == "OFI", f"{name}: NCCL over EFA or an error, never TCP"
        checked += 1
    assert checked == 5


def _dockerfile_env() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(w.split("=", 1) for w in shlex.split(line[4:]))
    return env


def test_image_installs_the_efa_user_space_and_aws_ofi_nccl_at_pinned_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    version = re.search(r"^ARG EFA_INSTALLER_VERSION=(\d+\.\d+\.\d+)$", text, re.MULTILINE)
    assert version, "the EFA installer is pinned"
    assert "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in text
    install = re.search(r"efa_installer\.sh ([^)\n]*)", text).group(1).split()
    assert {"-y", "--skip-kmod", "--no-verify"} <= set(install), "no kernel module in an image"
    assert "libnccl-net" in text and "ldconfig" in text, "the build checks for the aws-ofi-nccl plugin"
    env = _dockerfile_env()
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_SOCKET_IFNAME"].startswith("^lo")
    assert "NCCL_NET" not in env, "forcing EFA belongs to the GPU workers, not to every use of the image"
    readme = (CLUSTER / "README.md").read_text()
    assert f"EFA_INSTALLER_VERSION={version.group(1)}" in readme and "aws-ofi-nccl" in readme
    efa = readme.split("## EFA: multi-node NCCL", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"over TCP will not reach the scaling targets", efa)


def test_ray_up_gpu_nodes_attach_efa_to_every_network_card():
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((RAY_UP / "lance-aws.yaml").read_text())
    gpu_types = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")}
    assert gpu_types
    for name, node in gpu_types.items():
        interfaces = node["node_config"]["NetworkInterfaces"]
        cards = INSTANCE_EFA[node["node_config"]["InstanceType"]]
        assert [i["NetworkCardIndex"] for i in interfaces] == list(range(cards))
        assert [i["DeviceIndex"] for i in interfaces] == [0] + [1] * (cards - 1)
        assert {i["InterfaceType"] for i in interfaces} == {"efa"}
        assert len({i["SubnetId"] for i in interfaces}) == 1 and len({tuple(i["Groups"]) for i in interfaces}) == 1
        options = node["docker"]["worker_run_options"]
        assert "--device=/dev/infiniband" in options and "--ulimit memlock=-1:-1" in options
        assert "-e NCCL_NET=OFI" in options
        assert any(o.startswith("--shm-size=") for o in options), "the node type's options replace the global ones"
    for name, node in cfg["available_node_types"].items():
        if name not in gpu_types:
            assert "NetworkInterfaces" not in node["node_config"] and "docker" not in node
    prepared = prepare_config(cfg)
    validate_config(prepared)                       # Ray's own schema
    _configure_from_network_interfaces(prepared)    # Ray's rules for NetworkInterfaces (subnet, groups)


def _readme_blocks() -> list[str]:
    """Paragraphs, list items and table rows of cluster/README.md."""
    blocks: list[str] = []
    for paragraph in (CLUSTER / "README.md").read_text().split("\n\n"):
        for line in paragraph.splitlines():
            if not blocks or line.startswith(("|", "- ")) or re.match(r"\d+\. ", line) \
                    or blocks[-1].startswith("|"):
                blocks.append(line)
            else:
                blocks[-1] += "\n" + line
        blocks.append("")
    return [b for b in blocks if b.strip()]


def test_gpu_product_labels_are_credited_to_gpu_feature_discovery():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        if "gpu.product" in text:
            assert "GPU Feature Discovery" in text, f"{path.name}: who sets nvidia.com/gpu.product"
    for block in _readme_blocks():
        if "gpu.product" in block:
            assert "GPU Feature Discovery" in block, block
        for sentence in re.split(r"(?<=[.:;])\s", block):
            if "device plugin" in sentence and re.search(r"label", sentence):
                assert re.search(r"\bnot\b|\bno such\b|\balone\b|\bonly\b|Feature Discovery", sentence), sentence


# Figures of cluster/README.md computed, not measured: each must say it is a target (or an extrapolation).
UNMEASURED = ("40 % MFU", "0.85 at 64 nodes", "126 VAE images/s", "≈ 1,000 images/s", "≈ 24 clips/s",
              "154,000 tokens/s", "3.6 images/s per", "≈ 25 s", "≈ 8.4 M", "≈ 64,000 /s",
              "≈ 4.5 | ≈ 4.6", "a node reads ≈ 0.3 GB/s", "at 10⁸ and 44 GB at 10⁹")


@pytest.mark.parametrize("figure", UNMEASURED)
def test_figures_never_measured_are_labelled_targets(figure):
    blocks = [b for b in _readme_blocks() if figure in re.sub(r"\s+", " ", b)]
    assert blocks, f"{figure!r} is gone from cluster/README.md"
    for block in blocks:
        assert re.search(r"\btargets?\b|extrapolated", block, re.IGNORECASE), block
