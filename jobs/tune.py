"""``lance tune``: a Ray Tune sweep of the config's ``tune:`` section (search space, ASHA or FIFO, trials
and concurrency), each trial a real training run of the given config (use the tiny preset on one machine).
The winner is written as ``<sweep>/best_config.yaml``, which ``lance train --config`` takes back.

    lance tune --config jobs/configs/train_tiny.yaml [--data URI ...] [--samples N] [--steps N] [--workers N]
               [--resume | --overwrite]

Relative paths are taken from the current folder. Rerunning into the same sweep folder reports a finished
sweep, continues an unfinished one of the same config, and refuses one of another config.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.config_io import read_yaml
from lance_core.config import ConfigError
from pipelines.runtime.run_folder import RunFolderError, add_rerun_options
from pipelines.runtime.run_log import setup_logging
from pipelines.train.config import apply_overrides, load_train_config
from pipelines.train.plan import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML config the trials start from")
    parser.add_argument("--data", action="append", help="latent shard root, local or s3:// (repeatable)")
    parser.add_argument("--output", help="folder of the sweep (default: the config's output)")
    parser.add_argument("--steps", type=int, default=8, help="steps per trial (ASHA's max_t); the best config "
                        "keeps the config's own step count")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument("--samples", type=int, help="trials (tune.num_samples)")
    parser.add_argument("--grace", type=int, help="steps before ASHA may stop a trial (tune.scheduler.grace_period)")
    add_rerun_options(parser, "the sweep folder")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        given = read_yaml(args.config)
        data = apply_overrides(given, uris=args.data, output=args.output, steps=args.steps, workers=args.workers)
        name = data.get("name", "lance-train")
        data["name"] = f"{name}-tune"
        tune = dict(data.get("tune") or {})
        if args.samples is not None:
            tune["num_samples"] = args.samples
        if args.grace is not None:
            tune["scheduler"] = {**(tune.get("scheduler") or {}), "grace_period": args.grace}
        data["tune"] = tune
        base = load_train_config(data)
    except ConfigError as err:
        print(f"lance tune: {err}", file=sys.stderr)
        return 2
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
