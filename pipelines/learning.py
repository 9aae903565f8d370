"""Does the whole system learn? Real handwritten digits through every job, judged by a classifier that never
saw a generated image.

    lance synth digits           UCI's digits (scikit-learn's bundled copy): images, captions, a fixed split
                                 and the judge: a scikit-learn classifier of the training split's real images
    lance precompute             the training split (t2i and i2t) and the held-out images into latent shards
                                 (the exact pixel codec in the VAE's slot, the tiny ViT)
    lance train                  t2i + i2t on Ray Train + DeepSpeed, an export at every checkpoint
    sampling                     the project's sampler (KV cache, CFG); the judge classifies each generated image
    captioning                   greedy decoding on the held-out real images; a caption must name the digit
    lance grpo                   from the export, the judge as the reward (the classifier reward term), prompts
                                 of some phrasings; scored again on the phrasings it never trained on

Figures: the judge's accuracy on the held-out real digits; t2i accuracy (the share of generated images the
judge reads as the prompted digit; chance 10 %) at every exported checkpoint (the learning curve) and at the
end; i2t accuracy (the share of held-out images whose caption names their digit); GRPO's mean reward and
t2i accuracy on its evaluation prompts before and after. Nothing here knows about digits beyond the data
and the judge's file: the jobs run their shipped configs (``*_digits.yaml``) with paths set.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from lance_core.config import StrictModel, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
log = logging.getLogger("lance.learning")


class LearningConfig(StrictModel):
    size: int = Field(16, gt=0)
    """Side of the digit images in pixels (the 8x8 originals upscaled; a multiple of the codec's 4)."""
    steps: int = Field(2000, gt=0)
    """Training steps of ``lance train``."""
    curve_every: int = Field(400, gt=0)
    """Steps between checkpoints, each exported and scored: the learning curve."""
    workers: int = Field(2, ge=1)
    samples_per_digit: int = Field(10, gt=0)
    """Generated images per digit for the final t2i accuracy (every phrasing in turn)."""
    curve_samples_per_digit: int = Field(3, gt=0)
    sampling_steps: int = Field(20, gt=0)
    cfg_scale: float = Field(4.0, ge=1.0)
    i2t_images: int | None = Field(None, gt=0)
    """Held-out images to caption (None: all of them)."""
    grpo_epochs: int = Field(40, ge=0)
    """0: no GRPO phase."""
    grpo_samples_per_prompt: int = Field(16, gt=0)
    """Generated images per GRPO evaluation prompt, before and after."""
    grpo_from_step: int | None = Field(400, gt=0)
    """GRPO starts from the export of this training step (a checkpoint of the curve, with room left to improve:
    a quarter to a half of the held-out prompts drawn right at step 400, 93 % at step 800, near 100 % at the end),
    None: from the final export."""
    seed: int = 0
    train: dict[str, Any] = Field(default_factory=dict)
    """Fields laid over jobs/configs/train_digits.yaml."""
    grpo: dict[str, Any] = Field(default_factory=dict)
    """Fields laid over jobs/configs/grpo_digits.yaml."""
    precompute: dict[str, Any] = Field(default_factory=dict)
    """Fields laid over jobs/configs/precompute_digits.yaml."""


QUICK = {"steps": 800, "curve_every": 400, "samples_per_digit": 4, "curve_samples_per_digit": 2,
         "sampling_steps": 12, "i2t_images": 100, "grpo_epochs": 6, "grpo_samples_per_prompt": 4,
         "grpo_from_step": 400}
"""The quick run (tests, the demo, ``--quick``): two fifths of the training, fewer samples, a short GRPO phase from
the first checkpoint."""


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _shipped(name: str) -> dict:
    import yaml

    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@dataclass
class LearningRun:
    """Where a learning run keeps its parts (under ``root``) and writes what it generated (``output``)."""

    root: Path
    output: Path
    digits: Path = field(init=False)
    judge: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root, self.output = Path(self.root).resolve(), Path(self.output).resolve()
        self.digits = self.root / "digits"
        self.judge = self.digits / "judge.joblib"


def job_configs(cfg: LearningConfig, run: LearningRun, prefix: str = "learning"):
    """The precompute (training split, held-out images), training and GRPO configs: the shipped digits configs
    with this run's paths, sizes and overrides (errors named ``{prefix}.train.…``)."""
    from pipelines.data.config import PrecomputeConfig
    from pipelines.rl.config import GRPOConfig
    from pipelines.train.config import TrainConfig

    area = cfg.size * cfg.size
    base = merge(_shipped("precompute_digits"), {"buckets": {"image_area": area, "video_area": area}})
    base = merge(base, cfg.precompute)
    precompute = load_config(PrecomputeConfig, merge(base, {"input": str(run.digits / "parquet"),
                                                            "output": str(run.root / "latents")}),
                             prefix=f"{prefix}.precompute")
    heldout = load_config(PrecomputeConfig, merge(base, {"input": str(run.digits / "heldout_parquet"),
                                                         "output": str(run.root / "heldout-latents")}),
                          prefix=f"{prefix}.precompute")
    train = merge(_shipped("train_digits"), {
        "name": "digits", "output": str(run.root / "train"), "steps": cfg.steps, "seed": cfg.seed,
        "data": {"uris": [str(run.root / "latents")]}, "scaling": {"workers": cfg.workers},
        "checkpoint": {"every_steps": cfg.curve_every, "export_every": True}})
    train = load_config(TrainConfig, merge(train, cfg.train), prefix=f"{prefix}.train")
    grpo = merge(_shipped("grpo_digits"), {
        "epochs": max(cfg.grpo_epochs, 1), "seed": cfg.seed,
        "prompts": {"path": str(run.digits / "prompts" / "grpo_train.jsonl"),
                    "eval_path": str(run.digits / "prompts" / "grpo_eval.jsonl")},
        "rewards": {"terms": [{"name": "digit", "kind": "classifier",
                               "classifier": {"path": str(run.judge), "image_size": [cfg.size, cfg.size],
                                              "grayscale": True}}]},
        "rollout": {"image_size": cfg.size}})
    grpo = load_config(GRPOConfig, merge(grpo, cfg.grpo), prefix=f"{prefix}.grpo")
    return precompute, heldout, train, grpo


# ----------------------------------------------------------------------------------------------- the judge
class Judge:
    """The judge's class probabilities of generated images (the classifier reward's own preparation)."""

    def __init__(self, path: Path, size: int) -> None:
        from lance_core.rewards import ClassifierConfig
        from lance_core.rewards.classifier import ClassifierReward

        self.reward = ClassifierReward(ClassifierConfig(path=str(path), image_size=(size, size), grayscale=True))

    def read(self, images: list[np.ndarray], digits: list[int]) -> tuple[list[str], list[float]]:
        """(the digit the judge reads in each image, its probability of the prompted one)."""
        out = self.reward(images, [""] * len(images), [str(d) for d in digits])
        return out.details["predicted"], out.scores


# ----------------------------------------------------------------------------------------------- sampling
class Sampler:
    """A trained model (an exported safetensors file) with the project's sampler and the codec to decode."""

    def __init__(self, model_cfg, tokenizer_ref: str | None, weights: Path, threads: int = 2) -> None:
        from lance_core.checkpoint import load_lance_checkpoint
        from lance_core.encoders import load_vae
        from lance_core.model import build_model
        from lance_core.tokenizer import load_tokenizer_for

        torch.set_num_threads(threads)
        self.cfg = model_cfg
        self.model = build_model(model_cfg).eval()
        load_lance_checkpoint(self.model, weights)
        self.tokenizer = load_tokenizer_for(model_cfg, tokenizer_ref)
        self.codec = load_vae(model_cfg.vae).eval()

    @torch.no_grad()
    def images(self, prompts: list[str], size: int, steps: int, cfg_scale: float, seed: int) -> list[np.ndarray]:
        from lance_core.sampling import SamplingConfig, generate_latents

        side = size // self.cfg.vae.spatial_ratio
        sampling = SamplingConfig(steps=steps, cfg_scale=cfg_scale)
        generator = torch.Generator().manual_seed(seed)
        out = []
        for prompt in prompts:
            latents = generate_latents(self.model, self.tokenizer, "t2i", prompt, (1, side, side), sampling,
                                       generator=generator)
            frames = self.codec.decode_frames(latents.float().permute(3, 0, 1, 2)[None])
            out.append(frames[0, 0].numpy())
        return out

    @torch.no_grad()
    def caption(self, row: dict, max_tokens: int = 12) -> str:
        from lance_core.packing import build_understanding_sample
        from lance_core.sampling import generate_text
        from pipelines.train.data import slot_visual

        media = slot_visual(row, "target", self.cfg)
        prompt = build_understanding_sample(self.tokenizer, "i2t", media, row.get("question") or "", None)
        return self.tokenizer.decode(generate_text(self.model, self.tokenizer, prompt, max_new_tokens=max_tokens))


def t2i_prompts(per_digit: int) -> tuple[list[str], list[int]]:
    """``per_digit`` prompts of every digit, the phrasings in turn."""
    from pipelines.data.digits import PHRASINGS, caption

    pairs = [(caption(d, k % len(PHRASINGS)), d) for d in range(10) for k in range(per_digit)]
    return [p for p, _ in pairs], [d for _, d in pairs]


def score_t2i(sampler: Sampler, judge: Judge, cfg: LearningConfig, per_digit: int, seed: int):
    prompts, digits = t2i_prompts(per_digit)
    images = sampler.images(prompts, cfg.size, cfg.sampling_steps, cfg.cfg_scale, seed)
    read, probability = judge.read(images, digits)
    accuracy = float(np.mean([r == str(d) for r, d in zip(read, digits)]))
    return accuracy, float(np.mean(probability)), images, digits, read


def score_prompts(sampler: Sampler, judge: Judge, cfg: LearningConfig, prompt_file: Path, seed: int) -> dict:
    """Accuracy and mean reward of ``grpo_samples_per_prompt`` images of each prompt of a GRPO prompt file."""
    rows = [json.loads(line) for line in prompt_file.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows for _ in range(cfg.grpo_samples_per_prompt)]
    digits = [int(r["target"]) for r in rows for _ in range(cfg.grpo_samples_per_prompt)]
    images = sampler.images(prompts, cfg.size, cfg.sampling_steps, cfg.cfg_scale, seed)
    read, probability = judge.read(images, digits)
    return {"accuracy": float(np.mean([r == str(d) for r, d in zip(read, digits)])),
            "mean_reward": float(np.mean(probability)), "chroma": chroma(images), "images": images,
            "digits": digits, "prompts": prompts}


def chroma(images: list[np.ndarray]) -> float:
    """Mean distance of a pixel's channels from their mean (0-255; 0 for grey images): colour the judge,
    which reads grey, neither sees nor pays for."""
    pixels = np.stack(images).astype(np.float64)
    return float(np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).mean())


