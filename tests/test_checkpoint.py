import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lance_core.checkpoint import (
    LANCE_PREFIXES,
    load_lance_checkpoint,
    load_qwen25vl_weights,
    load_state_dict_checked,
    read_safetensors_dir,
    save_lance_checkpoint,
)
from lance_core.config import model_preset
from lance_core.encoders import QwenViT
from lance_core.encoders.vit import meta_vision_tower
from lance_core.flops import count_parameters
from lance_core.model import build_model
from lance_core.model.embeddings import latent_position_table
from tests.qwen_tiny import random_qwen, save_random_qwen


def _randomised(cfg, seed):
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def _raw(tensor):
    return tensor.dtype, tuple(tensor.shape), tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _state(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ Lance
def test_lance_checkpoint_round_trip_is_identical(tmp_path, tiny_cfg):
    assert tiny_cfg.qk_norm
    model = _randomised(tiny_cfg, 0)
    first = save_lance_checkpoint(model, tmp_path / "a.safetensors", metadata={"step": 7})
    fresh = build_model(tiny_cfg)
    report = load_lance_checkpoint(fresh, first)
    assert report.loaded == len(model.state_dict()) and not report.vit_weights
    second = save_lance_checkpoint(fresh, tmp_path / "b")
    assert second == tmp_path / "b" / "model.safetensors"
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys() == model.state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith(LANCE_PREFIXES) for k in a)
    for key in ("language_model.model.layers.0.self_attn.q_proj_moe_gen.bias",
                "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight",
                "language_model.model.layers.1.mlp_moe_gen.down_proj.weight",
                "language_model.model.norm_moe_gen.weight", "language_model.lm_head.weight",
                "time_embedder.mlp.2.weight", "vae2llm.bias", "llm2vae.weight", "latent_pos_embed.pos_embed"):
        assert key in a, key
    rows = tiny_cfg.max_latent_frames * tiny_cfg.latent_grid ** 2
    assert a["latent_pos_embed.pos_embed"].shape == (rows, tiny_cfg.hidden_size)
    from safetensors import safe_open

    with safe_open(str(first), framework="pt") as fh:
        assert fh.metadata()["step"] == "7"


def test_position_table_is_rebuilt_and_vit_keys_kept_apart(tmp_path, tiny_cfg):
    model = _randomised(tiny_cfg, 1)
    state = _state(model)
    table = state["latent_pos_embed.pos_embed"].clone()
    state["latent_pos_embed.pos_embed"] = torch.randn_like(table)
    state["vit_model.blocks.0.attn.qkv.weight"] = torch.ones(3, 3)
    save_file(state, str(tmp_path / "c.safetensors"))
    fresh = build_model(tiny_cfg)
    report = load_lance_checkpoint(fresh, tmp_path / "c.safetensors")
    assert torch.equal(fresh.latent_pos_embed.pos_embed, table)
    assert list(report.vit_weights) == ["blocks.0.attn.qkv.weight"]
    assert "vit_model.blocks.0.attn.qkv.weight" not in fresh.state_dict()
    assert torch.equal(fresh.llm2vae.weight, model.llm2vae.weight)


