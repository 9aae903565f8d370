"""Epoch metrics of a GRPO run, the JSONL log and TensorBoard events, the console line and the rollout
gallery."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.runtime.gallery import captioned_grid


def reward_metrics(scores: dict[int, dict], prefix: str = "reward") -> dict[str, float]:
    """Mean/std of the total and of every component, counts of the reasons each component gave, and of the
    images each component raised on (scored 0): per component and in all."""
    totals = np.concatenate([np.asarray(s["total"], dtype=np.float64) for s in scores.values()])
    errors = Counter()
    for s in scores.values():
        errors.update(s.get("errors", {}))
    out = {f"{prefix}/mean": float(totals.mean()), f"{prefix}/std": float(totals.std()),
           f"{prefix}/count": int(totals.size), f"{prefix}/errors": sum(errors.values())}
    names = next(iter(scores.values()))["components"].keys()
    for name in names:
        values = np.concatenate([np.asarray(s["components"][name], dtype=np.float64) for s in scores.values()])
        out[f"{prefix}/{name}/mean"] = float(values.mean())
        out[f"{prefix}/{name}/std"] = float(values.std())
        out[f"{prefix}/{name}/errors"] = errors[name]
        reasons = Counter(r for s in scores.values() for r in s["reasons"][name] if r)
        out.update({f"{prefix}/{name}/reason/{code}": count for code, count in sorted(reasons.items())})
    return out


def console_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"reward {row['reward/mean']:.4f}±{row['reward/std']:.4f}",
             f"zero-spread {row['zero_spread_ratio']:.2f}", f"ratio {row['ratio_mean']:.4f}±{row['ratio_std']:.1e}",
             f"clip {row['clip_fraction']:.2f}", f"kl {row['kl']:.2e}", f"{row['images_per_s']:.1f} img/s",
             f"rollout {row['rollout_s']:.1f}s reward {row['reward_s']:.1f}s learn {row['learn_s']:.1f}s",
             f"util {row['reward_utilisation']:.2f}"]
    if row.get("rollout/staleness"):
        parts.append(f"staleness {row['rollout/staleness']}")
    if row.get("reward/errors"):
        parts.append(f"reward errors {row['reward/errors']}")
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
