"""The training worker: one ``Trainer`` per rank, under Ray Train (``train_func``) or ``torchrun``
(pipelines/train/torch_launch.py); the launcher's part is a :class:`~pipelines.train.session.TrainSession`.

The launcher has set up the process group (gloo on CPU, NCCL on GPU); DeepSpeed is imported here and reuses
it. Each step: take the next pack from the loader thread, compute CE + MSE with global token counts, skip
the step on every rank if any rank's loss is not finite, backward + step through the DeepSpeed engine,
update the fp32 EMA, reduce and write the metrics, evaluate, checkpoint. Every collective goes through
pipelines/runtime/collectives.py, on the process group's device.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lance_core.checkpoint import load_lance_checkpoint, load_qwen25vl_weights
from lance_core.flops import count_parameters
from lance_core.flow import compute_losses, loss_token_counts
from lance_core.model import build_model
from lance_core.model.sequence_parallel import new_sequence_parallel
from lance_core.packing import GENERATION_TASKS, TASKS
from lance_core.tokenizer import load_tokenizer_for
from pipelines.runtime.checkpointing import DamagedCheckpointError, verify_checkpoint
from pipelines.runtime.collectives import all_ranks_true, all_reduce_named, broadcast_from, sum_over_ranks
from pipelines.runtime.devices import pick_device
from pipelines.runtime.ema import ShardedEMA
from pipelines.runtime.finite_steps import step_if_finite
from pipelines.runtime.local_files import copy_file_atomic
from pipelines.runtime.run_log import MetricsLog, worker_logging

from . import checkpoints as ckpt
from .config import TrainConfig, check_global_packs
from .data import PackLoader
from .deepspeed_config import build_deepspeed_config, lr_scheduler_factory, use_bf16
from .evaluate import HeldOut, SampleWriter
from .metrics import ExpertGradProbe, pack_flops, peak_tflops, task_loss_sums
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
# DeepSpeed's ZeRO calls these under their old names every step; the warning says nothing to a user
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")


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
    model.activation_checkpointing = cfg.deepspeed.activation_checkpointing
    freeze(model, cfg.freeze)
    return model_cfg, model


def _load_initial_weights(cfg: TrainConfig, model) -> None:
    if cfg.model.weights.qwen:
        load_qwen25vl_weights(model, cfg.model.weights.qwen)
    if cfg.model.weights.lance:
        load_lance_checkpoint(model, cfg.model.weights.lance)


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
    if cfg.model.weights.qwen or cfg.model.weights.lance:
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
        broadcast_from(buffer, src=0)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    optim = cfg.optim
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=optim.fused)


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
    from .session import RayTrainSession

    session = RayTrainSession(async_upload=TrainConfig.model_validate_json(config["cfg"]).checkpoint.async_save)
    with worker_logging(Path(config["run_dir"]) / "logs" / f"rank-{session.rank}.log",
                        config.get("log_sink") if session.rank == 0 else None):
        Trainer(config, session).run()


@dataclass
class StepOutcome:
    """What one training step leaves for its metrics row, before any reduction across ranks."""

    packs: list[Any]
    """This rank's packs of the step, one per accumulation micro-batch (its pack slots)."""
    losses: list[Any]
    """``compute_losses``' output of each pack."""
    loss: torch.Tensor
    """The rank's total loss over its packs (made NaN at ``debug.nan_at_step``)."""
    weights: dict[str, float]
    """The mixture weights the pack was drawn with."""
    applied: bool
    """False when some rank's loss was not finite and every rank skipped the update."""
    waited: float
    step_seconds: float
    step_cpu: float
    und_grad: float
    gen_grad: float


