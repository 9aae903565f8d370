"""Image-text similarity with open_clip: the CLIP score used by the data filter and by rewards.

``model_name="tiny"`` builds a small randomly initialised CLIP (tests, the demo); any other name is an
open_clip architecture whose weights come from a local file (``weights``). Nothing is downloaded.
The score is the cosine similarity of the normalised image and text embeddings, in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .vit import CLIP_MEAN, CLIP_STD

TINY_CLIP = dict(embed_dim=32, image_size=64, vision_layers=2, vision_width=64, patch_size=16,
                 text_layers=2, text_width=64, text_heads=2)


def _tiny_clip(seed: int):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    t = TINY_CLIP
    vision = CLIPVisionCfg(layers=t["vision_layers"], width=t["vision_width"], head_width=32,
                           patch_size=t["patch_size"], image_size=t["image_size"])
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=t["text_width"], heads=t["text_heads"],
                       layers=t["text_layers"])
    return CLIP(embed_dim=t["embed_dim"], vision_cfg=vision, text_cfg=text)


class ClipScorer:
    """An open_clip model with its tokenizer and pixel preprocessing, scoring (image, text) pairs."""

    def __init__(self, model_name: str = "tiny", weights: str | None = None, device: str | torch.device = "cpu",
                 seed: int = 0, architecture: dict | None = None) -> None:
        """``architecture`` ({embed_dim, vision_cfg, text_cfg}) builds a custom CLIP instead of ``model_name``,
        randomly initialised from ``seed`` unless ``weights`` names a checkpoint file."""
        import open_clip

        self.device = torch.device(device)
        if architecture is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = open_clip.model.CLIP(**architecture)
            if weights is not None:
                if not Path(weights).is_file():
                    raise FileNotFoundError(f"CLIP weights file {weights!r} does not exist")
                open_clip.load_checkpoint(model, weights)
            tokenizer_name = None
        elif model_name == "tiny":
            with torch.random.fork_rng():
                model = _tiny_clip(seed)
            tokenizer_name = "ViT-B-32"
        else:
            if weights is None:
                raise ValueError(f"CLIP model {model_name!r} needs a local weights file (clip_weights); "
                                 "nothing is downloaded at run time")
            if not Path(weights).is_file():
                raise FileNotFoundError(f"CLIP weights file {weights!r} does not exist")
            if model_name not in open_clip.list_models():
                raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
            model = open_clip.create_model(model_name, pretrained=weights)
            tokenizer_name = model_name
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = (open_clip.get_tokenizer(tokenizer_name) if tokenizer_name else
                          open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length))
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        preprocess = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        self.mean = torch.tensor(preprocess.get("mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.get("std", CLIP_STD)).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> resized (shorter side), centre-cropped and normalised model input."""
        height, width = images.shape[-2:]
        out_h, out_w = self.image_size
        scale = max(out_h / height, out_w / width)
        resized = F.interpolate(images.float(), size=(max(out_h, round(height * scale)), max(out_w, round(width * scale))),
                                mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top = (resized.shape[-2] - out_h) // 2
        left = (resized.shape[-1] - out_w) // 2
        cropped = resized[..., top:top + out_h, left:left + out_w]
        return (cropped - self.mean) / self.std

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (B, D) of images (B, 3, H, W) in [0, 1]."""
        return self.model.encode_image(self.preprocess(images).to(self.device), normalize=True).float().cpu()

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its text: (B,) for images (B, 3, H, W) in [0, 1]."""
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} texts")
        pixels = self.preprocess(images).to(self.device)
        tokens = self.tokenizer(texts).to(self.device)
        image_emb = self.model.encode_image(pixels, normalize=True)
        text_emb = self.model.encode_text(tokens, normalize=True)
        return (image_emb * text_emb).sum(dim=-1).float().cpu()
