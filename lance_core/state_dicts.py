"""Loading a state dict into a module only when it fits: every key present and every shape equal, with errors
that name the source, the key and both shapes. Used for Lance checkpoints and for the VAE and ViT weights."""

from __future__ import annotations

import torch


def key_listing(keys: list[str], limit: int = 8) -> str:
    return f"{keys[:limit]}{f' (+{len(keys) - limit} more)' if len(keys) > limit else ''}"


def check_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "state dict", strict: bool = True,
) -> None:
    """Shape mismatches raise ``ValueError`` naming key and shapes; with ``strict``, missing/unexpected keys
    raise ``KeyError``. Nothing is copied."""
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(f"{source}: missing keys {key_listing(missing)}; unexpected keys {key_listing(unexpected)}")


def load_state_dict_checked(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "state dict", strict: bool = True,
) -> int:
    """Copy ``state`` into ``model`` (dtype cast, no re-allocation) after :func:`check_state_dict`.
    Returns how many tensors were copied."""
    check_state_dict(model, state, source, strict)
    expected = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in state.items():
            if key in expected:
                expected[key].copy_(value.to(expected[key].dtype))
                copied += 1
    return copied
