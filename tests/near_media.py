"""Near-duplicate variants of the real media in ../shared/media: re-encodes, resizes and watermarks (near
duplicates) and other crops of the same picture (not), for the near-dedup tests."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw


def encoded(image: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def watermarked(image: Image.Image) -> Image.Image:
    """A small opaque stamp with text in the lower right corner (about 1.5 % of the picture)."""
    out = image.copy()
    width, height = out.size
    box = (width - width // 6 - 8, height - height // 12 - 8, width - 8, height - 8)
    draw = ImageDraw.Draw(out)
    draw.rectangle(box, fill=(255, 255, 255))
    draw.text((box[0] + 4, box[1] + 4), "(c) stock", fill=(0, 0, 0))
    return out


def image_variants(media: Path) -> dict[str, bytes]:
    """name -> image bytes: the originals, their near duplicates and two other crops of the photo."""
    photo = Image.open(media / "photo.jpg").convert("RGB")
    chart = Image.open(media / "chart.png").convert("RGB")
    width, height = photo.size
    return {
        "photo": (media / "photo.jpg").read_bytes(),
        "chart": (media / "chart.png").read_bytes(),
        "photo_q30": encoded(photo, quality=30),
        "photo_resized": encoded(photo.resize((int(width * 0.9), int(height * 0.9)), Image.Resampling.BICUBIC)),
        "photo_watermark": encoded(watermarked(photo)),
        "chart_watermark": encoded(watermarked(chart), "PNG"),
        "photo_crop_top": encoded(photo.crop((0, 0, width * 6 // 10, height * 6 // 10))),
        "photo_crop_bottom": encoded(photo.crop((width * 4 // 10, height * 4 // 10, width, height))),
    }


NEAR = {"photo_q30": "photo", "photo_resized": "photo", "photo_watermark": "photo", "chart_watermark": "chart"}
"""Variant -> the original it is a near duplicate of."""
KEPT = ("photo", "chart", "photo_crop_top", "photo_crop_bottom")
"""Different pictures (the crops: other views of the same scene)."""


def write_variant_parquet(path: Path, media: Path, order: list[str]) -> Path:
    """A t2i Parquet in the release layout with one row per name of ``order`` (a name twice: the same bytes)."""
    variants = image_variants(media)
    rows = [{"caption": f"a picture, {name.replace('_', ' ')}", "image_bytes": variants[name]} for name in order]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path
