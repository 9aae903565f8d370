"""``lance tune``: a Ray Tune sweep of the config's ``tune:`` section (search space, ASHA or FIFO, trials
and concurrency), each trial a real training run of the given config (use the tiny preset on one machine).
The winner is written as ``<sweep>/best_config.yaml``, which ``lance train --config`` takes back.

    lance tune --config train_tiny [--data URI ...] [--output DIR] [--samples N] [--steps N] [--workers N]
               [--set section.field=value ...] [--resume | --overwrite]

``--config`` takes a YAML file or the name of a shipped config. The sweep folder is
``<output>/<name>-tune``. Relative paths are taken from the current folder. Rerunning into the same sweep
folder reports a finished sweep, continues an unfinished one of the same config, and refuses one of another
config.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import add_log_level_option, add_rerun_options, positive_int, setup_logging
from jobs.config_io import add_config_options, read_yaml, show_config
from jobs.train import add_training_flags, training_fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "training config the trials start from", "train_")
    add_training_flags(parser, output="folder holding the sweep folder <output>/<name>-tune (default: the "
                       "config's output)", steps="steps per trial (ASHA's max_t); the best config keeps the "
                       "config's own step count", default_steps=8, default_workers=1)
    parser.add_argument("--samples", type=positive_int, help="trials (tune.num_samples)")
    parser.add_argument("--grace", type=positive_int,
                        help="steps before ASHA may stop a trial (tune.scheduler.grace_period)")
    add_rerun_options(parser, "the sweep folder")
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError
    from pipelines.train.config import load_train_config

    fields = training_fields(args)
    fields.flag("--samples", "tune.num_samples", args.samples)
    fields.flag("--grace", "tune.scheduler.grace_period", args.grace)
    try:
        fields.sets(args.set)
        given = read_yaml(args.config)
        data = fields.apply(given)
        name = data.get("name", "lance-train")
        data["name"] = f"{name}-tune"
        base = load_train_config(data, flags=fields.flags)
    except ConfigError as err:
        print(f"lance tune: {err}", file=sys.stderr)
        return 2
    if show_config(args, base.model_copy(update={"name": name})):  # the config the trials start from
        return 0
    from pipelines.runtime.run_folder import RunFolderError
    from pipelines.train.plan import DataError
    from pipelines.train.tune import SweepFailed, sweep

    try:
        outcome = sweep(base, f"{name}-best", given.get("steps", base.steps), mode=args.mode)
    except (ConfigError, RunFolderError) as err:
        print(f"lance tune: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"lance tune: data: {err}", file=sys.stderr)
        return 1
    except SweepFailed as err:
        print(f"lance tune: {err}", file=sys.stderr)
        return 1
    earlier = " (found from an earlier run)" if outcome.complete_before else ""
    print(f"best trial{earlier}: " + json.dumps(outcome.best))
    print(f"best config: {outcome.config_path}  (lance train --config {outcome.config_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
