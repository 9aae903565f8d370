"""``lance tune``: a Ray Tune sweep of the config's ``tune:`` section (search space, ASHA or FIFO, trials
and concurrency), each trial a real training run of the given config (use the tiny preset on one machine).
The winner is written as ``<sweep>/best_config.yaml``, which ``lance train --config`` takes back.

    lance tune --config jobs/configs/train_tiny.yaml [--data URI ...] [--samples N] [--steps N] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from jobs.config_io import read_yaml
from lance_core.config import ConfigError
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
    args = parser.parse_args(argv)
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
    from pipelines.train.trainer import storage_and_log_dir
    from pipelines.train.tune import best_config_data, best_params, run_sweep

    try:
        grid = run_sweep(base)
    except DataError as err:
        print(f"lance tune: data: {err}", file=sys.stderr)
        return 1
    errors = [r.error for r in grid if r.error]
    if len(errors) == len(grid):
        print(f"lance tune: every trial failed; first error: {errors[0]}", file=sys.stderr)
        return 1
    best = best_params(grid, base)
    path = storage_and_log_dir(base)[1] / "best_config.yaml"
    best_data = best_config_data(base, best["params"], f"{name}-best")
    best_data["steps"] = given.get("steps", best_data["steps"])  # the sweep's short trials set none of it
    path.write_text(yaml.safe_dump(best_data, sort_keys=False))
    print("best trial: " + json.dumps(best))
    print(f"best config: {path}  (lance train --config {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
