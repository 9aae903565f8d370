"""Encoder wrappers on tiny random presets: Wan2.2 VAE shapes, normalisation, posterior scaling and weight
loading (original single file and diffusers folder); Qwen2.5-VL ViT patch parity with transformers'
processors, encode shapes and vision-weight loading from a saved Qwen2.5-VL checkpoint; both encoders' uint8
input (converted on their device) and their bf16 paths."""

import json

import pytest
import torch

from lance_core.config import TINY_VAE, TINY_VIT, VAEConfig, ViTConfig
from lance_core.encoders import (
    QwenViT,
    WanVAE,
    convert_wan_vae_state_dict,
    latents_to_tokens,
    to_original_wan_state_dict,
    tokens_to_latents,
)
from lance_core.encoders.vit import CLIP_MEAN, CLIP_STD, vision_config


@pytest.fixture(scope="module")
def vae():
    return WanVAE.from_config(VAEConfig(**TINY_VAE))


@pytest.fixture(scope="module")
def vit():
    return QwenViT.from_config(ViTConfig(**TINY_VIT))


# ------------------------------------------------------------------------------------------------ VAE
@pytest.mark.parametrize("frames,height,width", [(1, 64, 96), (5, 32, 48), (9, 32, 32)])
def test_vae_round_trip_shapes(vae, frames, height, width):
    pixels = torch.rand(1, 3, frames, height, width) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (1, 48, (frames - 1) // 4 + 1, height // 16, width // 16)
    assert latents.dtype == torch.float32
    assert vae.latent_shape(frames, height, width) == tuple(latents.shape[2:])
    decoded = vae.decode(latents)
    assert decoded.shape == pixels.shape
    assert vae.pixel_shape(*latents.shape[2:]) == (frames, height, width)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_vae_normalisation_and_posterior_sampling(vae):
    pixels = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.autoencoder.encode(pixels).latent_dist
    mean = torch.tensor(vae.autoencoder.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.autoencoder.config.latents_std).view(1, -1, 1, 1, 1)
    normalised_mu = vae.encode(pixels)
    assert torch.allclose(normalised_mu, (dist.mean - mean) / std, atol=1e-6)
    assert torch.allclose(vae.decode(normalised_mu), vae.autoencoder.decode(dist.mean).sample, atol=1e-6)

    sampled = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    # the posterior noise is scaled by sigma and then by the same 1/std as the mean
    assert torch.allclose(sampled, (dist.mean + dist.std * eps - mean) / std, atol=1e-5)
    assert torch.allclose((sampled - normalised_mu) * std / dist.std, eps, atol=1e-3)
    again = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again)


def test_vae_follows_module_dtype(vae):
    import copy

    half = copy.deepcopy(vae).to(torch.bfloat16)
    latents = half.encode(torch.rand(1, 3, 1, 32, 32) * 2 - 1)
    assert latents.dtype == torch.float32 and latents.shape == (1, 48, 1, 2, 2)  # normalised in float32
    assert half.decode(latents).dtype == torch.bfloat16


def test_vae_takes_uint8_pixels_and_converts_them_on_its_device(vae):
    frames = torch.randint(0, 256, (2, 3, 5, 32, 48), dtype=torch.uint8)
    as_floats = frames.float().div(255) * 2 - 1  # the host-side conversion the precompute used to do
    assert torch.equal(vae.model_input(frames), as_floats)
    assert torch.equal(vae.encode(frames), vae.encode(as_floats))
    mean, std = vae.encode_posterior(frames)
    assert torch.equal(mean, vae.encode(as_floats)) and bool((std > 0).all())


def test_vae_in_bf16_keeps_its_posterior_arithmetic_in_float32(vae):
    import copy

    half = copy.deepcopy(vae).to(torch.bfloat16)
    frames = torch.randint(0, 256, (1, 3, 5, 32, 32), dtype=torch.uint8)
    assert half.model_input(frames).dtype == torch.bfloat16
    mean, std = half.encode_posterior(frames)
    assert mean.dtype == std.dtype == torch.float32
    # float32 out of a bf16 encoder is not just bf16 widened: the normalisation ran in float32
    assert not torch.equal(mean, mean.bfloat16().float())
    ref_mean, ref_std = vae.encode_posterior(frames)
    scale = ref_mean.abs().max()
    assert (mean - ref_mean).abs().max() < 0.02 * scale and (std - ref_std).abs().max() < 0.02 * ref_std.max()


def test_vae_rejects_bad_shapes(vae):
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 1, 30, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.latent_shape(1, 32, 40)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        vae.encode(torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="spatial_ratio"):
        WanVAE.from_config(VAEConfig(**{**TINY_VAE, "spatial_ratio": 8}))


