"""A job's paths checked before any work (before Ray starts, before any output is created).

Every path field of a config is typed :data:`lance_core.config.InputPath` or ``OutputPath`` (already
absolute); :func:`check_paths` walks them: a local input must exist, a local output must be a folder or
creatable. URIs with a scheme (``s3://``...) are left to the storage layer, which each job reaches before
Ray starts too (listing inputs, reading manifests). One error lists every problem, each naming its field
and, where the job has one, its command-line flag.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from pydantic import BaseModel

from lance_core.config import ConfigError, PathRole, path_fields


def _local(value: str) -> str | None:
    """The local path of ``value`` (``file://`` stripped), None for any other URI."""
    if value.startswith("file://"):
        return value[len("file://"):]
    return None if "://" in value else value


def path_problem(value: str, role: str) -> str | None:
    """Why a local ``value`` cannot serve as an input or output of that ``role``; None when it can."""
    path = _local(value)
    if path is None:
        return None
    if role == "input":
        return None if os.path.exists(path) else f"{path} does not exist"
    if os.path.exists(path):
        return None if os.path.isdir(path) else f"{path} exists and is not a folder"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{path} cannot be created: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable"
    return None


def check_paths(fields: Iterable[tuple[str, str, PathRole]] | BaseModel, prefix: str,
                flags: Mapping[str, str] | None = None, missing: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError naming every path field (``prefix.field``, and its flag from ``flags``) whose local
    path cannot serve, and every field of ``missing`` (a field that must be given but is not -> what to say).
    ``fields`` is a config (all its path fields) or (name, value, role) triples from :func:`path_fields`."""
    flags = flags or {}
    if isinstance(fields, BaseModel):
        fields = path_fields(fields)
    problems = list((missing or {}).items())
    for name, value, role in fields:
        problem = path_problem(value, role.role)
        if problem is not None:
            problems.append((name, problem))
    if problems:
        lines = []
        for name, problem in problems:
            flag = flags.get(name.split("[")[0])
            lines.append(f"  {prefix}.{name}{f' ({flag})' if flag else ''}: {problem}")
        raise ConfigError("invalid paths:\n" + "\n".join(lines))
