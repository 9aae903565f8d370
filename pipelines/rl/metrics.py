"""Epoch metrics of a GRPO run, the JSONL log and TensorBoard events, the console line and the rollout
gallery."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.runtime.gallery import captioned_grid
from pipelines.runtime.local_files import read_jsonl, write_text_atomic
from pipelines.runtime.run_log import TensorBoardLog


def reward_metrics(scores: dict[int, dict], prefix: str = "reward") -> dict[str, float]:
    """Mean/std of the total and of every component, and counts of the reasons each component gave."""
    totals = np.concatenate([np.asarray(s["total"], dtype=np.float64) for s in scores.values()])
    out = {f"{prefix}/mean": float(totals.mean()), f"{prefix}/std": float(totals.std()),
           f"{prefix}/count": int(totals.size)}
    names = next(iter(scores.values()))["components"].keys()
    for name in names:
        values = np.concatenate([np.asarray(s["components"][name], dtype=np.float64) for s in scores.values()])
        out[f"{prefix}/{name}/mean"] = float(values.mean())
        out[f"{prefix}/{name}/std"] = float(values.std())
        reasons = Counter(r for s in scores.values() for r in s["reasons"][name] if r)
        out.update({f"{prefix}/{name}/reason/{code}": count for code, count in sorted(reasons.items())})
    return out


class MetricsLog:
    """``metrics.jsonl`` (one row per epoch) and, with ``tensorboard``, events under ``tb/``: every number
    of a row (rewards per component, KL, clip fraction, ratio, timings) and the gallery images."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tb" if tensorboard else None
        self.tb: TensorBoardLog | None = None

    def history(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return read_jsonl(self.path)

    def truncate(self, epochs: int) -> None:
        """Keep the rows of the first ``epochs`` epochs (a resumed run rewrites later ones)."""
        rows = [r for r in self.history() if r["epoch"] < epochs]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def open_tensorboard(self, first_epoch: int) -> None:
        """Events from ``first_epoch`` on (those a run before wrote from there are dropped)."""
        if self.tb_dir is not None:
            self.close()
            self.tb = TensorBoardLog(self.tb_dir, purge_step=first_epoch, index="epoch")

    def append(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            self.tb.scalars(row, row["epoch"])

    def image(self, tag: str, image: np.ndarray, epoch: int) -> None:
        if self.tb is not None:
            self.tb.image(tag, image, epoch)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def console_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"reward {row['reward/mean']:.4f}±{row['reward/std']:.4f}",
             f"zero-spread {row['zero_spread_ratio']:.2f}", f"ratio {row['ratio_mean']:.4f}±{row['ratio_std']:.1e}",
             f"clip {row['clip_fraction']:.2f}", f"kl {row['kl']:.2e}", f"{row['images_per_s']:.1f} img/s",
             f"rollout {row['rollout_s']:.1f}s reward {row['reward_s']:.1f}s learn {row['learn_s']:.1f}s",
             f"util {row['reward_utilisation']:.2f}"]
    if "eval/reward/mean" in row:
        parts.append(f"eval {row['eval/reward/mean']:.4f}")
    return " | ".join(parts)


GALLERY_GRID = "grid.png"


def write_gallery(folder: Path, images: list[np.ndarray], entries: list[dict]) -> np.ndarray:
    """PNG per rollout, ``gallery.json`` with its prompt and rewards, and ``grid.png``: the rollouts
    enlarged with prompt and reward written under each (returned, for TensorBoard)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, entry) in enumerate(zip(images, entries)):
        name = f"{index:03d}.png"
        Image.fromarray(image).save(folder / name)
        entry["file"] = name
    (folder / "gallery.json").write_text(json.dumps(entries, indent=2))
    grid = captioned_grid(images, [f"{e['prompt']}\nreward {e['reward']:.3f}" for e in entries])
    Image.fromarray(grid).save(folder / GALLERY_GRID)
    return grid
