"""The per-worker training function run by Ray Train's ``TorchTrainer``.

Ray has set up the process group (gloo on CPU, NCCL on GPU); DeepSpeed is imported here and reuses it.
Each step: take the next pack from the loader thread, compute CE + MSE with global token counts, skip the
step on every rank if any rank's loss is not finite, backward + step through the DeepSpeed engine, reduce
and write the metrics, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from lance_core.checkpoint import load_lance_checkpoint, load_qwen25vl_weights
from lance_core.flops import count_parameters
from lance_core.flow import compute_losses
from lance_core.model import build_model
from lance_core.packing import GENERATION_TASKS, TASKS
from lance_core.tokenizer import load_tokenizer_for
from pipelines.runtime.run_log import worker_logging

from . import checkpoints as ckpt
from .config import TrainConfig
from .data import PackLoader
from .deepspeed_config import build_deepspeed_config
from .evaluate import HeldOut, SampleWriter
from .metrics import ExpertGradProbe, MetricsWriter, copy_file_atomic, pack_flops, peak_tflops, task_loss_sums
from .mixture import MixtureSchedule
from .plan import DataPlan
from .progress import StepProgress

FREEZE_GROUPS = {
    "embed_tokens": lambda n: n.startswith("language_model.model.embed_tokens."),
    "lm_head": lambda n: n.startswith("language_model.lm_head."),
    "und": lambda n: (".layers." in n and "_moe_gen" not in n) or n.startswith("language_model.model.norm."),
    "gen": lambda n: (".layers." in n and "_moe_gen" in n) or n.startswith("language_model.model.norm_moe_gen."),
    "vae_io": lambda n: n.startswith(("vae2llm.", "llm2vae.", "time_embedder.")),
}
log = logging.getLogger("lance.train")


def freeze(model: torch.nn.Module, groups: tuple[str, ...]) -> int:
    frozen = 0
    for name, param in model.named_parameters():
        if any(FREEZE_GROUPS[g](name) for g in groups):
            param.requires_grad_(False)
            frozen += getattr(param, "ds_numel", param.numel())  # a ZeRO-3 partition holds only a share
    return frozen


def build_initial_model(cfg: TrainConfig, zero3_config: dict | None = None):
    """The model to train, seeded, with its initial weights and frozen groups. With ``zero3_config`` the
    parameters are created partitioned (ZeRO-3 ``zero.Init``) and end up with the same values."""
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model.build()
    if zero3_config is None:
        model = build_model(model_cfg)
        _load_initial_weights(cfg, model)
    else:
        model = _build_partitioned(cfg, model_cfg, zero3_config)
    model.gradient_checkpointing = cfg.deepspeed.activation_checkpointing
    freeze(model, cfg.freeze)
    return model_cfg, model


def _load_initial_weights(cfg: TrainConfig, model) -> None:
    if cfg.model.init_qwen:
        load_qwen25vl_weights(model, cfg.model.init_qwen)
    if cfg.model.init_lance:
        load_lance_checkpoint(model, cfg.model.init_lance)


def _gather_module(module: torch.nn.Module):
    """One module's own parameters made whole; rank 0's values are scattered back on exit."""
    import deepspeed

    params = list(module.parameters(recurse=False))
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0) if params else nullcontext()


def _build_partitioned(cfg: TrainConfig, model_cfg, zero3_config: dict):
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=zero3_config):
        model = build_model(model_cfg)
    model.reset_parameters(gather=_gather_module)
    if cfg.model.init_qwen or cfg.model.init_lance:
        # Rank 0 alone reads the files into a whole copy (host memory of one model per job, not per rank).
        source = None
        if dist.get_rank() == 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                source = build_model(model_cfg)  # the same seeded values as the partitioned model
            _load_initial_weights(cfg, source)
        _scatter_from_rank0(model, source)
    return model


def _scatter_from_rank0(model, source) -> None:
    values = dict(source.named_parameters()) if source is not None else {}
    for prefix, module in model.named_modules():
        with _gather_module(module), torch.no_grad():
            if source is not None:
                for name, param in module.named_parameters(recurse=False):
                    param.copy_(values[f"{prefix}.{name}" if prefix else name])
    buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buffer in model.named_buffers():
        if source is not None:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    optim = cfg.optim
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=optim.fused)


def _all_reduce(values: list[float], op) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def heldout_score(heldout: dict[str, float]) -> float | None:
    """One number for comparing runs whatever their loss weights: mean generation MSE + 0.25 · mean
    understanding CE over the held-out rows (the released loss weights)."""
    gen = [v for t, v in heldout.items() if t in GENERATION_TASKS]
    und = [v for t, v in heldout.items() if t not in GENERATION_TASKS]
    if not gen and not und:
        return None
    return (sum(gen) / len(gen) if gen else 0.0) + 0.25 * (sum(und) / len(und) if und else 0.0)


def train_func(config: dict) -> None:
    """Ray Train's function on every worker. All output of the worker process goes to
    ``<log_dir>/logs/rank-N.log``; rank 0's ``lance`` log lines (progress) also go to the driver through
    ``config["log_sink"]`` when the driver made one."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with worker_logging(Path(config["run_dir"]) / "logs" / f"rank-{rank}.log",
                        config.get("log_sink") if rank == 0 else None):
        _train(config)


