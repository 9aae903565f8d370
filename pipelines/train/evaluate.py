"""Evaluation during training: the held-out loss per task (input of the capability-oriented mixture rule)
and generated samples written into the run folder (an image, a video as a frame strip, a caption).

Every rank evaluates the same held-out rows and runs the same sampling calls, so that under ZeRO-3 all
ranks gather the same weights in the same order; rank 0 writes the files. Decoding the latents into
pictures (the frozen VAE, on the training device in the training dtype) runs on a thread of rank 0's, off the
training path: the ranks go on with the next step meanwhile.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lance_core.config import ModelConfig
from lance_core.flow import LossConfig, compute_losses
from lance_core.packing import GENERATION_TASKS, Sample, build_understanding_sample, pack_samples
from lance_core.sampling import SamplingConfig, generate_latents, generate_text
from lance_core.tokenizer import TextTokenizer

from .config import DataSection, EvalSection
from .data import read_rows, row_to_sample, slot_visual
from .plan import DataPlan


class HeldOut:
    """The held-out rows of the plan, as samples per task (no conditioning dropout)."""

    def __init__(self, plan: DataPlan, data: DataSection, cfg: ModelConfig, tokenizer: TextTokenizer) -> None:
        no_dropout = data.model_copy(update={"caption_dropout": 0.0, "condition_dropout": 0.0,
                                             "sample_posterior": False})
        self.rows: dict[str, list[dict]] = {}
        self.samples: dict[str, list[Sample]] = {}
        for task, refs in plan.holdout.items():
            if not refs:
                continue
            rows = read_rows(plan, refs, data)
            self.rows[task] = rows
            self.samples[task] = [row_to_sample(r, tokenizer, cfg, no_dropout, random.Random(0)) for r in rows]

    @torch.no_grad()
    def losses(self, model, cfg: ModelConfig, loss_cfg: LossConfig, device: torch.device, seed: int) -> dict:
        """Task -> held-out loss (MSE for generation tasks, CE for understanding), same noise every time."""
        was_training = model.training
        model.eval()
        out = {}
        for task, samples in self.samples.items():
            batch = pack_samples(samples, cfg).to(device)
            result = compute_losses(model, batch, loss_cfg, torch.Generator().manual_seed(seed))
            out[task] = float(result.mse if task in GENERATION_TASKS else result.ce)
        model.train(was_training)
        return out


class SampleWriter:
    """Generates with the current weights; rank 0 decodes the latents through the (frozen) VAE on a thread
    of its own and writes the pictures (:meth:`close` waits for the last ones)."""

    def __init__(self, cfg: ModelConfig, tokenizer: TextTokenizer, held: HeldOut, eval_cfg: EvalSection,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.tok, self.held, self.eval_cfg = cfg, tokenizer, held, eval_cfg
        self.device, self.dtype = torch.device(device), dtype
        self._vae = None
        self._decoder: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def vae(self):
        if self._vae is None:
            from lance_core.encoders import load_vae

            self._vae = load_vae(self.cfg.vae).eval().to(self.device, self.dtype)
        return self._vae

    @torch.no_grad()
    def _frame_strip(self, latents: torch.Tensor) -> np.ndarray:
        """One clip's latents (T', H', W', C) -> its decoded frames side by side: (H, T·W, 3) uint8."""
        latents = latents.to(self.device, self.dtype).permute(3, 0, 1, 2)[None]
        frames = self.vae().decode_frames(latents)[0]
        return torch.cat(list(frames), dim=1).cpu().numpy()

    def _save(self, out_dir: Path, step: int, image: torch.Tensor, video: torch.Tensor | None, result: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self._frame_strip(image)).save(out_dir / f"step{step:07d}_image.png")
        if video is not None:
            Image.fromarray(self._frame_strip(video)).save(out_dir / f"step{step:07d}_video_frames.png")
        (out_dir / f"step{step:07d}.json").write_text(json.dumps(result, indent=2))

    def _decode_later(self, *args) -> None:
        """Decode and write on the decoder thread; an error there surfaces at the next call or at close."""
        for done in [f for f in self._pending if f.done()]:
            self._pending.remove(done)
            done.result()
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample-decoder")
        self._pending.append(self._decoder.submit(self._save, *args))

    def close(self) -> None:
        """Wait for the pictures still being decoded."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
            self._decoder = None

    def _prompt(self, task: str, default_grid: tuple[int, int, int]) -> tuple[str, tuple[int, int, int]]:
        rows = self.held.rows.get(task) or []
        if not rows:
            return ("a red sign" if task == "t2i" else "a blue square moving to the right"), default_grid
        row = rows[0]
        return row.get("caption") or "", tuple(int(x) for x in row["target_vae_shape"][:3])

    @torch.no_grad()
    def write(self, model, step: int, out_dir: Path | None, seed: int) -> dict:
        """``out_dir`` None on ranks other than 0: they run the same calls and write nothing."""
        was_training = model.training
        model.eval()
        sampling = SamplingConfig(steps=self.eval_cfg.sampling_steps, cfg_scale=self.eval_cfg.cfg_scale)
        generator = torch.Generator().manual_seed(seed)
        result: dict = {"step": step}
        image_caption, image_grid = self._prompt("t2i", (1, 4, 4))
        image = generate_latents(model, self.tok, "t2i", image_caption, image_grid, sampling, generator=generator)
        result.update(image_prompt=image_caption, image_latent_shape=list(image.shape))
        video = None
        if self.cfg.max_latent_frames > 1:  # an image-only model (lance-3b: 1 latent frame) makes no video
            video_caption, video_grid = self._prompt("t2v", (2, 4, 4))
            video_grid = (min(video_grid[0], self.cfg.max_latent_frames), *video_grid[1:])
            video = generate_latents(model, self.tok, "t2v", video_caption, video_grid, sampling,
                                     generator=generator)
            result.update(video_prompt=video_caption, video_latent_shape=list(video.shape))
        understanding = next((t for t in ("i2t", "v2t") if self.held.rows.get(t)), None)
        if understanding is not None:
            row = self.held.rows[understanding][0]
            media = slot_visual(row, "target", self.cfg)
            prompt = build_understanding_sample(self.tok, understanding, media, row.get("question") or "", None)
            ids = generate_text(model, self.tok, prompt, max_new_tokens=self.eval_cfg.max_caption_tokens)
            result.update(caption_task=understanding, caption_truth=row.get("answer") or "",
                          caption_generated=self.tok.decode(ids))
        model.train(was_training)
        if out_dir is not None:
            self._decode_later(out_dir, step, image.detach().cpu(), None if video is None else video.detach().cpu(),
                               dict(result))
        return result
