"""``lance synth OUT [--count N] [--seed S]``: sample datasets in every input format (see pipelines/data/synth.py).
The folder may also be given as ``--output OUT``, as for the other jobs.

``lance synth digits OUT [--size 16] [--seed S]``: UCI's real handwritten digits (scikit-learn's bundled copy)
as image files with captions, a fixed train / held-out split, the release's Parquet layouts, GRPO prompts and
an independent judge (pipelines/data/digits.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.cli import add_log_level_option, positive_int, setup_logging


def digits_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lance synth digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="OUT", help="folder to write the digits into")
    parser.add_argument("--size", type=positive_int, default=16, help="image side in pixels (a multiple of 4)")
    parser.add_argument("--seed", type=int, default=0)
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from pipelines.data.digits import write_digits

    try:
        paths = write_digits(Path(args.folder), size=args.size, seed=args.seed)
    except ImportError as err:
        print(f"lance synth digits: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name:<20} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["digits"]:
        return digits_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lance synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
