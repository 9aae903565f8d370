"""A corpus of bad and unusual inputs for the precompute pipeline, each with the outcome it must have."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.synth import render_image, render_video


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _gradient(mode: str, size=(96, 64)) -> Image.Image:
    array = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


def _audio_only_mp4() -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _vfr_mp4() -> bytes:
    """Frames at irregular presentation times (variable frame rate)."""
    from fractions import Fraction

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for k in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), (k * 8) % 255, dtype=np.uint8), format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, 1000)
            t += 40 if k % 2 else 90
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _bomb_png() -> bytes:
    image = Image.new("1", (20000, 20000))  # 400 M pixels, a few kB compressed
    return _png(image)


def build_corpus(folder: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Write media + a JSONL manifest; return (manifest, {name: (outcome, reason)})."""
    rng = random.Random(0)
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    good_jpeg, _ = render_image(rng, 96, 64)
    good_video, _ = render_video(rng, 96, 64, frames=25)
    broken_index = bytearray(good_video)
    moov = broken_index.find(b"moov")
    broken_index[moov:moov + 4] = b"xxxx"
    entries = {
        # name: (bytes, caption, expected outcome, expected reason)
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], "a truncated photo", "quarantined", "undecodable_image"),
        "empty.jpg": (b"", "an empty file", "quarantined", "empty_file"),
        "not_an_image.jpg": (b"this is plain text, not a JPEG" * 10, "text bytes", "quarantined", "undecodable_image"),
        "bomb.png": (_bomb_png(), "a decompression bomb", "quarantined", "decompression_bomb"),
        "rgba.png": (_png(_gradient("RGBA")), "an RGBA image", "written", ""),
        "palette.png": (_png(_gradient("P")), "a palette image", "written", ""),
        "cmyk.jpg": (_jpeg(_gradient("CMYK")), "a CMYK image", "written", ""),
        "grey16.png": (_png(Image.fromarray((np.arange(96 * 64).reshape(64, 96) * 10).astype(np.uint16))),
                       "a 16-bit image", "written", ""),
        "grey.jpg": (_jpeg(_gradient("L")), "a grey image", "written", ""),
        "tiny.jpg": (_jpeg(_gradient("RGB", (16, 16))), "a tiny image", "filtered", "too_small"),
        "panorama.jpg": (_jpeg(_gradient("RGB", (400, 40))), "a thin panorama", "filtered", "extreme_aspect"),
        "broken_index.mp4": (bytes(broken_index), "a video with a broken index", "quarantined", "undecodable_video"),
        "audio_only.mp4": (_audio_only_mp4(), "no video here", "quarantined", "no_video_stream"),
        "vfr.mp4": (_vfr_mp4(), "a variable frame rate video", "written", ""),
        "short.mp4": (render_video(rng, 96, 64, frames=2)[0], "a two-frame video", "quarantined", "video_too_short"),
        "no_caption.jpg": (good_jpeg + b"", None, "filtered", "missing_caption"),
    }
    rows = []
    expected = {}
    for name, (data, caption, outcome, reason) in entries.items():
        (media / name).write_bytes(data)
        row = {"uri": f"media/{name}"}
        if caption is not None:
            row["caption"] = caption
        rows.append(row)
        expected[name] = (outcome, reason)
    rows.append({"uri": "media/missing.jpg", "caption": "a file that is not there"})
    expected["missing.jpg"] = ("quarantined", "missing_file")
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, expected
