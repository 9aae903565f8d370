"""``lance demo``: the main job on the embedded default, showing that the system learns: real handwritten
digits (``lance synth digits``) -> ``lance precompute`` (local Ray, the exact pixel codec, the tiny ViT) ->
``lance train`` (2 DeepSpeed ZeRO-2 workers, t2i + i2t) -> sampling scored by a classifier that never saw a
generated image -> ``lance grpo`` with that classifier as the reward -> a report in the run folder (generated
digits under their prompts, held-out images with their captions, accuracies, the learning curve, GRPO before
and after). ``--set media=synthetic`` runs the tour of every task (video, edits) on made-up media instead.

    lance demo [--config demo] [--output runs/demo] [--steps N] [--set field=value ...] [--resume | --overwrite]

Running again into the same ``--output`` with the same demo settings resumes it (each stage reports what an
earlier run finished); other settings are refused; ``--overwrite`` removes the earlier demo folder first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jobs.cli import add_log_level_option, add_rerun_options, positive_int, setup_logging
from jobs.config_io import FieldOverrides, add_config_options, read_yaml, show_config


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, "demo settings (defaults built in)", "demo")
    parser.add_argument("--output", help="run folder (default: runs/demo-<time>)")
    parser.add_argument("--steps", type=positive_int, help="training steps (overrides the config)")
    add_rerun_options(parser)
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError
    from pipelines.demo import demo_configs, learning_config, load_demo_config, run_demo
    from pipelines.learning import LearningRun, figure_lines, job_configs
    from pipelines.runtime.run_folder import CONFIG_FILE, RunFolder, RunFolderError

    run_dir = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    fields = FieldOverrides()
    fields.flag("--steps", "steps", args.steps)
    try:
        fields.sets(args.set)
        cfg = load_demo_config(fields.apply(read_yaml(args.config)), flags=fields.flags)
        if show_config(args, cfg):
            return 0
        if cfg.media == "digits":
            job_configs(learning_config(cfg), LearningRun(run_dir, run_dir / "report"))
        else:
            demo_configs(cfg, run_dir)
        # the demo's own settings decide; each stage then checks its own config (in config.json beside them)
        folder = RunFolder("demo", str(run_dir.resolve()))
        folder.settle({"demo": cfg.model_dump(mode="json")}, ("precompute", "train", "grpo"), args.mode,
                      holds_run=folder.holds(CONFIG_FILE))
    except (ConfigError, RunFolderError) as err:
        print(f"lance demo: {err}", file=sys.stderr)
        return 2
    metrics = run_demo(cfg, run_dir)
    if cfg.media == "digits":
        for line in figure_lines(metrics):
            print(line)
        print(f"report: {(run_dir / 'report').resolve()} (t2i_grid.png, i2t_grid.png, grpo_before_after.png, "
              f"curve.png, t2i/, i2t.jsonl)")
        return 0
    first, last, speed = metrics["first_loss"], metrics["last_loss"], metrics["throughput"]
    print(f"precompute: {metrics['samples_written']} samples of tasks {', '.join(metrics['tasks'])} "
          f"in {metrics['precompute_seconds']:.0f} s")
    print(f"train: {metrics['steps']} steps on {metrics['workers']} workers (ZeRO-{metrics['zero_stage']}): "
          f"loss {_num(first['loss'])} -> {_num(last['loss'])} (ce {_num(first['ce'])} -> {_num(last['ce'])}, "
          f"mse {_num(first['mse'])} -> {_num(last['mse'])}) in {metrics['train_seconds']:.0f} s")
    print(f"throughput: {speed['tokens_per_s']:.0f} tokens/s, {speed['samples_per_s']:.1f} samples/s, "
          f"pack fill {speed['pack_fill']:.3f}, data wait {100 * speed['data_wait_share']:.1f} % of a step")
    print(f"generated caption: {metrics['eval'].get('caption_generated')!r}")
    if metrics["grpo"]:
        g = metrics["grpo"]
        print(f"grpo: {g['epochs']} epochs, reward {g['reward_first']:.3f} -> {g['reward_last']:.3f} "
              f"(best {g['reward_best']:.3f}), {g['images_per_s']:.1f} images/s, "
              f"zero-spread groups {100 * g['zero_spread_ratio']:.0f} %")
    print(json.dumps({k: metrics["eval"].get(k) for k in ("image_latent_shape", "video_latent_shape")}))
    print(f"report: {run_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
