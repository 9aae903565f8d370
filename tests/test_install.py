"""pyproject.toml against the environment the tests run in: every bound holds for what is installed, and
every third-party module the project imports is declared by a requirement (core or an extra)."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL = {"gpu", "paddle"}  # not installed by scripts/setup.sh (CUDA-only / an alternative OCR backend)
OWN = {"lance_core", "pipelines", "jobs", "tests", "bench"}


def _requirements() -> dict[str, list[Requirement]]:
    groups = {"core": [Requirement(r) for r in PROJECT["dependencies"]]}
    for extra, reqs in PROJECT["optional-dependencies"].items():
        groups[extra] = [Requirement(r) for r in reqs if not r.startswith(PROJECT["name"])]
    return groups


def test_installed_versions_satisfy_the_declared_bounds():
    wrong = []
    for group, reqs in _requirements().items():
        if group in OPTIONAL:
            continue
        for req in reqs:
            installed = metadata.version(req.name)
            if not req.specifier.contains(installed, prereleases=True):
                wrong.append(f"{group}: {req} but {installed} is installed")
    assert not wrong, wrong


def test_every_imported_distribution_is_declared():
    declared = {req.name.lower().replace("_", "-") for reqs in _requirements().values() for req in reqs}
    providers = metadata.packages_distributions()
    missing = set()
    for folder in ("lance_core", "pipelines", "jobs"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in OWN or top in sys.stdlib_module_names:
                        continue
                    dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                    if not dists & declared:
                        missing.add(f"{path.relative_to(ROOT)}: {top} ({', '.join(sorted(dists))})")
    assert not missing, sorted(missing)


def test_extras_by_job_and_no_unused_ffmpeg_binding():
    extras = PROJECT["optional-dependencies"]
    assert {"data", "train", "rl", "demo", "all", "dev"} <= set(extras)
    assert not any(r.startswith("ffmpeg-python") for reqs in extras.values() for r in reqs)
    assert extras["all"] == [f"{PROJECT['name']}[data,train,rl,demo]"]
    # scikit-learn (the digits and their judge) is the demo's and the tests', not a job's core requirement
    assert not any(r.startswith("scikit-learn") for r in PROJECT["dependencies"])
    assert any(r.startswith("scikit-learn") for r in extras["demo"]) and any(r.startswith("scikit-learn") for r in extras["dev"])
