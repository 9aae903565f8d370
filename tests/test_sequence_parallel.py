"""Ulysses sequence parallelism: S gloo ranks sharing one pack give the loss and the gradients of one rank
holding all of it (fp32, within 1e-5); the 6 s 480p v2v pair, skipped at the released 65,536-token budget,
packs and trains at the long-video budget; a real SP = 2 step through Ray Train + DeepSpeed (slow)."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lance_core.config import model_preset
from lance_core.flow import LossConfig, compute_losses, noise_latents
from lance_core.model import build_model
from lance_core.model.sequence_parallel import SequenceParallel, kv_repeats, new_sequence_parallel
from lance_core.packing import (
    StepPacker,
    TokenBudgetError,
    VisualInput,
    build_generation_sample,
    pack_samples,
    pad_batch,
)
from lance_core.synthetic import synthetic_mix
from lance_core.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
MIX = ("t2i", "i2i", "v2v", "i2t", "v2t", "i2t")
"""Generation and understanding samples; with S = 4 the last chunk holds no GEN token."""
RELEASED_BUDGET = 65_536
LONG_CONFIG = ROOT / "jobs" / "configs" / "train_video_long.yaml"
SCALE = 16
"""The tiny-width run scales the 6 s pair and both budgets down by this factor."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mix_pack(cfg):
    return pack_samples(synthetic_mix(ByteTokenizer(), cfg, tasks=MIX), cfg)


def _v2v_pair(tokenizer, latent_grid, vit_grid, latent_channels, vit_dim, seed=0):
    """A v2v edit pair: ViT + clean VAE source, noisy VAE target, both clips of ``latent_grid``."""
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = latent_grid
    source = VisualInput(latents=torch.randn(frames, height, width, latent_channels, generator=gen),
                         vit_features=torch.randn(vit_grid[0] * vit_grid[1] * vit_grid[2], vit_dim, generator=gen),
                         vit_grid=vit_grid, is_video=True)
    target = torch.randn(frames, height, width, latent_channels, generator=gen)
    return build_generation_sample(tokenizer, "v2v", "make it night", target, source=source)


def _long_pack(cfg):
    """The 6 s 854x480 pair scaled down by SCALE at tiny width (latent 18x30x53 -> 7x16x16, ViT 35x16x29 ->
    4x16x16), packed under the long budget / SCALE."""
    sample = _v2v_pair(ByteTokenizer(), (7, 16, 16), (4, 16, 16), cfg.latent_channels, cfg.hidden_size)
    packer = StepPacker(_long_budget() // SCALE)
    samples = packer.next_pack(lambda generation: sample, need_generation=True)[:1]
    assert packer.skipped == 0
    return pack_samples(samples, cfg)


def _long_budget() -> int:
    from jobs.config_io import read_yaml

    return read_yaml(LONG_CONFIG)["data"]["token_budget"]


def _setup(pack_name: str, backend: str, policy: str):
    cfg = model_preset("tiny", attention_backend=backend)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.activation_checkpointing = policy
    batch = _long_pack(cfg) if pack_name == "long" else _mix_pack(cfg)
    noised = noise_latents(batch, LossConfig(), torch.Generator().manual_seed(1))
    return model, batch, noised


def _loss_and_grads(model, batch, noised, sp=None, reducer=None):
    out = compute_losses(model, batch, LossConfig(), noised=noised, count_reducer=reducer, run_all_heads=True,
                         sequence_parallel=sp)
    out.total.backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters() if p.requires_grad}
    return out.total.detach(), grads


