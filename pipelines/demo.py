"""The embedded demo: the whole system at tiny size on this machine.

By default (``media: digits``) it shows that the system learns: real handwritten digits through precompute,
training, sampling and GRPO, judged by a classifier (pipelines/learning.py), with a report of generated
digits under their prompts, held-out images with their generated captions, the accuracies, the learning
curve and GRPO's before / after. ``media: synthetic`` runs the original tour of every task instead:

``lance synth`` datasets (images with rendered text, moving-shape videos, edit pairs, QA rows) ->
``lance precompute`` on a local Ray (tiny Wan VAE and Qwen ViT, latent shards) -> ``lance train`` (Ray
Train, 2 DeepSpeed ZeRO-2 workers on CPU, a few dozen steps of the multi-task mixture) -> a short
``lance grpo`` phase from the exported weights (rollout, PP-OCR reward and learner actors) -> a report in
the run folder: loss curves, a generated image and video strip decoded through the VAE (enlarged, their
prompts written under them), a generated caption, the GRPO rewards and gallery (``grpo_gallery.png``:
rollouts with prompt and reward), the metrics and the throughput summary.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lance_core.config import StrictModel, load_config
from pipelines.data.config import PrecomputeConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN_BASE = ROOT / "jobs" / "configs" / "train_tiny.yaml"
GRPO_BASE = ROOT / "jobs" / "configs" / "grpo_tiny.yaml"

DEMO_PRECOMPUTE = dict(partition_size=8, latent_dtype="bf16",
                       buckets=dict(image_area=64 * 64, video_area=64 * 96, vit_area=56 * 56),
                       video=dict(fps=12, max_seconds=1.0), filters=dict(dedup=False))


SYNTHETIC_STEPS = 24
SYNTHETIC_TRAIN = {"optim": {"lr": 0.002, "warmup_steps": 2}, "checkpoint": {"every_steps": 12, "keep_last": 1}}
"""The synthetic tour's training settings over jobs/configs/train_tiny.yaml (``train:`` lies over them)."""