def test_tokens_round_trip():
    latents = torch.randn(48, 2, 3, 4)
    tokens, grid = latents_to_tokens(latents)
    assert tokens.shape == (24, 48) and grid == (2, 3, 4)
    assert torch.equal(tokens[5], latents[:, 0, 1, 1])  # raster order: t, then h, then w
    assert torch.equal(tokens[12], latents[:, 1, 0, 0])
    assert torch.equal(tokens_to_latents(tokens, grid), latents)
    with pytest.raises(ValueError, match="do not fill"):
        tokens_to_latents(tokens, (2, 3, 3))


def test_original_layout_keys_round_trip(vae):
    diffusers_sd = vae.autoencoder.state_dict()
    original = to_original_wan_state_dict(diffusers_sd)
    assert "encoder.downsamples.0.downsamples.0.residual.2.weight" in original
    assert "encoder.downsamples.0.downsamples.1.resample.1.weight" in original  # resampler after 1 resnet
    assert "decoder.upsamples.0.upsamples.2.resample.1.weight" in original  # decoder: after 2 resnets
    assert "decoder.upsamples.0.upsamples.2.time_conv.weight" in original
    assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "decoder.head.2.weight",
            "encoder.middle.1.to_qkv.weight", "decoder.middle.2.residual.6.weight"} <= set(original)
    assert not any("resnets" in k or "mid_block" in k for k in original)
    assert convert_wan_vae_state_dict(original).keys() == diffusers_sd.keys()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vae_loads_original_single_file(tmp_path, vae, suffix):
    original = to_original_wan_state_dict(vae.autoencoder.state_dict(), num_res_blocks=1)
    path = tmp_path / f"Wan2.2_VAE{suffix}"
    if suffix == ".pth":
        torch.save(original, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in original.items()}, path)
    loaded = WanVAE.from_config(VAEConfig(**{**TINY_VAE, "path": str(path), "seed": 123}))
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(pixels), vae.encode(pixels))
    latents = torch.randn(1, 48, 2, 2, 2)
    assert torch.equal(loaded.decode(latents), vae.decode(latents))


def test_vae_loads_diffusers_folder(tmp_path, vae):
    vae.autoencoder.save_pretrained(tmp_path / "vae")
    loaded = WanVAE.from_config(VAEConfig(**{**TINY_VAE, "path": str(tmp_path / "vae"), "seed": 7}))
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(pixels), vae.encode(pixels))


