"""``lance synth OUT [--count N] [--seed S]``: sample datasets in every input format (see pipelines/data/synth.py).
The folder may also be given as ``--output OUT``, as for the other jobs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.cli import add_log_level_option, positive_int, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance synth", description=__doc__)
    parser.add_argument("folder", nargs="?", metavar="OUT", help="folder to write the datasets into")
    parser.add_argument("--output", help="the same folder (instead of OUT)")
    parser.add_argument("--count", type=positive_int, default=8, help="records per image dataset")
    parser.add_argument("--seed", type=int, default=0)
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.output is None):
        parser.error("give the output folder once: OUT or --output OUT")
    setup_logging(args.log_level)
    from pipelines.data.synth import synth_all

    for name, path in synth_all(Path(args.folder or args.output), args.count, args.seed).items():
        print(f"{name:<20} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
