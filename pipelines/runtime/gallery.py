"""Sample images a person can look at: small samples enlarged (nearest neighbour, so pixels stay pixels),
each with its prompt written under it, side by side in a grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_WIDTH = 256
"""A sample narrower than this is enlarged by the smallest whole factor that reaches it."""
MIN_HEIGHT = 128
PAD = 8


def enlarge(image: np.ndarray, min_width: int = MIN_WIDTH, min_height: int = MIN_HEIGHT) -> Image.Image:
    """HWC uint8 (or HW) -> a PIL image enlarged by a whole factor to at least ``min_width`` x ``min_height``."""
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    factor = max(1, math.ceil(min_width / picture.width), math.ceil(min_height / picture.height))
    return picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Lines of ``text`` (its own line breaks kept) that fit ``width`` pixels, broken between words, or
    inside a word longer than a line."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and draw.textlength(word, font=font) > width:
                cut = len(word) - 1
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def captioned_grid(images: list[np.ndarray], captions: list[str], columns: int = 4,
                   min_width: int = MIN_WIDTH) -> np.ndarray:
    """The images enlarged, each caption (wrapped) under its image in Pillow's default font at a size
    that reads at the image's width; ``columns`` per row. Returns HWC uint8."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"{len(images)} images and {len(captions)} captions: need as many, at least one")
    pictures = [enlarge(image, min_width) for image in images]
    cell_width = max(p.width for p in pictures)
    font_size = max(14, min(28, cell_width // 18))
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [_wrap(caption, font, cell_width, measure) for caption in captions]
    line_height = font_size + font_size // 3
    columns = max(1, min(columns, len(pictures)))
    rows = [list(range(start, min(start + columns, len(pictures)))) for start in range(0, len(pictures), columns)]
    heights = [max(pictures[i].height + PAD + len(texts[i]) * line_height for i in row) for row in rows]
    canvas = Image.new("RGB", (columns * (cell_width + PAD) + PAD, sum(heights) + PAD * (len(rows) + 1)), "white")
    draw = ImageDraw.Draw(canvas)
    top = PAD
    for row, height in zip(rows, heights):
        for column, index in enumerate(row):
            left = PAD + column * (cell_width + PAD)
            canvas.paste(pictures[index], (left, top))
            y = top + pictures[index].height + PAD // 2
            for line in texts[index]:
                draw.text((left, y), line, fill="black", font=font)
                y += line_height
        top += height + PAD
    return np.asarray(canvas)


def write_captioned(images: list[np.ndarray], captions: list[str], path: Path, columns: int = 4) -> Path:
    Image.fromarray(captioned_grid(images, captions, columns)).save(path)
    return path
