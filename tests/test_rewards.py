"""Rewards: OCR through the real PP-OCRv4 models of the rapidocr-onnxruntime wheel, CLIP on a tiny random
open_clip model, composition, callables."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from lance_core.config import ConfigError, load_config
from lance_core.rewards import (
    NO_TARGET,
    NOTHING_READ,
    OCRConfig,
    OCRReward,
    RewardSpec,
    WeightedReward,
    extract_target,
    levenshtein,
    ocr_score,
)
from lance_core.rewards.clip import CLIPConfig, CLIPReward
from lance_core.rewards.ocr import normalise_text

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def render_text(text: str, size: tuple[int, int] = (480, 120)) -> np.ndarray:
    image = Image.new("RGB", size, (255, 255, 255))
    if text:
        ImageDraw.Draw(image).text((20, 30), text, fill=(0, 0, 0), font=ImageFont.load_default(size=44))
    return np.asarray(image)


@pytest.fixture(scope="module")
def ocr_reward():
    return OCRReward(OCRConfig(threads=1))


def test_target_extraction_and_distance():
    assert extract_target('A sign that reads "Gas Next Exit" at dusk') == "Gas Next Exit"
    assert extract_target('first "one" then "two"') == "one"
    assert extract_target("no quotes here") is None
    assert extract_target('empty "" quotes') is None
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


def test_ocr_score_rules():
    assert ocr_score(["Hello", "World"], "hello world") == 1.0
    assert ocr_score(["big sign: HELLO WORLD!"], "Hello World") == 1.0  # contained
    assert ocr_score(["Helo World"], "Hello World") == pytest.approx(0.9)
    assert ocr_score(["zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"], "abc") == 0.0  # distance capped at len(target)
    assert ocr_score([], "abc") == 0.0


def test_ocr_reward_on_rendered_text(ocr_reward):
    prompt = 'A poster with the words "Hello World" on it'
    images = [render_text("Hello World"), render_text("Helo World"), render_text("")]
    out = ocr_reward(images, [prompt] * 3)
    exact, typo, blank = out.scores
    assert exact >= 0.95
    assert 0.5 < typo < 0.99
    assert blank == 0.0
    assert out.reasons == [None, None, NOTHING_READ]
    assert "hello" in out.details["ocr_text"][0].lower()


def test_ocr_reward_unreadable_and_missing_target(ocr_reward):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    out = ocr_reward([noise, render_text("Hello")], ['a "Hello" sign', "a sign without a quoted target"])
    assert out.scores[1] == 0.0 and out.reasons[1] == NO_TARGET
    assert 0.0 <= out.scores[0] < 0.5


SIGN_TEXTS = ("Open Late Tonight", "Harbor View Cafe", "Quiet Please", "Blue Lantern Books")


def render_sign(text: str, side: int = 512, font_size: int = 40) -> np.ndarray:
    image = Image.new("RGB", (side, side), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    draw.text(((side - draw.textlength(text, font=font)) / 2, side / 2 - font_size), text, fill=(20, 20, 20),
              font=font)
    return np.asarray(image)


def detector_inputs(reward: OCRReward, monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the arrays the detection network receives (after its resize)."""
    detector = reward.backend.engine.text_det
    shapes, run = [], detector.infer
    monkeypatch.setattr(detector, "infer", lambda batch: (shapes.append(batch.shape), run(batch))[1])
    return shapes


def test_ocr_defaults_detect_at_the_image_size_with_the_same_accuracy(ocr_reward, monkeypatch):
    """PaddleOCR's detection settings (960, max) against rapidocr's (736, min) on 512² signs."""
    assert (ocr_reward.cfg.det_limit_side_len, ocr_reward.cfg.det_limit_type) == (960, "max")
    assert ocr_reward.models == {"backend": "rapidocr", "det": "ch_PP-OCRv4_det_infer.onnx",
                                 "rec": "ch_PP-OCRv4_rec_infer.onnx", "cls": None,
                                 "det_limit_side_len": 960, "det_limit_type": "max"}
    upscaling = OCRReward(OCRConfig(threads=1, det_limit_side_len=736, det_limit_type="min"))
    images = [render_sign(text) for text in SIGN_TEXTS]
    prompts = [f'A storefront sign that says "{text}"' for text in SIGN_TEXTS]
    new_shapes, old_shapes = detector_inputs(ocr_reward, monkeypatch), detector_inputs(upscaling, monkeypatch)
    new, old = ocr_reward(images, prompts), upscaling(images, prompts)
    assert new_shapes == [(1, 3, 512, 512)] * len(images)
    assert old_shapes == [(1, 3, 736, 736)] * len(images)
    assert new.scores == old.scores == [1.0] * len(images)
    assert [normalise_text(t) for t in new.details["ocr_text"]] == [normalise_text(t) for t in SIGN_TEXTS]


