"""``lance synth OUT [--count N] [--seed S]``: sample datasets in every input format (see pipelines/data/synth.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.data.synth import synth_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance synth", description=__doc__)
    parser.add_argument("output", help="folder to write the datasets into")
    parser.add_argument("--count", type=int, default=8, help="records per image dataset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in synth_all(Path(args.output), args.count, args.seed).items():
        print(f"{name:<20} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
