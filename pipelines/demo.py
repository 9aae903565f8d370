"""The embedded demo: the whole model path at tiny size on generated media, in one process.

Render images and short videos of coloured shapes with captions -> encode them with the tiny Wan VAE and
Qwen ViT -> build interleaved samples of every task -> pack -> train the tiny dual-stream model -> sample
an image and a video latent with the KV-cached Euler sampler and decode them through the VAE -> decode a
caption -> write a report (loss curve PNG, samples, metrics JSON) into a run folder.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import Field

from lance_core.config import ModelConfig, StrictModel, load_config, model_preset
from lance_core.encoders import QwenViT, WanVAE
from lance_core.flow import LossConfig, compute_losses
from lance_core.model import build_model
from lance_core.packing import (
    TASKS,
    Sample,
    VisualInput,
    build_generation_sample,
    build_understanding_sample,
    pack_samples,
)
from lance_core.sampling import SamplingConfig, generate_latents, generate_text
from lance_core.tokenizer import ByteTokenizer

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


class DemoConfig(StrictModel):
    model_preset: str = "tiny"
    steps: int = Field(40, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    samples_per_task: int = Field(2, gt=0)
    image_size: int = Field(64, gt=0)
    """Side in pixels of generated images (multiple of 16 for the VAE)."""
    vit_image_size: int = Field(56, gt=0)
    """Side in pixels of ViT inputs (multiple of 28)."""
    video_frames: int = Field(5, gt=0)
    """Frames per generated video (4k + 1)."""
    sampling_steps: int = Field(10, gt=0)
    seed: int = 0
    loss: LossConfig = LossConfig()


@dataclass
class Media:
    caption: str
    frames: torch.Tensor
    """(T, 3, H, W) in [0, 1]."""


def render_shape(colour: str, shape: str, size: int, offset: float = 0.0) -> np.ndarray:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    radius = size // 4
    cx = int(size / 2 + offset * size / 4)
    cy = size // 2
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return np.asarray(image)


def make_media(rng: random.Random, size: int, frames: int) -> Media:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    moving = frames > 1
    arrays = [render_shape(colour, shape, size, (k / max(frames - 1, 1)) * 2 - 1 if moving else 0.0)
              for k in range(frames)]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    caption = f"a {colour} {shape}" + (" moving right" if moving else "")
    return Media(caption, tensor)


class Encoders:
    def __init__(self, cfg: ModelConfig) -> None:
        self.vae = WanVAE.from_config(cfg.vae).eval()
        self.vit = QwenViT.from_config(cfg.vit).eval()

    @torch.no_grad()
    def latents(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, 3, H, W) in [0, 1] -> (T', H', W', C)."""
        pixels = frames.permute(1, 0, 2, 3)[None] * 2 - 1
        return self.vae.encode(pixels)[0].permute(1, 2, 3, 0).contiguous()

    @torch.no_grad()
    def vit_input(self, frames: torch.Tensor, side: int) -> VisualInput:
        resized = torch.nn.functional.interpolate(frames, size=(side, side), mode="bilinear", align_corners=False)
        features, grid = self.vit.encode(resized)
        return VisualInput(vit_features=features, vit_grid=tuple(grid), is_video=frames.shape[0] > 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(T', H', W', C) -> (T, 3, H, W) in [0, 1]."""
        pixels = self.vae.decode(latents.permute(3, 0, 1, 2)[None])[0]
        return ((pixels.clamp(-1, 1) + 1) / 2).permute(1, 0, 2, 3)


def build_demo_samples(cfg: DemoConfig, encoders: Encoders, tokenizer: ByteTokenizer) -> list[Sample]:
    rng = random.Random(cfg.seed)
    samples: list[Sample] = []
    for _ in range(cfg.samples_per_task):
        for task in TASKS:
            video = task in ("t2v", "i2v", "v2v", "v2t")
            media = make_media(rng, cfg.image_size, cfg.video_frames if video else 1)
            target = encoders.latents(media.frames)
            if task in ("t2i", "t2v", "i2v"):
                samples.append(build_generation_sample(tokenizer, task, media.caption, target,
                                                       first_frame_clean=task == "i2v"))
            elif task in ("i2i", "v2v", "subject"):
                other = make_media(rng, cfg.image_size, media.frames.shape[0])
                condition = encoders.vit_input(other.frames, cfg.vit_image_size)
                condition.latents = encoders.latents(other.frames)
                if task == "subject":
                    samples.append(build_generation_sample(tokenizer, task, media.caption, target,
                                                           references=[condition]))
                else:
                    samples.append(build_generation_sample(tokenizer, task, f"turn it into {media.caption}", target,
                                                           source=condition))
            else:
                vit = encoders.vit_input(media.frames, cfg.vit_image_size)
                samples.append(build_understanding_sample(tokenizer, task, vit, "What is shown?", media.caption))
    return samples


def _save_frames(frames: torch.Tensor, path: Path) -> None:
    strip = torch.cat(list(frames), dim=2)  # frames side by side
    Image.fromarray((strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def _plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in ("ce", "mse", "total"):
        ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(cfg: DemoConfig, run_dir: Path) -> dict:
    """Run the embedded demo into ``run_dir``; returns the metrics written to ``metrics.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model_cfg = model_preset(cfg.model_preset)
    (run_dir / "config.json").write_text(json.dumps(
        {"demo": cfg.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json")}, indent=2))
    tokenizer = ByteTokenizer()
    encoders = Encoders(model_cfg)
    started = time.perf_counter()
    samples = build_demo_samples(cfg, encoders, tokenizer)
    batch = pack_samples(samples, mape=model_cfg.mape, temporal_step=model_cfg.tokens_per_second)
    encode_seconds = time.perf_counter() - started

    model = build_model(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-15,
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    started = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        out = compute_losses(model, batch, cfg.loss, generator)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        history.append({"step": step, "total": out.total.item(), "ce": out.ce.item(), "mse": out.mse.item(),
                        "grad_norm": grad_norm, **out.per_task})
    train_seconds = time.perf_counter() - started
    _plot_losses(history, run_dir / "loss_curve.png")

    model.eval()
    sampling = SamplingConfig(steps=cfg.sampling_steps)
    side = cfg.image_size // model_cfg.vae.spatial_ratio
    frames = (cfg.video_frames - 1) // model_cfg.vae.temporal_ratio + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    image_latents = generate_latents(model, tokenizer, "t2i", "a red circle", (1, side, side), sampling, generator=gen)
    video_latents = generate_latents(model, tokenizer, "t2v", "a blue square moving right", (frames, side, side),
                                     sampling, generator=gen)
    _save_frames(encoders.decode(image_latents), run_dir / "sample_image.png")
    _save_frames(encoders.decode(video_latents), run_dir / "sample_video_frames.png")
    probe = make_media(random.Random(cfg.seed + 1), cfg.image_size, 1)
    prompt = build_understanding_sample(tokenizer, "i2t", encoders.vit_input(probe.frames, cfg.vit_image_size),
                                        "What is shown?", None)
    caption = tokenizer.decode(generate_text(model, tokenizer, prompt, max_new_tokens=32))

    metrics = {
        "steps": cfg.steps,
        "packed_tokens": len(batch),
        "samples": batch.num_samples,
        "tasks": sorted(set(batch.sample_tasks)),
        "first_loss": history[0],
        "last_loss": history[-1],
        "encode_seconds": round(encode_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "train_tokens_per_second": round(len(batch) * cfg.steps / train_seconds, 1),
        "image_latent_shape": list(image_latents.shape),
        "video_latent_shape": list(video_latents.shape),
        "caption_prompt_truth": probe.caption,
        "caption_generated": caption,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(run_dir / "loss_history.jsonl", "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    return metrics


def load_demo_config(data: dict | None) -> DemoConfig:
    return load_config(DemoConfig, data, prefix="demo")
