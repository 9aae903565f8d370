import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
T2I_FLOOR, I2T_FLOOR = 0.4, 0.5
"""What the quick learning run reaches every time, well above chance (10 %); bench/learning.py reports the
full run's figures."""
GRPO_SLACK = 0.05


@pytest.mark.slow
def test_lance_demo_shows_the_system_learns_real_digits(tmp_path):
    """The default demo (the quick learning run, pipelines/learning.py): real handwritten digits through
    precompute, 2-worker DeepSpeed training, sampling and GRPO. A regression in losses, positions, packing,
    sampling, CFG, export or GRPO that unit tests miss shows here as accuracies near chance (10 %)."""
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--output", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=2400,
                         env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = tmp_path / "report"
    assert f"report: {report}" in out.stdout
    figures = json.loads((tmp_path / "metrics.json").read_text())
    assert figures["judge_heldout_accuracy"] >= 0.95
    assert figures["t2i_accuracy"] >= T2I_FLOOR, figures  # of the generated digits, what the judge reads
    assert figures["i2t_accuracy"] >= I2T_FLOOR, figures  # held-out images whose caption names their digit
    curve = figures["curve"]
    assert len(curve) >= 2 and curve[-1]["t2i_accuracy"] > curve[0]["t2i_accuracy"]
    grpo = figures["grpo"]
    assert grpo["after"]["mean_reward"] >= grpo["before"]["mean_reward"] - GRPO_SLACK, grpo
    assert grpo["before"]["chroma"] >= 0 and grpo["after"]["chroma"] >= 0
    for name in ("t2i_grid.png", "i2t_grid.png", "grpo_before_after.png", "curve.png", "i2t.jsonl", "figures.json"):
        assert (report / name).stat().st_size > 0, name
    generated = sorted((report / "t2i").glob("*.png"))
    assert len(generated) == figures["t2i_samples"] and {p.name.split("_")[0] for p in generated} == set("0123456789")
    rows = [json.loads(line) for line in (report / "i2t.jsonl").read_text().splitlines()]
    assert len(rows) == figures["i2t_images"] and set(rows[0]) == {"image", "digit", "caption"}
    assert "t2i accuracy:" in out.stdout and "GRPO" in out.stdout


def test_chroma_is_zero_for_grey_and_the_mean_channel_distance_otherwise():
    import numpy as np

    from pipelines.learning import chroma

    grey = np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4, 1), 3, axis=-1)
    assert chroma([grey, grey]) == 0.0
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 90  # channels 90, 0, 0 around their mean 30: distances 60, 30, 30
    assert chroma([red, grey]) == 20.0


@pytest.mark.slow
def test_lance_demo_synthetic_media_runs_every_task_and_writes_a_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--set", "media=synthetic", "--steps", "12",
                          "--output", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"report: {tmp_path}" in out.stdout
    for name in ("loss_curve.png", "sample_image.png", "sample_video_frames.png", "metrics.json",
                 "loss_history.jsonl", "config.json", "latents/manifest.json", "train/metrics.jsonl",
                 "train/model.safetensors", "grpo/metrics.jsonl", "grpo/summary.json", "grpo_gallery.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    from PIL import Image

    assert Image.open(tmp_path / "sample_image.png").width >= 256  # enlarged, the prompt written under it
    assert list((tmp_path / "grpo" / "tb").glob("events.out.tfevents.*"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tasks"] == sorted(["t2i", "t2v", "i2i", "v2v", "i2t", "v2t"])
    assert metrics["workers"] == 2 and metrics["zero_stage"] == 2 and metrics["steps"] == 12
    assert metrics["last_loss"]["loss"] < metrics["first_loss"]["loss"]
    assert metrics["eval"]["image_latent_shape"][-1] == 48 and metrics["eval"]["video_latent_shape"][0] > 1
    assert metrics["throughput"]["pack_fill"] > 0.8 and metrics["throughput"]["tokens_per_s"] > 0
    assert len((tmp_path / "loss_history.jsonl").read_text().splitlines()) == 12
    grpo = metrics["grpo"]
    assert grpo["epochs"] == 2 and 0.0 <= grpo["reward_last"] <= 2.0 and grpo["images_per_s"] > 0
    assert list((tmp_path / "grpo" / "gallery").rglob("*.png"))
    assert "grpo: 2 epochs, reward" in out.stdout


def test_demo_rejects_a_bad_config_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: -3\ntrain:\n  optim:\n    lr: -1\n")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "demo.steps" in out.stderr
    bad.write_text("train:\n  optim:\n    lr: -1\n")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "demo.train.optim.lr" in out.stderr
