"""The GPU check's parts that run the jobs' own code: the training worker under the torch launcher (no Ray),
and one GRPO learner update.

``training``: for ZeRO-2 and ZeRO-3, the ``Trainer`` (pipelines/train/trainer.py) trains the plan's model
(``lance-3b`` widths, a few layers) on synthetic shards in bf16 with the fp32 EMA on, saves a checkpoint,
then a second launch resumes it under another activation-checkpointing policy, trains on, saves and
exports. Checked: the resumed run starts where the first stopped, every loss is finite, the export loads
into the model and holds the EMA's weights. Figures: tokens/s, MFU and step time (the training metrics,
steps after each launch's first), peak GPU memory.

``grpo_learner``: a GRPO learner (pipelines/rl/learner.py) in fp32 and in bf16 samples one group with the
rollout's SDE sampler, then takes one clipped-objective update; checked: the first ratio is 1 (the update
reproduces the rollout's log-probs), loss and gradient norm finite, the weights changed.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from pathlib import Path

import torch

from bench.gpu.harness import error_text, peak_gib, reset_peak, section_status

POLICIES = {2: ("none", "selective"), 3: ("layer", "none")}
"""Activation checkpointing of the first and the resumed launch, per ZeRO stage: every policy runs."""


def train_config(plan, shards: Path, output: Path, name: str, zero_stage: int, policy: str, steps: int):
    from pipelines.train.config import load_train_config

    on_gpu = plan.device == "cuda"
    return load_train_config({
        "stage": "custom", "name": name, "output": str(output), "steps": steps, "seed": 0,
        "model": {"preset": plan.preset, "overrides": model_overrides(plan), "tokenizer": "byte"},
        "data": {"uris": [str(shards)], "token_budget": plan.train_tokens, "buffer_size": 8, "holdout_per_task": 1,
                 "caption_dropout": 0.0, "condition_dropout": 0.0},
        "mixture": {"weights": dict.fromkeys(("t2i", "t2v", "i2i", "v2v", "i2t", "v2t"), 1.0)},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "deepspeed": {"zero_stage": zero_stage, "precision": "bf16" if plan.dtype == "bfloat16" else "fp32",
                      "ema_decay": 0.9999, "activation_checkpointing": policy},
        "scaling": {"workers": 1, "use_gpu": on_gpu, "cpus_per_worker": 1,
                    "threads_per_worker": torch.get_num_threads()},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "eval": {"samples": False},
        "metrics": {"report_every": 1, "tensorboard": False},
    })


def model_overrides(plan) -> dict:
    """The plan's layers; two latent frames for the video tasks where the preset has one (the position
    table is not trained, so its size changes no FLOPs)."""
    return {"num_layers": plan.layers, **({"max_latent_frames": 2} if plan.preset == "lance-3b" else {})}


def write_shards(plan, root: Path) -> Path:
    from lance_core.config import model_preset
    from pipelines.train.synthetic_shards import write_synthetic_shards

    cfg = model_preset(plan.preset, **model_overrides(plan))
    return write_synthetic_shards(root, cfg, rows_per_task=plan.rows_per_task, latent_side=plan.image_side)


def _launch(cfg) -> tuple[object, float]:
    from pipelines.train.torch_launch import run_torch_training

    started = time.perf_counter()
    result = run_torch_training(cfg)
    return result, time.perf_counter() - started


def _export_holds_the_ema(result, cfg) -> tuple[bool, str]:
    """The exported trained weights equal the checkpoint's fp32 EMA, rounded to the model's dtype."""
    from safetensors.torch import load_file

    from lance_core.checkpoint import load_lance_checkpoint
    from lance_core.model import build_model
    from pipelines.runtime.ema import ShardedEMA

    model = build_model(cfg.model.build(), device="cpu")
    load_lance_checkpoint(model, result.export)  # strict: every tensor of the model, shapes checked
    exported = load_file(str(result.export))
    ema = load_file(str(ShardedEMA.shard_path(Path(result.checkpoint), 0)))
    worst = max(float((exported[name].float().reshape(-1) - value.to(exported[name].dtype).float()).abs().max())
                for name, value in ema.items())
    return worst == 0.0, f"{len(ema)} EMA tensors, max |export - EMA| {worst:.3g}"


def measure_training(plan, device: torch.device, work: Path) -> dict:
    from pipelines.train.metrics import read_metrics

    shards = write_shards(plan, work / "latents")
    section: dict = {"config": {"preset_widths": plan.preset, "layers": plan.layers, "dtype": plan.dtype,
                                "token_budget": plan.train_tokens, "ema_decay": 0.9999}, "rows": [], "checks": []}
    for zero_stage, (first, second) in POLICIES.items():
        row = {"zero_stage": zero_stage, "policies": f"{first} -> {second}", "status": "error", "reason": None}
        name = f"zero{zero_stage}"
        try:
            reset_peak(device)
            run1, seconds1 = _launch(train_config(plan, shards, work / "runs", name, zero_stage, first, 2))
            cfg2 = train_config(plan, shards, work / "runs", name, zero_stage, second, 4)
            run2, seconds2 = _launch(cfg2)
            rows = read_metrics(run2.run_dir)
            timed = [r for r in rows if r["step"] in (2, 4)]  # the second step of each launch: warm
            ok_export, export_note = _export_holds_the_ema(run2, cfg2)
            checks = {
                f"{name}: first launch checkpointed step 2": Path(run1.checkpoint or "").name == "checkpoint_0000002",
                f"{name}: resumed at step 3 and trained to 4": [r["step"] for r in rows] == [1, 2, 3, 4],
                f"{name}: every loss finite, no step skipped":
                    all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)
                    and rows[-1]["skipped_steps"] == 0,
                f"{name}: export loads and holds the fp32 EMA ({export_note})": ok_export,
            }
            section["checks"] += [{"check": k, "passed": bool(v)} for k, v in checks.items()]
            row.update(status="ok" if all(checks.values()) else "error",
                       reason=None if all(checks.values()) else "a check failed",
                       tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
                       step_ms=statistics.median(r["step_time_s"] for r in timed) * 1e3,
                       tflops=statistics.median(r["tflops"] for r in timed),
                       mfu=statistics.median(r["mfu"] for r in timed) if all(r.get("mfu") for r in timed) else None,
                       tokens=timed[-1]["tokens"], launch_s=[seconds1, seconds2], peak_mem_gib=peak_gib(device))
        except Exception as err:  # noqa: BLE001 - recorded; the next stage still runs
            row.update(status="error", reason=error_text(err))
            section["checks"].append({"check": f"{name}: train, checkpoint, resume, export", "passed": False,
                                      "detail": error_text(err)})
        finally:
            gc.collect()
        section["rows"].append(row)
    section["status"] = section_status(section["rows"])
    return section


# ----------------------------------------------------------------------------------------------- GRPO
def grpo_config(plan, precision: str) -> dict:
    return {
        "seed": 0, "epochs": 1,
        "model": {"preset": plan.preset, "overrides": {"num_layers": plan.layers}, "tokenizer": "byte"},
        "rollout": {"group_size": 4, "prompts_per_epoch": 1, "image_size": plan.grpo_image_side,
                    "sampler": {"steps": 4, "window_size": 2}},
        "learner": {"kl_weight": 0.04, "actor": {"num_gpus": 1 if plan.device == "cuda" else 0,
                                                 "torch_threads": torch.get_num_threads()}},
        "optim": {"lr": 1e-5},
        "deepspeed": {"zero_stage": 2, "precision": precision, "ema_decay": 0.999},
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_payload(learner, text: str, seed: int) -> dict:
    """One group sampled as a rollout worker samples it (pipelines/rl/rollout.py), with the learner's policy."""
    import random

    from lance_core.rl import sample_group, sde_window

    sampler = learner.cfg.rollout.sampler
    group = learner.cfg.rollout.group_size
    window = sde_window(sampler, random.Random(seed))
    cond, uncond = learner.policy.group_prefixes(text, group)
    trajectory = sample_group(learner.policy.model, cond, uncond, sampler, group, window,
                              torch.Generator().manual_seed(seed))
    return {"group_id": 0, "text": text, "window": trajectory.window, "timesteps": trajectory.timesteps,
            "states": trajectory.states.cpu(), "log_probs": trajectory.log_probs.cpu(), "version": 0}


