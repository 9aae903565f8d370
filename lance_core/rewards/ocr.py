"""OCR reward for text rendering (GRPO.md): the target is the text inside the first pair of double quotes
of the prompt; recognised lines are joined, spaces removed, lower-cased; d = 0 when the target occurs in
the recognised text, else the Levenshtein distance capped at len(target); reward = 1 - d / len(target);
nothing recognised gives 0.

Backends recognise text lines in an RGB uint8 image:
- ``rapidocr``: the PP-OCRv4 detection + recognition ONNX models shipped inside the
  ``rapidocr-onnxruntime`` wheel (offline), or model files given by path;
- ``paddleocr``: PaddleOCR with local model folders (nothing downloaded).
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np

from .base import RewardOutput
from .config import OCRConfig

QUOTED = re.compile(r'"([^"]+)"')
NO_TARGET = "no_target"
NOTHING_READ = "nothing_recognised"


def extract_target(prompt: str) -> str | None:
    """Text inside the first pair of double quotes, or None when the prompt quotes nothing."""
    match = QUOTED.search(prompt)
    if match is None or not match.group(1).strip():
        return None
    return match.group(1)


def normalise_text(text: str) -> str:
    return "".join(text.split()).lower()


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_score(lines: list[str], target: str) -> float:
    """1 - d / len(target) for the normalised target against the joined recognised lines."""
    goal = normalise_text(target)
    read = normalise_text("".join(lines))
    if not goal:
        raise ValueError("the OCR target is empty after removing spaces")
    if not read:
        return 0.0
    distance = 0 if goal in read else min(levenshtein(read, goal), len(goal))
    return 1.0 - distance / len(goal)


class OCRBackend(Protocol):
    def recognise(self, image: np.ndarray) -> list[str]:
        """Text lines read in an (H, W, 3) RGB uint8 image, in reading order."""


class RapidOCRBackend:
    def __init__(self, cfg: OCRConfig) -> None:
        from rapidocr_onnxruntime import RapidOCR

        kwargs = {"det_limit_side_len": cfg.det_limit_side_len, "text_score": cfg.min_score,
                  "use_cls": cfg.use_angle_cls}
        if cfg.use_cuda:
            kwargs.update(det_use_cuda=True, rec_use_cuda=True, cls_use_cuda=True)
        if cfg.threads:
            import cv2

            kwargs.update(intra_op_num_threads=cfg.threads, inter_op_num_threads=1)
            cv2.setNumThreads(cfg.threads)  # pre- and post-processing threads of the same process
        for key, path in (("det_model_path", cfg.det_model), ("rec_model_path", cfg.rec_model),
                          ("cls_model_path", cfg.cls_model)):
            if path is not None:
                kwargs[key] = path
        self.engine = RapidOCR(**kwargs)

    def recognise(self, image: np.ndarray) -> list[str]:
        result, _ = self.engine(np.ascontiguousarray(image[:, :, ::-1]))  # the engine reads BGR
        return [line[1] for line in result or []]


class PaddleOCRBackend:
    """PaddleOCR (2.x API) with local model folders: the same API as :class:`RapidOCRBackend`."""

    def __init__(self, cfg: OCRConfig) -> None:
        try:
            from paddleocr import PaddleOCR
        except ImportError as err:
            raise ImportError("reward ocr.backend 'paddleocr' needs the paddleocr package installed") from err
        if cfg.det_model is None or cfg.rec_model is None:
            raise ValueError("reward ocr.backend 'paddleocr' needs det_model and rec_model folders (offline)")
        kwargs = {"det_model_dir": cfg.det_model, "rec_model_dir": cfg.rec_model, "use_angle_cls": cfg.use_angle_cls,
                  "det_limit_side_len": cfg.det_limit_side_len, "show_log": False}
        if cfg.cls_model is not None:
            kwargs["cls_model_dir"] = cfg.cls_model
        if cfg.threads:
            kwargs["cpu_threads"] = cfg.threads
        kwargs["use_gpu"] = cfg.use_cuda
        self.engine = PaddleOCR(**kwargs)
        self.min_score = cfg.min_score

    def recognise(self, image: np.ndarray) -> list[str]:
        pages = self.engine.ocr(np.ascontiguousarray(image[:, :, ::-1]), cls=False)
        lines = []
        for page in pages or []:
            for _, (text, score) in page or []:
                if score >= self.min_score:
                    lines.append(text)
        return lines


def make_ocr_backend(cfg: OCRConfig) -> OCRBackend:
    return RapidOCRBackend(cfg) if cfg.backend == "rapidocr" else PaddleOCRBackend(cfg)


class OCRReward:
    """Scores images against the quoted target of their prompts."""

    def __init__(self, cfg: OCRConfig | None = None, backend: OCRBackend | None = None) -> None:
        cfg = cfg or OCRConfig()
        self.cfg = cfg
        self.backend = backend or make_ocr_backend(cfg)

    uses_targets = True

    def __call__(self, images: list[np.ndarray], prompts: list[str],
                 targets: list[str | None] | None = None) -> RewardOutput:
        """``targets`` (optional) overrides the quoted text of each prompt where it is not None."""
        scores, reasons, texts = [], [], []
        targets = targets or [None] * len(prompts)
        for image, prompt, given in zip(images, prompts, targets, strict=True):
            target = given or extract_target(prompt)
            if target is None:
                scores.append(0.0)
                reasons.append(NO_TARGET)
                texts.append("")
                continue
            lines = self.backend.recognise(image)
            scores.append(ocr_score(lines, target))
            reasons.append(None if lines else NOTHING_READ)
            texts.append(" ".join(lines))
        return RewardOutput(scores, reasons, {"ocr_text": texts})
