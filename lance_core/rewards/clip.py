"""CLIP score with open_clip: cosine similarity between the image and its prompt, times ``scale``.

Weights come from a local file (``pretrained``); without one the model is randomly initialised, which is
what tests use with a tiny architecture (``architecture``). Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import RewardOutput
from .config import CLIPConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPReward:
    def __init__(self, cfg: CLIPConfig | None = None) -> None:
        import open_clip

        cfg = cfg or CLIPConfig()

        if cfg.device == "auto":
            cfg = cfg.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
        self.cfg = cfg
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            if cfg.architecture is not None:
                model = open_clip.model.CLIP(**cfg.architecture)
                if cfg.pretrained is not None:
                    open_clip.load_checkpoint(model, cfg.pretrained)
                context = model.context_length
                self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
            else:
                model = open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained)
                self.tokenizer = open_clip.get_tokenizer(cfg.model_name)
        self.model = model.to(cfg.device).eval().requires_grad_(False)
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = torch.tensor(OPENAI_MEAN, device=cfg.device).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_STD, device=cfg.device).view(1, 3, 1, 1)

    def _pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        resized = []
        for image in images:
            pixels = torch.from_numpy(np.array(image, copy=True)).to(self.cfg.device).permute(2, 0, 1)[None]
            resized.append(F.interpolate(pixels.float() / 255.0, size=self.image_size, mode="bicubic",
                                         align_corners=False))
        return (torch.cat(resized).clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> RewardOutput:
        scores: list[float] = []
        for start in range(0, len(images), self.cfg.batch_size):
            chunk = slice(start, start + self.cfg.batch_size)
            image_emb = F.normalize(self.model.encode_image(self._pixels(images[chunk])).float(), dim=-1)
            tokens = self.tokenizer(prompts[chunk]).to(self.cfg.device)
            text_emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            scores += (self.cfg.scale * (image_emb * text_emb).sum(-1)).tolist()
        return RewardOutput(scores, [None] * len(scores))
