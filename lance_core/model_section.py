"""The ``model:`` section every job's config shares: which network (a preset and field overrides) and which
weights (``weights: {lance, qwen, vae, vit}``), named the same way in precompute, train and GRPO.

    model:
      preset: lance-3b
      overrides: {attention_backend: flash}
      weights: {lance: /w/lance.safetensors, vae: /w/Wan2.2_VAE.pth, vit: /w/Qwen2.5-VL-3B-Instruct}

The encoders' weights are given only here: ``overrides`` may not hold ``vae.path`` or ``vit.path``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from .config import PRESETS, ConfigError, InputPath, ModelConfig, ModelOverrides, StrictModel, model_preset
from .tokenizer import TokenizerRef, check_tokenizer_fits


class ModelWeights(StrictModel):
    lance: InputPath | None = None
    """A Lance checkpoint (released tensor names; a safetensors file or a sharded folder) to start from."""
    qwen: InputPath | None = None
    """A Qwen2.5-VL checkpoint folder: its LLM is loaded into UND and copied into GEN (a pre-training start)."""
    vae: InputPath | None = None
    """Wan2.2 VAE: a diffusers ``AutoencoderKLWan`` folder or the original ``Wan2.2_VAE.pth``. None = the
    preset's VAE with random weights (tests, demo)."""
    vit: InputPath | None = None
    """Qwen2.5-VL vision tower: a Qwen2.5-VL checkpoint folder (or the ``Lance_3B_Video`` checkpoint, which
    holds it). None = the ViT inside ``lance`` where the preset keeps it there (``lance-3b-video``), else
    random weights."""


class ModelSection(StrictModel):
    preset: str = "tiny"
    """``tiny``, ``lance-3b`` or ``lance-3b-video``."""
    overrides: ModelOverrides = Field(default_factory=dict)
    """Fields of :class:`lance_core.config.ModelConfig` to change (e.g. ``attention_backend``)."""
    weights: ModelWeights = ModelWeights()
    tokenizer: TokenizerRef | None = None
    """``qwen2.5`` (the built-in Qwen2.5 tokenizer), ``byte`` (byte-level) or a Qwen2 tokenizer folder. None =
    ``qwen2.5`` where the model's logit rows hold its 151,665 ids (``lance-3b``), else ``byte`` (``tiny``)."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown model preset {value!r}; allowed: {', '.join(sorted(PRESETS))}")
        return value

    @field_validator("overrides")
    @classmethod
    def _no_weight_paths(cls, value: dict[str, Any]) -> dict[str, Any]:
        for encoder in ("vae", "vit"):
            if isinstance(value.get(encoder), dict) and "path" in value[encoder]:
                raise ValueError(f"{encoder}.path: give the {encoder.upper()} weights as model.weights.{encoder}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        try:
            built = self.build()
        except ConfigError as err:  # name the fields as the user wrote them: overrides.<field>
            lines = [line.strip().replace("model.", "overrides.", 1) for line in str(err).splitlines()[1:]]
            raise ValueError("; ".join(lines)) from None
        check_tokenizer_fits(built, self.tokenizer)
        return self

    def build(self) -> ModelConfig:
        """The model config: the preset, the overrides, and the encoders' weight paths."""
        cfg = model_preset(self.preset, **self.overrides)
        vit = self.weights.vit or (self.weights.lance if cfg.vit_in_checkpoint else None)
        return cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"path": self.weights.vae}),
                                      "vit": cfg.vit.model_copy(update={"path": vit})})
