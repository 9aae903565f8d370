"""Weights in and out: Qwen2.5-VL checkpoints into the UND expert (then copied into GEN), and Lance
checkpoints under the released key names. Safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import LanceModel

LANCE_PREFIXES = ("language_model.", "time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")
VIT_PREFIX = "vit_model."
POS_TABLE_KEY = "latent_pos_embed.pos_embed"
# transformers >= 5 writes model.language_model.*, older releases model.*; vision keys are skipped here.
QWEN_TEXT_PREFIXES = ("model.language_model.", "model.")
QWEN_VISION_PREFIXES = ("model.visual.", "visual.")


@dataclass
class LoadReport:
    loaded: int = 0
    copied_to_gen: int = 0
    skipped_vision: int = 0
    vit_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _safetensors_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {str(path)!r}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard missing: {str(file)!r}")
    return files


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a file, or of a folder (single file or sharded with an index)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    return tensors


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                            strict: bool = True) -> None:
    """Load with errors that name the source and the offending keys or shapes."""
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(f"{source}: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                       f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    with torch.no_grad():
        for key, value in state.items():
            if key in expected:
                expected[key].copy_(value.to(expected[key].dtype))


def _qwen_to_und_key(key: str) -> str | None:
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    for prefix in QWEN_TEXT_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith(("layers.", "embed_tokens.", "norm.")):
                return "language_model.model." + rest
    return None


def copy_und_into_gen(model: LanceModel) -> int:
    """Every ``_moe_gen`` weight of the decoder takes the value of its UND twin."""
    state = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in state.items():
            if "_moe_gen" in key:
                value.copy_(state[key.replace("_moe_gen", "")])
                copied += 1
    return copied


def load_qwen25vl_weights(model: LanceModel, path: str | Path) -> LoadReport:
    """A Qwen2.5-VL checkpoint folder: LLM into UND, **then** UND copied into GEN; QK-norms start at 1."""
    report = LoadReport()
    source = read_safetensors(path)
    expected = model.state_dict()
    und: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key.startswith(QWEN_VISION_PREFIXES):
            report.skipped_vision += 1
            continue
        target = _qwen_to_und_key(key)
        if target is not None:
            und[target] = value
    if "language_model.lm_head.weight" not in und and "language_model.model.embed_tokens.weight" in und:
        und["language_model.lm_head.weight"] = und["language_model.model.embed_tokens.weight"]  # tied embeddings
    needed = [k for k in expected if k.startswith("language_model.") and "_moe_gen" not in k
              and "q_norm" not in k and "k_norm" not in k]
    missing = [k for k in needed if k not in und]
    if missing:
        raise KeyError(f"{path}: the Qwen2.5-VL checkpoint lacks {missing[:8]}")
    load_state_dict_checked(model, und, str(path), strict=False)
    with torch.no_grad():
        for key, value in expected.items():
            if "q_norm" in key or "k_norm" in key:
                value.fill_(1.0)
    report.loaded = len(und)
    report.copied_to_gen = copy_und_into_gen(model)
    return report


def save_lance_checkpoint(model: LanceModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file with the released Lance key names (the fixed position table included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "lance", "preset": model.cfg.preset, **(metadata or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_lance_checkpoint(model: LanceModel, path: str | Path, strict: bool = True) -> LoadReport:
    """Load released-name weights; ``vit_model.*`` keys are returned apart; the fixed table is rebuilt."""
    report = LoadReport()
    state = read_safetensors(path)
    report.vit_weights = {k[len(VIT_PREFIX):]: v for k, v in state.items() if k.startswith(VIT_PREFIX)}
    lance = {k: v for k, v in state.items() if not k.startswith(VIT_PREFIX)}
    unknown = sorted(k for k in lance if not k.startswith(LANCE_PREFIXES))
    if unknown and strict:
        raise KeyError(f"{path}: keys outside the Lance naming: {unknown[:8]}")
    load_state_dict_checked(model, lance, str(path), strict=strict)
    model.latent_pos_embed.rebuild()
    report.loaded = len(lance)
    return report
