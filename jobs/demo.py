"""``lance demo``: the main job on the embedded default (tiny presets, generated media, this machine).

    lance demo [--config jobs/configs/demo.yaml] [--output runs/demo] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lance_core.config import ConfigError
from jobs.config_io import read_yaml
from pipelines.demo import load_demo_config, run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of demo settings (defaults built in)")
    parser.add_argument("--output", help="run folder (default: runs/demo-<time>)")
    parser.add_argument("--steps", type=int, help="training steps (overrides the config)")
    args = parser.parse_args(argv)
    try:
        data = read_yaml(args.config)
        if args.steps is not None:
            data["steps"] = args.steps
        cfg = load_demo_config(data)
    except ConfigError as err:
        print(f"lance demo: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics = run_demo(cfg, run_dir)
    first, last = metrics["first_loss"], metrics["last_loss"]
    print(f"trained {metrics['steps']} steps on {metrics['samples']} packed samples "
          f"({metrics['packed_tokens']} tokens, tasks: {', '.join(metrics['tasks'])})")
    print(f"loss  ce {first['ce']:.3f} -> {last['ce']:.3f}   mse {first['mse']:.3f} -> {last['mse']:.3f}")
    print(f"generated caption: {metrics['caption_generated']!r}")
    print(json.dumps({k: metrics[k] for k in ('image_latent_shape', 'video_latent_shape')}))
    print(f"report: {run_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