def _train(config: dict) -> None:
    import deepspeed
    import ray.train

    cfg = TrainConfig.model_validate_json(config["cfg"])
    plan = DataPlan.from_json(config["plan"])
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if on_gpu else "cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)))

    ds_config = build_deepspeed_config(cfg, on_gpu)
    zero_init = cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_init
    model_cfg, model = build_initial_model(cfg, ds_config if zero_init else None)
    probe = ExpertGradProbe(model) if cfg.metrics.expert_grad_check else None
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    module = engine.module
    named_trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    tokenizer = load_tokenizer_for(model_cfg, cfg.model.tokenizer)
    schedule = MixtureSchedule(cfg.mixture, list(plan.task_rows))
    need_generation = any(t in schedule.tasks for t in GENERATION_TASKS)
    loader = PackLoader(plan, cfg.data, model_cfg, tokenizer, rank, world, cfg.seed, need_generation)
    noise = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    held = HeldOut(plan, cfg.data, model_cfg, tokenizer)
    sampler = SampleWriter(model_cfg, tokenizer, held, cfg.eval)

    start, skipped_steps, pending = 0, 0, []
    ema = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            train_state, data_state, ema = ckpt.load_checkpoint(engine, Path(folder), rank, world)
        start, skipped_steps = train_state["step"], train_state["skipped_steps"]
        schedule.load_state_dict(train_state["mixture"])
        loader.load_state_dict(data_state["loader"])
        noise.set_state(data_state["noise_rng"])
        pending = [(int(k), w) for k, w in data_state["pending"]]
    if cfg.deepspeed.ema_decay is not None and ema is None:
        ema = {n: p.detach().clone() for n, p in named_trainable}
    if start == 0 and cfg.mixture.capability.enabled:
        schedule.update_capability(held.losses(module, model_cfg, cfg.loss, device, cfg.seed))
    if rank == 0:
        log.info(f"training from step {start} to {cfg.steps} on {world} worker(s); tasks {schedule.tasks}")

    next_ticket = start + len(pending) + 1
    while len(pending) < cfg.data.prefetch and next_ticket <= cfg.steps:
        pending.append((next_ticket, schedule.weights(next_ticket)))
        next_ticket += 1
    for _, weights in pending:
        loader.submit(weights)

    writer = MetricsWriter(run_dir, start, cfg.metrics.tensorboard) if rank == 0 else None
    progress = StepProgress(start, cfg.steps, cfg.metrics.report_every) if rank == 0 else None
    counts = count_parameters(build_model(model_cfg, device="meta"))
    peak, peak_source = peak_tflops(cfg.metrics.peak_tflops_per_worker, device) if rank == 0 else (0.0, "")
    report_losses: list[float] = []
    heldout_total = None

    def count_reducer(local: torch.Tensor) -> torch.Tensor:
        total = local.detach().clone()
        dist.all_reduce(total)
        return total

    for step in range(start + 1, cfg.steps + 1):
        began, cpu_began = time.perf_counter(), time.process_time()
        pack = loader.next()
        waited = time.perf_counter() - began
        ticket_step, weights = pending.pop(0)
        assert ticket_step == step, (ticket_step, step)
        if cfg.debug.kill_at_step == step and cfg.debug.kill_rank == rank:
            ckpt.kill_once(run_dir / "debug" / f"killed-rank{rank}-step{step}")
        batch = pack.batch.to(device)
        out = compute_losses(module, batch, cfg.loss, noise, count_reducer, run_all_heads=True)
        loss = out.total
        if cfg.debug.nan_at_step == step and cfg.debug.nan_rank == rank:
            loss = loss * float("nan")
        finite = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() > 0:
            engine.backward(loss * world)
            engine.step()
            if ema is not None:
                with torch.no_grad():
                    for name, param in named_trainable:
                        ema[name].lerp_(param.detach(), 1.0 - cfg.deepspeed.ema_decay)
        else:
            skipped_steps += 1
            if rank == 0:
                log.warning(f"step {step}: non-finite loss on a rank; step skipped on all ranks")
        und_grad, gen_grad = probe.take() if probe is not None else (float("nan"), float("nan"))
        step_seconds, step_cpu = time.perf_counter() - began, time.process_time() - cpu_began

        tasks = task_loss_sums(pack.batch, out.per_task).flatten().tolist()
        counters = pack.state["counters"]
        sums = _all_reduce([float(loss.detach()), float(out.ce.detach()), float(out.mse.detach()),
                            pack.batch.num_real_tokens, pack.batch.num_samples, pack.state["skipped"],
                            counters.get("bad_rows", 0), counters.get("filtered_rows", 0),
                            pack_flops(pack.batch, model_cfg, counts), zlib.crc32("|".join(pack.keys).encode()),
                            *tasks], dist.ReduceOp.SUM)
        maxes = _all_reduce([waited, pack.build_seconds, step_seconds, -und_grad, -gen_grad, step_cpu],
                            dist.ReduceOp.MAX)
        total, ce, mse, tokens, samples, skipped, bad_rows, filtered, flops, data_hash = sums[:10]
        per_task = torch.tensor(sums[10:]).view(4, len(TASKS))
        waited_max, build_max, step_max = maxes[:3]
        grad_norm = engine.get_global_grad_norm() if finite.item() > 0 else None
        row = {
            "step": step, "loss": _finite_or_none(total),
            "ce": _finite_or_none(ce) if per_task[1].sum() > 0 else None,
            "mse": _finite_or_none(mse) if per_task[3].sum() > 0 else None,
            "lr": engine.get_lr()[0], "grad_norm": _finite_or_none(float(grad_norm)) if grad_norm is not None else None,
            "tokens": int(tokens), "samples": int(samples), "tokens_per_s": tokens / step_max,
            "samples_per_s": samples / step_max, "step_time_s": step_max, "step_cpu_s": maxes[5],
            "data_wait_s": waited_max,
            "data_wait_share": waited_max / step_max, "pack_build_s": build_max,
            "pack_fill": tokens / (world * cfg.data.token_budget), "skipped_samples": int(skipped),
            "bad_rows": int(bad_rows), "filtered_rows": int(filtered), "skipped_steps": skipped_steps,
            "und_grad_min": -maxes[3], "gen_grad_min": -maxes[4], "data_hash": int(data_hash),
            "tflops": flops / step_max / 1e12,
            "mfu": flops / (maxes[5] if device.type == "cpu" else step_max) / (world * peak * 1e12) if peak else None,
            "mixture": {t: round(w, 6) for t, w in weights.items()},
        }
        for index, task in enumerate(TASKS):
            for kind, sum_row in (("ce", 0), ("mse", 2)):
                if per_task[sum_row + 1, index] > 0:
                    row[f"{kind}/{task}"] = float(per_task[sum_row, index] / per_task[sum_row + 1, index])

        capability = cfg.mixture.capability
        adapt = capability.enabled and step % capability.every_steps == 0
        if adapt or (cfg.eval.heldout_every and step % cfg.eval.heldout_every == 0):
            heldout = held.losses(module, model_cfg, cfg.loss, device, cfg.seed)
            row.update({f"heldout/{t}": v for t, v in heldout.items()})
            heldout_total = heldout_score(heldout)
            row["heldout_total"] = heldout_total
            if adapt:
                schedule.update_capability(heldout)
                row["capability"] = dict(schedule.capability)
        if next_ticket <= cfg.steps:
            pending.append((next_ticket, schedule.weights(next_ticket)))
            loader.submit(pending[-1][1])
            next_ticket += 1
        last = step == cfg.steps
        sample_now = cfg.eval.samples and (last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0))
        if sample_now and (rank == 0 or cfg.deepspeed.zero_stage == 3):
            result = sampler.write(module, step, run_dir / "samples" if rank == 0 else None, cfg.seed)
            if rank == 0:
                row["eval"] = result
        if writer is not None:
            writer.write(row | {"peak_tflops": peak, "peak_source": peak_source} if step == start + 1 else row)
            progress.add(row)
        if row["loss"] is not None:
            report_losses.append(row["loss"])

        metrics = {"step": step, "loss": row["loss"], "loss_avg": sum(report_losses) / max(len(report_losses), 1),
                   "tokens_per_s": row["tokens_per_s"], "skipped_steps": skipped_steps}
        if heldout_total is not None:
            metrics["heldout_total"] = heldout_total
        if last or step % cfg.checkpoint.every_steps == 0:
            folder = ckpt.new_local_folder(f"lance-ckpt-{rank}-")
            train_state = {"step": step, "world_size": world, "skipped_steps": skipped_steps,
                           "mixture": schedule.state_dict(), "name": cfg.name}
            data_state = {"loader": pack.state, "pending": pending, "noise_rng": noise.get_state()}
            ckpt.save_checkpoint(engine, folder, rank, train_state, data_state, ema)
            if last and cfg.checkpoint.export_safetensors:
                exported = ckpt.export_safetensors(engine, cfg.deepspeed.zero_stage, folder, rank, ema,
                                                   {"step": step, "stage": cfg.stage, "run": cfg.name})
                if exported is not None:
                    copy_file_atomic(exported, run_dir / ckpt.EXPORT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")
            ckpt.remove_local_folder(folder)
            report_losses = []
        elif step % cfg.metrics.report_every == 0:
            ray.train.report(metrics)
            report_losses = []
    loader.close()
    if writer is not None:
        writer.close()
        (run_dir / "plan_issues.json").write_text(json.dumps(
            {"issues": dict(plan.issues), "messages": plan.messages, "task_rows": plan.task_rows}, indent=2))
