"""``lance synth``: sample datasets in every input format, made on the spot.

Images carry rendered text and a caption that quotes it; videos are moving shapes (H.264 through PyAV);
edit pairs change a colour; QA rows ask what is shown. Formats: WebDataset tars, Parquet in the Lance
release layouts (t2i, t2v, i2i, v2v, i2t, v2t), and JSONL / CSV manifests pointing at media files.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "orange": (240, 140, 30)}
WORDS = ("LANCE", "HELLO", "OPEN", "SALE", "RAY", "FLOW", "TOKYO", "PARIS")
FORMATS = ("webdataset", "parquet", "jsonl", "csv")


def render_image(rng: random.Random, width: int, height: int, colour: str | None = None) -> tuple[bytes, str]:
    colour = colour or rng.choice(list(COLOURS))
    word = rng.choice(WORDS)
    image = Image.new("RGB", (width, height), (245, 243, 235))
    draw = ImageDraw.Draw(image)
    box = (width // 8, height // 3, width * 7 // 8, height * 2 // 3)
    draw.rectangle(box, fill=COLOURS[colour])
    draw.text((box[0] + 4, box[1] + 4), word, fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), f'a {colour} sign that says "{word}"'


def render_video(rng: random.Random, width: int, height: int, frames: int, fps: int = 12,
                 colour: str | None = None) -> tuple[bytes, str]:
    import av

    colour = colour or rng.choice(list(COLOURS))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        size = min(width, height) // 3
        for k in range(frames):
            canvas = np.full((height, width, 3), 240, dtype=np.uint8)
            x = int((width - size) * k / max(frames - 1, 1))
            y = (height - size) // 2
            canvas[y:y + size, x:x + size] = COLOURS[colour]
            for packet in stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue(), f"a {colour} square moving to the right"


def _items(rng: random.Random, count: int, video: bool, size: tuple[int, int]):
    for _ in range(count):
        if video:
            yield render_video(rng, size[0], size[1], frames=rng.choice([13, 17, 25]))
        else:
            yield render_image(rng, size[0], size[1])


def write_webdataset(path: Path, count: int, seed: int, video: bool = False, size=(96, 64)) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for index, (data, caption) in enumerate(_items(rng, count, video, size)):
            key = f"sample{index:06d}"
            for name, payload in ((f"{key}.{'mp4' if video else 'jpg'}", data),
                                  (f"{key}.json", json.dumps({"caption": caption}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def write_release_parquet(path: Path, task: str, count: int, seed: int, size=(96, 64)) -> Path:
    """Parquet in the Lance release layout of ``task``."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        video = task in ("t2v", "v2v", "v2t")
        render = (lambda c=None: render_video(rng, size[0], size[1], 13, colour=c)) if video else (
            lambda c=None: render_image(rng, size[0], size[1], colour=c))
        if task in ("i2i", "v2v"):
            before, _ = render("red")
            after, caption = render("blue")
            key = "video" if video else "image"
            rows.append({"caption": "make it blue", f"input_{key}_bytes": before, f"output_{key}_bytes": after})
        elif task in ("i2t", "v2t"):
            media, caption = render()
            rows.append({f"{'video' if video else 'image'}_bytes": media, "caption_i": "You are a helpful assistant.",
                         "caption_q": "What is shown?", "caption_a": caption})
        else:
            media, caption = render()
            rows.append({"caption": caption, f"{'video' if video else 'image'}_bytes": media})
        del index
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    return path


def write_manifest(folder: Path, fmt: str, count: int, seed: int, video: bool = False, size=(96, 64)) -> Path:
    """Media files under ``folder/media`` and a JSONL or CSV manifest with relative URIs."""
    rng = random.Random(seed)
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (data, caption) in enumerate(_items(rng, count, video, size)):
        name = f"item{index:05d}.{'mp4' if video else 'jpg'}"
        (media / name).write_bytes(data)
        rows.append({"uri": f"media/{name}", "caption": caption})
    path = folder / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["uri", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return path


def synth_all(root: Path, count: int = 8, seed: int = 0) -> dict[str, Path]:
    """One dataset of every format and release layout under ``root``."""
    out = {
        "webdataset_images": write_webdataset(root / "wds" / "images-000.tar", count, seed),
        "webdataset_videos": write_webdataset(root / "wds_video" / "videos-000.tar", max(2, count // 4), seed + 1,
                                              video=True),
        "jsonl": write_manifest(root / "jsonl", "jsonl", count, seed + 2),
        "csv": write_manifest(root / "csv", "csv", count, seed + 3),
    }
    for offset, task in enumerate(("t2i", "t2v", "i2i", "v2v", "i2t", "v2t")):
        n = count if task in ("t2i", "i2t", "i2i") else max(2, count // 4)
        out[f"parquet_{task}"] = write_release_parquet(root / "parquet" / task / "part-0.parquet", task, n,
                                                        seed + 10 + offset)
    return out