def heldout_rows(root: Path, digits: Path, limit: int | None) -> list[tuple[dict, dict]]:
    """(the held-out image's record in ``heldout.jsonl``, its precomputed shard row with the ViT features),
    in ``heldout.jsonl``'s order, at most ``limit``. A shard row's source is ``.../i2t.parquet#<row>``."""
    import pyarrow.parquet as pq

    from lance_core.shards import shard_rows

    records = [json.loads(line) for line in (digits / "heldout.jsonl").read_text().splitlines()]
    by_row = {}
    for path in sorted((root / "shards").glob("*.parquet")):
        for row in shard_rows(pq.read_table(path)):
            by_row[int(row["source_uri"].rsplit("#", 1)[1])] = row
    pairs = [(records[index], by_row[index]) for index in sorted(by_row)]
    return pairs[:limit] if limit else pairs


# ----------------------------------------------------------------------------------------------- outputs
def write_grid(images: list[np.ndarray], labels: list[str], path: Path, columns: int) -> Path:
    """A labelled grid: each image enlarged (nearest) to 96 px, its label under it."""
    from PIL import Image

    from pipelines.runtime.gallery import captioned_grid

    Image.fromarray(captioned_grid(images, labels, columns, min_width=96)).save(path)
    return path


def write_t2i(output: Path, images: list[np.ndarray], digits: list[int]) -> None:
    from PIL import Image

    folder = output / "t2i"
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[int, int] = {}
    for image, digit in zip(images, digits):
        n = counts.get(digit, 0)
        counts[digit] = n + 1
        Image.fromarray(image).save(folder / f"{digit}_{n}.png")


