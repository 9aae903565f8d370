"""Weights in and out: Qwen2.5-VL checkpoints into the UND expert (then copied into GEN), and Lance
checkpoints under the released key names. Safetensors only; nothing is unpickled.

Qwen2.5-VL key layouts accepted (both appear in the wild):
- on disk, as ``save_pretrained`` of transformers 5.x and the Hub checkpoints write them:
  ``model.layers.*``, ``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``, ``visual.*``;
- in memory, as transformers >= 4.52 names the modules (a ``state_dict()`` saved by hand):
  ``model.language_model.*``, ``lm_head.weight``, ``model.visual.*``.

The released ``Lance_3B_Video`` checkpoint also holds the Qwen2.5-VL vision tower under ``vit_model.*``
(the tower's own state-dict names); it goes into the ViT encoder (:class:`~lance_core.encoders.QwenViT`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import LanceModel
from .safetensors_files import SINGLE_FILE, read_safetensors_dir, safetensors_key_files
from .state_dicts import check_state_dict, key_listing, load_state_dict_checked

LANCE_PREFIXES = ("language_model.", "time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")
VIT_PREFIX = "vit_model."
POS_TABLE_KEY = "latent_pos_embed.pos_embed"
LM_HEAD_KEY = "language_model.lm_head.weight"
EMBED_KEY = "language_model.model.embed_tokens.weight"
QWEN_TEXT_PREFIXES = ("model.language_model.", "model.")
QWEN_VISION_PREFIXES = ("model.visual.", "visual.")


@dataclass
class LoadReport:
    """What a load did. ``vit_loaded``: ``vit_model.*`` tensors copied into the ViT encoder; ``vit_weights``:
    those tensors (prefix removed) when no encoder was given to load them into."""

    source: str = ""
    loaded: int = 0
    vit_loaded: int = 0
    copied_to_gen: int = 0
    skipped_vision: int = 0
    tied_lm_head: bool = False
    ignored: list[str] = field(default_factory=list)
    vit_weights: dict[str, torch.Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ reading
# ------------------------------------------------------------------------------------------ Qwen2.5-VL
def _qwen_to_und_key(key: str) -> str | None:
    if key == "lm_head.weight":
        return LM_HEAD_KEY
    for prefix in QWEN_TEXT_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith(("layers.", "embed_tokens.", "norm.")):
                return "language_model.model." + rest
    return None


def _qwen_ties_embeddings(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return bool(data.get("tie_word_embeddings") or (data.get("text_config") or {}).get("tie_word_embeddings"))


def copy_und_into_gen(model: LanceModel) -> int:
    """Every ``_moe_gen`` weight (decoder layers and final norm) takes the value of its UND twin."""
    state = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in state.items():
            if "_moe_gen" in key:
                value.copy_(state[key.replace("_moe_gen", "")])
                copied += 1
    return copied


def _is_qwen_vision(key: str) -> bool:
    return key.startswith(QWEN_VISION_PREFIXES)


def _is_qk_norm(key: str) -> bool:
    return ".q_norm" in key or ".k_norm" in key


def load_qwen25vl_weights(model: LanceModel, path: str | Path) -> LoadReport:
    """A Qwen2.5-VL checkpoint folder: the LLM into UND, **then** UND copied into GEN (MODEL.md; the release
    copies before loading on one path). QK-norms start at 1 (Qwen2.5-VL has none). Vision weights are
    counted, not read. A tied (or absent) lm_head takes the embedding."""
    report = LoadReport(source=str(path))
    owners = safetensors_key_files(path)
    report.skipped_vision = sum(_is_qwen_vision(key) for key in owners)
    report.ignored = sorted(k for k in owners if not _is_qwen_vision(k) and _qwen_to_und_key(k) is None)
    source = read_safetensors_dir(path, lambda k: not _is_qwen_vision(k) and _qwen_to_und_key(k) is not None)
    und = {_qwen_to_und_key(key): value for key, value in source.items()}
    if EMBED_KEY in und and (LM_HEAD_KEY not in und or _qwen_ties_embeddings(path)):
        und[LM_HEAD_KEY] = und[EMBED_KEY]
        report.tied_lm_head = True
    expected = model.state_dict()
    needed = [k for k in expected
              if k.startswith("language_model.") and "_moe_gen" not in k and not _is_qk_norm(k)]
    missing = [k for k in needed if k not in und]
    unexpected = sorted(k for k in und if k not in expected)
    if missing:
        raise KeyError(f"{path}: the Qwen2.5-VL checkpoint lacks {key_listing(missing)}")
    if unexpected:
        raise KeyError(f"{path}: the Qwen2.5-VL checkpoint has LLM weights the model lacks (more layers?): "
                       f"{key_listing(unexpected)}")
    report.loaded = load_state_dict_checked(model, und, str(path), strict=False)
    with torch.no_grad():
        for key, value in expected.items():
            if _is_qk_norm(key):
                value.fill_(1.0)
    report.copied_to_gen = copy_und_into_gen(model)
    return report


# ------------------------------------------------------------------------------------------ Lance
def _vision_tower(vit: torch.nn.Module) -> torch.nn.Module:
    """The module whose state dict carries the ``vit_model.*`` names: ``QwenViT.tower`` or a bare tower."""
    return getattr(vit, "tower", vit)


def save_lance_checkpoint(
    model: LanceModel, path: str | Path, metadata: dict[str, str] | None = None,
    vit: torch.nn.Module | None = None, replace: dict[str, torch.Tensor] | None = None,
) -> Path:
    """One safetensors file under the released Lance key names, the fixed position table included as the
    release stores it; with ``vit`` (a ``QwenViT``) its tower too, under ``vit_model.*`` (``Lance_3B_Video``).
    ``replace``: tensors written in place of the model's under the same names (an EMA's weights).
    ``path`` is a ``.safetensors`` file or a folder (``model.safetensors`` inside). Written to a temporary
    name, then renamed, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / SINGLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    unknown = sorted(set(replace or {}) - set(state))
    if unknown:
        raise KeyError(f"tensors to replace are not in the model: {key_listing(unknown)}")
    state.update({k: v.detach().cpu().contiguous() for k, v in (replace or {}).items()})
    if vit is not None:
        tower = _vision_tower(vit).state_dict()
        state.update({VIT_PREFIX + k: v.detach().cpu().contiguous() for k, v in tower.items()})
    meta = {"format": "pt", "lance_preset": str(model.cfg.preset)}
    meta.update({key: str(value) for key, value in (metadata or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _check_position_table(model: LanceModel, stored: torch.Tensor, path: str | Path) -> None:
    """A stored table of another size means another frame count or grid: say which preset fits."""
    table = model.latent_pos_embed
    if tuple(stored.shape) == tuple(table.pos_embed.shape):
        return
    rows, grid = stored.shape[0], table.grid
    frames = f"{rows // (grid * grid)} latent frame(s) of {grid}x{grid}" if rows % (grid * grid) == 0 else ""
    raise ValueError(
        f"{path}: {POS_TABLE_KEY} has shape {tuple(stored.shape)}{f' ({frames})' if frames else ''}, the model "
        f"expects {tuple(table.pos_embed.shape)} ({table.max_frames} latent frame(s) of {grid}x{grid}); "
        f"Lance_3B needs preset lance-3b, Lance_3B_Video preset lance-3b-video (model.max_latent_frames)")


def load_lance_checkpoint(
    model: LanceModel, path: str | Path, strict: bool = True, vit: torch.nn.Module | None = None,
) -> LoadReport:
    """Released-name weights from a file or folder (single or sharded). ``vit_model.*`` tensors go into
    ``vit`` (a ``QwenViT``) when it is given (strict: the file must hold exactly its tower), otherwise they
    come back in ``report.vit_weights``. The fixed position table is rebuilt whatever the file held
    (missing is fine; another size is an error naming the preset that fits)."""
    report = LoadReport(source=str(path))
    state = read_safetensors_dir(path)
    vit_state = {k[len(VIT_PREFIX):]: v for k, v in state.items() if k.startswith(VIT_PREFIX)}
    lance = {k: v for k, v in state.items() if not k.startswith(VIT_PREFIX)}
    if strict:
        unknown = sorted(k for k in lance if not k.startswith(LANCE_PREFIXES))
        if unknown:
            raise KeyError(f"{path}: keys outside the Lance naming: {key_listing(unknown)}")
    if POS_TABLE_KEY in lance:
        _check_position_table(model, lance[POS_TABLE_KEY], path)
    lance.setdefault(POS_TABLE_KEY, model.latent_pos_embed.pos_embed.detach())
    check_state_dict(model, lance, str(path), strict=strict)
    if vit is None:
        report.vit_weights = vit_state
    elif strict and not vit_state:
        raise KeyError(f"{path}: no {VIT_PREFIX}* tensors for the ViT encoder (not a Lance_3B_Video checkpoint?)")
    else:  # the model's tensors were checked above: a bad ViT tensor leaves both untouched
        vit_source = f"{path} ({VIT_PREFIX}*)"
        report.vit_loaded = load_state_dict_checked(_vision_tower(vit), vit_state, vit_source, strict=strict)
    report.loaded = load_state_dict_checked(model, lance, str(path), strict=strict)
    model.latent_pos_embed.rebuild()
    return report
