"""The precompute encoders' compute dtype (``encoders.dtype``) and their pixel path, on the tiny presets on
the CPU: the config field and its resolution, bf16 latents and features close to fp32's, the dtype recorded in
the encoder description (and kept out of the encoder identity), and uint8 pixels handed to the encoders."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lance_core.config import ConfigError, load_config
from lance_core.encoder_identity import encoder_identity
from pipelines.data.config import PrecomputeConfig
from pipelines.data.encode import VAEEncoder, ViTEncoder, compute_dtype, uint8_pixels

TOLERANCE = {"bf16": 0.02, "fp16": 0.005}
"""Largest |x - fp32| allowed, relative to the fp32 values' largest magnitude, for the tiny random encoders.
Measured on this batch: bf16 0.66 % (VAE latents) and 0.56 % (ViT features), fp16 0.08 % and 0.08 % (bf16
keeps 8 significant bits, 2^-8 ≈ 0.4 % per rounding; fp16 11)."""


def _batch(frames: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2):
        vae = rng.integers(0, 256, (frames, 32, 48, 3), dtype=np.uint8)
        vit = rng.integers(0, 256, (frames, 56, 56, 3), dtype=np.uint8)
        rows.append({"status": "ok", "stage": "", "reason": "", "error": "",
                     "target_pixels": vae.tobytes(), "target_shape": list(vae.shape),
                     "source_pixels": b"", "source_shape": [],
                     "target_vit_pixels": vit.tobytes(), "target_vit_shape": list(vit.shape),
                     "source_vit_pixels": b"", "source_vit_shape": []})
    return pd.DataFrame(rows)


def _cfg(dtype: str) -> str:
    return PrecomputeConfig(latent_dtype="fp32", encoders={"dtype": dtype}).model_dump_json()


def _values(row: dict, column: str, shape_column: str) -> np.ndarray:
    return np.frombuffer(row[column], np.float32).reshape(row[shape_column])


# --------------------------------------------------------------------------------------------- config
def test_dtype_field_is_validated_and_named():
    assert PrecomputeConfig().encoders.dtype == "auto"
    assert PrecomputeConfig(encoders={"dtype": "bf16"}).encoders.dtype == "bf16"
    message = r"encoders\.dtype: Input should be 'auto', 'bf16', 'fp16' or 'fp32' \(got 'fp8'\)"
    with pytest.raises(ConfigError, match=message):
        load_config(PrecomputeConfig, {"encoders": {"dtype": "fp8"}})
    with pytest.raises(ConfigError, match=r"encoders\.video_batch_size"):
        load_config(PrecomputeConfig, {"encoders": {"video_batch_size": 0}})


def test_auto_is_bf16_on_a_gpu_and_fp32_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype("auto", cpu) == torch.float32 and compute_dtype("auto", cuda) == torch.bfloat16
    assert compute_dtype("bf16", cpu) == torch.bfloat16  # asked for: allowed on the CPU
    assert compute_dtype("fp16", cuda) == torch.float16 and compute_dtype("fp32", cuda) == torch.float32


def test_the_dtype_is_not_part_of_the_encoder_identity():
    # training refuses shards made by other encoders; the compute dtype does not make another encoder
    ids = {json.dumps(encoder_identity(PrecomputeConfig(encoders={"dtype": d}).model.build()), sort_keys=True)
           for d in ("auto", "bf16", "fp32")}
    assert len(ids) == 1 and "dtype" not in next(iter(ids))


# --------------------------------------------------------------------------------------------- pixels
def test_pixels_leave_the_host_as_uint8():
    batch = _batch()
    pixels = uint8_pixels(batch, "target", [0, 1], (5, 32, 48, 3))
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 5, 32, 48, 3)
    expected = np.frombuffer(batch["target_pixels"][1], np.uint8).reshape(5, 32, 48, 3)
    assert np.array_equal(pixels[1].numpy(), expected)


def test_the_encoder_stages_hand_uint8_to_the_encoders():
    seen = []
    vae_stage, vit_stage = VAEEncoder(_cfg("bf16")), ViTEncoder(_cfg("bf16"))
    encode, encode_many = vae_stage.vae.encode, vit_stage.vit.encode_many

    def vae_spy(pixels):
        latents = encode(pixels)
        seen.append(("vae", pixels.dtype, pixels.device.type, tuple(pixels.shape), latents.dtype))
        return latents

    def vit_spy(clips):
        seen.extend(("vit", c.dtype, c.device.type, tuple(c.shape), None) for c in clips)
        return encode_many(clips)

    vae_stage.vae.encode, vit_stage.vit.encode_many = vae_spy, vit_spy
    vit_stage(vae_stage(_batch()).to_pandas())
    # uint8 in; float32 latents out of the bf16 VAE (normalised in float32)
    assert seen == [("vae", torch.uint8, "cpu", (2, 3, 5, 32, 48), torch.float32)] + \
        [("vit", torch.uint8, "cpu", (5, 3, 56, 56), None)] * 2


# ------------------------------------------------------------------------------------------ precision
@pytest.fixture(scope="module")
def stage_outputs():
    """Both stages' rows for the same batch at fp32 and at bf16."""
    out = {}
    for dtype in ("fp32", "bf16", "fp16"):
        vae_stage, vit_stage = VAEEncoder(_cfg(dtype)), ViTEncoder(_cfg(dtype))
        out[dtype] = vit_stage(vae_stage(_batch()).to_pandas()).to_pylist()
    return out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_latents_and_features_are_close_to_fp32(stage_outputs, dtype):
    for column, shape in (("target_vae", "target_vae_shape"), ("target_vit", "target_vit_feat_shape")):
        for ref_row, row in zip(stage_outputs["fp32"], stage_outputs[dtype]):
            ref, got = _values(ref_row, column, shape), _values(row, column, shape)
            assert ref.shape == got.shape
            error = np.abs(got - ref).max() / np.abs(ref).max()
            assert 0 < error < TOLERANCE[dtype], (column, error)  # close, and really computed in that dtype


def test_the_compute_dtype_is_recorded(stage_outputs):
    for dtype in ("fp32", "bf16", "fp16"):
        row = stage_outputs[dtype][0]
        vae, vit = json.loads(row["vae_info"]), json.loads(row["vit_info"])
        assert vae["compute_dtype"] == vit["compute_dtype"] == dtype
        assert vae["device"] == vit["device"] == "cpu"
        assert "float32" in vae["normalisation"]


def test_auto_runs_fp32_on_the_cpu(stage_outputs):
    stage = VAEEncoder(_cfg("auto"))
    assert stage.vae.dtype == torch.float32 and json.loads(stage.info)["compute_dtype"] == "fp32"
    row = stage(_batch()).to_pylist()[0]
    assert np.array_equal(_values(row, "target_vae", "target_vae_shape"),
                          _values(stage_outputs["fp32"][0], "target_vae", "target_vae_shape"))


def test_video_rows_are_encoded_in_video_batch_size_chunks():
    calls = []
    stage = VAEEncoder(PrecomputeConfig(encoders={"batch_size": 8, "video_batch_size": 1}).model_dump_json())
    encode = stage.vae.encode
    stage.vae.encode = lambda pixels: calls.append(pixels.shape[0]) or encode(pixels)
    stage(_batch(frames=5))
    stage(_batch(frames=1))
    assert calls == [1, 1, 2]  # two clips one at a time, then two images together
