import pytest
import torch
from safetensors.torch import load_file, save_file

from lance_core.checkpoint import (
    LANCE_PREFIXES,
    load_lance_checkpoint,
    load_qwen25vl_weights,
    read_safetensors,
    save_lance_checkpoint,
)
from lance_core.config import model_preset
from lance_core.model import build_model


def _randomised(cfg, seed):
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def test_lance_checkpoint_round_trip_is_identical(tmp_path, tiny_cfg):
    model = _randomised(tiny_cfg, 0)
    first = save_lance_checkpoint(model, tmp_path / "a.safetensors")
    fresh = build_model(tiny_cfg)
    load_lance_checkpoint(fresh, first)
    second = save_lance_checkpoint(fresh, tmp_path / "b.safetensors")
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith(LANCE_PREFIXES) for k in a)
    assert "language_model.model.layers.0.self_attn.q_proj_moe_gen.bias" in a
    assert "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight" in a
    assert "language_model.model.norm_moe_gen.weight" in a and "time_embedder.mlp.2.weight" in a


def test_position_table_is_rebuilt_and_vit_keys_kept_apart(tmp_path, tiny_cfg):
    model = _randomised(tiny_cfg, 1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    table = state["latent_pos_embed.pos_embed"].clone()
    state["latent_pos_embed.pos_embed"] = torch.zeros_like(table)
    state["vit_model.blocks.0.attn.qkv.weight"] = torch.ones(3, 3)
    save_file(state, str(tmp_path / "c.safetensors"))
    fresh = build_model(tiny_cfg)
    report = load_lance_checkpoint(fresh, tmp_path / "c.safetensors")
    assert torch.equal(fresh.latent_pos_embed.pos_embed, table)
    assert list(report.vit_weights) == ["blocks.0.attn.qkv.weight"]


def test_missing_key_shape_mismatch_and_missing_file_are_named(tmp_path, tiny_cfg):
    state = {k: v.contiguous() for k, v in build_model(tiny_cfg).state_dict().items()}
    del state["llm2vae.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyError, match="llm2vae.bias"):
        load_lance_checkpoint(build_model(tiny_cfg), tmp_path / "missing.safetensors")
    bigger = build_model(model_preset("tiny", intermediate_size=96))
    save_lance_checkpoint(bigger, tmp_path / "bigger.safetensors")
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_lance_checkpoint(build_model(tiny_cfg), tmp_path / "bigger.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lance_checkpoint(build_model(tiny_cfg), tmp_path / "nowhere")


def test_sharded_folder_reads_all_shards(tmp_path):
    import json

    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert set(read_safetensors(tmp_path)) == {"a", "b"}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        read_safetensors(tmp_path)


def test_qwen_checkpoint_with_other_sizes_names_the_key(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=512,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64))
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_qwen25vl_weights(build_model(model_preset("tiny")), tmp_path)
