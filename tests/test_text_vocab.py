"""CE over the tokenizer's length (``ModelConfig.text_vocab``), as the release's ``vocab_size_efficient``:
logits cut to the first ``text_vocab`` rows, targets at or past it ignored."""

import pytest
import torch
import torch.nn.functional as F

from lance_core.config import PRESETS, ConfigError, model_preset
from lance_core.flow import LossConfig, compute_losses, noise_latents
from lance_core.model import TokenInputs, build_model
from lance_core.packing import IGNORE_INDEX, pack_samples
from lance_core.synthetic import synthetic_mix
from lance_core.tokenizer import QWEN25_VOCAB

TEXT_VOCAB = 300


def test_released_presets_cut_logits_to_the_qwen25_length():
    for name in PRESETS:
        cfg = model_preset(name)
        if name == "tiny":
            assert cfg.text_vocab is None and cfg.logit_rows == cfg.vocab_size == 512
        else:
            assert (cfg.vocab_size, cfg.text_vocab, cfg.logit_rows) == (151_936, QWEN25_VOCAB, QWEN25_VOCAB)
    with pytest.raises(ConfigError, match="text_vocab"):
        model_preset("tiny", text_vocab=513)


def test_text_logits_are_cut_to_text_vocab():
    hidden = torch.randn(5, 64)
    full = build_model(model_preset("tiny"))
    assert full.text_logits(hidden).shape == (5, 512)
    cut = build_model(model_preset("tiny", text_vocab=TEXT_VOCAB))
    cut.load_state_dict(full.state_dict())
    logits = cut.text_logits(hidden)
    assert logits.shape == (5, TEXT_VOCAB)
    assert torch.equal(logits, full.text_logits(hidden)[:, :TEXT_VOCAB])
    assert cut.text_logits(hidden, 263).shape == (5, 263)  # an explicit limit (sampling: len(tokenizer))


def test_ce_ignores_targets_past_text_vocab_and_softmaxes_over_it(tokenizer):
    cfg = model_preset("tiny", text_vocab=TEXT_VOCAB)
    model = build_model(cfg)
    batch = pack_samples(synthetic_mix(tokenizer, cfg, per_task=1), cfg)
    positions = torch.nonzero(batch.ce_labels != IGNORE_INDEX).squeeze(1)
    assert positions.numel() >= 4
    out_of_range = positions[::3]
    batch.ce_labels[out_of_range] = torch.arange(out_of_range.numel()) % (512 - TEXT_VOCAB) + TEXT_VOCAB
    noised = noise_latents(batch, LossConfig(), torch.Generator().manual_seed(0))

    out = compute_losses(model, batch, LossConfig(), noised=noised)

    valid = positions[batch.ce_labels[positions] < TEXT_VOCAB]
    assert out.ce_tokens == valid.numel() == positions.numel() - out_of_range.numel()
    with torch.no_grad():
        hidden, _ = model.backbone(TokenInputs.from_batch(batch, noised.values, noised.timesteps))
        logits = model.language_model.lm_head(hidden[valid]).float()
    expected = F.cross_entropy(logits[:, :TEXT_VOCAB], batch.ce_labels[valid], reduction="sum") / valid.numel()
    assert torch.allclose(out.ce.detach(), expected, rtol=1e-5)
    over_all_rows = F.cross_entropy(logits, batch.ce_labels[valid], reduction="sum") / valid.numel()
    assert not torch.allclose(out.ce.detach(), over_all_rows, rtol=1e-5)

    model.zero_grad()
    out.ce.backward()
    grad = model.language_model.lm_head.weight.grad
    assert grad[:TEXT_VOCAB].abs().sum() > 0 and grad[TEXT_VOCAB:].abs().sum() == 0
