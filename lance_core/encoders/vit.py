"""The Qwen2.5-VL vision tower through transformers: patch 14, temporal patch 2, 2x2 merger, output
width = LLM hidden. Frames (uint8, or floats in [0, 1]) are normalised with the CLIP mean/std on the tower's
device, in float32, then cast to its dtype; a single image is repeated to two frames.
Tokens per span = (T/2)·(H/28)·(W/28), laid out in the merger's 2x2 block order like Qwen's processor.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import ViTConfig
from ..safetensors_files import read_safetensors_dir
from ..state_dicts import load_state_dict_checked

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_PREFIXES = ("model.visual.", "visual.", "vit_model.")
"""Vision-tower key prefixes: transformers >= 4.52 saves ``model.visual.*``, the original Qwen release
``visual.*``, the ``Lance_3B_Video`` checkpoint ``vit_model.*`` (so ``model.weights.vit`` may name it too)."""

QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
)
"""Vision config of the Qwen2.5-VL-3B-Instruct release (patch 14, temporal patch 2, merge 2 as the defaults)."""


def vision_config(cfg: ViTConfig):
    """The transformers ``Qwen2_5_VLVisionConfig``: the 3B release sizes, or the config's for preset "tiny"."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    if cfg.preset == "qwen2.5-vl-3b":
        sizes = dict(QWEN25_VL_3B_VISION)
    else:
        sizes = dict(depth=cfg.depth, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_heads=cfg.num_heads, out_hidden_size=cfg.out_hidden_size, window_size=cfg.window_size,
                     fullatt_block_indexes=list(cfg.fullatt_block_indexes), tokens_per_second=2)
    return Qwen2_5_VLVisionConfig(patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                                  spatial_merge_size=cfg.spatial_merge_size, **sizes)


def meta_vision_tower(cfg: ViTConfig) -> nn.Module:
    """The vision tower of ``cfg`` on the meta device (nothing allocated, no weights read): for counting."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.device("meta"):
        return Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config(cfg))


def _vision_key(key: str) -> str | None:
    for prefix in VISION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def read_vision_weights(path: str) -> dict[str, torch.Tensor]:
    """The vision-tower tensors of a Qwen2.5-VL checkpoint folder, keyed like the tower's state dict (of a
    sharded folder only the shards its index names for vision keys are opened)."""
    try:
        tensors = read_safetensors_dir(path, select=lambda key: _vision_key(key) is not None)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (model.weights.vit)") from None
    weights = {_vision_key(key): value for key, value in tensors.items()}
    if not weights:
        raise KeyError(f"{path!r} holds no vision tower weights (keys under {', '.join(VISION_PREFIXES)})")
    return weights


def load_vision_weights(tower: nn.Module, path: str) -> None:
    """Load a checkpoint's vision weights into ``tower``; errors name the missing, extra or mis-shaped key."""
    load_state_dict_checked(tower, read_vision_weights(path), f"{path!r} (vision tower)")


class QwenViT(nn.Module):
    """Frozen Qwen2.5-VL vision tower; frames are (T, 3, H, W), uint8 0..255 or float in [0, 1], H and W
    multiples of 28. Features come back in the tower's dtype."""

    def __init__(self, cfg: ViTConfig, tower: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = tower
        self.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: ViTConfig) -> QwenViT:
        """Random init (seeded by ``cfg.seed``), then the vision weights of ``cfg.path`` when it is set."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        config = vision_config(cfg)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
        tower.eval()
        if cfg.path is not None:
            if not os.path.isdir(cfg.path):
                raise FileNotFoundError(f"ViT checkpoint folder not found: {cfg.path!r} (model.weights.vit)")
            load_vision_weights(tower, cfg.path)
        return cls(cfg, tower)

    @property
    def merge_factor(self) -> int:
        return self.cfg.patch_size * self.cfg.spatial_merge_size

    def preprocess(self, frames: torch.Tensor, dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(T, 3, H, W) uint8 0..255 or float in [0, 1] -> flattened patches (N, 3·tp·p·p) in ``dtype`` and
        the patch grid (t, h, w), on the frames' device.

        uint8 frames become x / 255 and all frames (x - mean) / std in float32 (the same arithmetic as
        transformers' processor), then ``dtype``. An odd T (an image: T = 1) is padded by repeating the last
        frame. Rows come in the order of transformers' ``Qwen2VLImageProcessor``: per temporal patch, 2x2
        merge blocks in raster order, then the patches inside a block; each row is (channel, frame, y, x)
        flattened.
        """
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"frames must be (T, 3, H, W), got {tuple(frames.shape)}")
        _, _, height, width = frames.shape
        if height % self.merge_factor or width % self.merge_factor:
            raise ValueError(f"ViT input sides must be multiples of {self.merge_factor}, got {height}x{width}")
        tp, p, m = self.cfg.temporal_patch_size, self.cfg.patch_size, self.cfg.spatial_merge_size
        pad = (-frames.shape[0]) % tp
        if pad:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        mean = torch.tensor(CLIP_MEAN, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=frames.device).view(1, 3, 1, 1)
        x = frames.float().div_(255.0) if frames.dtype == torch.uint8 else frames.float()
        x = ((x - mean) / std).to(dtype)
        gt, gh, gw = x.shape[0] // tp, height // p, width // p
        x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, 3 * tp * p * p), (gt, gh, gw)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """-> features (N, out_hidden) and the LLM token grid (T/2, H/28, W/28)."""
        features, grids = self.encode_many([frames])
        return features[0], grids[0]

    @torch.no_grad()
    def encode_many(self, clips: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
        """Several clips in one tower call (attention stays within each clip) -> per-clip features and grids.

        Each clip is copied to the tower's device as it is (uint8 frames as bytes) and preprocessed there."""
        if not clips:
            raise ValueError("encode_many needs at least one clip")
        weight = next(self.tower.parameters())
        prepared = [self.preprocess(c.to(weight.device, non_blocking=True), weight.dtype) for c in clips]
        patches, grids = zip(*prepared)
        del prepared
        inputs = patches[0] if len(patches) == 1 else torch.cat(patches)
        del patches
        merged = self.tower(inputs, grid_thw=torch.tensor(grids, device=weight.device)).pooler_output
        m = self.cfg.spatial_merge_size
        llm_grids = [(t, h // m, w // m) for t, h, w in grids]
        sizes = [t * h * w for t, h, w in llm_grids]
        return list(torch.split(merged, sizes)), llm_grids
