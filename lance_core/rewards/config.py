"""Reward configs: light to import (no torch), so reward actors load only the models they use."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import InputPath, StrictModel


class OCRConfig(StrictModel):
    backend: str = Field("rapidocr", pattern="^(rapidocr|paddleocr)$")
    det_model: InputPath | None = None
    """Detection model: an ONNX file (rapidocr) or an inference-model folder (paddleocr). None = the
    PP-OCRv4 model shipped in the rapidocr-onnxruntime wheel (required for paddleocr)."""
    rec_model: InputPath | None = None
    cls_model: InputPath | None = None
    use_angle_cls: bool = False
    use_cuda: bool = False
    """Run the ONNX sessions on CUDA (needs onnxruntime-gpu, and num_gpus on the reward actors)."""
    threads: int = Field(1, ge=0)
    """Intra-op threads of each ONNX session (0 = runtime default). One per actor scales by actors."""
    det_limit_side_len: int = Field(960, gt=0)
    """Detection resize limit, PaddleOCR's default 960 (rapidocr's own default is 736 with ``min``)."""
    det_limit_type: Literal["max", "min"] = "max"
    """``max``: images whose long side exceeds the limit are shrunk to it, smaller ones are detected at their
    own size (PaddleOCR's default); ``min``: images whose short side is below the limit are upscaled to
    it (rapidocr's default, 512² -> 736²). Either way the sides are then rounded to multiples of 32."""
    min_score: float = Field(0.5, ge=0, le=1)
    """Recognised lines with a lower confidence are dropped."""


class CLIPConfig(StrictModel):
    model_name: str | None = "ViT-B-32"
    """An open_clip architecture name; ignored when ``architecture`` is given."""
    architecture: dict[str, Any] | None = None
    """A custom open_clip CLIP config: {embed_dim, vision_cfg, text_cfg} (tests use a tiny one)."""
    pretrained: InputPath | None = None
    """Local weights file (required for a named model; a custom ``architecture`` without it starts random).
    Always a path, never one of open_clip's download tags: nothing is downloaded at run time."""
    device: str = "auto"
    """auto = cuda when the process sees a GPU (declare num_gpus on the reward actors), else cpu."""
    scale: float = Field(1.0, gt=0)
    batch_size: int = Field(32, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_model(self) -> CLIPConfig:
        if self.architecture is None and not self.model_name:
            raise ValueError("clip needs model_name or architecture")
        return self


class ClassifierConfig(StrictModel):
    """An image classifier scoring p(target class | image) (``lance_core/rewards/classifier.py``)."""

    path: InputPath
    """A scikit-learn estimator saved with joblib (.joblib / .pkl: loading runs its code, trusted files only) or
    a torch model saved with ``torch.export.save`` (.pt2) returning logits."""
    image_size: tuple[int, int] | None = None
    """(height, width) the classifier takes; images are resized to it (None: as generated)."""
    grayscale: bool = False
    """Average R, G and B into one channel first."""
    classes: tuple[str, ...] | None = None
    """The labels of the classifier's outputs, in order (required for torch; scikit-learn: ``classes_``)."""


class RewardSpec(StrictModel):
    """One component of the reward."""

    name: str
    kind: Literal["ocr", "clip", "classifier", "brightness", "colour", "callable"]
    weight: float = 1.0
    ocr: OCRConfig | None = None
    clip: CLIPConfig | None = None
    classifier: ClassifierConfig | None = None
    colour: tuple[int, int, int] = (255, 0, 0)
    callable: str | None = None
    """``package.module:function`` taking (images, prompts) and returning one score per image."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for a callable that is a class or a factory (called once per actor)."""

    @model_validator(mode="after")
    def _check_kind(self) -> RewardSpec:
        if self.kind == "callable" and not self.callable:
            raise ValueError(f"reward {self.name!r} of kind 'callable' needs callable: 'module:function'")
        if self.kind == "classifier" and self.classifier is None:
            raise ValueError(f"reward {self.name!r} of kind 'classifier' needs classifier: {{path: MODEL_FILE}}")
        return self
