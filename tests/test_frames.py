"""Frame selection against the Lance release (``../shared/fixtures/lance_release/frames.json``): the frames
``MultiClipsFrameSampler`` takes from 1-8 s clips at 24 and 30 fps under the generation, understanding and
inference settings, with their latent and ViT frame counts; the visual token counts of a 6 s 854x480 v2v pair
and t2v clip; the config defaults; and the SFT resolution limit that must keep 6 s clips."""

import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml

from lance_core.config import model_preset
from pipelines.data.buckets import ASPECTS, bucket_for
from pipelines.data.config import BucketConfig, PrecomputeConfig, VideoConfig
from pipelines.data.decode import decode_video, plan_clips, sample_clip_indices

ROOT = Path(__file__).resolve().parents[1]
BITS = 8  # a frame shows its own index as 8 black/white columns


@pytest.fixture(scope="module")
def frames_table(shared_dir):
    path = shared_dir / "fixtures" / "lance_release" / "frames.json"
    if not path.is_file():
        pytest.skip(f"release fixture {path.name} is not in ../shared/fixtures/lance_release")
    return json.loads(path.read_text())


def _rows(table):
    return [(t["params"], row) for t in table["tables"] for row in t["rows"]]


def _effective_fps(indices, fps):
    return (len(indices) - 1) * fps / (indices[-1] - indices[0])


