"""A tiny random Qwen2.5-VL (transformers) sized like ``model_preset("tiny")``, for checkpoint and parity
tests. Token ids of the visual markers are the ByteTokenizer's, so they fall inside the 512-row vocab."""

from __future__ import annotations

from pathlib import Path

import torch

from lance_core.config import ModelConfig
from lance_core.tokenizer import ByteTokenizer

SPECIAL = ByteTokenizer().special
TOKENS_PER_SECOND = 2


def qwen_config(cfg: ModelConfig, tie_word_embeddings: bool = False, **text_overrides):
    """transformers 5.x: the text sizes sit in ``text_config``, rope theta and the mRoPE sections in its
    ``rope_parameters``; ``tokens_per_second`` belongs to the vision config; marker ids to the top level."""
    from transformers import Qwen2_5_VLConfig

    text = {
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": 4096,
        "bos_token_id": None, "eos_token_id": SPECIAL.im_end, "pad_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "mrope_section": list(cfg.mrope_section)},
        **text_overrides,
    }
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": cfg.hidden_size, "patch_size": 14, "temporal_patch_size": 2,
              "spatial_merge_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
              "tokens_per_second": TOKENS_PER_SECOND}
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=SPECIAL.image_pad, video_token_id=SPECIAL.video_pad,
        vision_start_token_id=SPECIAL.vision_start, vision_end_token_id=SPECIAL.vision_end,
        tie_word_embeddings=tie_word_embeddings,
    )


def random_qwen(cfg: ModelConfig, seed: int = 0, tie_word_embeddings: bool = False, **text_overrides):
    """Seeded random init in eval mode; norm weights moved off 1 so the norms are compared too."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = qwen_config(cfg, tie_word_embeddings, **text_overrides)
    qwen = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return qwen.eval()


def save_random_qwen(path: Path, cfg: ModelConfig, seed: int = 0, **kwargs):
    qwen = random_qwen(cfg, seed, **kwargs)
    qwen.save_pretrained(path)
    return qwen
