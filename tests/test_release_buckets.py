"""Aspect buckets against the released Lance code's measured behaviour.

``../shared/fixtures/lance_release/buckets.json`` holds, for 68 source sizes in each of the release's four
settings (VAE images 768², VAE video 640², ViT edit sources 672², ViT understanding and video 616²), the
bucket ``BucketResize`` picks and the size ``DivisibleCrop`` leaves. Ours must equal both in every case.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.data.buckets import bucket_for, fit_bucket, resize_center_crop, resize_frame
from pipelines.data.config import PrecomputeConfig
from pipelines.data.media import Media, slot_clips

SETTINGS = ("vae_image", "vae_video", "vit_edit_image", "vit_understanding_and_video")


@pytest.fixture(scope="module")
def release_buckets(shared_dir) -> dict[str, dict]:
    data = json.loads((shared_dir / "fixtures" / "lance_release" / "buckets.json").read_text())
    return {name.split(" ")[0]: setting for name, setting in data["settings"].items()}


def _mismatches(setting: dict, size_of, keys: tuple[str, ...]) -> list[str]:
    """The cases where ``size_of(width, height)`` differs from the fixture's ``keys`` joined."""
    wrong = []
    for case in setting["cases"]:
        got = size_of(*case["source_wh"])
        want = [side for key in keys for side in case[key]]
        if list(got) != want:
            wrong.append(f"{case['source_wh']}: {list(got)} != {want}")
    return wrong


@pytest.mark.parametrize("name", SETTINGS)
def test_encoder_input_sizes_equal_the_release(release_buckets, name):
    """``bucket_for`` gives the size the encoder receives: the release's bucket after its divisible crop."""
    setting = release_buckets[name]
    area, crop = setting["resolution"] ** 2, setting["divisible_crop"]
    wrong = _mismatches(setting, lambda w, h: bucket_for(w, h, area, multiple=crop)[1:], ("cropped_wh",))
    assert not wrong, f"{len(wrong)} of {len(setting['cases'])} differ: " + "; ".join(wrong)


@pytest.mark.parametrize("name", SETTINGS)
def test_buckets_and_crops_equal_the_release(release_buckets, name):
    setting = release_buckets[name]
    area, crop, stride = setting["resolution"] ** 2, setting["divisible_crop"], setting["stride"]

    def size_of(width: int, height: int) -> tuple[int, ...]:
        bucket = fit_bucket(width, height, area, crop=crop, stride=stride)
        return bucket.width, bucket.height, bucket.crop_width, bucket.crop_height

    wrong = _mismatches(setting, size_of, ("bucket_wh", "cropped_wh"))
    assert not wrong, f"{len(wrong)} of {len(setting['cases'])} differ: " + "; ".join(wrong)


def test_config_areas_are_the_release_settings(release_buckets):
    buckets = PrecomputeConfig().buckets
    assert buckets.image_area == release_buckets["vae_image"]["resolution"] ** 2
    assert buckets.video_area == release_buckets["vae_video"]["resolution"] ** 2
    assert buckets.vit_area_for(edit_source=True) == release_buckets["vit_edit_image"]["resolution"] ** 2
    assert buckets.vit_area_for(edit_source=False) == \
        release_buckets["vit_understanding_and_video"]["resolution"] ** 2


def test_understanding_images_reach_the_vit_at_616_and_edit_sources_at_672():
    """A square image: 588² (21 x 21 = 441 merged tokens) for i2t, 672² for the source of an i2i edit."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    media = Media(b"", 300, 300, None, pixels)
    cfg = PrecomputeConfig()
    understanding = next(slot_clips(media, "target", True, cfg)).values
    edit_source = next(slot_clips(media, "source", True, cfg)).values
    assert understanding["target_vit_shape"] == [1, 588, 588, 3]
    assert edit_source["source_vit_shape"] == [1, 672, 672, 3]
    assert understanding["target_shape"] == edit_source["source_shape"] == [1, 768, 768, 3]


def test_vit_view_is_the_centre_of_the_resized_bucket():
    """854x480 at 616²: resized to the 832x464 bucket, of which the centre 812x448 is kept."""
    frame = np.random.default_rng(1).integers(0, 256, (480, 854, 3), dtype=np.uint8)
    bucket = fit_bucket(854, 480, 616 * 616, crop=28)
    assert (bucket.width, bucket.height, bucket.crop_width, bucket.crop_height) == (832, 464, 812, 448)
    whole = resize_center_crop(frame[None], bucket.width, bucket.height)[0]
    view = resize_center_crop(frame[None], *bucket.view)[0]
    assert view.shape == (3, 448, 812)
    assert np.array_equal(view.numpy(), whole[:, 8:456, 10:822].numpy())
    assert resize_frame(frame, *bucket.view).shape == (448, 812, 3)