# ----------------------------------------------------------------------------------------------- the run
def run_learning(cfg: LearningConfig, root: Path, output: Path) -> dict:
    """The whole path into ``root`` (data, shards, runs) and ``output`` (what was generated, the figures)."""
    from PIL import Image

    from pipelines.data.digits import names_digit, write_digits
    from pipelines.data.pipeline import run_precompute
    from pipelines.rl import run_grpo
    from pipelines.train.driver import ensure_train_ray, run_training

    run = LearningRun(root, output)
    run.output.mkdir(parents=True, exist_ok=True)
    precompute, heldout_cfg, train_cfg, grpo_cfg = job_configs(cfg, run)
    seconds: dict[str, float] = {}
    began = time.perf_counter()

    def lap(name: str, since: float) -> float:
        seconds[name] = round(time.perf_counter() - since, 1)
        log.info(f"{name}: {seconds[name]:.0f} s")
        return time.perf_counter()

    mark = time.perf_counter()
    write_digits(run.digits, size=cfg.size, seed=cfg.seed)
    judge_accuracy = json.loads((run.digits / "judge.json").read_text())["heldout_accuracy"]
    log.info(f"judge: {judge_accuracy:.1%} on the held-out real digits")
    mark = lap("data_and_judge", mark)
    ensure_train_ray()
    run_precompute(precompute, progress=False)
    run_precompute(heldout_cfg, progress=False)
    mark = lap("precompute", mark)
    result = run_training(train_cfg)
    mark = lap("train", mark)

    judge = Judge(run.judge, cfg.size)
    model_cfg, tokenizer = train_cfg.model.build(), train_cfg.model.tokenizer
    curve = []
    for export in sorted((result.run_dir / "exports").glob("model_step*.safetensors")):
        step = int(export.stem.removeprefix("model_step"))
        sampler = Sampler(model_cfg, tokenizer, export)
        accuracy, reward, *_ = score_t2i(sampler, judge, cfg, cfg.curve_samples_per_digit, cfg.seed + 1)
        curve.append({"step": step, "t2i_accuracy": accuracy, "mean_reward": reward})
        log.info(f"step {step}: t2i accuracy {accuracy:.1%}")
    sampler = Sampler(model_cfg, tokenizer, result.export)
    t2i_accuracy, t2i_reward, images, digits, read = score_t2i(sampler, judge, cfg, cfg.samples_per_digit,
                                                                cfg.seed)
    write_t2i(run.output, images, digits)
    write_grid(images, [f"prompt {d} / read {r}" for d, r in zip(digits, read)], run.output / "t2i_grid.png",
               columns=cfg.samples_per_digit)
    captions = [{"image": str(run.digits / record["image"]), "digit": record["digit"], "caption": sampler.caption(row)}
                for record, row in heldout_rows(run.root / "heldout-latents", run.digits, cfg.i2t_images)]
    i2t_accuracy = float(np.mean([names_digit(c["caption"], c["digit"]) for c in captions])) if captions else None
    (run.output / "i2t.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    shown = captions[:20]
    write_grid([np.asarray(Image.open(c["image"]).convert("RGB")) for c in shown],
               [f"{c['digit']}: {c['caption']}" for c in shown], run.output / "i2t_grid.png", columns=5)
    mark = lap("score", mark)

    grpo: dict = {}
    if cfg.grpo_epochs:
        eval_prompts = run.digits / "prompts" / "grpo_eval.jsonl"
        start = result.export if cfg.grpo_from_step is None else \
            result.run_dir / "exports" / f"model_step{cfg.grpo_from_step:07d}.safetensors"
        if not start.is_file():
            raise FileNotFoundError(f"learning.grpo_from_step: no export of step {cfg.grpo_from_step} ({start}); "
                                    f"exports are written every {cfg.curve_every} steps")
        sampling = grpo_cfg.rollout.sampler
        rollout_like = cfg.model_copy(update={"sampling_steps": sampling.steps, "cfg_scale": sampling.cfg_scale})
        before = score_prompts(Sampler(model_cfg, tokenizer, start), judge, rollout_like, eval_prompts, cfg.seed + 2)
        summary = run_grpo(grpo_cfg, run.root / "grpo", checkpoint=str(start))
        after_sampler = Sampler(model_cfg, tokenizer, Path(summary["model"]))
        after = score_prompts(after_sampler, judge, rollout_like, eval_prompts, cfg.seed + 2)
        kept = ("accuracy", "mean_reward", "chroma")
        grpo = {"epochs": cfg.grpo_epochs, "from_step": cfg.grpo_from_step or cfg.steps,
                "before": {k: before[k] for k in kept}, "after": {k: after[k] for k in kept},
                "accuracy_gain": after["accuracy"] - before["accuracy"],
                "reward_gain": after["mean_reward"] - before["mean_reward"],
                "train_reward_first": summary.get("reward_first"), "train_reward_last": summary.get("reward_last")}
        show = [k for k in range(0, len(before["images"]), cfg.grpo_samples_per_prompt)][:20]
        write_grid([before["images"][k] for k in show] + [after["images"][k] for k in show],
                   [f"before: {before['prompts'][k]}" for k in show] + [f"after: {after['prompts'][k]}" for k in show],
                   run.output / "grpo_before_after.png", columns=len(show) // 2 or 1)
        mark = lap("grpo", mark)
    seconds["total"] = round(time.perf_counter() - began, 1)
    figures = {
        "judge_heldout_accuracy": judge_accuracy,
        "t2i_accuracy": t2i_accuracy, "t2i_mean_reward": t2i_reward,
        "t2i_samples": len(images), "i2t_accuracy": i2t_accuracy, "i2t_images": len(captions),
        "curve": curve, "grpo": grpo, "seconds": seconds,
        "train_steps": cfg.steps, "train_last_loss": result.metrics[-1]["loss"] if result.metrics else None,
        "export": str(result.export), "chance": 0.1,
    }
    (run.output / "figures.json").write_text(json.dumps(figures, indent=2))
    return figures


def load_learning_config(data: dict | None, quick: bool = False) -> LearningConfig:
    return load_config(LearningConfig, merge(QUICK, data or {}) if quick else data, prefix="learning")


def figure_lines(figures: dict) -> list[str]:
    """The figures as lines of text (the demo's report and the benchmark's log)."""
    grpo = figures.get("grpo") or {}
    lines = [f"judge: {figures['judge_heldout_accuracy']:.1%} on the held-out real digits",
             f"t2i accuracy: {figures['t2i_accuracy']:.1%} of {figures['t2i_samples']} generated digits (chance 10%)",
             f"i2t accuracy: {figures['i2t_accuracy']:.1%} of {figures['i2t_images']} held-out images"
             if figures.get("i2t_accuracy") is not None else "i2t: not run"]
    if grpo:
        lines.append(f"GRPO ({grpo['epochs']} epochs from step {grpo['from_step']}) on prompts it never trained on: accuracy "
                     f"{grpo['before']['accuracy']:.1%} -> {grpo['after']['accuracy']:.1%}, mean reward "
                     f"{grpo['before']['mean_reward']:.3f} -> {grpo['after']['mean_reward']:.3f}, chroma "
                     f"{grpo['before'].get('chroma', 0):.1f} -> {grpo['after'].get('chroma', 0):.1f}")
    lines.append("curve: " + ", ".join(f"step {p['step']} {p['t2i_accuracy']:.0%}" for p in figures["curve"]))
    return lines


