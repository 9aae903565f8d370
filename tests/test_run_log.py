"""How runs log (no Ray): the captioned sample grid of reports and TensorBoard, the training progress line,
TensorBoard scalars and images, a worker's output going to its rank log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipelines.runtime.gallery import MIN_WIDTH, captioned_grid, enlarge
from pipelines.runtime.run_log import TensorBoardLog
from pipelines.train.progress import StepProgress, progress_line

ROOT = Path(__file__).resolve().parents[1]


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_small_samples_are_enlarged_pixel_for_pixel():
    sample = _noise(48, 80, 0)
    big = np.asarray(enlarge(sample))
    assert big.shape == (192, 320, 3)  # factor 4: the smallest that reaches 256 px wide
    assert np.array_equal(big, sample.repeat(4, axis=0).repeat(4, axis=1))
    assert np.asarray(enlarge(_noise(64, 512, 1))).shape == (128, 1024, 3)  # a frame strip: 128 px high


def test_captioned_grid_writes_each_prompt_under_its_sample():
    images = [_noise(48, 80, seed) for seed in range(3)]
    prompts = ['a red sign that says "TOKYO"', "a blue square moving to the right", 'a poster that says "SALE"']
    grid = captioned_grid(images, prompts, columns=2)
    cell = 320  # 80 px enlarged x4
    assert cell >= MIN_WIDTH and grid.shape[1] >= 2 * cell
    first = grid[8:8 + 192, 8:8 + cell]
    assert np.array_equal(first, images[0].repeat(4, axis=0).repeat(4, axis=1))
    caption = grid[8 + 192:8 + 192 + 40, 8:8 + cell]
    dark = (caption.max(axis=2) < 100).sum(axis=0)
    assert (caption == 255).mean() > 0.5, "the caption sits on a white band"
    assert (dark > 0).sum() > cell // 3, "text spans a good part of the width"
    rows = np.nonzero((caption.max(axis=2) < 100).any(axis=1))[0]
    assert rows.max() - rows.min() >= 10, "letters are at least 10 px high"
    other = captioned_grid(images[:1], ["another prompt"])
    assert not np.array_equal(other[200:240, 8:8 + cell], caption), "the text drawn is the prompt"
    long = captioned_grid(images[:1], ["word " * 60])
    assert long.shape[0] > other.shape[0] and long.shape[1] == other.shape[1], "long prompts wrap"
    with pytest.raises(ValueError, match="as many"):
        captioned_grid(images, prompts[:1])


def _row(step: int, loss: float | None = 2.0, **extra) -> dict:
    return {"step": step, "loss": loss, "tokens": 1000, "step_time_s": 0.5, "data_wait_s": 0.05, "mfu": 0.1,
            "lr": 1e-3, "skipped_steps": 0, **extra}


def test_progress_line_per_logging_step_over_the_steps_since_the_last():
    progress = StepProgress(start=0, total=6, every=4)
    assert progress.add(_row(1, 4.0)) is None
    assert progress.add(_row(2, None, skipped_steps=1)) is None
    assert progress.add(_row(3, 2.0, skipped_steps=1)) is None
    summary = progress.add(_row(4, 3.0, skipped_steps=1, heldout_total=1.25))
    assert summary["step"] == 4 and summary["loss"] == pytest.approx(3.0)  # non-finite step left out
    assert summary["tokens_per_s"] == pytest.approx(2000) and summary["data_wait_share"] == pytest.approx(0.1)
    line = progress_line(summary)
    assert line.startswith("step 4/6 (67%) | loss 3.0000 | 2000 tok/s | MFU 10.0% | data wait 10.0% | lr 1.0e-03")
    assert "held-out 1.2500" in line and "skipped steps 1" in line and " | ETA 0:00:0" in line
    assert progress.add(_row(5)) is None
    assert progress.add(_row(6))["step"] == 6  # the last step always gets its line


def test_tensorboard_log_writes_nested_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TensorBoardLog(tmp_path / "tb", purge_step=0, index="epoch")
    for epoch in range(2):
        log.scalars({"epoch": epoch, "kl": 0.1 * epoch, "reward/mean": 0.5, "learn": {"clip_fraction": 0.25},
                     "note": "text is skipped", "shape": [1, 2]}, epoch)
    log.image("gallery", captioned_grid([_noise(16, 16, 0)], ["x"]), 1)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"kl", "reward/mean", "learn/clip_fraction"}
    assert [e.step for e in events.Scalars("kl")] == [0, 1]
    assert events.Tags()["images"] == ["gallery"]


def test_worker_output_goes_to_its_rank_log_file(tmp_path):
    """Python prints, logging in the one format and a child process's raw output all land in the file;
    the process's own stdout and stderr get nothing, and are back after the block."""
    script = textwrap.dedent(f"""
        import logging, os, sys
        from pathlib import Path
        from pipelines.runtime.run_log import worker_logging
        with worker_logging(Path({str(tmp_path / "logs" / "rank-1.log")!r})):
            print("python print")
            logging.getLogger("lance.train").info("a lance line")
            os.system("echo raw child output 1>&2")
        print("after the block")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout == "after the block\n" and out.stderr == ""
    text = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "python print\n" in text and "raw child output" in text
    assert " INFO lance.train: a lance line" in text