def test_sharded_lance_checkpoint_loads(tmp_path, tiny_cfg):
    state = _state(_randomised(tiny_cfg, 2))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    fresh = build_model(tiny_cfg)
    load_lance_checkpoint(fresh, tmp_path)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in keys)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, tiny_cfg):
    state = _state(build_model(tiny_cfg))
    del state["llm2vae.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyError, match=r"llm2vae\.bias"):
        load_lance_checkpoint(build_model(tiny_cfg), tmp_path / "missing.safetensors")
    load_lance_checkpoint(build_model(tiny_cfg), tmp_path / "missing.safetensors", strict=False)

    state = _state(build_model(tiny_cfg))
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"extra\.weight"):
        load_state_dict_checked(build_model(tiny_cfg), state)

    bigger = build_model(model_preset("tiny", intermediate_size=96))
    save_lance_checkpoint(bigger, tmp_path / "bigger.safetensors")
    misshaped = r"mlp(_moe_gen)?\.(gate|up|down)_proj\.weight has shape \((96, 64|64, 96)\), the model"
    with pytest.raises(ValueError, match=misshaped):
        load_lance_checkpoint(build_model(tiny_cfg), tmp_path / "bigger.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lance_checkpoint(build_model(tiny_cfg), tmp_path / "nowhere")


def test_sharded_folder_reads_all_shards_lazily(tmp_path):
    save_file({"a": torch.ones(2), "c": torch.ones(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors"}}))
    assert set(read_safetensors_dir(tmp_path)) == {"a", "b", "c"}
    assert set(read_safetensors_dir(tmp_path, select=lambda k: k != "c")) == {"a", "b"}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        read_safetensors_dir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*empty"):
        read_safetensors_dir(tmp_path / "empty")


def _released_lance_keys(num_layers):
    """The key names of the released Lance checkpoint (MODEL.md, "Released checkpoint key names")."""
    per_expert = [f"self_attn.{p}_proj{{g}}.{t}" for p in "qkv" for t in ("weight", "bias")]
    per_expert += ["self_attn.o_proj{g}.weight", "self_attn.q_norm{g}.weight", "self_attn.k_norm{g}.weight"]
    per_expert += [f"mlp{{g}}.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_expert += ["input_layernorm{g}.weight", "post_attention_layernorm{g}.weight"]
    keys = {f"language_model.model.layers.{i}.{name.format(g=g)}"
            for i in range(num_layers) for name in per_expert for g in ("", "_moe_gen")}
    keys |= {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
             "language_model.model.norm.weight", "language_model.model.norm_moe_gen.weight",
             "latent_pos_embed.pos_embed"}
    keys |= {f"{m}.{t}" for m in ("time_embedder.mlp.0", "time_embedder.mlp.2", "vae2llm", "llm2vae")
             for t in ("weight", "bias")}
    return keys


def _released_vit_keys(depth):
    """``vit_model.*`` names of the released ``Lance_3B_Video`` checkpoint: the Qwen2.5-VL vision tower."""
    per_block = ["norm1.weight", "norm2.weight"]
    per_block += [f"attn.{m}.{t}" for m in ("qkv", "proj") for t in ("weight", "bias")]
    per_block += [f"mlp.{p}_proj.{t}" for p in ("gate", "up", "down") for t in ("weight", "bias")]
    keys = {f"vit_model.blocks.{i}.{name}" for i in range(depth) for name in per_block}
    keys |= {"vit_model.patch_embed.proj.weight", "vit_model.merger.ln_q.weight"}
    keys |= {f"vit_model.merger.mlp.{i}.{t}" for i in (0, 2) for t in ("weight", "bias")}
    return keys


def test_lance_3b_has_the_released_parameter_count_and_key_names():
    model = build_model(model_preset("lance-3b"), device="meta")
    state = model.state_dict()
    assert sum(v.numel() for v in state.values()) == 6_185_205_808
    assert all(k.startswith(LANCE_PREFIXES) for k in state)
    assert set(state) == _released_lance_keys(36)
    assert state["latent_pos_embed.pos_embed"].shape == (4096, 2048)


def test_lance_3b_video_has_the_released_parameter_count_and_key_names():
    """``Lance_3B_Video``: the 31-frame table and the ViT tower: 7,105,548,336 parameters in 1,411 tensors."""
    cfg = model_preset("lance-3b-video")
    assert cfg.vit_in_checkpoint and cfg.max_latent_frames == 31
    model, tower = build_model(cfg, device="meta"), meta_vision_tower(cfg.vit)
    state = {**model.state_dict(), **{"vit_model." + k: v for k, v in tower.state_dict().items()}}
    assert len(state) == 1_411
    assert sum(v.numel() for v in state.values()) == 7_105_548_336
    assert set(state) == _released_lance_keys(36) | _released_vit_keys(32)
    assert state["latent_pos_embed.pos_embed"].shape == (126_976, 2048)
    counts = count_parameters(model, tower)
    assert (counts.total, counts.tensors, counts.vit) == (7_105_548_336, 1_411, 668_684_288)


def _tiny_video_setup():
    """A tiny model of the video kind: several latent frames and the ViT inside the checkpoint."""
    cfg = model_preset("tiny", vit_in_checkpoint=True)
    return cfg, build_model(cfg), QwenViT.from_config(cfg.vit)


def _released_tiny_video_file(folder, cfg, model, vit):
    """A checkpoint written by hand under the released names (no code of ours writes it): random weights,
    the release's position table, the ViT under ``vit_model.*``."""
    gen = torch.Generator().manual_seed(11)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    shapes |= {"vit_model." + k: v.shape for k, v in vit.tower.state_dict().items()}
    assert set(shapes) == _released_lance_keys(cfg.num_layers) | _released_vit_keys(cfg.vit.depth)
    state = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    state["latent_pos_embed.pos_embed"] = latent_position_table(cfg.hidden_size, cfg.latent_grid,
                                                                cfg.max_latent_frames)
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    return state


def test_tiny_video_checkpoint_with_released_names_round_trips(tmp_path):
    cfg, model, vit = _tiny_video_setup()
    released = _released_tiny_video_file(tmp_path / "released", cfg, model, vit)
    report = load_lance_checkpoint(model, tmp_path / "released", vit=vit)
    assert report.loaded == len(model.state_dict()) and report.vit_loaded == len(vit.tower.state_dict())
    assert not report.vit_weights
    assert torch.equal(vit.tower.blocks[0].attn.qkv.weight, released["vit_model.blocks.0.attn.qkv.weight"])

    first = save_lance_checkpoint(model, tmp_path / "first", vit=vit)
    written = load_file(first)
    assert written.keys() == released.keys()

    _, again, again_vit = _tiny_video_setup()
    load_lance_checkpoint(again, first, vit=again_vit)
    second = save_lance_checkpoint(again, tmp_path / "second", vit=again_vit)
    rewritten = load_file(second)  # the header's metadata order varies, so compare tensor bytes, not files
    assert rewritten.keys() == written.keys()
    assert all(_raw(rewritten[k]) == _raw(written[k]) == _raw(released[k]) for k in written)

    # model.vit.path may name the video checkpoint: the encoder reads its vit_model.* tensors
    direct = QwenViT.from_config(cfg.vit.model_copy(update={"path": str(tmp_path / "first")}))
    assert all(torch.equal(v, vit.tower.state_dict()[k]) for k, v in direct.tower.state_dict().items())
    frames = torch.rand(1, 3, 56, 56)
    assert torch.equal(direct.encode(frames)[0], vit.encode(frames)[0])


def test_video_checkpoint_errors_name_the_preset_and_the_tensor(tmp_path):
    cfg, model, vit = _tiny_video_setup()
    released = _released_tiny_video_file(tmp_path / "released", cfg, model, vit)
    image_model = build_model(model_preset("tiny", max_latent_frames=1))
    with pytest.raises(ValueError, match=r"latent_pos_embed\.pos_embed has shape \(4096, 64\) \(16 latent "
                                         r"frame\(s\) of 16x16\).*lance-3b-video"):
        load_lance_checkpoint(image_model, tmp_path / "released")

    report = load_lance_checkpoint(build_model(cfg), tmp_path / "released")  # no encoder: handed back
    assert set(report.vit_weights) == {k[len("vit_model."):] for k in released if k.startswith("vit_model.")}

    image_only = save_lance_checkpoint(build_model(cfg), tmp_path / "image_only")
    with pytest.raises(KeyError, match="no vit_model"):
        load_lance_checkpoint(build_model(cfg), image_only, vit=QwenViT.from_config(cfg.vit))

    state = dict(released, **{"vit_model.merger.ln_q.weight": torch.ones(3)})
    save_file(state, str(tmp_path / "bad.safetensors"))
    fresh, fresh_vit = build_model(cfg), QwenViT.from_config(cfg.vit)
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"vit_model\.\*\).*merger\.ln_q\.weight has shape \(3,\)"):
        load_lance_checkpoint(fresh, tmp_path / "bad.safetensors", vit=fresh_vit)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


# ------------------------------------------------------------------------------------------ Qwen2.5-VL
def _qwen_und_pairs(qwen):
    """(Qwen in-memory key, Lance UND key) for every LLM tensor."""
    for key in qwen.state_dict():
        if key.startswith("model.language_model."):
            yield key, "language_model.model." + key[len("model.language_model."):]
    yield "lm_head.weight", "language_model.lm_head.weight"


def test_qwen_weights_go_into_und_then_gen(tmp_path):
    cfg = model_preset("tiny")  # qk_norm on: the norms start at 1
    qwen = save_random_qwen(tmp_path, cfg, seed=3)
    model = _randomised(cfg, 4)
    report = load_qwen25vl_weights(model, tmp_path)
    ours, theirs = model.state_dict(), qwen.state_dict()
    for qwen_key, lance_key in _qwen_und_pairs(qwen):
        assert torch.equal(ours[lance_key], theirs[qwen_key]), lance_key
    for key, value in ours.items():
        if "_moe_gen" in key:
            assert torch.equal(value, ours[key.replace("_moe_gen", "")]), key
        if ".q_norm" in key or ".k_norm" in key:
            assert torch.equal(value, torch.ones_like(value)), key
    assert report.skipped_vision == sum(k.startswith("model.visual.") for k in theirs)
    assert report.loaded == len(list(_qwen_und_pairs(qwen))) and not report.ignored


def test_qwen_in_memory_layout_and_tied_embeddings(tmp_path):
    """``model.language_model.*`` keys (a state_dict saved by hand) and a checkpoint without lm_head."""
    cfg = model_preset("tiny")
    qwen = random_qwen(cfg, seed=5, tie_word_embeddings=True)
    state = {k: v.contiguous() for k, v in qwen.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.layers.") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = build_model(cfg)
    report = load_qwen25vl_weights(model, tmp_path)
    assert report.tied_lm_head
    assert torch.equal(model.language_model.lm_head.weight, state["model.language_model.embed_tokens.weight"])
    final_norm = state["model.language_model.norm.weight"]
    assert torch.equal(model.language_model.model.norm_moe_gen.weight, final_norm)


def test_qwen_errors_name_the_path_and_the_key(tmp_path):
    cfg = model_preset("tiny")
    with pytest.raises(FileNotFoundError, match="no_such_qwen"):
        load_qwen25vl_weights(build_model(cfg), tmp_path / "no_such_qwen")

    save_random_qwen(tmp_path / "wide", cfg, hidden_size=96)
    with pytest.raises(ValueError, match=r"language_model\.\S+ has shape \(.*96.*\), the model expects"):
        load_qwen25vl_weights(build_model(cfg), tmp_path / "wide")

    qwen = random_qwen(cfg)
    state = {k: v.contiguous() for k, v in qwen.state_dict().items()
             if k != "model.language_model.layers.1.mlp.up_proj.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_qwen25vl_weights(build_model(cfg), tmp_path)

    save_random_qwen(tmp_path / "deep", cfg, num_hidden_layers=3)
    with pytest.raises(KeyError, match=r"layers\.2\."):
        load_qwen25vl_weights(build_model(cfg), tmp_path / "deep")
