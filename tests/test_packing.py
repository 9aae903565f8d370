import pytest
import torch

from lance_core.packing import (
    IGNORE_INDEX,
    TASKS,
    VAE_CLEAN,
    VAE_NOISY,
    VIT,
    TokenBudgetPacker,
    VisualInput,
    build_generation_sample,
    build_understanding_sample,
    pack_samples,
)
from lance_core.synthetic import synthetic_mix


def test_every_task_packs_with_consistent_fields(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=1)
    size = sum(s.num_tokens for s in samples) + 100
    batch = pack_samples(samples, pad_to=size)
    assert len(batch) == size and batch.num_real_tokens == sum(s.num_tokens for s in samples)
    assert batch.sample_tasks == list(TASKS)
    assert batch.position_ids.shape == (3, size)
    assert torch.equal(batch.is_gen[batch.vae_positions], torch.ones(len(batch.vae_positions), dtype=torch.bool))
    assert not batch.is_gen[batch.vit_positions].any()
    assert (batch.token_kind[batch.vit_positions] == VIT).all()
    # one noisy target per generation sample, MSE only on its noisy tokens
    assert batch.num_targets == 6
    assert torch.equal(batch.mse_mask, batch.target_index >= 0)
    assert (batch.token_kind[batch.mse_mask] == VAE_NOISY).all()
    # CE only in the understanding samples, labels are the next token
    ce_pos = torch.nonzero(batch.ce_labels != IGNORE_INDEX).squeeze(1)
    assert set(batch.task_index[ce_pos].tolist()) == {TASKS.index("i2t"), TASKS.index("v2t")}
    assert torch.equal(batch.ce_labels[ce_pos], batch.input_ids[ce_pos + 1])
    # padding is its own sample with no loss
    pad = batch.task_index == -1
    assert int(pad.sum()) == size - batch.num_real_tokens
    assert (batch.sample_index[pad] == len(samples)).all()


def test_understanding_ce_covers_answer_and_im_end(tokenizer):
    media = VisualInput(vit_features=torch.randn(4, 64), vit_grid=(1, 2, 2))
    sample = build_understanding_sample(tokenizer, "i2t", media, "what?", "a cat")
    batch = pack_samples([sample])
    targets = batch.ce_labels[batch.ce_labels != IGNORE_INDEX].tolist()
    assert targets == tokenizer.encode("a cat") + [tokenizer.special.im_end]


def test_i2v_first_latent_frame_is_clean_and_lossless(tokenizer):
    target = torch.randn(3, 2, 2, 48)
    sample = build_generation_sample(tokenizer, "i2v", "walk", target, first_frame_clean=True)
    batch = pack_samples([sample])
    noisy_span = torch.nonzero(batch.span_noise).squeeze(1)
    assert len(noisy_span) == 12 + 2  # with <|vision_start|> and <|vision_end|>
    latents = noisy_span[1:-1]
    assert (batch.token_kind[latents[:4]] == VAE_CLEAN).all()
    assert not batch.mse_mask[latents[:4]].any() and batch.mse_mask[latents[4:]].all()
    assert not batch.mse_mask[noisy_span[[0, -1]]].any() and not batch.is_gen[noisy_span[[0, -1]]].any()


def test_noisy_target_keeps_its_markers_and_closes_the_turn(tokenizer):
    sample = build_generation_sample(tokenizer, "t2i", "x", torch.randn(1, 2, 2, 48))
    target, closing = sample.spans[-2:]
    assert target.mode == "noise" and target.bracketed
    assert target.token_ids[[0, -1]].tolist() == [tokenizer.special.vision_start, tokenizer.special.vision_end]
    assert closing.mode == "causal" and closing.token_ids.tolist() == [tokenizer.special.im_end]


def test_unknown_task_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="not a generation task"):
        build_generation_sample(tokenizer, "t2x", "x", torch.randn(1, 2, 2, 48))


def test_pack_overflow_names_sizes(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=1, tasks=("t2i",))
    with pytest.raises(ValueError, match="do not fit"):
        pack_samples(samples, pad_to=10)


def test_token_slice_splits_prefix_and_noise(tokenizer):
    batch = pack_samples([build_generation_sample(tokenizer, "t2i", "x", torch.randn(1, 2, 2, 48))])
    start = int(torch.nonzero(batch.span_noise)[0])
    prefix, noisy = batch.token_slice(0, start), batch.token_slice(start, len(batch))
    assert len(prefix) + len(noisy) == len(batch)
    assert prefix.vae_positions.numel() == 0 and noisy.vae_positions.tolist() == [1, 2, 3, 4]
    assert torch.equal(noisy.position_ids, batch.position_ids[:, start:])


def test_budget_packer_buffers_and_skips(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=3)
    lengths = [s.num_tokens for s in samples]
    budget = max(lengths) + 50
    huge = build_generation_sample(tokenizer, "t2i", "x", torch.randn(1, 40, 40, 48))
    packer = TokenBudgetPacker(budget, buffer_size=4)
    packs = list(packer.packs(samples + [huge]))
    assert packer.skipped == 1
    assert sorted(s.key for p in packs for s in p) == sorted(s.key for s in samples)
    assert all(sum(s.num_tokens for s in p) <= budget for p in packs)
    fill = sum(lengths) / (budget * len(packs))
    assert fill > 0.6
