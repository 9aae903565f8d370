"""The Ray a job runs on: the cluster named by ``RAY_ADDRESS`` (a submitted job; or an address the config
gives), else a new Ray of its own on this machine, never another one's (``address="local"``).

    started = ensure_ray(cfg.ray_address, num_cpus=cfg.ray_num_cpus, local_env=repo_pythonpath())

Workers' lines stay off the driver's console (``log_to_driver=False``): each job logs through its own
logger and files. A local Ray runs without the dashboard.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_pythonpath(keep_existing: bool = True) -> dict[str, str]:
    """``PYTHONPATH`` for Ray workers that import this repository: its root, then (``keep_existing``) the
    driver's own ``PYTHONPATH``."""
    parts = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "") if keep_existing else ""]
    return {"PYTHONPATH": os.pathsep.join(part for part in parts if part)}


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               local_env: Mapping[str, str] | None = None, cluster_env: Mapping[str, str] | None = None) -> bool:
    """Join the cluster at ``address`` (default: ``RAY_ADDRESS``), else start a local Ray with ``num_cpus``
    (None: all of them). ``local_env`` / ``cluster_env``: environment variables of the workers of a local
    Ray / of a joined cluster (a submitted job's own ``runtime_env`` carries its code; None adds nothing).
    Returns True when this call connected, False when Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, **_runtime_env(cluster_env))
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 **_runtime_env(local_env))
    return True


def _runtime_env(env: Mapping[str, str] | None) -> dict:
    return {"runtime_env": {"env_vars": dict(env)}} if env else {}