class DemoConfig(StrictModel):
    media: Literal["digits", "synthetic"] = "digits"
    """digits: the learning run on real handwritten digits (t2i, i2t, GRPO with a classifier reward);
    synthetic: made-up media of every task (video and edits included), a tour of the pipeline."""
    learning: dict[str, Any] = {}
    """Fields of the learning run (pipelines/learning.py ``LearningConfig``) over its quick settings."""
    synth_count: int = Field(8, gt=0)
    """Records per image dataset made by ``lance synth`` (video datasets get a quarter)."""
    seed: int = 0
    steps: int | None = Field(None, gt=0)
    """Training steps (None: 24 for ``synthetic``, the learning run's quick setting for ``digits``)."""
    workers: int = Field(2, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precompute: dict[str, Any] = {}
    """Fields of the precompute config (input and output are set by the demo), laid over
    jobs/configs/precompute_digits.yaml (digits) or the synthetic tour's settings."""
    train: dict[str, Any] = {}
    """Fields of the training config, laid over jobs/configs/train_digits.yaml (digits) or
    jobs/configs/train_tiny.yaml (synthetic)."""
    grpo_epochs: int = Field(2, ge=0)
    """GRPO epochs after training of the synthetic tour (0: no GRPO phase; digits: ``learning.grpo_epochs``)."""
    grpo: dict[str, Any] = {}
    """Fields of the GRPO config, laid over jobs/configs/grpo_digits.yaml (digits) or
    jobs/configs/grpo_tiny.yaml (synthetic)."""


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def demo_configs(cfg: DemoConfig, run_dir: Path):
    """The precompute, training and GRPO configs of a demo run (validated, errors named ``demo.…``)."""
    import yaml

    from pipelines.rl.config import GRPOConfig
    from pipelines.train.config import TrainConfig

    latents = run_dir / "latents"
    precompute = load_config(PrecomputeConfig, {**_merge(DEMO_PRECOMPUTE, cfg.precompute), "input": str(run_dir / "synth" / "parquet"),
                                                "output": str(latents)}, prefix="demo.precompute")
    base = yaml.safe_load(TRAIN_BASE.read_text())
    steps = cfg.steps or SYNTHETIC_STEPS
    fixed = {"name": "train", "output": str(run_dir), "steps": steps, "seed": cfg.seed,
             "data": {"uris": [str(latents)]}, "scaling": {"workers": cfg.workers},
             "deepspeed": {"zero_stage": cfg.zero_stage},
             "mixture": {"progressive": {"end_step": steps}}}
    train = load_config(TrainConfig, _merge(_merge(_merge(base, SYNTHETIC_TRAIN), fixed), cfg.train),
                        prefix="demo.train")
    grpo_base = yaml.safe_load(GRPO_BASE.read_text())
    grpo = load_config(GRPOConfig, _merge(_merge(grpo_base, {"epochs": max(cfg.grpo_epochs, 1), "seed": cfg.seed}),
                                          cfg.grpo), prefix="demo.grpo")
    return precompute, train, grpo


def learning_config(cfg: DemoConfig):
    """The learning run's config: ``learning:`` over its quick settings, the demo's ``train`` / ``grpo`` /
    ``precompute`` fields over the digits configs (checked here, so errors name ``demo.train.…``)."""
    from pipelines.learning import LearningRun, job_configs, load_learning_config, merge

    steps = {"steps": cfg.steps} if cfg.steps else {}
    data = {"seed": cfg.seed, "workers": cfg.workers, **steps, **cfg.learning}
    for part in ("train", "grpo", "precompute"):
        data[part] = merge(cfg.learning.get(part, {}), getattr(cfg, part))
    learning = load_learning_config(data, quick=True)
    job_configs(learning, LearningRun(Path("."), Path(".")), prefix="demo")
    return learning


def run_digits_demo(cfg: DemoConfig, run_dir: Path) -> dict:
    """The learning run into ``run_dir`` (its report in ``report/``); returns its figures, also in
    ``metrics.json``."""
    from pipelines.learning import run_learning

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    learning = learning_config(cfg)
    (run_dir / "config.json").write_text(json.dumps({"demo": cfg.model_dump(mode="json"),
                                                     "learning": learning.model_dump(mode="json")}, indent=2))
    figures = run_learning(learning, run_dir, run_dir / "report")
    _write_curve(figures["curve"], run_dir / "report" / "curve.png")
    (run_dir / "metrics.json").write_text(json.dumps(figures, indent=2))
    return figures


def _write_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.plot([p["step"] for p in curve], [p["t2i_accuracy"] for p in curve], marker="o", label="t2i accuracy")
    axes.axhline(0.1, color="grey", linestyle=":", label="chance")
    axes.set_xlabel("training step")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(cfg: DemoConfig, run_dir: Path) -> dict:
    """Run the demo into ``run_dir``; returns the metrics written to ``metrics.json``."""
    if cfg.media == "digits":
        return run_digits_demo(cfg, run_dir)
    from pipelines.data.pipeline import run_precompute
    from pipelines.data.synth import synth_all
    from pipelines.rl import run_grpo
    from pipelines.rl.metrics import GALLERY_GRID
    from pipelines.train.report import plot_losses, throughput_summary
    from pipelines.train.driver import ensure_train_ray, run_training

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    precompute_cfg, train_cfg, grpo_cfg = demo_configs(cfg, run_dir)
    (run_dir / "config.json").write_text(json.dumps({
        "demo": cfg.model_dump(mode="json"), "precompute": precompute_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json"), "grpo": grpo_cfg.model_dump(mode="json")}, indent=2))
    timings = {}
    started = time.perf_counter()
    synth_all(run_dir / "synth", cfg.synth_count, cfg.seed)
    timings["synth_seconds"] = time.perf_counter() - started
    ensure_train_ray()
    started = time.perf_counter()
    data = run_precompute(precompute_cfg, progress=False)
    timings["precompute_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    result = run_training(train_cfg)
    timings["train_seconds"] = time.perf_counter() - started
    grpo = {}
    if cfg.grpo_epochs:
        started = time.perf_counter()
        grpo = run_grpo(grpo_cfg, run_dir / "grpo", checkpoint=str(result.export))
        timings["grpo_seconds"] = time.perf_counter() - started

    rows = result.metrics
    plot_losses(rows, run_dir / "loss_curve.png")
    with open(run_dir / "loss_history.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    last_eval = next((r["eval"] for r in reversed(rows) if "eval" in r), {})
    samples = result.run_dir / "samples"
    step = last_eval.get("step", cfg.steps or SYNTHETIC_STEPS)
    _captioned_copy(samples / f"step{step:07d}_image.png", last_eval.get("image_prompt", ""),
                    run_dir / "sample_image.png")
    _captioned_copy(samples / f"step{step:07d}_video_frames.png",
                    f"{last_eval.get('video_prompt', '')}\n(frames, left to right)",
                    run_dir / "sample_video_frames.png")
    galleries = sorted((run_dir / "grpo" / "gallery").glob(f"epoch_*/{GALLERY_GRID}")) if grpo else []
    if galleries:
        shutil.copyfile(galleries[-1], run_dir / "grpo_gallery.png")
    summary = throughput_summary(rows)
    metrics = {
        "steps": summary["steps"],
        "workers": cfg.workers,
        "zero_stage": cfg.zero_stage,
        "tasks": sorted(result.plan.task_rows),
        "rows_per_task": result.plan.task_rows,
        "samples_written": data.stats.get("samples_written"),
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "throughput": {k: summary[k] for k in ("tokens_per_s", "samples_per_s", "step_time_s", "data_wait_share",
                                              "pack_fill", "tflops", "mfu", "peak_source")},
        "skipped_samples": summary["skipped_samples"],
        "skipped_steps": summary["skipped_steps"],
        "final_mixture": rows[-1]["mixture"] if rows else {},
        "eval": last_eval,
        "export": str(result.export) if result.export else None,
        "train_run": str(result.run_dir),
        "grpo": {k: grpo[k] for k in ("epochs", "reward_first", "reward_last", "reward_best", "images_per_s",
                                      "zero_spread_ratio", "model")} if grpo else {},
        **{k: round(v, 2) for k, v in timings.items()},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _captioned_copy(source: Path, caption: str, target: Path) -> None:
    """A sample of the report: enlarged, its prompt written under it."""
    from PIL import Image

    from pipelines.runtime.gallery import write_captioned

    write_captioned([np.asarray(Image.open(source).convert("RGB"))], [caption], target)


def load_demo_config(data: dict | None, flags: dict[str, str] | None = None) -> DemoConfig:
    """``flags``: dotted field -> the command-line flag that set it, named in the errors."""
    return load_config(DemoConfig, data, prefix="demo", flags=flags)
