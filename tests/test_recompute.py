"""Activation checkpointing policies: the same loss and gradients, the layers run again in the backward pass."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from lance_core.config import model_preset
from lance_core.flow import LossConfig, compute_losses, noise_latents
from lance_core.model import build_model, recompute
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_mix
from lance_core.tokenizer import ByteTokenizer
from pipelines.train.config import load_train_config


def _gradients(policy: str) -> tuple[float, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    cfg = model_preset("tiny", attention_backend="per_sample")
    model = build_model(cfg).train()
    model.activation_checkpointing = policy
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    for layer in model.layers:
        layer.register_forward_pre_hook(count)
    batch = pack_samples(synthetic_mix(ByteTokenizer(), cfg, per_task=1), cfg)
    loss_cfg = LossConfig()
    noised = noise_latents(batch, loss_cfg, torch.Generator().manual_seed(0))
    loss = compute_losses(model, batch, loss_cfg, noised=noised).total
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("policy", ["layer", "selective"])
def test_recomputation_gives_the_same_loss_and_gradients(policy):
    loss, grads, calls = _gradients("none")
    assert calls == 2  # each of the two layers once
    loss_r, grads_r, calls_r = _gradients(policy)
    assert calls_r == 4  # and once more in the backward pass
    assert loss_r == pytest.approx(loss, rel=1e-6)
    assert grads_r.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_policy_is_named_in_the_training_config():
    assert load_train_config({}).deepspeed.activation_checkpointing == "none"
    assert load_train_config({"deepspeed": {"activation_checkpointing": True}}).deepspeed.activation_checkpointing == "layer"
    assert load_train_config({"deepspeed": {"activation_checkpointing": "selective"}}).deepspeed.activation_checkpointing \
        == "selective"
    with pytest.raises(ValueError, match="activation_checkpointing"):
        load_train_config({"deepspeed": {"activation_checkpointing": "every_other"}})


@torch.library.custom_op("lance_test::costly", mutates_args=())
def _costly(x: torch.Tensor) -> torch.Tensor:
    _costly.calls += 1
    return x * 2


_costly.calls = 0
_costly.register_autograd(lambda ctx, grad: grad * 2)


@torch.library.custom_op("lance_test_flash::_flash_attn_forward", mutates_args=())
def _fake_flash(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@torch.library.custom_op("lance_test_flash::_flash_attn_varlen_forward", mutates_args=())
def _fake_flash_varlen(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def _costly_layer_calls(monkeypatch, saved: bool) -> int:
    """How often the custom op runs for one forward and backward of a layer under ``selective``."""
    costly = {torch.ops.lance_test.costly.default} if saved else set()
    monkeypatch.setattr(recompute, "SAVED_OPS", recompute.SAVED_OPS | costly)
    _costly.calls = 0
    x = torch.randn(4, requires_grad=True)
    recompute.run_layer(lambda h: torch.ops.lance_test.costly(h.sin()).cos(), "selective", True, x).sum().backward()
    torch.testing.assert_close(x.grad, -torch.sin(2 * x.sin()) * 2 * x.cos())
    return _costly.calls


def test_selective_keeps_the_outputs_of_saved_ops(monkeypatch):
    assert recompute._keep_costly(None, torch.ops.lance_test.costly.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _costly_layer_calls(monkeypatch, saved=False) == 2  # run again in the backward pass
    assert _costly_layer_calls(monkeypatch, saved=True) == 1
    assert recompute._keep_costly(None, torch.ops.lance_test.costly.default) == CheckpointPolicy.MUST_SAVE


def test_registered_ops_skips_missing_ones():
    found = recompute.registered_ops("lance_test", ("costly", "not_registered"))
    assert found == {torch.ops.lance_test.costly.default}
    assert recompute.registered_ops("lance_test_nothing_here", ("costly",)) == set()


def test_flash_attention_ops_are_looked_up_when_flash_attn_imports(monkeypatch):
    """A stand-in ``flash_attn`` module and its two forward ops registered under a test namespace."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert recompute.flash_attention_ops("lance_test_flash") == {
        torch.ops.lance_test_flash._flash_attn_forward.default, torch.ops.lance_test_flash._flash_attn_varlen_forward.default}
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    assert recompute.flash_attention_ops("lance_test_flash") == set()


def test_installed_flash_attention_ops_are_saved():
    """Where flash-attn (>= 2.6) is installed its forward ops are in SAVED_OPS; elsewhere there are none."""
    assert recompute.registered_ops("flash_attn", recompute.FLASH_ATTN_OPS) <= recompute.SAVED_OPS
