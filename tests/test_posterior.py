"""VAE posterior sampling (the release draws a fresh latent per step): the std stored beside the mean in the
shards, normalised like it, and training drawing mean + std * eps each time a row is read. The posterior
mean alone stays the default."""

import random

import numpy as np
import pandas as pd
import pytest
import torch

from lance_core.config import TINY_VAE, VAEConfig
from lance_core.encoders import WanVAE, sample_posterior
from lance_core.shards import (
    LEGACY_OPTIONAL_COLUMNS,
    LEGACY_SCHEMA,
    SHARD_SCHEMA,
    check_schema,
    shard_rows,
    shard_table,
)
from pipelines.data.config import PrecomputeConfig
from pipelines.train.config import DataSection
from pipelines.train.data import row_to_sample, slot_latents


@pytest.fixture(scope="module")
def vae():
    return WanVAE.from_config(VAEConfig(**TINY_VAE))


def test_normalised_posterior_std_scales_the_noise_like_the_mean(vae):
    pixels = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    mean, std = vae.encode_posterior(pixels)
    assert torch.equal(mean, vae.encode(pixels))
    with torch.no_grad():
        dist = vae.autoencoder.encode(pixels).latent_dist
    channel_std = vae.latent_stats()[1]
    assert torch.allclose(std, dist.std / channel_std, atol=1e-6)
    # a draw from the stored (normalised) posterior is the normalised draw from the VAE's own posterior
    drawn = sample_posterior(mean, std, torch.Generator().manual_seed(3))
    direct = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(drawn, direct, atol=1e-5)
    assert not torch.allclose(drawn, mean)
    with pytest.raises(ValueError, match="differ in shape"):
        sample_posterior(mean, std[:, :, :1])


def _pixel_batch(frames: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (frames, 32, 48, 3), dtype=np.uint8)
    return pd.DataFrame([{"status": "ok", "target_pixels": pixels.tobytes(),
                          "target_shape": list(pixels.shape), "source_pixels": b"", "source_shape": []}])


@pytest.mark.parametrize("store_std", [False, True])
def test_vae_stage_stores_the_std_only_when_asked(store_std):
    from pipelines.data.encode import VAEEncoder

    cfg = PrecomputeConfig(encoders=dict(store_posterior_std=store_std), latent_dtype="fp32")
    stage = VAEEncoder(cfg.model_dump_json())
    table = stage(_pixel_batch()).to_pylist()[0]

    def stored(name: str) -> torch.Tensor:  # the stage hands on the values as stored (fp32 here)
        values = np.frombuffer(table[name], np.float32).reshape(table["target_vae_shape"])
        return torch.from_numpy(values.copy())

    mean = stored("target_vae")
    assert list(mean.shape) == [2, 2, 3, 48]
    frames = np.frombuffer(_pixel_batch()["target_pixels"][0], dtype=np.uint8).reshape(5, 32, 48, 3)
    pixels = torch.from_numpy(frames.copy()).float().div(255).permute(3, 0, 1, 2)[None] * 2 - 1
    expected_mean, expected_std = stage.vae.encode_posterior(pixels)
    assert torch.equal(mean, expected_mean[0].permute(1, 2, 3, 0))  # the mean is the same either way
    if store_std:
        std = stored("target_vae_std")
        assert torch.equal(std, expected_std[0].permute(1, 2, 3, 0)) and bool((std > 0).all())
        assert table["source_vae_std"] == b""
    else:
        assert "target_vae_std" not in table


def test_shard_schema_has_an_optional_std_column():
    import pyarrow as pa

    assert SHARD_SCHEMA.field("target_vae_std").type == SHARD_SCHEMA.field("target_vae").type
    without = shard_table([_row(with_std=False)], "fp32")
    assert "target_vae_std" not in without.schema.names and check_schema(without.schema, "mean.parquet") == 2
    assert "target_vae_std" in shard_table([_row()], "fp32").schema.names
    assert "target_vae_std" in LEGACY_OPTIONAL_COLUMNS
    older = pa.schema([f for f in LEGACY_SCHEMA if f.name not in LEGACY_OPTIONAL_COLUMNS],
                      metadata=LEGACY_SCHEMA.metadata)
    assert check_schema(older, "older.parquet") == 1  # version-1 shards from before the column still read
    for schema in (LEGACY_SCHEMA, SHARD_SCHEMA):
        wrong = pa.schema([pa.field(f.name, pa.string()) if f.name == "target_vae_std" else f
                           for f in schema], metadata=schema.metadata)
        with pytest.raises(ValueError, match="target_vae_std"):
            check_schema(wrong, "wrong.parquet")


def _row(with_std: bool = True) -> dict:
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(2, 2, 3, 48, generator=gen), torch.rand(2, 2, 3, 48, generator=gen) + 0.5
    row = {"task": "t2v", "sample_id": "s0", "caption": "a clip", "target_vae": mean, "target_fps": 11.4}
    if with_std:
        row["target_vae_std"] = std
    return row


def _read_row(with_std: bool = True) -> dict:
    """The row as training reads it: written as an fp32 shard, read back."""
    return shard_rows(shard_table([_row(with_std)], "fp32"))[0]


def _target_latents(sample) -> torch.Tensor:
    return next(s.latents for s in sample.spans if s.latents is not None and s.mode == "noise")


def test_training_draws_a_fresh_latent_per_read(tokenizer, tiny_cfg):
    row = _read_row()
    mean = slot_latents(row, "target", 48)
    assert torch.equal(mean, _row()["target_vae"])
    std = torch.from_numpy(row["target_vae_std"].copy())
    assert torch.equal(slot_latents(row, "target", 48, None), mean)
    drawn = slot_latents(row, "target", 48, torch.Generator().manual_seed(5))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(drawn, mean + std * eps)

    quiet = dict(caption_dropout=0.0, condition_dropout=0.0)
    default = DataSection(**quiet)
    assert not default.sample_posterior
    plain = row_to_sample(row, tokenizer, tiny_cfg, default, random.Random(0))
    assert torch.equal(_target_latents(plain), mean.reshape(-1, 48))

    sampling = DataSection(sample_posterior=True, **quiet)
    rng = random.Random(0)
    first = _target_latents(row_to_sample(row, tokenizer, tiny_cfg, sampling, rng))
    second = _target_latents(row_to_sample(row, tokenizer, tiny_cfg, sampling, rng))
    assert not torch.allclose(first, second) and not torch.allclose(first, mean.reshape(-1, 48))
    # the draws follow the loader's random state, so a resumed run draws the same latents
    replay = random.Random(0)
    assert torch.equal(_target_latents(row_to_sample(row, tokenizer, tiny_cfg, sampling, replay)), first)
    # over many reads the draws average to the mean with the stored spread
    draws = torch.stack([slot_latents(row, "target", 48, torch.Generator().manual_seed(k))
                         for k in range(400)])
    assert torch.allclose(draws.mean(0), mean, atol=0.25)
    assert torch.allclose(draws.std(0), std, rtol=0.2)


def test_sampling_without_a_stored_std_names_the_option(tokenizer, tiny_cfg):
    sampling = DataSection(sample_posterior=True, caption_dropout=0.0, condition_dropout=0.0)
    with pytest.raises(ValueError, match="store_posterior_std"):
        row_to_sample(_read_row(with_std=False), tokenizer, tiny_cfg, sampling, random.Random(0))
