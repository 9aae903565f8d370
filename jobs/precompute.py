"""``lance precompute``: raw pairs -> latent shards on Ray Data (local Ray unless RAY_ADDRESS is set).

    lance precompute [--config precompute_tiny] [--input URI] [--output URI] [--set section.field=value ...]
                     [--semantic-dedup] [--resume | --overwrite]
    python -m jobs.precompute ...      (for ray job submit)

``--config`` takes a YAML file or the name of a shipped config. Relative paths are taken from the current
folder. Running again into the same output resumes it when its config is the same (a finished one is
reported, nothing runs), and is refused when it differs. With ``--semantic-dedup`` (``filters.semantic_dedup``)
the shards also store CLIP image embeddings, and once every partition is committed the semantic dedup pass
(pipelines/data/semdedup.py) writes ``semantic_drop.parquet``, the rows training leaves out.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_log_level_option, add_rerun_options, setup_logging
from jobs.config_io import FieldOverrides, add_config_options, read_yaml, show_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "precompute config (default: tiny encoders, local Ray)", "precompute_")
    parser.add_argument("--input", help="input URI (file or folder, local or s3://)")
    parser.add_argument("--output", help="output URI for shards, manifest, quarantine and stats")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress bars; a log line every tenth of the partitions (at least every "
                             "100) instead")
    parser.add_argument("--semantic-dedup", action="store_true",
                        help="store CLIP image embeddings and run the semantic dedup pass after the precompute "
                             "(filters.semantic_dedup)")
    add_rerun_options(parser)
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError, load_config
    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.report import nothing_written, print_summary
    from pipelines.runtime.run_folder import RunFolderError
    from pipelines.runtime.storage import StorageError

    fields = FieldOverrides()
    fields.flag("--input", "input", args.input or None)
    fields.flag("--output", "output", args.output or None)
    fields.flag("--semantic-dedup", "filters.semantic_dedup", True if args.semantic_dedup else None)
    try:
        fields.sets(args.set)
        data = fields.apply(read_yaml(args.config))
        cfg = load_config(PrecomputeConfig, data, prefix="precompute", flags=fields.flags)
        if show_config(args, cfg):
            return 0
        from pipelines.data.pipeline import run_precompute

        result = run_precompute(cfg, progress=not args.no_progress, mode=args.mode)
        failure = nothing_written(result.stats, result.output)  # then there is nothing to deduplicate
        semantic = None
        if cfg.filters.semantic_dedup and not failure:  # run_precompute returns once all is committed
            from pipelines.data.semdedup import run_semantic_dedup

            semantic = run_semantic_dedup(cfg)
    except (ConfigError, RunFolderError) as err:
        print(f"lance precompute: {err}", file=sys.stderr)
        return 2
    except (StorageError, FileNotFoundError, ValueError) as err:
        print(f"lance precompute: {err}", file=sys.stderr)
        return 1
    print_summary(result)
    if semantic is not None:
        from pipelines.data.semdedup import print_semantic_summary

        print_semantic_summary(semantic)
    if failure:
        print(f"lance precompute: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
