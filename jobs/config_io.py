"""Job configs on the command line: ``--config`` (a YAML file, or the name of a config shipped in
``jobs/configs``) and fields set by flags (``--steps``, ``--set section.field=value``...), laid over the YAML
mapping before validation so that an error names the flag that gave the bad value.

    add_config_options(parser, "training config", "train_")       # --config, --set, --print-config
    args = parser.parse_args(argv)
    fields = FieldOverrides()
    fields.flag("--steps", "steps", args.steps)                     # None: not given
    fields.sets(args.set)                                           # after the flags: --set has the last word
    data = fields.apply(read_yaml(args.config))
    cfg = load_train_config(data, flags=fields.flags)               # "train.steps (--steps): ..."
    if show_config(args, cfg):                                      # --print-config: print it, run nothing
        return 0

Only the standard library is imported at module level: ``lance <job> --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configs (package data of ``jobs``), addressable by name: ``--config train_tiny``."""


def _config_error(message: str) -> Exception:
    from lance_core.config import ConfigError

    return ConfigError(message)


def shipped_configs(prefix: str = "") -> list[str]:
    """Names of the shipped configs (starting with ``prefix``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob(f"{prefix}*.yaml"))


def resolve_config(value: str | Path) -> Path:
    """A config file: ``value`` when it is a file (relative to the current folder), else the shipped config
    of that name (``train_tiny`` or ``train_tiny.yaml``, from any folder)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    names = ", ".join(shipped_configs())
    if path.name == str(value) and path.suffix in ("", ".yaml", ".yml"):  # a bare name, no folder
        shipped = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
        raise _config_error(f"config file {str(value)!r} does not exist and is not the name of a shipped "
                            f"config ({names})")
    raise _config_error(f"config file {str(value)!r} does not exist (shipped configs, by name: {names})")


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """The mapping of a YAML config (see :func:`resolve_config`); ``{}`` for None (the built-in defaults)."""
    import yaml

    if path is None:
        return {}
    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise _config_error(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise _config_error(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def add_config_options(parser: argparse.ArgumentParser, help_: str, kind: str) -> None:
    """``--config`` (a file or a shipped config's name; those named ``<kind>*`` are listed in the help), the
    repeatable ``--set section.field=value`` and ``--print-config`` (see :func:`show_config`)."""
    parser.add_argument("--config", help=f"{help_}; a YAML file or the name of a shipped config "
                                         f"({', '.join(shipped_configs(kind))}); every field and its default: "
                                         "--print-config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="set a config field (repeatable); the value is read as YAML: 3, 1e-4, true, "
                             "[a, b], {k: v}; applied after the other flags")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (--config, then the flags and --set, over the defaults) "
                             "as YAML and exit without running; the reference of the fields: without --config "
                             "it shows every field with its default. The output is a valid --config")


def show_config(args: argparse.Namespace, cfg: Any) -> bool:
    """``--print-config``: print the validated ``cfg`` (a pydantic model: every field, the defaults of those
    not given included, paths as resolved) as YAML and return True, the job then stops; else False."""
    if not args.print_config:
        return False
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False), end="")
    return True


class FieldOverrides:
    """Config fields set on the command line, in order, each with the flag that set it."""

    def __init__(self) -> None:
        self._fields: list[tuple[str, Any, str]] = []  # (dotted field, value, flag)

    def flag(self, flag: str, field: str, value: Any) -> None:
        """``flag`` sets ``field`` (dotted) to ``value``; None = the flag was not given."""
        if value is not None:
            self._fields.append((field, value, flag))

    def sets(self, items: list[str] | None) -> None:
        """``--set section.field=value`` items; the value is parsed as YAML."""
        import yaml

        for item in items or ():
            field, sep, text = item.partition("=")
            field = field.strip()
            parts = field.split(".")
            if not sep or not all(p.strip() and p == p.strip() for p in parts):
                raise _config_error(f"--set {item}: give section.field=value (e.g. --set optim.lr=3e-4)")
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError as err:
                raise _config_error(f"--set {field}: {text!r} is not a YAML value: {err}") from None
            self._fields.append((field, value, f"--set {field}"))

    @property
    def flags(self) -> dict[str, str]:
        """Dotted field -> the flag that set it (the last one), for the error messages of validation."""
        return {field: flag for field, _, flag in self._fields}

    def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``data`` with every field set (missing sections are created)."""
        data = copy.deepcopy(data)
        for field, value, flag in self._fields:
            *sections, name = field.split(".")
            node = data
            for depth, section in enumerate(sections):
                child = node.setdefault(section, {})
                if child is None:
                    child = node[section] = {}
                if not isinstance(child, dict):
                    where = ".".join(sections[:depth + 1])
                    raise _config_error(f"{flag}: {where} holds {child!r}, not a section with fields")
                node = child
            node[name] = value
        return data
