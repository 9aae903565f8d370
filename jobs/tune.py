"""``lance tune``: a Ray Tune sweep (ASHA) over learning rate, CE loss weight and mixture, each trial a real
training run of the given config (use the tiny preset on one machine).

    lance tune --config jobs/configs/train_tiny.yaml [--data URI ...] [--samples N] [--steps N] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.config_io import read_yaml
from lance_core.config import ConfigError, load_config
from pipelines.train.config import apply_overrides, load_train_config
from pipelines.train.plan import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML config the trials start from")
    parser.add_argument("--data", action="append", help="latent shard root, local or s3:// (repeatable)")
    parser.add_argument("--output", help="folder of the sweep (default: the config's output)")
    parser.add_argument("--steps", type=int, default=8, help="steps per trial (ASHA's max_t)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument("--samples", type=int, default=4, help="trials")
    parser.add_argument("--grace", type=int, default=4, help="steps before ASHA may stop a trial")
    args = parser.parse_args(argv)
    from pipelines.train.tune import TuneSection

    try:
        data = apply_overrides(read_yaml(args.config), uris=args.data, output=args.output, steps=args.steps,
                               workers=args.workers)
        data["name"] = f"{data.get('name', 'lance-train')}-tune"
        base = load_train_config(data)
        sweep = load_config(TuneSection, {"num_samples": args.samples, "grace_period": args.grace}, prefix="tune")
    except ConfigError as err:
        print(f"lance tune: {err}", file=sys.stderr)
        return 2
    from pipelines.train.tune import best_params, run_sweep

    try:
        grid = run_sweep(base, sweep)
    except DataError as err:
        print(f"lance tune: data: {err}", file=sys.stderr)
        return 1
    errors = [r.error for r in grid if r.error]
    if len(errors) == len(grid):
        print(f"lance tune: every trial failed; first error: {errors[0]}", file=sys.stderr)
        return 1
    best = best_params(grid)
    print("best config: " + json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
