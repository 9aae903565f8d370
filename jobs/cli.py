"""The ``lance`` command: one subcommand per job; each lives in its own module under ``jobs``.

    lance [--version] [--log-level LEVEL] <command> [options]

Job modules import the heavy packages (Ray, torch, DeepSpeed, ``pipelines``) inside ``main``, after their
arguments are parsed, so that ``lance <command> --help`` answers at once. What the jobs share on the command
line is here: the options every job spells the same (``--log-level``, ``--resume`` / ``--overwrite``, counts
that must be >= 1) and the one logging setup, :func:`setup_logging`: the ``lance`` loggers to stderr in one
format, at the level of ``--log-level``, else ``$LANCE_LOG_LEVEL``, else INFO. A job's config options
(``--config``, ``--set``) are in ``jobs/config_io.py``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = {
    "demo": ("jobs.demo", "run the main job on the embedded default (local, tiny presets, generated data)"),
    "model-info": ("jobs.model_info", "parameter counts and training FLOPs per token of a model preset"),
    "synth": ("jobs.synth", "write sample datasets in every input format"),
    "precompute": ("jobs.precompute", "encode raw pairs into latent shards with Ray Data"),
    "grpo": ("jobs.grpo", "Flow-GRPO: rollout actors, reward actor pool (PP-OCR, CLIP), DeepSpeed learner"),
    "train": ("jobs.train", "train the dual-stream model on latent shards (Ray Train + DeepSpeed)"),
    "tune": ("jobs.tune", "sweep learning rate, loss weights and mixture with Ray Tune (ASHA)"),
    "submit": ("jobs.submit", "run a job on a Ray cluster (Job Submission API); status, stop, logs"),
}
DISTRIBUTION = "lance-train"
"""The installed distribution (pyproject.toml ``[project] name``) whose version ``lance --version`` prints."""
LOG_LEVEL_ENV = "LANCE_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> int:
    name = text.strip().upper()
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)} (also ${LOG_LEVEL_ENV})")
    return getattr(logging, name)


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` (default ``$LANCE_LOG_LEVEL``, else INFO) into ``args.log_level`` (a logging level)."""
    parser.add_argument("--log-level", type=_log_level, default=os.environ.get(LOG_LEVEL_ENV, "INFO"),
                        metavar="LEVEL", help=f"{', '.join(LOG_LEVELS)} (default: ${LOG_LEVEL_ENV} or INFO)")


def positive_int(text: str) -> int:
    """argparse type of a count flag: the error names the flag (``argument --steps: must be >= 1``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_rerun_options(parser: argparse.ArgumentParser, output: str = "--output") -> None:
    """``--resume`` and ``--overwrite`` (exclusive) into ``args.mode``: ``auto`` when neither is given (see
    ``pipelines/runtime/run_folder.py``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="mode", action="store_const", const="resume", default="auto",
                       help=f"continue the run in {output}; an error when it holds none or one of another "
                            "config (default: resume a run of the same config, else start one)")
    group.add_argument("--overwrite", dest="mode", action="store_const", const="overwrite",
                       help=f"remove the previous run's outputs in {output} first and start afresh")


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """The one logging setup of every job: the ``lance`` loggers to stderr in ``run_log.LOG_FORMAT``."""
    from pipelines.runtime.run_log import setup_logging as setup_run_logging

    return setup_run_logging(level)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _usage() -> str:
    lines = ["usage: lance [--version] [--log-level LEVEL] <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "options:", "  --version          print the version of lance-train and exit",
              f"  --log-level LEVEL  {', '.join(LOG_LEVELS)} for every job (default: ${LOG_LEVEL_ENV} or INFO)",
              "", "run `lance <command> --help` for the options of a command; configs of jobs/configs are",
              "given by name (--config train_tiny), fields by --set section.field=value; every field of a",
              "job's config with its default: `lance <command> --print-config`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"lance {version()}")
        return 0
    level: list[str] = []  # lance --log-level LEVEL <command>: handed to the command's own option
    if argv[0] == "--log-level" and len(argv) > 1:
        level, argv = argv[:2], argv[2:]
    elif argv[0].startswith("--log-level="):
        level, argv = argv[:1], argv[1:]
    if not argv:
        print(f"lance: no command given\n\n{_usage()}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lance: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main([*level, *rest]) or 0)


if __name__ == "__main__":
    sys.exit(main())
