"""OCR reward for text rendering (GRPO.md): the target is the text inside the first pair of double quotes
of the prompt; recognised lines are joined, spaces removed, lower-cased; d = 0 when the target occurs in
the recognised text, else the Levenshtein distance capped at len(target); reward = 1 - d / len(target);
nothing recognised gives 0.

Backends recognise text lines in an RGB uint8 image:
- ``rapidocr``: by default the ONNX models shipped inside the ``rapidocr-onnxruntime`` wheel (offline):
  detection ``ch_PP-OCRv4_det_infer.onnx`` (DB), recognition ``ch_PP-OCRv4_rec_infer.onnx`` (SVTR-LCNet,
  Chinese + English characters) and, only with ``use_angle_cls``, ``ch_ppocr_mobile_v2.0_cls_infer.onnx``;
  or model files given by path. Flow-GRPO's ``PaddleOCR(lang="en")`` recognises with
  ``en_PP-OCRv4_rec`` instead; pass it as ``rec_model`` for that model.
- ``paddleocr``: PaddleOCR with local model folders (nothing downloaded).

Detection resizes as PaddleOCR does by default (``det_limit_side_len`` 960, ``det_limit_type`` max): an
image up to 960 pixels a side is detected at its own size, rounded to multiples of 32.
:attr:`OCRReward.models` names the models and settings in use; they are logged once per reward.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from .base import RewardOutput
from .config import OCRConfig

log = logging.getLogger("lance.rewards")

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
    models: dict[str, str | int | None]
    """The backend, the model files (names) and the detection settings in use."""

    def recognise(self, image: np.ndarray) -> list[str]:
        """Text lines read in an (H, W, 3) RGB uint8 image, in reading order."""


class RapidOCRBackend:
    def __init__(self, cfg: OCRConfig) -> None:
        from rapidocr_onnxruntime import RapidOCR

        kwargs = {"det_limit_side_len": cfg.det_limit_side_len, "det_limit_type": cfg.det_limit_type,
                  "text_score": cfg.min_score, "use_cls": cfg.use_angle_cls}
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
        self._keep_detection_limit(cfg)
        shipped = _shipped_rapidocr_models()
        self.models = {
            "backend": "rapidocr", "det": Path(cfg.det_model or shipped["Det"]).name,
            "rec": Path(cfg.rec_model or shipped["Rec"]).name,
            "cls": Path(cfg.cls_model or shipped["Cls"]).name if cfg.use_angle_cls else None,
            "det_limit_side_len": cfg.det_limit_side_len, "det_limit_type": cfg.det_limit_type}

    def _keep_detection_limit(self, cfg: OCRConfig) -> None:
        """rapidocr's ``max`` mode swaps the limit for 960, 1500 or 2000 picked from the image's long side;
        PaddleOCR (and this config) keep the given one."""
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

        detector = self.engine.text_det
        resize = DetPreProcess(cfg.det_limit_side_len, cfg.det_limit_type, detector.mean, detector.std)
        detector.get_preprocess = lambda long_side: resize

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
                  "det_limit_side_len": cfg.det_limit_side_len, "det_limit_type": cfg.det_limit_type,
                  "show_log": False}
        if cfg.cls_model is not None:
            kwargs["cls_model_dir"] = cfg.cls_model
        if cfg.threads:
            kwargs["cpu_threads"] = cfg.threads
        kwargs["use_gpu"] = cfg.use_cuda
        self.engine = PaddleOCR(**kwargs)
        self.min_score = cfg.min_score
        self.models = {
            "backend": "paddleocr", "det": Path(cfg.det_model).name, "rec": Path(cfg.rec_model).name,
            "cls": Path(cfg.cls_model).name if cfg.use_angle_cls and cfg.cls_model else None,
            "det_limit_side_len": cfg.det_limit_side_len, "det_limit_type": cfg.det_limit_type}

    def recognise(self, image: np.ndarray) -> list[str]:
        pages = self.engine.ocr(np.ascontiguousarray(image[:, :, ::-1]), cls=False)
        lines = []
        for page in pages or []:
            for _, (text, score) in page or []:
                if score >= self.min_score:
                    lines.append(text)
        return lines


def _shipped_rapidocr_models() -> dict[str, str]:
    """Det/Rec/Cls model paths of the rapidocr-onnxruntime wheel's own config.yaml."""
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH, read_yaml

    config = read_yaml(str(DEFAULT_CFG_PATH))
    return {part: str(Path(DEFAULT_CFG_PATH).parent / config[part]["model_path"]) for part in ("Det", "Rec", "Cls")}


def make_ocr_backend(cfg: OCRConfig) -> OCRBackend:
    return RapidOCRBackend(cfg) if cfg.backend == "rapidocr" else PaddleOCRBackend(cfg)


class OCRReward:
    """Scores images against the quoted target of their prompts."""

    def __init__(self, cfg: OCRConfig | None = None, backend: OCRBackend | None = None) -> None:
        cfg = cfg or OCRConfig()
        self.cfg = cfg
        self.backend = backend or make_ocr_backend(cfg)
        log.info("OCR reward models: %s", self.models)

    uses_targets = True

    @property
    def models(self) -> dict[str, str | int | None]:
        """The backend, model file names and detection settings (a custom backend may not say)."""
        return getattr(self.backend, "models", {"backend": type(self.backend).__name__})

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
