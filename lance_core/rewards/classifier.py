"""An image classifier as a reward: p(prompted class | image).

The classifier comes from a file (``classifier.path``):

- a scikit-learn estimator with ``predict_proba`` and ``classes_`` saved with joblib (``.joblib``, ``.pkl``);
  loading such a file runs the code it holds, so give only files you made or trust;
- a torch model exported with ``torch.export.save`` (``.pt2``: a graph and its weights, no code runs at load)
  returning logits (N, classes) for images (N, C, H, W), with the class labels in ``classifier.classes``.

Each image (H, W, 3 uint8) is resized to ``classifier.image_size`` (bilinear), made grey when
``classifier.grayscale`` (the mean of R, G, B), scaled to [0, 1] and flattened (scikit-learn) or given as
(N, C, H, W) (torch). The prompted class is the sample's target (the prompt file's ``target`` field);
a sample without one scores 0 with reason ``no_target``, a target the classifier does not know scores 0 with
reason ``unknown_class``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import RewardOutput
from .config import ClassifierConfig

NO_TARGET = "no_target"
UNKNOWN_CLASS = "unknown_class"
SCIKIT_SUFFIXES = (".joblib", ".pkl", ".pickle")
TORCH_SUFFIXES = (".pt2",)


def prepare_images(images: list[np.ndarray], size: tuple[int, int] | None, grayscale: bool) -> np.ndarray:
    """(N, H, W, C) float32 in [0, 1]: resized to ``size`` (height, width), grey (C = 1) when asked."""
    from PIL import Image

    out = []
    for image in images:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if size is not None and array.shape[:2] != tuple(size):
            array = np.asarray(Image.fromarray(array[..., :3]).resize((size[1], size[0]), Image.BILINEAR))
        values = array[..., :3].astype(np.float32) / 255.0
        out.append(values.mean(axis=-1, keepdims=True) if grayscale else values)
    return np.stack(out)


class ClassifierReward:
    """``reward(images, prompts, targets)``: the classifier's probability of each sample's target class."""

    uses_targets = True

    def __init__(self, cfg: ClassifierConfig) -> None:
        self.cfg = cfg
        path = Path(cfg.path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier model not found: {cfg.path!r} (rewards.terms[].classifier.path)")
        if path.suffix in TORCH_SUFFIXES:
            import torch

            self.torch_module = torch.export.load(str(path)).module()
            self.estimator = None
            if not cfg.classes:
                raise ValueError(f"{cfg.path}: a torch classifier needs classifier.classes (its output labels)")
            self.classes = [str(c) for c in cfg.classes]
        elif path.suffix in SCIKIT_SUFFIXES:
            try:
                import joblib
            except ImportError as err:
                raise ImportError(f"{cfg.path}: a scikit-learn classifier needs scikit-learn (and joblib): "
                                  "pip install scikit-learn") from err
            self.estimator = joblib.load(path)
            self.torch_module = None
            if not hasattr(self.estimator, "predict_proba"):
                raise ValueError(f"{cfg.path}: {type(self.estimator).__name__} has no predict_proba")
            self.classes = [str(c) for c in (cfg.classes or self.estimator.classes_)]
        else:
            raise ValueError(f"{cfg.path}: unknown classifier format {path.suffix!r}; a scikit-learn estimator "
                             f"({', '.join(SCIKIT_SUFFIXES)}) or an exported torch model ({', '.join(TORCH_SUFFIXES)})")
        self.index = {label: k for k, label in enumerate(self.classes)}

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """(N, classes) probabilities of the images."""
        x = prepare_images(images, self.cfg.image_size, self.cfg.grayscale)
        if self.estimator is not None:
            return np.asarray(self.estimator.predict_proba(x.reshape(len(x), -1)), dtype=np.float64)
        import torch

        with torch.no_grad():
            logits = self.torch_module(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
        return torch.softmax(logits.float(), dim=-1).numpy().astype(np.float64)

    def __call__(self, images: list[np.ndarray], prompts: list[str],
                 targets: list[str | None] | None = None) -> RewardOutput:
        targets = targets if targets is not None else [None] * len(images)
        probs = self.probabilities(images) if images else np.zeros((0, len(self.classes)))
        scores, reasons, predicted = [], [], []
        for row, target in zip(probs, targets):
            predicted.append(self.classes[int(row.argmax())])
            if target is None or str(target).strip() == "":
                scores.append(0.0)
                reasons.append(NO_TARGET)
            elif str(target).strip() not in self.index:
                scores.append(0.0)
                reasons.append(UNKNOWN_CLASS)
            else:
                scores.append(float(row[self.index[str(target).strip()]]))
                reasons.append(None)
        return RewardOutput(scores, reasons, {"predicted": predicted})
