"""Does the whole system learn? Real handwritten digits through precompute -> train -> sampling -> GRPO,
scored by an independent judge (pipelines/learning.py says how).

    python bench/learning.py [--quick] [--output DIR] [--root DIR] [--steps N] [--grpo-epochs N]

Prints the figures (judge accuracy, t2i accuracy against chance, i2t accuracy, GRPO before / after on
prompts it never trained on, the accuracy curve over training steps, wall time per stage) as a table and
writes them to ``bench/results/learning.json``. ``--output`` (default ``bench/results/learning``) receives what
was generated, laid out for any other judge: ``t2i/<digit>_<n>.png`` (the prompted digit first in the name),
``i2t.jsonl`` (``{"image", "digit", "caption"}`` of the held-out real images), ``t2i_grid.png`` (the generated
digits under their prompts and what the judge read) and ``grpo_before_after.png``. ``--quick``: fewer
training steps, fewer samples, a short GRPO phase (the demo and its test run these settings).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.common import RESULTS, load_average, print_table, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "learning"), help="what was generated goes here")
    parser.add_argument("--root", help="the run's data, shards and job runs (default: a temporary folder)")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--grpo-epochs", type=int)
    parser.add_argument("--out", help="the JSON (default bench/results/learning.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.learning import figure_lines, load_learning_config, run_learning

    overrides = {k: v for k, v in {"steps": args.steps, "grpo_epochs": args.grpo_epochs}.items() if v is not None}
    cfg = load_learning_config(overrides, quick=args.quick)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="lance-learning-"))
    figures = run_learning(cfg, root, Path(args.output))
    figures.update(quick=args.quick, load_average=load_average(), output=str(Path(args.output).resolve()),
                   config=cfg.model_dump(mode="json"))
    print()
    grpo = figures.get("grpo") or {}
    rows = [
        {"figure": "judge on held-out real digits", "value": figures["judge_heldout_accuracy"], "goal": ">= 0.95"},
        {"figure": f"t2i accuracy ({figures['t2i_samples']} images, chance 0.10)", "value": figures["t2i_accuracy"],
         "goal": ">= 0.90"},
        {"figure": f"i2t accuracy ({figures['i2t_images']} held-out images)", "value": figures["i2t_accuracy"],
         "goal": ">= 0.95"},
    ]
    if grpo:
        rows += [
            {"figure": "GRPO eval prompts: accuracy before", "value": grpo["before"]["accuracy"], "goal": ""},
            {"figure": "GRPO eval prompts: accuracy after", "value": grpo["after"]["accuracy"],
             "goal": "+0.05 or half the error"},
            {"figure": "GRPO eval prompts: mean reward before", "value": grpo["before"]["mean_reward"], "goal": ""},
            {"figure": "GRPO eval prompts: mean reward after", "value": grpo["after"]["mean_reward"], "goal": ""},
            {"figure": "GRPO eval images: chroma before (grey 0)", "value": grpo["before"]["chroma"], "goal": ""},
            {"figure": "GRPO eval images: chroma after", "value": grpo["after"]["chroma"], "goal": "low"},
        ]
    rows += [{"figure": f"t2i accuracy at step {p['step']}", "value": p["t2i_accuracy"], "goal": "curve"}
             for p in figures["curve"]]
    rows += [{"figure": f"seconds: {name}", "value": value, "goal": ""} for name, value in figures["seconds"].items()]
    print_table(rows, [("figure", "figure", "s"), ("value", "value", ".3f"), ("goal", "goal", "s")])
    for line in figure_lines(figures):
        print(line)
    write_json("learning", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
