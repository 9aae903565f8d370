"""Typed, validated model configs and the presets: ``tiny`` (CPU, seconds), ``lance-3b`` (the released
``Lance_3B`` image model) and ``lance-3b-video`` (``Lance_3B_Video``: 31-frame latent table, ViT in the checkpoint).

Every config is a pydantic model with ``extra="forbid"``; :func:`load_config` turns a validation failure
into a :class:`ConfigError` whose message names the field, the bad value and the allowed values.

Paths a user gives (CLI or YAML) are typed :data:`InputPath` or :data:`OutputPath`: validation makes a
relative local path absolute against the working directory of the process that loads the config (the
user's, on the driver), before any Ray worker, whose working directory differs, sees it. A URI with a
scheme (``s3://``, ``gs://``...) is kept as it is. Validating an absolute path again changes nothing, so
a config dumped on the driver loads the same in every worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

AttentionBackend = Literal["auto", "sdpa", "per_sample", "flex", "flash"]


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range; the message names it."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def resolve_user_path(value: str) -> str:
    """A local path made absolute against the current working directory (``~`` expanded); a URI with a
    scheme (``s3://bucket/x``, ``gs://...``, ``file://...``) and the empty string (not given) unchanged."""
    if not value or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


@dataclass(frozen=True)
class PathRole:
    """Marks a path field: an ``input`` must exist when a job starts (checked before any Ray work), an
    ``output`` is written by the job. ``names`` are values of the field that are names, not paths."""

    role: Literal["input", "output"]
    names: tuple[str, ...] = ()


def _resolver(names: tuple[str, ...]):
    def resolve(value: str) -> str:
        return value if value in names else resolve_user_path(value)

    return resolve


InputPath = Annotated[str, AfterValidator(resolve_user_path), PathRole("input")]
"""A file or folder the job reads (data, weights, prompts...): local (made absolute) or a URI."""
OutputPath = Annotated[str, AfterValidator(resolve_user_path), PathRole("output")]
"""A folder the job writes (run folder, shards, logs): local (made absolute) or a URI. A field with a
default needs ``Field(default, validate_default=True)`` so that the default is made absolute too."""


def input_path_or_name(*names: str):
    """An input field holding either one of ``names`` (kept as it is) or a path (made absolute), e.g. a
    tokenizer: ``qwen2.5``, ``byte`` or a tokenizer folder."""
    return Annotated[str, AfterValidator(_resolver(names)), PathRole("input", names)]


def _path_role(annotation) -> PathRole | None:
    """The PathRole inside a field's annotation (through Optional, tuples and lists), if any."""
    if get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, PathRole)), None)
    return next((role for arg in get_args(annotation) if (role := _path_role(arg)) is not None), None)


def field_path_role(info) -> PathRole | None:
    """The PathRole of a model field (``model_fields[name]``), if it holds paths."""
    return next((m for m in info.metadata if isinstance(m, PathRole)), None) or _path_role(info.annotation)


def path_fields(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, PathRole]]:
    """(dotted field name, value, role) of every path value given in ``model`` and its sections."""
    for name, info in type(model).model_fields.items():
        value, dotted = getattr(model, name), f"{prefix}{name}"
        role = field_path_role(info)
        items = value if isinstance(value, (tuple, list)) else [value]
        for index, item in enumerate(items):
            where = f"{dotted}[{index}]" if isinstance(value, (tuple, list)) else dotted
            if isinstance(item, BaseModel):
                yield from path_fields(item, where + ".")
            elif role is not None and isinstance(item, str) and item and item not in role.names:
                yield where, item, role


def resolve_override_paths(section: type[BaseModel], overrides: dict[str, Any]) -> dict[str, Any]:
    """Path fields inside a mapping of field overrides of ``section`` (``{"vae": {"path": "w/vae"}}``) made
    absolute, as if the mapping had been validated: such mappings are validated later, maybe in a worker."""
    out = dict(overrides)
    for key, value in overrides.items():
        info = section.model_fields.get(key)
        if info is None:
            continue
        nested = next((a for a in (info.annotation, *get_args(info.annotation))
                       if isinstance(a, type) and issubclass(a, BaseModel)), None)
        role = field_path_role(info)
        if nested is not None and isinstance(value, dict):
            out[key] = resolve_override_paths(nested, value)
        elif role is not None and isinstance(value, str):
            out[key] = _resolver(role.names)(value)
    return out


