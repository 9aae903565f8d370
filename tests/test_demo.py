import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lance_demo_writes_a_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--steps", "12", "--output", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"report: {tmp_path}" in out.stdout
    for name in ("loss_curve.png", "sample_image.png", "sample_video_frames.png", "metrics.json",
                 "loss_history.jsonl", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tasks"] == sorted(["t2i", "t2v", "i2v", "i2i", "v2v", "i2t", "v2t", "subject"])
    assert metrics["last_loss"]["total"] < metrics["first_loss"]["total"]
    assert metrics["image_latent_shape"] == [1, 4, 4, 48] and metrics["video_latent_shape"] == [2, 4, 4, 48]
    assert len((tmp_path / "loss_history.jsonl").read_text().splitlines()) == 12


def test_demo_rejects_a_bad_config_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: -3\nmodel_preset: tiny\n")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "demo.steps" in out.stderr
