import itertools
from dataclasses import replace

import pytest
import torch

from lance_core.packing import (
    IGNORE_INDEX,
    MAX_CONSECUTIVE_SKIPS,
    TASKS,
    VAE_CLEAN,
    VAE_NOISY,
    VIT,
    Sample,
    StepPacker,
    TokenBudgetError,
    VisualInput,
    build_generation_sample,
    build_understanding_sample,
    pack_samples,
)
from lance_core.synthetic import synthetic_mix


def test_every_task_packs_with_consistent_fields(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=1)
    size = sum(s.num_tokens for s in samples) + 100
    batch = pack_samples(samples, tiny_cfg, pad_to=size)
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


def test_understanding_ce_covers_answer_and_im_end(tokenizer, tiny_cfg):
    media = VisualInput(vit_features=torch.randn(4, 64), vit_grid=(1, 2, 2))
    sample = build_understanding_sample(tokenizer, "i2t", media, "what?", "a cat")
    batch = pack_samples([sample], tiny_cfg)
    targets = batch.ce_labels[batch.ce_labels != IGNORE_INDEX].tolist()
    assert targets == tokenizer.encode("a cat") + [tokenizer.special.im_end]


def test_text_is_tokenised_stripped(tokenizer):
    """A caption, question or answer with surrounding whitespace (an older shard's "a cat\\n") gives the
    tokens of the stripped text: no extra newline token before ``<|im_end|>``."""
    target = torch.randn(1, 2, 2, 48)
    media = VisualInput(vit_features=torch.randn(4, 64), vit_grid=(1, 2, 2))

    assert len(tokenizer.encode("a cat\n")) > len(tokenizer.encode("a cat")), "the newline is a token"

    def ids(sample: Sample) -> list[int]:
        return torch.cat([span.token_ids for span in sample.spans]).tolist()

    for caption in ("a cat\n", "  a cat ", "\ta cat\r\n"):
        assert ids(build_generation_sample(tokenizer, "t2i", caption, target)) == \
            ids(build_generation_sample(tokenizer, "t2i", "a cat", target))
    assert ids(build_understanding_sample(tokenizer, "i2t", media, " what?\n", "a cat\n")) == \
        ids(build_understanding_sample(tokenizer, "i2t", media, "what?", "a cat"))


def test_i2v_first_latent_frame_is_clean_and_lossless(tokenizer, tiny_cfg):
    target = torch.randn(3, 2, 2, 48)
    sample = build_generation_sample(tokenizer, "i2v", "walk", target, first_frame_clean=True)
    batch = pack_samples([sample], tiny_cfg)
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
        pack_samples(samples, tiny_cfg, pad_to=10)


def test_token_slice_splits_prefix_and_noise(tokenizer, tiny_cfg):
    batch = pack_samples([build_generation_sample(tokenizer, "t2i", "x", torch.randn(1, 2, 2, 48))], tiny_cfg)
    start = int(torch.nonzero(batch.span_noise)[0])
    prefix, noisy = batch.token_slice(0, start), batch.token_slice(start, len(batch))
    assert len(prefix) + len(noisy) == len(batch)
    assert prefix.vae_positions.numel() == 0 and noisy.vae_positions.tolist() == [1, 2, 3, 4]
    assert torch.equal(noisy.position_ids, batch.position_ids[:, start:])


def _numbered_stream(samples, oversize, oversize_at: int):
    """Samples cycled forever, each with its own key, and ``oversize`` once after ``oversize_at`` of them."""
    for number, sample in enumerate(itertools.cycle(samples)):
        if number == oversize_at:
            yield oversize
        yield replace(sample, key=str(number))


def test_step_packer_buffers_skips_and_loses_nothing(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=3)
    budget = max(s.num_tokens for s in samples) + 50
    huge = build_generation_sample(tokenizer, "t2i", "x", torch.randn(1, 40, 40, 48), key="huge")
    stream = _numbered_stream(samples, huge, oversize_at=5)
    drawn = []

    def draw(generation: bool) -> Sample:
        sample = next(s for s in stream if s.has_gen or not generation)
        drawn.append(sample.key)
        return sample

    packer = StepPacker(budget, buffer_size=4)
    packs = [packer.next_pack(draw, need_generation=True) for _ in range(12)]
    assert packer.skipped == 1
    packed = [s.key for p in packs for s in p] + [s.key for s in packer.buffer]
    assert sorted(packed) == sorted(k for k in drawn if k != "huge")
    assert all(sum(s.num_tokens for s in p) <= budget and p[0].has_gen for p in packs)
    assert len(packer.buffer) <= 4
    fill = sum(s.num_tokens for p in packs for s in p) / (budget * len(packs))
    assert fill > 0.6


def test_step_packer_names_the_budget_when_nothing_fits(tokenizer):
    huge = build_generation_sample(tokenizer, "t2i", "x", torch.randn(1, 8, 8, 48))
    packer = StepPacker(20)
    with pytest.raises(TokenBudgetError, match=f"exceed the token budget of 20 \\(smallest {huge.num_tokens}"):
        packer.next_pack(lambda generation: huge, need_generation=False)
    assert packer.skipped == MAX_CONSECUTIVE_SKIPS


def test_token_slice_keeps_visual_rows_whatever_their_width(tokenizer):
    """A visual tensor whose width equals the pack's length (latent channels = tokens) stays per visual token."""
    from lance_core.config import model_preset
    from lance_core.synthetic import synthetic_sample

    length = len(pack_samples([synthetic_sample("t2i", tokenizer, model_preset("tiny"), 0)], model_preset("tiny")))
    cfg = model_preset("tiny", latent_channels=length, vae={"latent_channels": length})
    batch = pack_samples([synthetic_sample("t2i", tokenizer, cfg, 0)], cfg)
    assert len(batch) == length == batch.vae_latents.shape[-1]
    start = int(batch.vae_positions[0])
    head, tail = batch.token_slice(0, start), batch.token_slice(start, length)
    assert head.vae_latents.shape == (0, length) and tail.vae_latents.shape == batch.vae_latents.shape
    assert len(head) + len(tail) == length