def _resolve_model_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    return resolve_override_paths(ModelConfig, overrides)


ModelOverrides = Annotated[dict[str, Any], AfterValidator(_resolve_model_overrides)]
"""Fields of :class:`ModelConfig` to change, as a mapping validated when the model is built; its path fields
(``vae.path``, ``vit.path``) are made absolute at load."""


class VAEConfig(StrictModel):
    """Wan2.2 VAE (diffusers ``AutoencoderKLWan``). ``path`` is a diffusers folder or the original ``.pth``.
    ``preset: pixel`` puts the exact space-to-depth test codec in the VAE's slot instead
    (``lance_core/encoders/pixel.py``: spatial_ratio r with 3·r² latent channels, no weights)."""

    preset: Literal["tiny", "wan2.2", "pixel"] = "tiny"
    path: InputPath | None = None
    """Weights: a diffusers model folder, or the original single-file ``Wan2.2_VAE.pth``. None = random init."""
    latent_channels: int = Field(48, gt=0)
    spatial_ratio: int = Field(16, gt=0)
    temporal_ratio: int = Field(4, gt=0)
    base_dim: int = Field(160, gt=0)
    decoder_base_dim: int = Field(256, gt=0)
    num_res_blocks: int = Field(2, gt=0)
    seed: int = 0
    """Seed of the random initialisation when ``path`` is None (tests, demo)."""

    @model_validator(mode="after")
    def _check_pixel(self) -> VAEConfig:
        ratio = self.spatial_ratio
        if self.preset == "pixel" and self.latent_channels != 3 * ratio * ratio:
            raise ValueError(f"preset 'pixel' packs {ratio}x{ratio} RGB blocks into 3·{ratio}² = {3 * ratio * ratio} "
                             f"channels, but latent_channels is {self.latent_channels} (48 channels: spatial_ratio 4)")
        return self


class ViTConfig(StrictModel):
    """Qwen2.5-VL vision tower (transformers). ``path`` is a Qwen2.5-VL checkpoint folder."""

    preset: Literal["tiny", "qwen2.5-vl-3b"] = "tiny"
    path: InputPath | None = None
    depth: int = Field(32, gt=0)
    hidden_size: int = Field(1280, gt=0)
    intermediate_size: int = Field(3420, gt=0)
    num_heads: int = Field(16, gt=0)
    out_hidden_size: int = Field(2048, gt=0)
    patch_size: int = Field(14, gt=0)
    temporal_patch_size: int = Field(2, gt=0)
    spatial_merge_size: int = Field(2, gt=0)
    window_size: int = Field(112, gt=0)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    seed: int = 0

    @model_validator(mode="after")
    def _check_heads(self) -> ViTConfig:
        head = self.hidden_size // self.num_heads
        if self.hidden_size % self.num_heads or head % 4:
            raise ValueError(
                f"vit.hidden_size ({self.hidden_size}) / vit.num_heads ({self.num_heads}) must be a whole "
                f"multiple of 4: the vision rotary embedding splits each head into (h, w) sin-cos pairs"
            )
        return self


