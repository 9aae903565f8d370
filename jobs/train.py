"""``lance train``: Ray Train + DeepSpeed training of the dual-stream model over latent shards.

    lance train --config train_tiny [--data URI ...] [--output DIR] [--steps N] [--workers N]
                [--set section.field=value ...] [--resume | --overwrite] [--launcher ray|torch]
    python -m jobs.train ...      (for ray job submit)
    torchrun --nproc-per-node 8 -m jobs.train --launcher torch ...   (one box, no Ray)

``--config`` takes a YAML file or the name of a shipped config (``jobs/configs/train_<stage>.yaml``). Relative
paths are taken from the current folder. Rerunning with the same output and run name resumes from the last
checkpoint when the config is the same (``steps`` may grow; a complete run is reported and nothing starts),
and is refused when it differs.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_log_level_option, add_rerun_options, positive_int, setup_logging
from jobs.config_io import FieldOverrides, add_config_options, read_yaml, show_config


def add_training_flags(parser: argparse.ArgumentParser, *, output: str, steps: str, default_steps: int | None,
                       default_workers: int | None) -> None:
    """The flags ``lance train`` and ``lance tune`` share (their help and defaults differ)."""
    parser.add_argument("--data", action="append", help="latent shard root, local or s3:// (repeatable)")
    parser.add_argument("--output", help=output)
    parser.add_argument("--steps", type=positive_int, default=default_steps, help=steps)
    parser.add_argument("--workers", type=positive_int, default=default_workers,
                        help="Ray Train workers" + (" per trial" if default_workers else ""))


def training_fields(args: argparse.Namespace) -> FieldOverrides:
    """The config fields the shared flags set, each named by its flag in errors."""
    fields = FieldOverrides()
    fields.flag("--data", "data.uris", list(args.data) if args.data else None)
    fields.flag("--output", "output", args.output)
    fields.flag("--steps", "steps", args.steps)
    fields.flag("--workers", "scaling.workers", args.workers)
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "training config", "train_")
    add_training_flags(parser, output="folder holding the run folder <output>/<name>",
                       steps="total training steps", default_steps=None, default_workers=None)
    parser.add_argument("--name", help="run name (same name = resume)")
    parser.add_argument("--launcher", choices=("ray", "torch"), default="ray",
                        help="ray: Ray Train workers (default); torch: this process is one rank of a torchrun "
                             "launch (or the only one), no Ray")
    add_rerun_options(parser, "<output>/<name>")
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError
    from pipelines.train.config import load_train_config

    fields = training_fields(args)
    fields.flag("--name", "name", args.name)
    try:
        fields.sets(args.set)
        cfg = load_train_config(fields.apply(read_yaml(args.config)), flags=fields.flags)
    except ConfigError as err:
        print(f"lance train: {err}", file=sys.stderr)
        return 2
    if show_config(args, cfg):
        return 0
    from pipelines.runtime.run_folder import RunFolderError
    from pipelines.runtime.storage import StorageError
    from pipelines.train.plan import DataError
    from pipelines.train.report import print_summary

    if args.launcher == "torch":
        from pipelines.train.torch_launch import run_torch_training as run_training

        class TrainingFailedError(Exception):  # no Ray Train: failures are the trainer's own errors
            pass
    else:
        from ray.train import TrainingFailedError

        from pipelines.train.driver import run_training
    try:
        result = run_training(cfg, mode=args.mode)
    except (ConfigError, RunFolderError) as err:
        print(f"lance train: {err}", file=sys.stderr)
        return 2
    except (DataError, StorageError) as err:
        print(f"lance train: data: {err}", file=sys.stderr)
        return 1
    except TrainingFailedError as err:
        print(f"lance train: training failed: {err}", file=sys.stderr)
        return 1
    if args.launcher == "torch":
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return 0  # rank 0 reports
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