class Trainer:
    """One worker's training run: the model in a DeepSpeed engine, the pack loader and mixture schedule,
    resumed from Ray Train's checkpoint when there is one; then ``run`` takes steps ``start + 1 .. steps``.
    Rank 0 writes the metrics rows; every rank takes part in each collective call, in the same order."""

    def __init__(self, config: dict, session) -> None:
        self.cfg = cfg = TrainConfig.model_validate_json(config["cfg"])
        self.plan = DataPlan.load(config["plan"])
        self.run_dir = Path(config["run_dir"])
        self.session = session
        self.rank, self.world = session.rank, session.world
        self.device = pick_device(cfg.scaling.use_gpu, session.local_rank)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.set_device(self.device)
        torch.set_num_threads(cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)))
        # ranks of one sequence-parallel group share a pack: data parallelism runs over the groups
        sp_size = cfg.scaling.sequence_parallel
        self.sp = new_sequence_parallel(sp_size)
        self.dp_rank, self.dp_world = self.rank // sp_size, self.world // sp_size
        # the global batch is cut into pack slots; the data position is kept per slot, so any data-parallel
        # width that divides the slot count resumes it
        self.accumulation = check_global_packs(cfg.data.global_packs, self.dp_world)
        self.global_packs = self.dp_world * self.accumulation
        self.slots = list(range(self.dp_rank * self.accumulation, (self.dp_rank + 1) * self.accumulation))

        self.saving: ckpt.BackgroundSave | None = None
        """The checkpoint whose files a background thread is writing (``checkpoint.async_save``)."""
        self._build_engine(on_gpu)
        self._build_data()
        self._resume_newest_intact()
        if self.start == 0 and cfg.mixture.capability.enabled:
            self.schedule.update_capability(self._heldout_losses())
        if self.rank == 0:
            groups = f" ({self.dp_world} data-parallel x {sp_size} sequence-parallel)" if self.sp else ""
            log.info(f"training from step {self.start} to {cfg.steps} on {self.world} worker(s){groups}; "
                     f"tasks {self.schedule.tasks}")
        self._queue_first_tickets()
        self._build_reporting()

    # ------------------------------------------------------------------------------------------------ set-up
    def _build_engine(self, on_gpu: bool) -> None:
        import deepspeed

        cfg = self.cfg
        ds_config = build_deepspeed_config(cfg, on_gpu, self.accumulation)
        zero_init = cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_init
        self.model_cfg, model = build_initial_model(cfg, ds_config if zero_init else None)
        self.probe = ExpertGradProbe(model) if cfg.metrics.expert_grad_check else None
        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                    lr_scheduler=lr_scheduler_factory(cfg), dist_init_required=False)
        self.module = self.engine.module
        self.named_trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        decay = cfg.deepspeed.ema_decay
        self.ema = ShardedEMA(self.named_trainable, decay) if decay is not None else None
        self.compute_dtype = torch.bfloat16 if use_bf16(cfg, on_gpu) else torch.float32

    def _build_data(self) -> None:
        cfg, model_cfg = self.cfg, self.model_cfg
        tokenizer = load_tokenizer_for(model_cfg, cfg.model.tokenizer)
        self.schedule = MixtureSchedule(cfg.mixture, list(self.plan.task_rows))
        need_generation = any(t in self.schedule.tasks for t in GENERATION_TASKS)
        self.loaders = [PackLoader(self.plan, cfg.data, model_cfg, tokenizer, slot, self.global_packs, cfg.seed,
                                   need_generation, pin_memory=self.device.type == "cuda") for slot in self.slots]
        self.noises = [torch.Generator().manual_seed(cfg.seed * 1000 + slot) for slot in self.slots]
        self.held = HeldOut(self.plan, cfg.data, model_cfg, tokenizer)
        self.sampler = SampleWriter(model_cfg, tokenizer, self.held, cfg.eval, self.device, self.compute_dtype)

    def _resume_newest_intact(self) -> None:
        """Resume from the newest checkpoint every rank finds intact (its manifests check out); a damaged one is
        named and skipped. Starts afresh when there is none; raises when every one is damaged."""
        damaged = []
        with self.session.resume_candidates() as candidates:
            for folder in candidates:
                state = folder / ckpt.TRAIN_STATE
                world = json.loads(state.read_text())["world_size"] if state.is_file() else None
                reason = verify_checkpoint(folder, world) if world is not None else f"no {ckpt.TRAIN_STATE}"
                if all_ranks_true(reason is None):
                    if damaged and self.rank == 0:
                        log.warning(f"resuming from {folder.name}, the newest intact checkpoint")
                    self._resume(folder)
                    return
                damaged.append(f"{folder.name}: {reason or 'damaged on another rank'}")
                if self.rank == 0:
                    log.error(f"checkpoint {folder.name} is damaged ({reason or 'on another rank'}); trying the one "
                              "before it")
        if damaged:
            raise DamagedCheckpointError("no intact checkpoint to resume from: " + "; ".join(damaged))
        self._resume(None)

    def _resume(self, folder: Path | None) -> None:
        """Engine, EMA, step, skipped-step count, mixture, loader and noise state and queued tickets from the
        checkpoint in ``folder`` (None: a fresh start)."""
        self.start, self.skipped_steps = 0, 0
        self.pending: list[tuple[int, dict[str, float]]] = []
        if folder is not None:
            train_state, data_states = ckpt.load_checkpoint(self.engine, folder, self.slots, self.global_packs,
                                                            self.ema)
            self.start, self.skipped_steps = train_state["step"], train_state["skipped_steps"]
            self.schedule.load_state_dict(train_state["mixture"])
            for loader, noise, data_state in zip(self.loaders, self.noises, data_states):
                loader.load_state_dict(data_state["loader"])
                noise.set_state(data_state["noise_rng"])
            self.pending = [(int(k), w) for k, w in data_states[0]["pending"]]
            if self.rank == 0 and train_state["world_size"] != self.world:
                log.info(f"resuming a run of {train_state['world_size']} workers on {self.world}: its "
                         f"{self.global_packs} pack slots take {self.accumulation} micro-batch(es) per rank")

    def _queue_first_tickets(self) -> None:
        """Up to ``data.prefetch`` steps' mixture weights handed to the loader thread ahead of their step."""
        self.next_ticket = self.start + len(self.pending) + 1
        while len(self.pending) < self.cfg.data.prefetch and self.next_ticket <= self.cfg.steps:
            self.pending.append((self.next_ticket, self.schedule.weights(self.next_ticket)))
            self.next_ticket += 1
        for _, weights in self.pending:
            for loader in self.loaders:
                loader.submit(weights)

    def _queue_next_ticket(self) -> None:
        if self.next_ticket <= self.cfg.steps:
            self.pending.append((self.next_ticket, self.schedule.weights(self.next_ticket)))
            for loader in self.loaders:
                loader.submit(self.pending[-1][1])
            self.next_ticket += 1

    def _build_reporting(self) -> None:
        cfg, lead = self.cfg, self.rank == 0
        self.writer = MetricsLog(self.run_dir, "step", cfg.metrics.tensorboard) if lead else None
        if self.writer is not None:
            self.writer.resume_at(self.start + 1)
        self.progress = StepProgress(self.start, cfg.steps, cfg.metrics.report_every) if lead else None
        self.counts = count_parameters(build_model(self.model_cfg, device="meta"))
        no_peak = (0.0, "")
        self.peak, self.peak_source = peak_tflops(cfg.metrics.peak_tflops_per_worker, self.device) if lead else no_peak
        self.report_losses: list[float] = []
        self.heldout_total: float | None = None

    # ------------------------------------------------------------------------------------------------ steps
    def run(self) -> None:
        for step in range(self.start + 1, self.cfg.steps + 1):
            outcome = self.train_step(step)
            row = self.metrics_row(step, outcome)
            self.evaluate(step, row)
            self._queue_next_ticket()
            last = step == self.cfg.steps
            self.write_samples(step, row, last)
            self._write_row(step, row)
            self._finish_save(wait=False)
            self.report(step, row, outcome.packs, last)
        self.close()

    def train_step(self, step: int) -> StepOutcome:
        """Take the step's packs (one per slot of this rank) and compute their losses, each divided by the
        global batch's token counts, one backward per pack; update the weights on every rank, or on none
        when any rank's loss or gradient is not finite."""
        cfg = self.cfg
        began, cpu_began = time.perf_counter(), time.process_time()
        packs = [loader.next() for loader in self.loaders]
        waited = time.perf_counter() - began
        ticket_step, weights = self.pending.pop(0)
        assert ticket_step == step, (ticket_step, step)
        if cfg.debug.kill_at_step == step and cfg.debug.kill_rank == self.rank:
            ckpt.kill_once(self.run_dir / "debug" / f"killed-rank{self.rank}-step{step}")
        batches = [pack.batch.to(self.device, non_blocking=True) for pack in packs]
        # every rank of a sequence-parallel group counts the same packs: the sum over all ranks / S is the
        # global batch's count
        local = sum(loss_token_counts(batch, self.model_cfg.logit_rows) for batch in batches)
        global_counts = sum_over_ranks(local) / (self.sp.size if self.sp is not None else 1)
        outs, total, finite = [], None, True
        for micro, batch in enumerate(batches):
            out = compute_losses(self.module, batch, cfg.loss, self.noises[micro], lambda _: global_counts,
                                 run_all_heads=True, sequence_parallel=self.sp)
            loss = out.total
            if cfg.debug.nan_at_step == step and cfg.debug.nan_rank == self.rank:
                loss = loss * float("nan")
            finite = finite and bool(torch.isfinite(loss.detach()).all())
            # DeepSpeed divides by the accumulation steps and averages over the ranks: undo both, so the
            # gradient is that of the global batch's loss
            self.engine.backward(loss * self.world * self.accumulation)
            if micro < len(batches) - 1:
                self.engine.step()
            outs.append(out)
            total = loss.detach() if total is None else total + loss.detach()
        applied = self._update(step, finite)
        und_grad, gen_grad = self.probe.take() if self.probe is not None else (float("nan"), float("nan"))
        step_seconds, step_cpu = time.perf_counter() - began, time.process_time() - cpu_began
        return StepOutcome(packs, outs, total, weights, applied, waited, step_seconds, step_cpu, und_grad,
                           gen_grad)

    def _update(self, step: int, loss_finite: bool) -> bool:
        """The optimizer step at the accumulation boundary, skipped on every rank (and counted) when some rank's
        loss or gradient is not finite."""
        if not all_ranks_true(loss_finite):
            step_if_finite(self.engine, False)
            self.skipped_steps += 1
            if self.rank == 0:
                log.warning(f"step {step}: non-finite loss on a rank; step skipped on all ranks")
            return False
        if not step_if_finite(self.engine):
            self.skipped_steps += 1
            if self.rank == 0:
                log.warning(f"step {step}: non-finite gradient on a rank; step skipped on all ranks")
            return False
        if self.ema is not None:
            with torch.no_grad():
                self.ema.update()
        return True

    # ------------------------------------------------------------------------------------------------ metrics
    def _reduce_step(self, outcome: StepOutcome) -> dict:
        """The step's figures over all ranks: sums of losses and counts, the slowest rank's times, the
        smallest expert gradient norm."""
        packs, outs = outcome.packs, outcome.losses
        counters = [pack.state["counters"] for pack in packs]
        # the packs' figures once per sequence-parallel group; the losses are each rank's own chunk's
        once = 1 if self.sp is None or self.sp.rank == 0 else 0

        def packs_sum(value) -> float:
            return once * sum(value(pack, counter) for pack, counter in zip(packs, counters))

        def losses_of(pack):
            return pack.batch if self.sp is None else self.sp.local_batch(pack.batch)

        return all_reduce_named(
            sums={"loss": float(outcome.loss), "ce": sum(float(out.ce.detach()) for out in outs),
                  "mse": sum(float(out.mse.detach()) for out in outs),
                  "tokens": packs_sum(lambda p, c: p.batch.num_real_tokens),
                  "samples": packs_sum(lambda p, c: p.batch.num_samples),
                  "skipped_samples": packs_sum(lambda p, c: p.state["skipped"]),
                  "bad_rows": packs_sum(lambda p, c: c.get("bad_rows", 0)),
                  "filtered_rows": packs_sum(lambda p, c: c.get("filtered_rows", 0)),
                  "flops": packs_sum(lambda p, c: pack_flops(p.batch, self.model_cfg, self.counts)),
                  "data_hash": packs_sum(lambda p, c: zlib.crc32("|".join(p.keys).encode())),
                  "task_sums": sum(task_loss_sums(losses_of(pack), out.per_task) for pack, out in zip(packs, outs))},
            maxes={"unreadable_shards": max(c.get("unreadable_shards", 0) for c in counters),
                   "data_wait_s": outcome.waited, "pack_build_s": sum(pack.build_seconds for pack in packs),
                   "step_time_s": outcome.step_seconds, "step_cpu_s": outcome.step_cpu},
            mins={"und_grad": outcome.und_grad, "gen_grad": outcome.gen_grad})

    def metrics_row(self, step: int, outcome: StepOutcome) -> dict:
        """The step's row of ``metrics.jsonl`` (every rank computes it; rank 0 writes it)."""
        r = self._reduce_step(outcome)
        # task_loss_sums' rows (CE sums, CE counts, MSE sums, MSE counts) in float32, as they always were
        # divided: the per-task means keep their values.
        per_task = r["task_sums"].float()
        tokens, samples, flops, step_max = r["tokens"], r["samples"], r["flops"], r["step_time_s"]
        grad_norm = self.engine.get_global_grad_norm() if outcome.applied else None
        on_cpu = self.device.type == "cpu"
        row = {
            "step": step, "loss": _finite_or_none(r["loss"]),
            "ce": _finite_or_none(r["ce"]) if per_task[1].sum() > 0 else None,
            "mse": _finite_or_none(r["mse"]) if per_task[3].sum() > 0 else None,
            "lr": self.engine.get_lr()[0],
            "grad_norm": _finite_or_none(float(grad_norm)) if grad_norm is not None else None,
            "tokens": int(tokens), "samples": int(samples), "tokens_per_s": tokens / step_max,
            "samples_per_s": samples / step_max, "step_time_s": step_max, "step_cpu_s": r["step_cpu_s"],
            "data_wait_s": r["data_wait_s"], "data_wait_share": r["data_wait_s"] / step_max,
            "pack_build_s": r["pack_build_s"], "pack_fill": tokens / (self.global_packs * self.cfg.data.token_budget),
            "skipped_samples": int(r["skipped_samples"]), "bad_rows": int(r["bad_rows"]),
            "unreadable_shards": int(r["unreadable_shards"]),
            "filtered_rows": int(r["filtered_rows"]), "skipped_steps": self.skipped_steps,
            "und_grad_min": r["und_grad"], "gen_grad_min": r["gen_grad"], "data_hash": int(r["data_hash"]),
            "tflops": flops / step_max / 1e12,
            "mfu": flops / (r["step_cpu_s"] if on_cpu else step_max) / (self.world * self.peak * 1e12)
            if self.peak else None,
            "mixture": {t: round(w, 6) for t, w in outcome.weights.items()},
        }
        for index, task in enumerate(TASKS):
            for kind, sum_row in (("ce", 0), ("mse", 2)):
                if per_task[sum_row + 1, index] > 0:
                    row[f"{kind}/{task}"] = float(per_task[sum_row, index] / per_task[sum_row + 1, index])
        return row

    def _write_row(self, step: int, row: dict) -> None:
        if self.writer is not None:
            first = step == self.start + 1
            self.writer.append(row | {"peak_tflops": self.peak, "peak_source": self.peak_source} if first else row)
            self.progress.add(row)
        if row["loss"] is not None:
            self.report_losses.append(row["loss"])

    # ------------------------------------------------------------------------------------------------ evaluation
    def _heldout_losses(self) -> dict[str, float]:
        return self.held.losses(self.module, self.model_cfg, self.cfg.loss, self.device, self.cfg.seed)

    def evaluate(self, step: int, row: dict) -> None:
        """Held-out losses into ``row`` every ``eval.heldout_every`` steps, and the capability rule's
        mixture update every ``mixture.capability.every_steps``."""
        capability = self.cfg.mixture.capability
        adapt = capability.enabled and step % capability.every_steps == 0
        heldout_every = self.cfg.eval.heldout_every
        if not (adapt or (heldout_every and step % heldout_every == 0)):
            return
        heldout = self._heldout_losses()
        row.update({f"heldout/{t}": v for t, v in heldout.items()})
        self.heldout_total = heldout_score(heldout)
        row["heldout_total"] = self.heldout_total
        if adapt:
            self.schedule.update_capability(heldout)
            row["capability"] = dict(self.schedule.capability)

    def write_samples(self, step: int, row: dict, last: bool) -> None:
        """Generated samples under ``samples/`` at the last step and every ``eval.every_steps`` (all ranks
        take part under ZeRO-3, where generating gathers the partitioned weights)."""
        cfg = self.cfg
        sample_now = cfg.eval.samples and (last or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0))
        if sample_now and (self.rank == 0 or cfg.deepspeed.zero_stage == 3):
            result = self.sampler.write(self.module, step, self.run_dir / "samples" if self.rank == 0 else None,
                                        cfg.seed)
            if self.rank == 0:
                row["eval"] = result

    # ------------------------------------------------------------------------------------------------ reports
    def report(self, step: int, row: dict, packs: list, last: bool) -> None:
        """The launcher's report: with a checkpoint every ``checkpoint.every_steps`` and at the last step,
        without one every ``metrics.report_every``."""
        metrics = {"step": step, "loss": row["loss"],
                   "loss_avg": sum(self.report_losses) / max(len(self.report_losses), 1),
                   "tokens_per_s": row["tokens_per_s"], "skipped_steps": self.skipped_steps}
        if self.heldout_total is not None:
            metrics["heldout_total"] = self.heldout_total
        if last or step % self.cfg.checkpoint.every_steps == 0:
            self.save_checkpoint(step, packs, metrics, last)
            self.report_losses = []
        elif step % self.cfg.metrics.report_every == 0:
            self.session.report(metrics, step)
            self.report_losses = []

    def save_checkpoint(self, step: int, packs: list, metrics: dict, last: bool) -> None:
        """This rank's share of the checkpoint (engine, train and data state, EMA), handed to the launcher
        with ``metrics``; at the last step also the exported safetensors when configured."""
        cfg = self.cfg
        folder = self.session.checkpoint_folder(step)
        train_state = {"step": step, "world_size": self.world, "global_packs": self.global_packs,
                       "skipped_steps": self.skipped_steps, "mixture": self.schedule.state_dict(), "name": cfg.name}
        writes_slots = self.sp is None or self.sp.rank == 0  # a sequence-parallel group shares its slots
        data_states = {slot: {"loader": pack.state, "pending": list(self.pending), "noise_rng": noise.get_state()}
                       for slot, pack, noise in zip(self.slots, packs, self.noises)} if writes_slots else {}
        self._finish_save(wait=True)  # one save at a time
        write = ckpt.snapshot_checkpoint(self.engine, folder, self.rank, train_state, data_states, self.ema)
        export_now = cfg.checkpoint.export_safetensors and (last or cfg.checkpoint.export_every)
        if cfg.checkpoint.async_save and not last:
            self.saving = ckpt.BackgroundSave(step, folder, metrics, write)
        else:
            write()
        if export_now:
            exported = ckpt.export_safetensors(self.engine, cfg.deepspeed.zero_stage, folder, self.rank, self.ema,
                                               {"step": step, "stage": cfg.stage, "run": cfg.name})
            if exported is not None and cfg.checkpoint.export_every:
                copy_file_atomic(exported, self.run_dir / "exports" / f"model_step{step:07d}.safetensors")
            if exported is not None and last:
                copy_file_atomic(exported, self.run_dir / ckpt.EXPORT_FILE)
        if self.saving is None:
            self.session.report(metrics, step, folder)

    def _finish_save(self, wait: bool) -> None:
        """Report the checkpoint being written in the background once every rank has written its share (with
        ``wait``: after waiting for it); a failure to write it stops the run on every rank."""
        if self.saving is None or not all_ranks_true(self.saving.finished(wait)):
            return
        saving, self.saving = self.saving, None
        if not all_ranks_true(saving.error is None):
            raise RuntimeError(f"checkpoint of step {saving.step} could not be written "
                               f"({saving.error or 'on another rank'})") from saving.error
        self.session.report(saving.metrics, saving.step, saving.folder)

    def close(self) -> None:
        self._finish_save(wait=True)
        for loader in self.loaders:
            loader.close()
        self.sampler.close()
        if self.writer is not None:
            self.writer.close()
            (self.run_dir / "plan_issues.json").write_text(json.dumps(
                {"issues": dict(self.plan.issues), "messages": self.plan.messages,
                 "task_rows": self.plan.task_rows}, indent=2))
