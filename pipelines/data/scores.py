"""The scoring stage (an actor pool between decode and the encoders): open_clip image-text score and the
text-overlay area found by the PP-OCR detector, on the bucketed target pixels (the middle frame of a clip);
with ``filters.semantic_dedup`` also the normalised CLIP image embedding, stored for the semantic dedup pass.

Scores are stored in the shard for later re-filtering; rows below ``clip_score_min`` or above
``text_area_max`` become filtered rows with stage ``clip`` / ``text`` before any encoder spends time on them.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

from lance_core.encoders import ClipScorer

from .encode import _EncoderActor, _groups, _pixels
from .records import frame_to_arrow


def scored_text(task: str, caption: str, answer: str) -> str | None:
    """The text a target should match: the caption, the answer of a QA row; edit instructions are not scored."""
    if task in ("i2i", "v2v"):
        return None
    text = answer if task in ("i2t", "v2t") else caption
    return text or None


def polygon_area(points) -> float:
    """Shoelace area of a polygon given as [[x, y], ...]."""
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


class TextDetector:
    """PP-OCRv4 text detection from the ONNX model shipped in the rapidocr-onnxruntime wheel (offline)."""

    def __init__(self, threads: int = 1) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)

    def text_area(self, frame: np.ndarray) -> float:
        """Fraction of the (H, W, 3) uint8 frame covered by detected text boxes, in [0, 1]."""
        boxes, _ = self.engine(frame, use_det=True, use_cls=False, use_rec=False)
        if not boxes:
            return 0.0
        height, width = frame.shape[:2]
        return min(1.0, sum(polygon_area(box) for box in boxes) / float(height * width))


class ScoreFilter(_EncoderActor):
    def __init__(self, cfg_json: str) -> None:
        super().__init__(cfg_json)
        f = self.cfg.filters
        self.scores = f.clip_score or f.clip_score_min is not None
        self.clip = (ClipScorer(f.clip_model, f.clip_weights, self.device)
                     if self.scores or f.semantic_dedup else None)
        self.detector = TextDetector(threads=max(1, math.ceil(self.cfg.encoders.cpus_per_actor))) \
            if f.text_area_max is not None else None

    def __call__(self, batch: pd.DataFrame):
        started = time.perf_counter()
        f = self.cfg.filters
        clip_scores = np.full(len(batch), np.nan)
        text_areas = np.full(len(batch), np.nan)
        embeddings = [b""] * len(batch)
        texts = [scored_text(t, c, a) for t, c, a in zip(batch["task"], batch["caption"], batch["answer"])]
        for shape, rows in _groups(batch, "target", self.chunk):
            middle = _pixels(batch, "target", rows, shape)[:, shape[0] // 2]  # (B, H, W, 3) in [0, 1]
            if self.clip is not None and f.semantic_dedup:
                for i, embedding in zip(rows, self.clip.image_embeddings(middle.permute(0, 3, 1, 2)).numpy()):
                    embeddings[i] = embedding.astype(np.float32).tobytes()
            if self.clip is not None and self.scores:
                with_text = [k for k, i in enumerate(rows) if texts[i] is not None]
                if with_text:
                    images = middle[with_text].permute(0, 3, 1, 2)
                    scores = self.clip.score(images, [texts[rows[k]] for k in with_text])
                    clip_scores[[rows[k] for k in with_text]] = scores.numpy()
            if self.detector is not None:
                frames = (middle * 255).round().to(torch.uint8).numpy()
                for i, frame in zip(rows, frames):
                    text_areas[i] = self.detector.text_area(frame)
        batch["clip_score"] = clip_scores
        batch["text_area"] = text_areas
        batch["clip_embedding"] = embeddings
        ok = batch["status"] == "ok"
        if f.clip_score_min is not None:
            low = ok & (batch["clip_score"] < f.clip_score_min)
            batch.loc[low, ["status", "stage", "reason"]] = ["filtered", "clip", "low_clip_score"]
            ok &= ~low
        if f.text_area_max is not None:
            texty = ok & (batch["text_area"] > f.text_area_max)
            batch.loc[texty, ["status", "stage", "reason"]] = ["filtered", "text", "text_overlay"]
        batch["score_seconds"] = (time.perf_counter() - started) / max(len(batch), 1)
        return frame_to_arrow(batch)