def measure_grpo_learner(plan, device: torch.device) -> dict:
    from pipelines.rl.learner import Learner

    section: dict = {"rows": [], "checks": []}
    for precision in ("fp32", "bf16"):
        row = {"precision": precision, "status": "error", "reason": None}
        try:
            reset_peak(device)
            learner = Learner(grpo_config(plan, precision))
            learner.start(("127.0.0.1", _free_port()))
            before = {n: p.detach().float().clone() for n, p in learner.policy.trained().items()}
            payload = _group_payload(learner, 'a sign that says "lance"', seed=1)
            started = time.perf_counter()
            metrics = learner.train_groups([payload], [[1.0, -1.0, 0.5, -0.5]])
            seconds = time.perf_counter() - started
            moved = max(float((p.detach().float() - before[n]).abs().max())
                        for n, p in learner.policy.trained().items())
            checks = {
                f"grpo {precision}: first ratio is 1 (old log-probs reproduced)":
                    metrics["ratio_first_update_max_dev"] < (1e-4 if precision == "fp32" else 5e-2),
                f"grpo {precision}: loss and gradient norm finite":
                    math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]),
                f"grpo {precision}: the update changed the weights": moved > 0,
            }
            section["checks"] += [{"check": k, "passed": bool(v)} for k, v in checks.items()]
            row.update(status="ok" if all(checks.values()) else "error",
                       reason=None if all(checks.values()) else "a check failed", update_ms=seconds * 1e3,
                       first_ratio_dev=metrics["ratio_first_update_max_dev"], loss=metrics["loss"],
                       grad_norm=metrics["grad_norm"], weights_moved=moved, peak_mem_gib=peak_gib(device))
            del learner
        except Exception as err:  # noqa: BLE001 - recorded; the other precision still runs
            row.update(status="error", reason=error_text(err))
            section["checks"].append({"check": f"grpo {precision}: sample, update", "passed": False,
                                      "detail": error_text(err)})
        finally:
            gc.collect()
        section["rows"].append(row)
    section["status"] = section_status(section["rows"])
    return section
