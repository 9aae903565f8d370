import numpy as np
import pytest
import torch

from lance_core.config import VAEConfig, ViTConfig, model_preset
from lance_core.encoders import (
    QwenViT,
    WanVAE,
    convert_wan_vae_state_dict,
    latents_to_tokens,
    to_original_wan_state_dict,
    tokens_to_latents,
)


@pytest.fixture(scope="module")
def vae():
    return WanVAE.from_config(model_preset("tiny").vae)


@pytest.fixture(scope="module")
def vit():
    return QwenViT.from_config(model_preset("tiny").vit)


@pytest.mark.parametrize("frames,height,width", [(1, 64, 96), (5, 32, 48), (9, 32, 32)])
def test_vae_round_trip_shapes(vae, frames, height, width):
    pixels = torch.rand(1, 3, frames, height, width) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (1, 48, (frames - 1) // 4 + 1, height // 16, width // 16)
    assert vae.latent_shape(frames, height, width) == tuple(latents.shape[2:])
    decoded = vae.decode(latents)
    assert decoded.shape == pixels.shape
    assert vae.pixel_shape(*latents.shape[2:]) == (frames, height, width)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_vae_normalisation_and_posterior_sampling(vae):
    pixels = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    dist = vae.autoencoder.encode(pixels).latent_dist
    mean = torch.tensor(vae.autoencoder.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.autoencoder.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(vae.encode(pixels), (dist.mean - mean) / std, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    sampled = vae.encode(pixels, sample=True, generator=gen)
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    # the posterior noise is scaled by sigma and then by the same 1/std as the mean
    assert torch.allclose(sampled, (dist.mean + dist.std * eps - mean) / std, atol=1e-5)


def test_vae_rejects_bad_shapes(vae):
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 1, 30, 32))


def test_tokens_round_trip():
    latents = torch.randn(48, 2, 3, 4)
    tokens, grid = latents_to_tokens(latents)
    assert tokens.shape == (24, 48) and grid == (2, 3, 4)
    assert torch.equal(tokens[5], latents[:, 0, 1, 1])
    assert torch.equal(tokens_to_latents(tokens, grid), latents)


def test_vae_loads_original_single_file_and_diffusers_folder(tmp_path, vae):
    original = to_original_wan_state_dict(vae.autoencoder.state_dict(), num_res_blocks=1)
    assert any(k.startswith("encoder.downsamples.0.downsamples.") for k in original)
    assert "decoder.head.2.weight" in original and "conv1.weight" in original
    assert set(convert_wan_vae_state_dict(original)) == set(vae.autoencoder.state_dict())
    pth = tmp_path / "Wan2.2_VAE.pth"
    torch.save(original, pth)
    cfg = model_preset("tiny").vae
    loaded = WanVAE.from_config(cfg.model_copy(update={"path": str(pth), "seed": 123}))
    folder = tmp_path / "vae"
    vae.autoencoder.save_pretrained(folder)
    from_folder = WanVAE.from_config(cfg.model_copy(update={"path": str(folder), "seed": 7}))
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    reference = vae.encode(pixels)
    assert torch.equal(loaded.encode(pixels), reference)
    assert torch.equal(from_folder.encode(pixels), reference)


def test_vae_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        WanVAE.from_config(VAEConfig(preset="tiny", base_dim=16, decoder_base_dim=16, num_res_blocks=1,
                                     path=str(tmp_path / "nowhere.pth")))
    small = WanVAE.from_config(VAEConfig(preset="tiny", base_dim=16, decoder_base_dim=16, num_res_blocks=1))
    path = tmp_path / "other.pth"
    torch.save(to_original_wan_state_dict(small.autoencoder.state_dict(), 1), path)
    with pytest.raises(ValueError, match="has shape"):
        WanVAE.from_config(VAEConfig(preset="tiny", base_dim=32, decoder_base_dim=16, num_res_blocks=1,
                                     path=str(path)))


def test_full_size_vae_builds_with_wan22_sizes():
    from lance_core.encoders.vae import diffusers_config

    cfg = diffusers_config(VAEConfig(preset="wan2.2"))
    assert (cfg["base_dim"], cfg["decoder_base_dim"], cfg["z_dim"], cfg["patch_size"]) == (160, 256, 48, 2)
    assert len(cfg["latents_mean"]) == len(cfg["latents_std"]) == 48


def test_vit_preprocess_matches_qwen_processor(vit):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, image_mean=list(vit.mean.flatten().tolist()),
                                      image_std=list(vit.std.flatten().tolist()), patch_size=14,
                                      temporal_patch_size=2, merge_size=2)
    image = torch.rand(3, 56, 84)
    reference = processor(images=[image.numpy()], return_tensors="pt", input_data_format="channels_first")
    patches, grid = vit.preprocess(image[None])
    assert grid == tuple(reference["image_grid_thw"][0].tolist()) == (1, 4, 6)
    assert torch.allclose(patches, reference["pixel_values"], atol=1e-5)


def test_vit_encode_shapes_image_and_video(vit):
    features, grid = vit.encode(torch.rand(1, 3, 56, 84))
    assert grid == (1, 2, 3) and features.shape == (6, 64)
    features, grid = vit.encode(torch.rand(5, 3, 28, 56))  # odd frame count: last frame repeated
    assert grid == (3, 1, 2) and features.shape == (6, 64)
    with pytest.raises(ValueError, match="multiples of 28"):
        vit.encode(torch.rand(1, 3, 30, 56))


def test_vit_loads_vision_weights_from_qwen_checkpoint(tmp_path, vit):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from lance_core.encoders.vit import vision_config

    tiny = model_preset("tiny")
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=512,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=vision_config(tiny.vit).to_dict())
    torch.manual_seed(1)
    qwen = Qwen2_5_VLForConditionalGeneration(config).eval()
    qwen.save_pretrained(tmp_path)
    loaded = QwenViT.from_config(tiny.vit.model_copy(update={"path": str(tmp_path)}))
    frames = torch.rand(1, 3, 56, 56)
    patches, grid = loaded.preprocess(frames)
    with torch.no_grad():
        reference = qwen.model.visual(patches, grid_thw=torch.tensor([grid])).pooler_output
    assert torch.allclose(loaded.encode(frames)[0], reference, atol=1e-6)
    assert not torch.allclose(vit.encode(frames)[0], reference, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="model.vit.path"):
        QwenViT.from_config(ViTConfig(**{**tiny.vit.model_dump(), "path": str(tmp_path / "missing")}))