class ModelConfig(StrictModel):
    """The dual-stream (UND + GEN) decoder over Qwen2.5-VL. Sizes as MODEL.md."""

    preset: str = "custom"
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    """Rows of the embedding and lm_head (151,936 in the released checkpoints)."""
    text_vocab: int | None = Field(None, gt=0)
    """The tokenizer's length (Qwen2.5: 151,665): logits are cut to these first rows and CE targets at or past
    it are ignored, as the release does (``len(tokenizer)``). None = all ``vocab_size`` rows."""
    rope_theta: float = Field(1_000_000.0, gt=0)
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    """Rotary frequency pairs given to the (t, h, w) axes; sums to head_dim / 2."""
    rms_norm_eps: float = Field(1e-6, gt=0)
    latent_channels: int = Field(48, gt=0)
    latent_grid: int = Field(64, gt=0)
    """Side of the fixed latent position table (64 x 64 latent tokens, 1024 px)."""
    max_latent_frames: int = Field(31, gt=0)
    """Latent frames of the fixed position table (max_latent_frames x latent_grid² rows): 1 in the released
    image model, 31 (121 video frames) in the video model."""
    timestep_freq_dim: int = Field(256, gt=0)
    """Width of the timestep sinusoid (cos/sin pairs, so even)."""
    vit_in_checkpoint: bool = False
    """The Lance checkpoint also holds the ViT weights, under ``vit_model.*`` (``Lance_3B_Video``)."""
    qk_norm: bool = True
    """Per-head RMSNorm on q and k in both experts."""
    mape: bool = True
    """Modality-aware temporal position offsets (MaPE)."""
    attention_backend: AttentionBackend = "auto"
    flex_block_size: int = Field(128, gt=0)
    tokens_per_second: float = Field(2.0, gt=0)
    """mRoPE temporal step per ViT grid frame (Qwen2.5-VL: tokens_per_second x seconds per grid)."""
    initializer_range: float = Field(0.02, gt=0)
    vit: ViTConfig = ViTConfig()
    vae: VAEConfig = VAEConfig()

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.hidden_size % 2 or self.hidden_size < 6:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be even and at least 6: the latent position table "
                f"splits it into t/h/w blocks of sin-cos pairs"
            )
        if self.timestep_freq_dim % 2:
            raise ValueError(f"timestep_freq_dim ({self.timestep_freq_dim}) must be even (cos/sin pairs)")
        if self.text_vocab is not None and self.text_vocab > self.vocab_size:
            raise ValueError(f"text_vocab ({self.text_vocab}) must not exceed vocab_size ({self.vocab_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if self.vit.out_hidden_size != self.hidden_size:
            raise ValueError(
                f"vit.out_hidden_size ({self.vit.out_hidden_size}) must equal hidden_size ({self.hidden_size})"
            )
        if self.vae.latent_channels != self.latent_channels:
            raise ValueError(
                f"vae.latent_channels ({self.vae.latent_channels}) must equal latent_channels "
                f"({self.latent_channels})"
            )
        return self

    @property
    def logit_rows(self) -> int:
        """Logit rows in use: ``text_vocab``, else ``vocab_size``."""
        return self.text_vocab or self.vocab_size


TINY_VIT = dict(
    preset="tiny", depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=(1,),
)
TINY_VAE = dict(preset="tiny", base_dim=16, decoder_base_dim=16, num_res_blocks=1)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        preset="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=512, rope_theta=10_000.0, mrope_section=(2, 3, 3),
        latent_grid=16, max_latent_frames=16, vit=TINY_VIT, vae=TINY_VAE,
    ),
    "lance-3b": dict(
        preset="lance-3b", hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
        intermediate_size=11008, vocab_size=151936, text_vocab=151665, rope_theta=1_000_000.0,
        mrope_section=(16, 24, 24),
        latent_grid=64, max_latent_frames=1, vit=dict(preset="qwen2.5-vl-3b"), vae=dict(preset="wan2.2"),
    ),
}
PRESETS["lance-3b-video"] = dict(PRESETS["lance-3b"], preset="lance-3b-video", max_latent_frames=31,
                                 vit_in_checkpoint=True)

T = TypeVar("T", bound=BaseModel)


def _flags_of(path: str, flags: dict[str, str]) -> list[str]:
    """The command-line flags that set ``path`` (dotted, without prefix), a field inside it or a section
    holding it."""
    return list(dict.fromkeys(flag for key, flag in flags.items()
                              if path == key or path.startswith(key + ".") or key.startswith(path + ".")))


def format_validation_error(err: ValidationError, prefix: str = "", flags: dict[str, str] | None = None) -> str:
    """One line per error: ``  prefix.field: message (got value)``; ``flags`` (dotted field -> the flag
    that set it, e.g. ``{"steps": "--steps"}``) adds the flag: ``  train.steps (--steps): ...``."""
    lines = []
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"])
        field = ".".join(p for p in (prefix, path) if p != "") or "<root>"
        given = _flags_of(path, flags or {}) if path else []
        named = f"{field} ({', '.join(given)})" if given else field
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {named}: {item['msg']}{shown}")
    return "invalid config:\n" + "\n".join(lines)


def load_config(cls: type[T], data: dict[str, Any] | None, prefix: str = "",
                flags: dict[str, str] | None = None) -> T:
    """Validate ``data`` into ``cls``; raise :class:`ConfigError` naming every bad field (and the
    command-line flag that set it, from ``flags``: dotted field -> flag)."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix, flags)) from None


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a preset (``tiny``, ``lance-3b`` or ``lance-3b-video``) with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    data = {**PRESETS[name]}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return load_config(ModelConfig, data, prefix="model")