def _sum_over_world(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _rank_main(rank: int, world: int, port: int, pack_name: str, backend: str, policy: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sp = new_sequence_parallel(world)
        model, batch, noised = _setup(pack_name, backend, policy)
        model.train()
        loss, grads = _loss_and_grads(model, batch, noised, sp, _sum_over_world)
        loss = _sum_over_world(loss)
        for grad in grads.values():
            dist.all_reduce(grad)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def _sequence_parallel_result(tmp_path: Path, world: int, pack_name: str = "mix", backend: str = "per_sample",
                              policy: str = "none") -> dict:
    out = tmp_path / f"sp{world}.pt"
    mp.spawn(_rank_main, args=(world, _free_port(), pack_name, backend, policy, str(out)), nprocs=world)
    return torch.load(out)


def _assert_same_as_one_rank(got: dict, pack_name: str = "mix", backend: str = "per_sample") -> None:
    model, batch, noised = _setup(pack_name, backend, "none")
    loss, grads = _loss_and_grads(model, batch, noised)
    assert abs(float(got["loss"]) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))
    assert got["grads"].keys() == grads.keys()
    worst = max((got["grads"][n] - g).abs().max().item() for n, g in grads.items())
    assert worst <= 1e-5, worst
    assert sum(float(g.abs().sum()) for n, g in grads.items() if "_moe_gen" in n) > 0


# ---------------------------------------------------------------------------------------------- pieces
def test_kv_heads_are_repeated_to_whole_heads_per_rank():
    assert kv_repeats(4, 2, 2) == 1 and kv_repeats(4, 2, 4) == 2 and kv_repeats(16, 2, 8) == 4
    assert kv_repeats(16, 2, 16) == 8 and kv_repeats(16, 4, 2) == 1
    with pytest.raises(ValueError, match="num_heads"):
        kv_repeats(4, 2, 3)
    assert kv_repeats(12, 3, 4) == 4 and kv_repeats(6, 3, 2) == 2


def test_chunks_of_a_padded_pack_reassemble_it(tiny_cfg):
    batch = _mix_pack(tiny_cfg)
    size = 4
    chunks = [SequenceParallel(None, size, r).local_batch(batch) for r in range(size)]
    padded = pad_batch(batch, -(-len(batch) // size) * size)
    assert len(padded) % size == 0 and len(padded) - len(batch) < size
    assert {len(c) for c in chunks} == {len(padded) // size}
    assert torch.equal(torch.cat([c.position_ids for c in chunks], dim=1), padded.position_ids)
    assert torch.equal(torch.cat([c.is_gen for c in chunks]), padded.is_gen)
    assert sum(c.vae_positions.numel() for c in chunks) == batch.vae_positions.numel()
    assert sum(c.num_real_tokens for c in chunks) == batch.num_real_tokens
    pad = padded.task_index < 0
    assert (padded.sample_index[pad] > batch.sample_index.max()).all() and not padded.mse_mask[pad].any()


def test_config_checks_workers_and_heads():
    from pipelines.train.config import load_train_config

    assert load_train_config({"scaling": {"workers": 4, "sequence_parallel": 4}}).scaling.sequence_parallel == 4
    with pytest.raises(ValueError, match="must divide scaling.workers"):
        load_train_config({"scaling": {"workers": 3, "sequence_parallel": 2}})
    with pytest.raises(ValueError, match="num_heads"):
        load_train_config({"scaling": {"workers": 3, "sequence_parallel": 3}})


# ---------------------------------------------------------------------------------------------- parity
def test_two_ranks_give_the_loss_and_gradients_of_one(tmp_path):
    """t2i, i2i, v2v, i2t and v2t in one pack, per-sample attention, 4 query / 2 KV heads over 2 ranks."""
    _assert_same_as_one_rank(_sequence_parallel_result(tmp_path, 2))


@pytest.mark.slow
def test_four_ranks_repeat_the_two_kv_heads(tmp_path):
    """S = 4 > 2 KV heads: each KV head is repeated for two ranks; dense SDPA; layer recomputation. One rank's
    chunk has no GEN token: it still runs the GEN modules (on zero rows), as the other ranks do."""
    chunks = [SequenceParallel(None, 4, r).local_batch(_mix_pack(model_preset("tiny"))) for r in range(4)]
    assert not chunks[-1].is_gen.any() and all(c.is_gen.any() for c in chunks[:-1])
    _assert_same_as_one_rank(_sequence_parallel_result(tmp_path, 4, backend="sdpa", policy="layer"), backend="sdpa")


# ---------------------------------------------------------------------------------------------- long video
def test_the_6s_480p_v2v_pair_packs_at_the_long_budget_only():
    """73,559 tokens under the release's rules: skipped at 65,536 tokens, packed at the long-video budget."""
    from jobs.config_io import read_yaml
    from lance_core.tokenizer import load_tokenizer_for
    from pipelines.train.config import load_train_config

    cfg = load_train_config(read_yaml(LONG_CONFIG))
    model_cfg = cfg.model.build()
    assert model_cfg.preset == "lance-3b-video" and cfg.scaling.sequence_parallel > 1
    tokenizer = load_tokenizer_for(model_cfg, cfg.model.tokenizer)
    lat = torch.zeros(1, 1, 1, 1).expand(18, 30, 53, model_cfg.latent_channels)  # 480x848, 69 frames
    source = VisualInput(latents=lat, vit_features=torch.zeros(1, 1).expand(35 * 16 * 29, model_cfg.hidden_size),
                         vit_grid=(35, 16, 29), is_video=True)
    sample = build_generation_sample(tokenizer, "v2v", "make it night", lat, source=source)
    assert sample.num_tokens == 73_559
    small = _v2v_pair(tokenizer, (1, 2, 2), (1, 2, 2), model_cfg.latent_channels, 4)
    assert 18 * 30 * 53 <= cfg.data.resolution.max_video_tokens
    for budget, fits in ((RELEASED_BUDGET, False), (cfg.data.token_budget, True)):
        draws = itertools.chain([sample, sample], itertools.repeat(small))
        packer = StepPacker(budget)
        pack = packer.next_pack(lambda generation, draws=draws: next(draws), need_generation=True)
        assert (packer.skipped == 0) == fits and (pack[0] is sample) == fits
    assert cfg.data.token_budget // cfg.scaling.sequence_parallel <= RELEASED_BUDGET  # per rank: the released size


@pytest.mark.slow
def test_scaled_long_pair_trains_on_two_ranks(tmp_path):
    """The pair scaled down by SCALE at tiny width: skipped at 65,536 / SCALE, packed at the long budget /
    SCALE, and the SP = 2 loss and gradients equal one rank's."""
    cfg = model_preset("tiny")
    sample = _v2v_pair(ByteTokenizer(), (7, 16, 16), (4, 16, 16), cfg.latent_channels, cfg.hidden_size)
    short = StepPacker(RELEASED_BUDGET // SCALE)
    with pytest.raises(TokenBudgetError):
        short.next_pack(lambda generation: sample, need_generation=True)
    assert short.skipped > 0
    assert RELEASED_BUDGET // SCALE < sample.num_tokens <= _long_budget() // SCALE
    _assert_same_as_one_rank(_sequence_parallel_result(tmp_path, 2, "long", policy="selective"), "long")


# ---------------------------------------------------------------------------------------------- Ray Train
@pytest.mark.slow
def test_ray_train_step_with_two_sequence_parallel_workers(latents, tmp_path):
    """2 workers, one sequence-parallel group: the step's pack is counted once, and the step-1 loss (summed
    over the two ranks' chunks) is the loss of that pack on one rank, recomputed here from the same data,
    weights and noise."""
    import zlib

    from jobs.config_io import read_yaml
    from lance_core.tokenizer import load_tokenizer_for
    from pipelines.train.config import load_train_config
    from pipelines.train.data import PackLoader
    from pipelines.train.trainer import build_initial_model
    from pipelines.train.mixture import MixtureSchedule
    from pipelines.train.driver import run_training

    data = read_yaml(ROOT / "jobs" / "configs" / "train_tiny.yaml")
    data.update(name="sp2", output=str(tmp_path), steps=2)
    data["data"] = {**data["data"], "uris": [str(latents)]}
    data["scaling"] = {**data["scaling"], "workers": 2, "sequence_parallel": 2}
    data["mixture"] = {"weights": data["mixture"]["weights"]}
    data["checkpoint"] = {"every_steps": 2, "keep_last": 1, "export_safetensors": False}
    data["eval"] = {**data["eval"], "samples": False}
    cfg = load_train_config(data)
    result = run_training(cfg)
    rows = result.metrics
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] is not None for r in rows)

    model_cfg, model = build_initial_model(cfg)
    schedule = MixtureSchedule(cfg.mixture, list(result.plan.task_rows))
    loader = PackLoader(result.plan, cfg.data, model_cfg, load_tokenizer_for(model_cfg, cfg.model.tokenizer), 0, 1,
                        cfg.seed, need_generation=True)
    pack = loader.build_pack(schedule.weights(1))
    with torch.no_grad():
        want = compute_losses(model, pack.batch, cfg.loss, torch.Generator().manual_seed(cfg.seed * 1000),
                              run_all_heads=True)
    first = rows[0]
    assert first["data_hash"] == zlib.crc32("|".join(pack.keys).encode())
    assert first["tokens"] == pack.batch.num_real_tokens and first["samples"] == pack.batch.num_samples
    assert first["loss"] == pytest.approx(float(want.total), rel=1e-5)
    assert first["mse"] == pytest.approx(float(want.mse), rel=1e-5)
