"""Where the tensors of a safetensors checkpoint are: one ``.safetensors`` file, a folder holding
``model.safetensors``, or a folder sharded as ``save_pretrained`` writes it, whose
``model.safetensors.index.json`` maps every key to its shard (``weight_map``). Nothing is unpickled."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_key_files(path: str | Path, select: Callable[[str], bool] | None = None) -> dict[str, Path]:
    """key -> the file holding it, for the keys passing ``select`` (all when None).

    A file is read as it is. A folder is read through its index when it has one (only the index is read;
    each shard it lists for a selected key must exist), else its ``model.safetensors``, else every
    ``*.safetensors`` in it (their headers are read). FileNotFoundError names what is missing."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    elif (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        owners = {key: path / name for key, name in weight_map.items() if select is None or select(key)}
        for file in sorted(set(owners.values())):
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint shard missing: {str(file)!r} (listed in {INDEX_FILE})")
        return owners
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors in {str(path)!r}")
    owners = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            keys = fh.keys()  # noqa: SIM118 (safe_open is not a dict)
        owners.update(dict.fromkeys((key for key in keys if select is None or select(key)), file))
    return owners


def _by_file(path: str | Path, select: Callable[[str], bool] | None) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for key, file in safetensors_key_files(path, select).items():
        by_file.setdefault(file, []).append(key)
    return by_file


def read_safetensors_dir(
    path: str | Path, select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or folder, read shard by shard; only keys passing ``select`` are read."""
    tensors: dict[str, torch.Tensor] = {}
    for file, keys in _by_file(path, select).items():
        with safe_open(str(file), framework="pt") as fh:
            for key in keys:
                tensors[key] = fh.get_tensor(key)
    return tensors


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor of a checkpoint file or folder, from the headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, keys in _by_file(path, None).items():
        with safe_open(str(file), framework="pt") as fh:
            for key in keys:
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes
