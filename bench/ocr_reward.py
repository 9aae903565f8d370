"""OCR reward on 512² images: PaddleOCR's detection settings against rapidocr's own.

    python bench/ocr_reward.py [--quick] [--out FILE]

The PP-OCRv4 models of the rapidocr-onnxruntime wheel (one intra-op thread, as in a reward actor) score
signs rendered with PIL: short phrases of one or two lines at several font sizes, on 512 x 512 images.
- baseline ``736, min``: rapidocr's default, the detector upscales every 512² image to 736²;
- ``960, max``: PaddleOCR's default (the OCRConfig default), the detector runs at 512².
Figures: wall and process-CPU seconds per image (medians over repetitions, the two settings alternating
so that the load of a shared machine drifts over both), their ratios new / old, the detector's input size,
and the accuracy of each setting: the mean reward and the share of images read exactly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bench.common import load_average, print_table, wall_and_cpu, write_json
from lance_core.rewards import OCRConfig, OCRReward

PHRASES = ("Open Late", "Harbor View Cafe", "Quiet Please", "Blue Lantern Books", "Fresh Bread Daily",
           "Night Market", "Copper Kettle", "Maple Street Bakery", "Silver Moon Diner", "Garden Path",
           "North Pier", "Lucky Seven Laundry")
SIDE = 512
SETTINGS = (("736, min (rapidocr)", 736, "min"), ("960, max (PaddleOCR)", 960, "max"))


def render_sign(text: str, font_size: int, two_lines: bool) -> np.ndarray:
    """Dark text centred on a light 512² background; ``two_lines`` breaks the phrase after its first word."""
    image = Image.new("RGB", (SIDE, SIDE), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    words = text.split()
    lines = [words[0], " ".join(words[1:])] if two_lines and len(words) > 1 else [text]
    top = (SIDE - len(lines) * font_size * 1.3) / 2
    for k, line in enumerate(lines):
        draw.text(((SIDE - draw.textlength(line, font=font)) / 2, top + k * font_size * 1.3), line,
                  fill=(20, 20, 20), font=font)
    return np.asarray(image)


def sign_set(quick: bool) -> tuple[list[np.ndarray], list[str]]:
    phrases = PHRASES[:4] if quick else PHRASES
    sizes = (40,) if quick else (20, 32, 48)
    layouts = (False,) if quick else (False, True)
    images, prompts = [], []
    for text in phrases:
        for size in sizes:
            for two_lines in layouts:
                images.append(render_sign(text, size, two_lines))
                prompts.append(f'A storefront sign that says "{text}"')
    return images, prompts


def detector_side(reward: OCRReward, image: np.ndarray) -> str:
    """H x W of the array the detection network receives for ``image``."""
    detector = reward.backend.engine.text_det
    shapes, run = [], detector.infer
    detector.infer = lambda batch: (shapes.append(batch.shape), run(batch))[1]
    try:
        reward([image], ['a sign that says "x"'])
    finally:
        detector.infer = run
    return f"{shapes[0][2]}x{shapes[0][3]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 images, 1 repetition (smoke test)")
    parser.add_argument("--out", help="JSON path (default bench/results/ocr_reward.json)")
    args = parser.parse_args()
    reps = 1 if args.quick else 3
    load_start = load_average()
    images, prompts = sign_set(args.quick)
    rewards = [OCRReward(OCRConfig(threads=1, det_limit_side_len=side, det_limit_type=kind))
               for _, side, kind in SETTINGS]
    outputs = [reward(images[:1], prompts[:1]) for reward in rewards]  # warm-up: first inference allocates
    walls, cpus = [[] for _ in SETTINGS], [[] for _ in SETTINGS]
    for _ in range(reps):
        for k, reward in enumerate(rewards):
            def score(reward=reward, k=k) -> None:
                outputs[k] = reward(images, prompts)

            wall, cpu = wall_and_cpu(score, 1)
            walls[k] += wall
            cpus[k] += cpu
    rows = []
    for k, ((name, side, kind), reward) in enumerate(zip(SETTINGS, rewards)):
        scores = outputs[k].scores
        rows.append({
            "setting": name, "det_limit_side_len": side, "det_limit_type": kind,
            "detector_input": detector_side(reward, images[0]), "images": len(images),
            "s_per_image": statistics.median(walls[k]) / len(images),
            "cpu_s_per_image": statistics.median(cpus[k]) / len(images),
            "mean_reward": float(np.mean(scores)), "exact_share": float(np.mean([s == 1.0 for s in scores])),
            "models": reward.models})
    for row in rows:
        row["ratio"] = row["s_per_image"] / rows[0]["s_per_image"]
        row["cpu_ratio"] = row["cpu_s_per_image"] / rows[0]["cpu_s_per_image"]
    load = {"start": load_start, "end": load_average()}
    print(f"models: {rows[1]['models']}")
    print(f"load average {load['start']:.1f} at start, {load['end']:.1f} at end; {os.cpu_count()} cores; "
          f"{len(images)} images of {SIDE}², {reps} repetition(s), ratios over the 736/min baseline")
    columns = [("setting", "setting", "s"), ("detector_input", "det input", "s"), ("images", "images", "d"),
               ("s_per_image", "s/image", ".3f"), ("ratio", "ratio", ".2f"), ("cpu_s_per_image", "cpu s/image", ".3f"),
               ("cpu_ratio", "cpu ratio", ".2f"), ("mean_reward", "mean reward", ".3f"),
               ("exact_share", "read exactly", ".2f")]
    print_table(rows, columns)
    write_json("ocr_reward", {"load_average": load, "cores": os.cpu_count(), "side": SIDE, "reps": reps,
                              "rows": rows, "speedup": 1 / rows[1]["ratio"]}, args.out)


if __name__ == "__main__":
    main()
