"""``lance grpo``: Flow-GRPO on Ray (local Ray unless RAY_ADDRESS or ray_address is set).

    lance grpo --config jobs/configs/grpo_tiny.yaml [--prompts FILE] [--checkpoint PATH] [--output DIR] [--steps N]
               [--resume | --overwrite]
    python -m jobs.grpo ...      (for ray job submit)

``--steps`` sets the number of epochs (one rollout + one learner update each). Relative paths are taken
from the current folder. Running again into the same ``--output`` resumes from its latest checkpoint when
the config is the same (more epochs continue a finished run; a finished one is reported and nothing runs),
and is refused when it differs.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.config_io import read_yaml
from lance_core.config import ConfigError
from pipelines.runtime.run_folder import RunFolderError, add_rerun_options
from pipelines.runtime.run_log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: tiny model, built-in prompts, OCR reward)")
    parser.add_argument("--prompts", help="prompts file: text (target in double quotes) or JSONL")
    parser.add_argument("--checkpoint", help="initial Lance weights (safetensors file or folder)")
    parser.add_argument("--output", default="runs/grpo", help="run folder (metrics, gallery, checkpoints)")
    parser.add_argument("--steps", type=int, help="epochs to run (overrides the config)")
    add_rerun_options(parser)
    args = parser.parse_args(argv)
    setup_logging()
    from pipelines.rl.config import load_grpo_config

    try:
        data = read_yaml(args.config)
        if args.prompts:
            data.setdefault("prompts", {})["path"] = args.prompts
        if args.checkpoint:
            data["checkpoint"] = args.checkpoint
        if args.steps is not None:
            data["epochs"] = args.steps
        cfg = load_grpo_config(data)
    except ConfigError as err:
        print(f"lance grpo: {err}", file=sys.stderr)
        return 2
    from pipelines.rl.loop import run_grpo
    from pipelines.rl.policy import CheckpointMismatchError

    try:
        summary = run_grpo(cfg, args.output, mode=args.mode)
    except (ConfigError, RunFolderError) as err:
        print(f"lance grpo: {err}", file=sys.stderr)
        return 2
    except (CheckpointMismatchError, FileNotFoundError, ValueError) as err:
        print(f"lance grpo: {err}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
