"""Activation checkpointing policies: the same loss and gradients, the layers run again in the backward pass."""

from __future__ import annotations

import pytest
import torch

from lance_core.config import model_preset
from lance_core.flow import LossConfig, compute_losses, noise_latents
from lance_core.model import build_model
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
