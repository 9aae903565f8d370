"""``lance precompute``: raw pairs -> latent shards on Ray Data (local Ray unless RAY_ADDRESS is set).

    lance precompute [--config precompute_tiny] [--input URI] [--output URI] [--set section.field=value ...]
                     [--resume | --overwrite]
    python -m jobs.precompute ...      (for ray job submit)

``--config`` takes a YAML file or the name of a shipped config. Relative paths are taken from the current
folder. Running again into the same output resumes it when its config is the same (a finished one is
reported, nothing runs), and is refused when it differs.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_log_level_option, add_rerun_options, setup_logging
from jobs.config_io import FieldOverrides, add_config_options, read_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "precompute config (default: tiny encoders, local Ray)", "precompute_")
    parser.add_argument("--input", help="input URI (file or folder, local or s3://)")
    parser.add_argument("--output", help="output URI for shards, manifest, quarantine and stats")
    parser.add_argument("--no-progress", action="store_true", help="hide the live progress bars")
    add_rerun_options(parser)
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError, load_config
    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.report import print_summary
    from pipelines.runtime.run_folder import RunFolderError
    from pipelines.runtime.storage import StorageError

    fields = FieldOverrides()
    fields.flag("--input", "input", args.input or None)
    fields.flag("--output", "output", args.output or None)
    try:
        fields.sets(args.set)
        data = fields.apply(read_yaml(args.config))
        cfg = load_config(PrecomputeConfig, data, prefix="precompute", flags=fields.flags)
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
