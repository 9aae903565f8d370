"""What a rerun does with a job's output that already holds a run: resume it, start afresh, or refuse.

Every job records its validated config (paths absolute) as ``config.json`` in its run folder. A rerun
compares its own config with the recorded one, leaving out the fields a resume may change (each pipeline
names them beside its runner: ``PRECOMPUTE_RESUMABLE``, ``TRAIN_RESUMABLE``, ``GRPO_RESUMABLE``...), and then,
by ``--resume`` / ``--overwrite`` / neither:

    neither      no run there: start one; a run of the same config: resume it (a finished one: say so,
                 keep its figures and do nothing); a run of another config: refuse, naming the fields
    --resume     the same, but an output without a run is an error (a mistyped output does not start anew)
    --overwrite  remove the previous run's outputs, then start afresh

    folder = RunFolder("grpo", "/abs/runs/grpo")
    action = folder.settle(cfg.model_dump(mode="json"), GRPO_RESUMABLE, mode, holds_run=...)  # new | resume

The folder may be local or a URI (``s3://``); it is read and written through fsspec.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Collection, Iterable
from typing import Any, Literal

from pydantic import BaseModel

from .storage import StorageConfig, filesystem, join_uri, with_retries

RunMode = Literal["auto", "resume", "overwrite"]
CONFIG_FILE = "config.json"
SHOWN_DIFFERENCES = 12


class RunFolderError(ValueError):
    """A rerun cannot go ahead with the output as it is; the message says why and what to do."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted field name -> leaf value of a config dump (lists are leaves)."""
    if isinstance(data, dict) and data:
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _covered(name: str, fields: Collection[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def _show(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


_ABSENT = object()


def with_defaults(recorded: dict | None, schema: type[BaseModel] | None) -> dict | None:
    """``recorded`` with the fields it lacks at their defaults in ``schema``; as it is when it does not
    validate (a field since renamed or removed: the difference is then shown)."""
    if recorded is None or schema is None:
        return recorded
    try:
        return schema.model_validate(recorded).model_dump(mode="json")
    except ValueError:
        return recorded


def config_differences(recorded: dict, current: dict, resumable: Collection[str] = ()) -> list[str]:
    """``field: recorded -> current`` for every field (dotted) whose value differs, leaving out the
    ``resumable`` fields and sections. Both sides are compared as JSON (tuples are lists). Fields set on both
    sides come first (a changed value), then those only one side has (a field added or removed since)."""
    old, new = _flatten(json.loads(json.dumps(recorded))), _flatten(json.loads(json.dumps(current)))
    names = [name for name in sorted(old.keys() | new.keys())
             if not _covered(name, resumable) and old.get(name, _ABSENT) != new.get(name, _ABSENT)]
    names.sort(key=lambda name: name not in old or name not in new)
    return [f"{name}: {_show(old.get(name, _ABSENT))} -> {_show(new.get(name, _ABSENT))}" for name in names]


def rerun_action(job: str, where: str, recorded: dict | None, holds_run: bool, current: dict,
                 resumable: Collection[str], mode: RunMode, other: str = "--output") -> str:
    """``new``, ``resume`` or ``overwrite`` (remove, then start), or RunFolderError saying why not.

    ``recorded`` is the config the folder records (None: none recorded), ``holds_run`` whether it holds
    results a resume would continue from (commits, checkpoints); ``other`` names what to change instead."""
    if mode not in ("auto", "resume", "overwrite"):
        raise ValueError(f"unknown run mode {mode!r}; allowed: auto, resume, overwrite")
    if mode == "overwrite":
        return "overwrite" if holds_run or recorded is not None else "new"
    if not holds_run and recorded is None:
        if mode == "resume":
            raise RunFolderError(f"{job}: --resume: {where} holds no {job} run to resume; run without --resume "
                                 "to start one")
        return "new"
    if recorded is not None:
        differences = config_differences(recorded, current, resumable)
        if differences:
            shown = differences[:SHOWN_DIFFERENCES]
            if len(differences) > len(shown):
                shown.append(f"... and {len(differences) - len(shown)} more")
            raise RunFolderError(
                f"{job}: {where} holds a run of another config ({CONFIG_FILE} there); fields that differ "
                f"(recorded -> now):\n  " + "\n  ".join(shown) +
                f"\nrerun with --overwrite to replace that run, or choose another {other}")
    return "resume" if holds_run else "new"


class RunFolder:
    """A job's run folder (local or a URI): its recorded config, what it holds, and its removal. What it
    decides is said through the ``lance.<job>`` logger."""

    def __init__(self, job: str, uri: str, storage=None, other: str = "--output") -> None:
        self.job, self.uri, self.other = job, str(uri).rstrip("/"), other
        self.log = logging.getLogger(f"lance.{job}")
        self.storage = storage or StorageConfig()
        self.fs = filesystem(self.uri, self.storage)

    def path(self, name: str) -> str:
        return join_uri(self.uri, name)

    def _retry(self, what: str, fn):
        return with_retries(f"{what} {self.uri}", self.storage, fn)

    def holds(self, *patterns: str) -> bool:
        """Whether any entry matching one of ``patterns`` (glob, relative to the folder) exists."""
        return any(self._retry("reading", lambda p=p: bool(self.fs.glob(self.path(p)))) for p in patterns)

    def recorded_config(self) -> dict | None:
        """The config ``config.json`` records; None if there is none, RunFolderError if it is damaged."""
        path = self.path(CONFIG_FILE)
        if not self._retry("reading", lambda: self.fs.exists(path)):
            return None
        data = self._retry("reading", lambda: self.fs.cat_file(path))
        try:
            recorded = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunFolderError(f"{self.job}: {path} is damaged ({type(err).__name__}: {err}); rerun with "
                                 "--overwrite to start afresh") from None
        if not isinstance(recorded, dict):
            raise RunFolderError(f"{self.job}: {path} holds no config mapping; rerun with --overwrite to start "
                                 "afresh")
        return recorded

    def record_config(self, config: dict) -> None:
        """Write ``config.json`` whole: a temporary file renamed on a local disk, one PUT on an object store."""
        data = json.dumps(config, indent=2).encode()
        path = self.path(CONFIG_FILE)
        if "://" not in self.uri:
            os.makedirs(self.uri, exist_ok=True)
            tmp = self.path(f".tmp-{uuid.uuid4().hex}.json")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
            return
        self._retry("writing", lambda: self.fs.pipe_file(path, data))

    def remove(self, names: Iterable[str] | None = None) -> list[str]:
        """Remove the entries matching ``names`` (globs), or the whole folder when None; return what went."""
        patterns = [self.uri] if names is None else [self.path(n) for n in names]
        removed = []
        for pattern in patterns:
            for path in sorted(self._retry("listing", lambda p=pattern: self.fs.glob(p))):
                self._retry("removing", lambda p=path: self.fs.rm(p, recursive=True))
                removed.append(path)
        return removed

    def settle(self, current: dict, resumable: Collection[str], mode: RunMode, holds_run: bool,
               remove: Iterable[str] | None = None, others: Iterable[RunFolder] = (),
               schema: type[BaseModel] | None = None) -> str:
        """Decide (:func:`rerun_action`); on ``--overwrite`` remove the previous run's outputs (``remove``:
        globs in this folder, None = the whole folder; ``others``: further folders of the run, whole); say
        what happens. Returns ``new`` or ``resume``. With ``schema`` (the config's class) the recorded config
        is read through it, so that a field added since it was recorded counts as its default."""
        recorded = with_defaults(self.recorded_config(), schema)
        action = rerun_action(self.job, self.uri, recorded, holds_run, current, resumable, mode, self.other)
        if action == "overwrite":
            removed = self.remove(remove) + [p for other in others for p in other.remove()]
            self.log.info(f"--overwrite: removed the previous run's outputs in {self.uri}"
                          f"{''.join(f' and {o.uri}' for o in others)} ({len(removed)} entries)")
            return "new"
        if action == "resume":
            how = "same config" if recorded is not None else f"it records no {CONFIG_FILE}"
            self.log.info(f"resuming the run in {self.uri} ({how}; --overwrite starts afresh)")
        return action
