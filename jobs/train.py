"""``lance train``: Ray Train + DeepSpeed training of the dual-stream model over latent shards.

    lance train --config jobs/configs/train_tiny.yaml [--data URI ...] [--output DIR] [--steps N] [--workers N]
                [--resume | --overwrite]
    python -m jobs.train ...      (for ray job submit)

Relative paths are taken from the current folder. Rerunning with the same output and run name resumes from
the last checkpoint when the config is the same (``steps`` may grow; a complete run is reported and nothing
starts), and is refused when it differs.
"""

from __future__ import annotations

import argparse
import sys

from jobs.config_io import read_yaml
from lance_core.config import ConfigError
from pipelines.data.storage import StorageError
from pipelines.runtime.run_folder import RunFolderError, add_rerun_options
from pipelines.runtime.run_log import setup_logging
from pipelines.train.config import apply_overrides, load_train_config
from pipelines.train.plan import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (jobs/configs/train_<stage>.yaml)")
    parser.add_argument("--data", action="append", help="latent shard root, local or s3:// (repeatable)")
    parser.add_argument("--output", help="folder holding the run folder <output>/<name>")
    parser.add_argument("--name", help="run name (same name = resume)")
    parser.add_argument("--steps", type=int, help="total training steps")
    parser.add_argument("--workers", type=int, help="Ray Train workers")
    add_rerun_options(parser, "<output>/<name>")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        data = apply_overrides(read_yaml(args.config), uris=args.data, output=args.output, steps=args.steps,
                               workers=args.workers, name=args.name)
        cfg = load_train_config(data)
    except ConfigError as err:
        print(f"lance train: {err}", file=sys.stderr)
        return 2
    from ray.train import TrainingFailedError

    from pipelines.train.report import print_summary
    from pipelines.train.trainer import run_training

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
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