def test_every_row_of_the_release_table(frames_table):
    rows = _rows(frames_table)
    assert len(rows) == 48  # 3 settings x 2 source rates x 8 durations
    for params, row in rows:
        assert params["temporal"] == 4 and not params["truncate"] and not params["assert_seconds"]
        indices = sample_clip_indices(row["source_frames"], row["source_fps"], params["sample_fps"],
                                      params["max_duration"], params["temporal"])
        where = (params["max_duration"], row["source_fps"], row["seconds"])
        assert len(indices) == row["frames_taken"], where
        assert (indices[0], indices[-1]) == (row["first_index"], row["last_index"]), where
        assert indices == sorted(indices) and len(set(indices)) == len(indices), where
        latent = (len(indices) - 1) // 4 + 1
        assert latent == row["latent_frames"] == row["sampler_clip_n_latent_frames"], where
        vit_frames = len(indices) + len(indices) % 2  # an odd clip repeats its last frame for the ViT
        assert (vit_frames, vit_frames // 2) == (row["vit_frames"], row["vit_grid_t"]), where
        assert round(_effective_fps(indices, row["source_fps"]), 4) == row["effective_fps"], where


def test_config_defaults_are_the_generation_setting(frames_table):
    generation = frames_table["tables"][0]["params"]
    video = PrecomputeConfig().video
    assert (video.fps, video.max_seconds) == (generation["sample_fps"], generation["max_duration"])
    assert video.max_clip_seconds >= 8  # 7-8 s videos stay one clip, spread as the release spreads them
    buckets = PrecomputeConfig().buckets
    assert buckets.vit_area_for(edit_source=True) == 672 * 672
    assert buckets.vit_area_for(edit_source=False) == 616 * 616
    assert BucketConfig(vit_area=56 * 56).vit_area_for(edit_source=True) == 56 * 56
    with pytest.raises(ValueError, match="max_clip_seconds"):
        VideoConfig(max_seconds=10.0)


def test_long_videos_are_cut_and_short_ones_are_one_clip():
    # up to max_clip_seconds: one clip over the whole video (the release's behaviour)
    assert plan_clips(192, 24) == [sample_clip_indices(192, 24)]
    # 13 s: a 6 s clip, then the remaining 7 s as the last clip (69 frames over it)
    clips = plan_clips(13 * 24, 24)
    assert [len(c) for c in clips] == [69, 69] and clips[0][-1] == 143 and clips[1][0] == 144
    assert clips[1][-1] == 13 * 24 - 1
    # 120 s: 20 clips of 6 s; the cap bounds the count
    clips = plan_clips(120 * 24, 24)
    assert len(clips) == 20 and all(len(c) == 69 for c in clips)
    assert [c[0] for c in clips] == [k * 144 for k in range(20)]
    assert len(plan_clips(120 * 24, 24, max_clips=3)) == 3
    # overlapping clips (stride shorter than a clip) are allowed
    clips = plan_clips(20 * 24, 24, stride_seconds=3.0)
    assert [c[0] for c in clips][:3] == [0, 72, 144]


# ------------------------------------------------------------------------------------- through the decoder
def _index_video(frames: int, fps: int, width: int = 64, height: int = 16) -> bytes:
    """A video whose frame k shows k in binary (8 columns, white = 1), so decoded frames name their index."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        column = width // BITS
        for k in range(frames):
            canvas = np.zeros((height, width, 3), dtype=np.uint8)
            for bit in range(BITS):
                if (k >> bit) & 1:
                    canvas[:, bit * column:(bit + 1) * column] = 255
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _shown_indices(frames: np.ndarray) -> list[int]:
    column = frames.shape[2] // BITS
    bits = [frames[:, :, b * column:(b + 1) * column].mean(axis=(1, 2, 3)) > 127 for b in range(BITS)]
    return [sum(int(bits[b][i]) << b for b in range(BITS)) for i in range(len(frames))]


@pytest.mark.parametrize("source_fps", [24, 30])
def test_decoded_frames_are_the_release_frames(frames_table, source_fps):
    """Every generation row, through the decoder with the config defaults: the frames it hands on are the
    source frames the release takes."""
    video = PrecomputeConfig().video
    generation = frames_table["tables"][0]
    for row in generation["rows"]:
        if row["source_fps"] != source_fps:
            continue
        data = _index_video(row["source_frames"], source_fps)
        clips = list(decode_video(data, video.fps, video.max_seconds, video.stride_seconds, video.min_frames,
                                  video.max_clips_per_video, video.max_clip_seconds))
        assert len(clips) == 1, row["seconds"]
        clip = clips[0]
        assert len(clip.frames) == row["frames_taken"]
        assert list(clip.indices) == sample_clip_indices(row["source_frames"], source_fps)
        assert _shown_indices(clip.frames) == list(clip.indices)
        assert round(clip.fps, 4) == row["effective_fps"]


# ------------------------------------------------------------------------------------------ token counts
def _visual_spans(case):
    return {span["span"]: span for span in case["visual_spans"]}


def test_visual_token_counts_of_a_6s_854x480_clip(frames_table):
    """Our buckets and ViT area give the release's tensors and token counts for a 6 s 854x480 24 fps clip."""
    buckets = PrecomputeConfig().buckets
    frames = len(sample_clip_indices(144, 24))
    vae = model_preset("lance-3b").vae
    vit = model_preset("lance-3b").vit
    _, vae_w, vae_h = bucket_for(854, 480, buckets.video_area)
    _, vit_w, vit_h = bucket_for(854, 480, buckets.vit_area_for(edit_source=False), multiple=28)
    latent_grid = [(frames - 1) // vae.temporal_ratio + 1, vae_h // vae.spatial_ratio,
                   vae_w // vae.spatial_ratio]
    merge = vit.patch_size * vit.spatial_merge_size
    vit_frames = frames + frames % vit.temporal_patch_size
    vit_grid = [vit_frames // vit.temporal_patch_size, vit_h // merge, vit_w // merge]
    for case in frames_table["token_counts"]:
        spans = _visual_spans(case)
        for name in ("vae target", "vae source"):
            if name in spans:
                assert spans[name]["tensor_CTHW"] == [3, frames, vae_h, vae_w]
                assert spans[name]["grid_thw"] == latent_grid
                assert spans[name]["tokens"] == int(np.prod(latent_grid)) == 28620
        if "vit" in spans:
            assert spans["vit"]["tensor_CTHW"] == [3, vit_frames, vit_h, vit_w]
            assert spans["vit"]["grid_thw"] == vit_grid
            assert spans["vit"]["tokens"] == int(np.prod(vit_grid)) == 16240


@pytest.mark.slow
def test_a_6s_v2v_record_is_bucketed_as_the_release(frames_table):
    """A 6 s 854x480 24 fps v2v record through read + decode + bucket with the config defaults."""
    from pipelines.data.records import process_record

    data = _index_video(144, 24, width=854, height=480)
    rows = process_record({"source_uri": "mem://v2v", "task": "v2v", "caption": "make it night",
                           "target_bytes": data, "source_bytes": data}, 0, 0, PrecomputeConfig())
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    spans = _visual_spans(next(c for c in frames_table["token_counts"] if c["task"] == "v2v"))
    _, t, h, w = spans["vae target"]["tensor_CTHW"]
    assert rows[0]["target_shape"] == [t, h, w, 3] and rows[0]["source_shape"] == [t, h, w, 3]
    _, vit_t, vit_h, vit_w = spans["vit"]["tensor_CTHW"]
    assert rows[0]["source_vit_shape"] == [vit_t - 1, vit_h, vit_w, 3]  # the ViT repeats the last frame
    assert rows[0]["target_frames"] == 69
    assert (rows[0]["target_width"], rows[0]["target_height"]) == (854, 480)


def test_sft_resolution_limit_keeps_6s_clips():
    """train_sft.yaml's max_video_tokens keeps a 6 s clip (18 latent frames) in every aspect bucket."""
    from pipelines.train.config import ResolutionFilter
    from pipelines.train.plan import passes_resolution

    for name in ("train_sft.yaml", "train_continual.yaml", "train_video_long.yaml"):
        data = yaml.safe_load((ROOT / "jobs" / "configs" / name).read_text())["data"]
        limits = ResolutionFilter.model_validate(data["resolution"])
        area = PrecomputeConfig().buckets.video_area
        for aspect in ASPECTS.values():
            _, w, h = bucket_for(round(1000 * aspect ** 0.5), round(1000 / aspect ** 0.5), area)
            frames = len(sample_clip_indices(6 * 24, 24))
            shape = [(frames - 1) // 4 + 1, h // 16, w // 16, 48]
            assert passes_resolution("t2v", shape, 11.4, limits), (name, aspect, shape)
