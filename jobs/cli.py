"""The ``lance`` command: one subcommand per job; each lives in its own module under ``jobs``."""

from __future__ import annotations

import importlib
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


def _usage() -> str:
    lines = ["usage: lance <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run `lance <command> --help` for the options of a command"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lance: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