def test_vae_missing_and_mismatched_weights(tmp_path, vae):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        WanVAE.from_config(VAEConfig(**{**TINY_VAE, "path": str(tmp_path / "nowhere.pth")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanVAE.from_config(VAEConfig(**{**TINY_VAE, "path": str(tmp_path / "empty")}))
    original = to_original_wan_state_dict(vae.autoencoder.state_dict())
    torch.save(original, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight has shape"):
        WanVAE.from_config(VAEConfig(**{**TINY_VAE, "base_dim": 32, "path": str(tmp_path / "ok.pth")}))
    del original["decoder.head.2.bias"]
    torch.save(original, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match=r"decoder\.conv_out\.bias"):
        WanVAE.from_config(VAEConfig(**{**TINY_VAE, "path": str(tmp_path / "partial.pth")}))


def test_full_size_models_build_with_release_sizes():
    with torch.device("meta"):
        vae = WanVAE.from_config(VAEConfig(preset="wan2.2"))
        vit = QwenViT.from_config(ViTConfig(preset="qwen2.5-vl-3b"))
    ae = vae.autoencoder
    assert ae.encoder.conv_in.weight.shape == (160, 12, 3, 3, 3)  # base_dim 160, 2x2-patchified RGB
    assert ae.decoder.conv_out.weight.shape == (12, 256, 3, 3, 3)  # decoder_base_dim 256
    assert ae.quant_conv.weight.shape[0] == 96 and vae.latent_stats()[1].shape == (1, 48, 1, 1, 1)
    assert round(sum(p.numel() for p in ae.parameters()) / 1e6) == 705
    assert vit.tower.patch_embed.proj.weight.shape == (1280, 3, 2, 14, 14)
    assert len(vit.tower.blocks) == 32 and vit.tower.fullatt_block_indexes == [7, 15, 23, 31]
    assert vit.tower.merger.mlp[-1].weight.shape[0] == 2048
    assert round(sum(p.numel() for p in vit.parameters()) / 1e6) == 669


# ------------------------------------------------------------------------------------------------ ViT
def test_vit_preprocess_matches_qwen_image_processor(vit):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, image_mean=list(CLIP_MEAN),
                                      image_std=list(CLIP_STD), patch_size=14, temporal_patch_size=2, merge_size=2)
    image = torch.rand(3, 56, 84)
    reference = processor(images=[image.numpy()], return_tensors="pt", input_data_format="channels_first")
    patches, grid = vit.preprocess(image[None])
    assert grid == tuple(reference["image_grid_thw"][0].tolist()) == (1, 4, 6)
    assert torch.allclose(patches, reference["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("frames", [4, 5])  # odd counts repeat the last frame, like the processor
def test_vit_preprocess_matches_qwen_video_processor(vit, frames):
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(do_resize=False, do_rescale=False, image_mean=list(CLIP_MEAN),
                                      image_std=list(CLIP_STD), patch_size=14, temporal_patch_size=2,
                                      merge_size=2, do_sample_frames=False, cap_pixels_per_frame=False)
    video = torch.rand(frames, 3, 56, 84)
    reference = processor(videos=[video], return_tensors="pt")
    patches, grid = vit.preprocess(video)
    assert grid == tuple(reference["video_grid_thw"][0].tolist()) == ((frames + 1) // 2, 4, 6)
    assert torch.allclose(patches, reference["pixel_values_videos"], atol=1e-5)


def test_vit_encode_shapes_image_and_video(vit):
    features, grid = vit.encode(torch.rand(1, 3, 56, 84))
    assert grid == (1, 2, 3) and features.shape == (6, 64)
    features, grid = vit.encode(torch.rand(5, 3, 28, 56))  # odd frame count: last frame repeated
    assert grid == (3, 1, 2) and features.shape == (6, 64)
    clips = [torch.rand(1, 3, 56, 56), torch.rand(4, 3, 28, 84)]
    many, grids = vit.encode_many(clips)
    assert grids == [(1, 2, 2), (2, 1, 3)] and [f.shape for f in many] == [(4, 64), (6, 64)]
    assert torch.allclose(many[1], vit.encode(clips[1])[0], atol=1e-5)  # clips do not attend to each other
    with pytest.raises(ValueError, match="multiples of 28"):
        vit.encode(torch.rand(1, 3, 30, 56))
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        vit.encode(torch.rand(3, 56, 56))


def test_vit_takes_uint8_frames_and_normalises_them_on_its_device(vit):
    import copy

    frames = torch.randint(0, 256, (5, 3, 56, 84), dtype=torch.uint8)
    as_floats = frames.float().div(255)  # the host-side conversion the precompute used to do
    patches, grid = vit.preprocess(frames)
    assert torch.equal(patches, vit.preprocess(as_floats)[0]) and grid == (3, 4, 6)
    assert torch.equal(vit.encode(frames)[0], vit.encode(as_floats)[0])
    assert vit.preprocess(frames, torch.bfloat16)[0].dtype == torch.bfloat16
    half = copy.deepcopy(vit).to(torch.bfloat16)
    features, _ = half.encode(frames)
    reference = vit.encode(frames)[0]
    assert features.dtype == torch.bfloat16
    assert (features.float() - reference).abs().max() < 0.02 * reference.abs().max()


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=512,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=vision_config(ViTConfig(**TINY_VIT)).to_dict())
    torch.manual_seed(1)
    qwen = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("qwen")
    qwen.save_pretrained(path)
    return qwen, path


def _reference_features(qwen, patches, grid):
    with torch.no_grad():
        return qwen.model.visual(patches, grid_thw=torch.tensor([grid])).pooler_output


def test_vit_loads_vision_weights_from_qwen_checkpoint(qwen_checkpoint, vit):
    qwen, path = qwen_checkpoint
    loaded = QwenViT.from_config(ViTConfig(**{**TINY_VIT, "path": str(path)}))
    for frames in (torch.rand(1, 3, 56, 56), torch.rand(4, 3, 56, 84)):
        reference = _reference_features(qwen, *loaded.preprocess(frames))
        assert torch.allclose(loaded.encode(frames)[0], reference, atol=1e-6)
    assert not torch.allclose(vit.encode(frames)[0], reference, atol=1e-3)


def test_vit_loads_sharded_checkpoint_with_old_visual_prefix(qwen_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    qwen, path = qwen_checkpoint
    state = {k.replace("model.visual.", "visual.", 1): v for k, v in load_file(path / "model.safetensors").items()}
    assert any(k.startswith("visual.") for k in state)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = QwenViT.from_config(ViTConfig(**{**TINY_VIT, "path": str(tmp_path)}))
    frames = torch.rand(2, 3, 28, 56)
    reference = _reference_features(qwen, *loaded.preprocess(frames))
    assert torch.allclose(loaded.encode(frames)[0], reference, atol=1e-6)


def test_vit_missing_and_mismatched_weights(qwen_checkpoint, tmp_path):
    _, path = qwen_checkpoint
    with pytest.raises(FileNotFoundError, match="missing"):
        QwenViT.from_config(ViTConfig(**{**TINY_VIT, "path": str(tmp_path / "missing")}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        QwenViT.from_config(ViTConfig(**{**TINY_VIT, "path": str(tmp_path)}))
    with pytest.raises(ValueError, match=r"\(vision tower\): patch_embed\.proj\.weight has shape"):
        QwenViT.from_config(ViTConfig(**{**TINY_VIT, "patch_size": 7, "path": str(path)}))
