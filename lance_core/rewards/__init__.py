"""Reward functions for GRPO: OCR (PP-OCR backends), CLIP score, an image classifier, cheap pixel rewards, any callable,
composed as a weighted sum. Images are RGB uint8 arrays (H, W, 3)."""

from .base import CallableReward, RewardFn, RewardOutput, import_callable
from .compose import ERROR_PREFIX, ComposedScores, WeightedReward, build_reward, error_reason
from .config import ClassifierConfig, CLIPConfig, OCRConfig, RewardSpec
from .ocr import NO_TARGET, NOTHING_READ, OCRReward, extract_target, levenshtein, ocr_score

__all__ = [
    "ERROR_PREFIX",
    "NOTHING_READ",
    "NO_TARGET",
    "CLIPConfig",
    "CallableReward",
    "ClassifierConfig",
    "ComposedScores",
    "OCRConfig",
    "OCRReward",
    "RewardFn",
    "RewardOutput",
    "RewardSpec",
    "WeightedReward",
    "build_reward",
    "error_reason",
    "extract_target",
    "import_callable",
    "levenshtein",
    "ocr_score",
]
