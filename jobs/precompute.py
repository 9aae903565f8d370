"""``lance precompute``: raw pairs -> latent shards on Ray Data (local Ray unless RAY_ADDRESS is set).

    lance precompute [--config jobs/configs/precompute_tiny.yaml] [--input URI] [--output URI]
                     [--resume | --overwrite]
    python -m jobs.precompute ...      (for ray job submit)

Relative paths are taken from the current folder. Running again into the same output resumes it when its
config is the same (a finished one is reported, nothing runs), and is refused when it differs.
"""

from __future__ import annotations

import argparse
import sys

from jobs.config_io import read_yaml
from lance_core.config import ConfigError, load_config
from pipelines.data.config import PrecomputeConfig
from pipelines.data.report import print_summary
from pipelines.data.storage import StorageError
from pipelines.runtime.run_folder import RunFolderError, add_rerun_options
from pipelines.runtime.run_log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: tiny encoders, local Ray)")
    parser.add_argument("--input", help="input URI (file or folder, local or s3://)")
    parser.add_argument("--output", help="output URI for shards, manifest, quarantine and stats")
    parser.add_argument("--no-progress", action="store_true", help="hide the live progress bars")
    add_rerun_options(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        data = read_yaml(args.config)
        if args.input:
            data["input"] = args.input
        if args.output:
            data["output"] = args.output
        cfg = load_config(PrecomputeConfig, data, prefix="precompute")
        from pipelines.data.pipeline import run_precompute

        result = run_precompute(cfg, progress=not args.no_progress, mode=args.mode)
    except (ConfigError, RunFolderError) as err:
        print(f"lance precompute: {err}", file=sys.stderr)
        return 2
    except (StorageError, FileNotFoundError, ValueError) as err:
        print(f"lance precompute: {err}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