def test_ocr_max_limit_shrinks_only_larger_images(monkeypatch):
    """With ``max`` the configured side is kept (rapidocr alone would pick 1500 for a 1200-pixel side)."""
    reward = OCRReward(OCRConfig(threads=1))
    shapes = detector_inputs(reward, monkeypatch)
    wide = np.asarray(Image.fromarray(render_sign("Harbor View Cafe", side=600, font_size=48)).resize((1200, 600)))
    out = reward([wide], ['a sign that says "Harbor View Cafe"'])
    assert shapes == [(1, 3, 480, 960)] and out.scores == [1.0]


def test_clip_reward_tiny_model():
    reward = CLIPReward(CLIPConfig(architecture=TINY_CLIP))
    images = [render_text("x", (64, 64)), np.zeros((48, 80, 3), dtype=np.uint8)]
    out = reward(images, ["a white card", "a black card"])
    assert len(out.scores) == 2
    assert all(-1.0 <= s <= 1.0 for s in out.scores)
    again = CLIPReward(CLIPConfig(architecture=TINY_CLIP))(images, ["a white card", "a black card"])
    assert again.scores == pytest.approx(out.scores)


def brightness_times_two(images, prompts):
    return [2 * float(np.mean(image)) / 255 for image in images]


def test_weighted_sum_and_callable():
    specs = [RewardSpec(name="bright", kind="brightness", weight=0.5),
             RewardSpec(name="twice", kind="callable", callable="tests.test_rewards:brightness_times_two", weight=1.0),
             RewardSpec(name="red", kind="colour", colour=(255, 0, 0), weight=2.0)]
    reward = WeightedReward(specs)
    white = np.full((16, 16, 3), 255, dtype=np.uint8)
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = reward([white, red], ["a", "b"])
    assert out.components["bright"] == pytest.approx([1.0, 1 / 3])
    assert out.components["twice"] == pytest.approx([2.0, 2 / 3])
    assert out.components["red"][1] == pytest.approx(1.0)
    expected = [0.5 * b + t + 2 * r for b, t, r in zip(out.components["bright"], out.components["twice"],
                                                          out.components["red"])]
    assert out.total == pytest.approx(expected)


def test_reward_spec_errors_name_the_field():
    with pytest.raises(ConfigError, match="kind"):
        load_config(RewardSpec, {"name": "x", "kind": "aesthetic"}, prefix="rewards.0")
    with pytest.raises(ConfigError, match="callable"):
        load_config(RewardSpec, {"name": "x", "kind": "callable"})
    with pytest.raises(ValueError, match="unique"):
        WeightedReward([RewardSpec(name="a", kind="brightness"), RewardSpec(name="a", kind="brightness")])


def test_paddleocr_backend_same_api(monkeypatch, tmp_path):
    """The paddleocr backend (when installed) reads local model folders and returns lines like rapidocr."""
    import sys
    import types

    seen = {}

    class FakePaddleOCR:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def ocr(self, image, cls=False):
            box = [[0, 0], [1, 0], [1, 1], [0, 1]]
            return [[[box, ("Hello World", 0.98)], [box, ("smudge", 0.2)]]]

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=FakePaddleOCR))
    with pytest.raises(ValueError, match="det_model and rec_model"):
        OCRReward(OCRConfig(backend="paddleocr"))
    cfg = OCRConfig(backend="paddleocr", det_model=str(tmp_path / "det"), rec_model=str(tmp_path / "rec"))
    out = OCRReward(cfg)([render_text("x", (32, 32))], ['a "Hello World" sign'])
    assert out.scores == [1.0] and out.details["ocr_text"] == ["Hello World"]
    assert seen["det_model_dir"].endswith("det") and seen["rec_model_dir"].endswith("rec")
