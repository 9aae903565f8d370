"""``lance grpo``: Flow-GRPO on Ray (local Ray unless RAY_ADDRESS or ray_address is set).

    lance grpo --config grpo_tiny [--prompts FILE] [--checkpoint PATH] [--output DIR] [--epochs N | --steps N]
               [--set section.field=value ...] [--resume | --overwrite]
    python -m jobs.grpo ...      (for ray job submit)

``--config`` takes a YAML file or the name of a shipped config. An epoch is one rollout and one learner
update of ``learner.minibatches`` optimizer steps: ``--epochs`` sets the epochs, ``--steps`` the optimizer
steps (a multiple of ``learner.minibatches``; with the default of 1 the two are the same). Relative paths
are taken from the current folder. Running again into the same ``--output`` resumes from its latest
checkpoint when the config is the same (more epochs continue a finished run; a finished one is reported and
nothing runs), and is refused when it differs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli import add_log_level_option, add_rerun_options, positive_int, setup_logging
from jobs.config_io import FieldOverrides, add_config_options, read_yaml, show_config

log = logging.getLogger("lance.grpo")


def _epochs_of_steps(steps: int, data: dict) -> int:
    """Epochs that make ``steps`` optimizer steps at the config's ``learner.minibatches`` per epoch."""
    from lance_core.config import ConfigError
    from pipelines.rl.config import LearnerConfig

    learner = data.get("learner") or {}
    per_epoch = learner.get("minibatches", LearnerConfig.model_fields["minibatches"].default)
    if not isinstance(per_epoch, int) or per_epoch < 1:
        return steps  # validation names learner.minibatches
    if steps % per_epoch:
        raise ConfigError(f"--steps: {steps} optimizer steps are not whole epochs of learner.minibatches = "
                          f"{per_epoch} steps; give a multiple of {per_epoch}, or --epochs")
    return steps // per_epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance grpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "GRPO config (default: tiny model, generated OCR prompts, OCR reward)", "grpo_")
    parser.add_argument("--prompts", help="training prompts file instead of the generated ones: text (target "
                        "in double quotes) or JSONL")
    parser.add_argument("--checkpoint", help="initial Lance weights (safetensors file or folder)")
    parser.add_argument("--output", default="runs/grpo", help="run folder (metrics, gallery, checkpoints)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, help="epochs to run (overrides the config)")
    length.add_argument("--steps", type=positive_int,
                        help="learner optimizer steps to run: epochs x learner.minibatches (overrides the config)")
    add_rerun_options(parser)
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError, resolve_user_path
    from pipelines.rl.config import load_grpo_config

    fields = FieldOverrides()
    fields.flag("--prompts", "prompts.path", args.prompts or None)
    fields.flag("--checkpoint", "model.weights.lance", args.checkpoint or None)
    fields.flag("--epochs", "epochs", args.epochs)
    try:
        fields.sets(args.set)
        given = read_yaml(args.config)
        if args.steps is not None and "epochs" not in fields.flags:  # --set epochs has the last word
            fields.flag("--steps", "epochs", _epochs_of_steps(args.steps, fields.apply(given)))
        cfg = load_grpo_config(fields.apply(given), flags=fields.flags)
    except ConfigError as err:
        print(f"lance grpo: {err}", file=sys.stderr)
        return 2
    if show_config(args, cfg):
        return 0
    from pipelines.rl.loop import run_grpo
    from pipelines.rl.policy import CheckpointMismatchError
    from pipelines.runtime.run_folder import RunFolderError

    log.info(f"run folder: {resolve_user_path(args.output)}")
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
