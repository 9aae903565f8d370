"""The handwritten digits (pipelines/data/digits.py), the exact pixel codec in the VAE's slot
(lance_core/encoders/pixel.py) and the classifier reward (lance_core/rewards/classifier.py)."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lance_core.config import ConfigError, model_preset
from lance_core.encoders import PixelCodec, load_vae
from lance_core.rewards import ClassifierConfig, RewardSpec, WeightedReward
from lance_core.rewards.classifier import NO_TARGET, UNKNOWN_CLASS, ClassifierReward
from pipelines.data.digits import PHRASINGS, caption, load_digit_images, names_digit, split_indexes, write_digits

PIXEL = {"preset": "pixel", "spatial_ratio": 4}


def test_digits_dataset_split_captions_and_prompts(tmp_path):
    paths = write_digits(tmp_path / "digits", size=16)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    heldout = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert len(train) + len(heldout) == 1797 and 300 < len(heldout) < 400
    assert {r["digit"] for r in heldout} == set(range(10))
    assert not {r["image"] for r in train} & {r["image"] for r in heldout}
    image = Image.open(tmp_path / "digits" / train[0]["image"])
    assert image.size == (16, 16) and image.mode == "RGB"
    assert all(names_digit(r["caption"], r["digit"]) for r in train)
    assert len({r["caption"] for r in train if r["digit"] == 3}) > 1  # several phrasings
    t2i = pq.read_table(paths["t2i"])
    assert t2i.column_names == ["caption", "image_bytes"] and t2i.num_rows == len(train)
    assert pq.read_table(paths["i2t"]).column_names == ["image_bytes", "caption_i", "caption_q", "caption_a"]
    grpo_train = {json.loads(line)["prompt"] for line in paths["grpo_train_prompts"].read_text().splitlines()}
    grpo_eval = [json.loads(line) for line in paths["grpo_eval_prompts"].read_text().splitlines()]
    assert not grpo_train & {p["prompt"] for p in grpo_eval}  # GRPO is evaluated on prompts it never trains on
    assert sorted(p["target"] for p in grpo_eval) == sorted([str(d) for d in range(10)] * 2)
    judge = json.loads((tmp_path / "digits" / "judge.json").read_text())
    assert judge["heldout_accuracy"] >= 0.95 and paths["judge"].is_file()  # the independent judge
    again = write_digits(tmp_path / "again", size=16)
    assert again["train"].read_text().replace("again", "digits") == paths["train"].read_text()  # fixed split


def test_names_digit_judges_a_caption():
    assert names_digit("a handwritten digit seven", 7) and names_digit("the number 7, written by hand", 7)
    assert not names_digit("a handwritten digit seven or 1", 7) and not names_digit("a handwritten digit", 7)
    assert caption(2, 0) == PHRASINGS[0].format(word="two", digit=2)


def test_pixel_codec_is_exact_for_images_and_keeps_the_vae_interface():
    cfg = model_preset("tiny", latent_channels=48, vae=PIXEL)
    codec = load_vae(cfg.vae)
    assert isinstance(codec, PixelCodec)
    pixels = torch.randint(0, 256, (2, 3, 1, 16, 24), dtype=torch.uint8)
    latents = codec.encode(pixels)
    assert latents.shape == (2, 48, 1, 4, 6) and latents.dtype == torch.float32
    assert torch.equal(codec.decode_frames(latents), pixels.permute(0, 2, 3, 4, 1))  # every pixel back
    # one latent token is one 4x4 block of RGB pixels
    block = (pixels[0, :, 0, 4:8, 8:12].float() / 255 * 2 - 1).permute(1, 2, 0).reshape(-1)
    assert torch.allclose(latents[0, :, 0, 1, 2], block)
    mean, std = codec.encode_posterior(pixels)
    assert torch.equal(mean, latents) and not std.any()
    clip = torch.randint(0, 256, (1, 3, 9, 8, 8), dtype=torch.uint8)
    frames = codec.decode_frames(codec.encode(clip))
    assert frames.shape == (1, 9, 8, 8, 3)
    assert torch.equal(frames[0, 0], clip[0, :, 0].permute(1, 2, 0))
    assert torch.equal(frames[0, 1], clip[0, :, 4].permute(1, 2, 0))  # each kept frame stands for 4
    with pytest.raises(ValueError, match="multiples of 4"):
        codec.encode(torch.zeros(1, 3, 1, 10, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="spatial_ratio"):
        load_vae(model_preset("tiny", vae={"preset": "pixel", "spatial_ratio": 16}).vae)


def test_pixel_codec_works_in_the_models_dtype_and_device():
    codec = PixelCodec(model_preset("tiny", vae=PIXEL).vae).to(torch.bfloat16)
    assert codec.dtype == torch.bfloat16
    latents = codec.encode(torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8))
    assert latents.dtype == torch.bfloat16 and codec.decode(latents).dtype == torch.float32


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from sklearn.linear_model import LogisticRegression

    images, digits = load_digit_images(16)
    train, heldout = split_indexes(digits, 5)
    model = LogisticRegression(max_iter=2000).fit(images[train].reshape(len(train), -1) / 255.0, digits[train])
    path = tmp_path_factory.mktemp("judge") / "digits.joblib"
    joblib.dump(model, path)
    return path, images[heldout], digits[heldout]


def test_classifier_reward_scores_the_prompted_class(judge):
    path, images, digits = judge
    reward = ClassifierReward(ClassifierConfig(path=str(path), image_size=(16, 16), grayscale=True))
    rgb = [np.repeat(image[..., None], 3, axis=-1) for image in images[:40]]
    right = reward(rgb, [""] * 40, [str(d) for d in digits[:40]])
    wrong = reward(rgb, [""] * 40, [str((d + 1) % 10) for d in digits[:40]])
    assert np.mean(right.scores) > 0.8 > 0.1 > np.mean(wrong.scores)
    assert right.details["predicted"][0] == str(digits[0])
    big = [np.asarray(Image.fromarray(image).resize((64, 64))) for image in rgb[:4]]  # resized to the input
    assert np.mean(reward(big, [""] * 4, [str(d) for d in digits[:4]]).scores) > 0.5
    odd = reward(rgb[:2], ["", ""], [None, "eleven"])
    assert odd.scores == [0.0, 0.0] and odd.reasons == [NO_TARGET, UNKNOWN_CLASS]


def test_classifier_reward_from_an_exported_torch_model_through_the_composed_reward(tmp_path):
    class Brightness(torch.nn.Module):
        def forward(self, x):
            level = x.mean(dim=(1, 2, 3)) - 0.5
            return torch.stack([-20 * level, 20 * level], dim=1)

    path = tmp_path / "dark_or_light.pt2"
    torch.export.save(torch.export.export(Brightness(), (torch.zeros(2, 3, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    spec = RewardSpec(name="light", kind="classifier",
                      classifier={"path": str(path), "classes": ["dark", "light"], "image_size": (8, 8)})
    composed = WeightedReward([spec])
    white, black = np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16, 3), np.uint8)
    out = composed([white, black], ["", ""], ["light", "light"])
    assert out.total[0] > 0.99 and out.total[1] < 0.01
    with pytest.raises(ValueError, match="needs classifier"):
        RewardSpec(name="x", kind="classifier")
    with pytest.raises(FileNotFoundError, match="classifier model not found"):
        ClassifierReward(ClassifierConfig(path=str(tmp_path / "missing.joblib")))
