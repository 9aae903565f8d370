"""The prepared GPU check: the jobs' own code on one GPU machine, each part with PASS / FAIL lines and its
figures in one JSON.

    bash bench/gpu/run.sh [--dry-run]     # fresh box without network: the wheels of fetch_wheels.sh, then this
    python bench/gpu/check.py [--dry-run] [--out FILE] [--layers N] [--budget-s S]

Parts, each in its own function and guarded (a failure is recorded and the next part runs):

- ``environment``: torch, CUDA, the device, flash-attn, the MFU peak and a bf16 matmul of this run.
- ``training`` (bench/gpu/train_check.py): the training worker under torch.distributed (no Ray; NCCL on the
  GPU) at ``lance-3b`` widths with ``--layers`` layers, bf16, fp32 EMA, ZeRO-2 and ZeRO-3, every activation
  checkpointing policy, save -> resume -> export; tokens/s and MFU from the training metrics.
- ``grpo_learner`` (bench/gpu/train_check.py): one GRPO learner update in fp32 and in bf16.
- ``attention``: forward and backward of the training loss on one pack of every task with each backend
  (flash varlen, flex, SDPA per sample) against the dense SDPA reference in fp32; tokens/s and MFU per backend.
- ``evaluation``: held-out losses and generated samples (KV-cached image and video, a caption) as the trainer
  runs them, with the number of attention compilations against the distinct sequence lengths seen.
- ``encoders``: the precompute's VAE and ViT at the production batch size in the encoders' dtype, a 69-frame
  480p clip (6 s at 12 fps) included; peak memory.
- ``nccl_broadcast``: GB/s of a broadcast across the GPUs (skipped, with the reason, on one GPU).

The GPU run has a total time budget (``--budget-s``) shared among the parts by weight, and a watchdog that
records the part still running when it is overrun. ``--dry-run`` runs the same code on the CPU at the
``tiny`` preset's sizes (gloo in place of NCCL), with no budget: it is not timed, so a loaded machine slows it
but cannot fail it; what cannot run as on the GPU (flash-attn, flex backward) says why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from bench.common import RESULTS, load_average, print_table
from bench.gpu.harness import (
    GIB,
    Budget,
    Report,
    error_text,
    peak_gib,
    reset_peak,
    section_status,
    share_until,
    sync,
    timed_calls,
)

PARTS = {"environment": 0.2, "training": 4.0, "grpo_learner": 1.0, "attention": 2.5, "evaluation": 1.0,
         "encoders": 2.0, "nccl_broadcast": 0.3}
"""The parts in order, each with its weight: the share of the time left that it may spend."""
BACKENDS = ("flash", "flex", "per_sample")
PARITY_TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}
"""Relative L2 distance of the loss and of the gradients to the fp32 dense reference, per compute dtype."""


@dataclass(frozen=True)
class Plan:
    """Sizes and settings of one mode (GPU or dry run)."""

    dry_run: bool
    device: str
    dtype: str
    preset: str
    layers: int
    image_side: int
    """Latent tokens per side of the synthetic images and video frames."""
    train_tokens: int
    """Token budget of a training pack."""
    rows_per_task: int
    parity_tokens: int
    """Tokens of the pack the attention backends are compared on (the dense reference is L²)."""
    speed_tokens: int
    grpo_image_side: int
    warmup: int
    max_reps: int
    vae_image_side: int
    vae_batch: int
    clip: tuple[int, int, int]
    """(frames, height, width) of the video clip the encoders take."""
    vit_side: int
    vit_batch: int
    broadcast_bytes: tuple[int, ...]
    broadcast_reps: int
    min_part_s: float


def make_plan(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        return Plan(dry_run=True, device="cpu", dtype="bfloat16" if cpu_runs_bf16() else "float32", preset="tiny",
                    layers=args.layers or 2, image_side=4, train_tokens=1024, rows_per_task=6, parity_tokens=768,
                    speed_tokens=1024, grpo_image_side=32, warmup=1, max_reps=2, vae_image_side=32, vae_batch=2,
                    clip=(9, 48, 80), vit_side=56, vit_batch=2, broadcast_bytes=(2**20,), broadcast_reps=3,
                    min_part_s=0.0)
    # lance-3b widths with 2 layers: ~1.0 B parameters (the 151,936 x 2,048 embedding and lm_head are 0.6 B);
    # 256-token images (16² latents) so a 16k-token pack holds some 40 samples of every task
    return Plan(dry_run=False, device="cuda", dtype="bfloat16", preset="lance-3b", layers=args.layers or 2,
                image_side=16, train_tokens=16384, rows_per_task=24, parity_tokens=8192, speed_tokens=32768,
                grpo_image_side=256, warmup=2, max_reps=8, vae_image_side=768, vae_batch=8, clip=(69, 480, 848),
                vit_side=616, vit_batch=8, broadcast_bytes=(64 * 2**20, GIB), broadcast_reps=10, min_part_s=10.0)


def cpu_runs_bf16() -> bool:
    """Whether this CPU's torch runs the model's bf16 ops (matmul with backward, conv3d)."""
    try:
        a = torch.randn(8, 8, dtype=torch.bfloat16, requires_grad=True)
        (a @ a).sum().backward()
        torch.nn.functional.conv3d(torch.randn(1, 2, 3, 4, 4, dtype=torch.bfloat16),
                                   torch.randn(2, 2, 3, 3, 3, dtype=torch.bfloat16))
        return True
    except (RuntimeError, NotImplementedError):
        return False


# ------------------------------------------------------------------------------------------- parts
def measure_environment(plan: Plan, device: torch.device) -> dict:
    from pipelines.train.metrics import peak_tflops, probe_cuda_peak_tflops

    env = {"status": "ok", "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": str(device), "dtype": plan.dtype, "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "load_average": load_average(),
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=props.total_memory / GIB)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as err:
        env["triton"] = None if device.type == "cpu" else error_text(err)
    env["flash_attn"] = flash_attn_status()
    env["peak_tflops"], env["peak_source"] = peak_tflops(None, device)
    if device.type == "cuda":
        env["matmul_tflops"], env["matmul_source"] = probe_cuda_peak_tflops(device), "bf16 8192³ matmul, wall time"
    else:  # on the CPU the MFU peak is already the measured fp32 matmul rate
        env["matmul_tflops"], env["matmul_source"] = env["peak_tflops"], env["peak_source"]
    return env


def flash_attn_status() -> dict:
    """Whether flash-attn imports, as ``lance_core.model.attention`` sees it, and why not."""
    from lance_core.model import attention

    try:
        import flash_attn

        version, error = getattr(flash_attn, "__version__", "?"), None
    except Exception as err:  # noqa: BLE001 - an ABI mismatch raises ImportError, OSError...
        version, error = None, error_text(err)
    return {"available": attention.flash_attn_func is not None, "version": version, "error": error}


def model_config(plan: Plan, backend: str):
    """The preset's widths with ``plan.layers`` layers; two latent frames for the synthetic video tasks."""
    from lance_core.config import model_preset

    frames = {"max_latent_frames": 2} if plan.preset == "lance-3b" else {}
    return model_preset(plan.preset, num_layers=plan.layers, attention_backend=backend, **frames)


def fill_pack(cfg, tokens: int, image_side: int):
    """Synthetic samples of every task in turn, each added while it fits ``tokens``."""
    from lance_core.packing import TASKS, pack_samples
    from lance_core.synthetic import synthetic_sample
    from lance_core.tokenizer import ByteTokenizer

    tokenizer, samples, used, misses, index = ByteTokenizer(), [], 0, 0, 0
    while misses < len(TASKS):
        sample = synthetic_sample(TASKS[index % len(TASKS)], tokenizer, cfg, index, image_side)
        index += 1
        if used + sample.num_tokens <= tokens:
            samples.append(sample)
            used += sample.num_tokens
            misses = 0
        else:
            misses += 1
    if not samples:
        raise ValueError(f"{tokens} tokens hold no sample (the smallest takes a few hundred tokens)")
    return pack_samples(samples, cfg)


def backend_choice(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str | None, bool]:
    """(backend to run, why it is not ``requested`` or not as on the GPU, whether backward runs)."""
    from lance_core.model.attention import describe_backend

    try:
        backend, _ = describe_backend(requested, device, dtype)
        reason = None
    except RuntimeError as err:
        backend, _ = describe_backend("auto", device, dtype)
        reason = f"{err} -> {backend} instead"
    if backend == "flex" and device.type != "cuda":
        return backend, (reason + "; " if reason else "") + "torch flex attention has no CPU backward: forward only", False
    return backend, reason, True


def loss_and_grads(model, batch, noised, backward: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training loss (fp32) and, with ``backward``, every gradient flattened (fp32, on the CPU)."""
    from lance_core.flow import LossConfig, compute_losses

    model.zero_grad(set_to_none=True)
    if not backward:
        with torch.no_grad():
            return compute_losses(model, batch, LossConfig(), noised=noised).total.float().cpu(), None
    loss = compute_losses(model, batch, LossConfig(), noised=noised).total
    loss.backward()
    grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.detach().float().cpu(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def measure_attention(plan: Plan, device: torch.device, env: dict, deadline: float) -> dict:
    """Each backend against the dense fp32 reference on the parity pack, then timed on the speed pack."""
    from lance_core.flops import count_parameters
    from lance_core.flow import LossConfig, noise_latents
    from lance_core.model import build_model
    from pipelines.train.metrics import pack_flops

    dtype = getattr(torch, plan.dtype)
    cfg = model_config(plan, "sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)  # fp32: the reference
    parity_cpu = fill_pack(cfg, plan.parity_tokens, plan.image_side)
    parity = parity_cpu.to(device)
    parity_noised = noise_latents(parity, LossConfig(), torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_grads(model, parity, parity_noised, backward=True)
    model.to(dtype)
    speed_cpu = fill_pack(cfg, plan.speed_tokens, plan.image_side)
    speed = speed_cpu.to(device)
    speed_noised = noise_latents(speed, LossConfig(), torch.Generator().manual_seed(0))
    counts = count_parameters(model)
    flops = pack_flops(speed_cpu, cfg, counts)
    section = {"config": {"preset_widths": plan.preset, "hidden_size": cfg.hidden_size, "layers": cfg.num_layers,
                          "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "dtype": plan.dtype},
               "parameters": counts.as_dict(),
               "parity_pack": {"tokens": len(parity_cpu), "samples": parity_cpu.num_samples,
                               "tasks": sorted(set(parity_cpu.sample_tasks))},
               "speed_pack": {"tokens": len(speed_cpu), "samples": speed_cpu.num_samples, "train_flops": flops},
               "rows": [], "checks": []}
    tolerance = PARITY_TOLERANCE[plan.dtype]
    for index, requested in enumerate(BACKENDS):
        row_deadline = share_until(deadline, 1.0, len(BACKENDS) - index)
        row = {"requested": requested, "status": "error", "reason": None}
        try:
            backend, reason, backward = backend_choice(requested, device, dtype)
            model.cfg = model_config(plan, backend)  # the backbone reads the backend from its config
            loss, grads = loss_and_grads(model, parity, parity_noised, backward)
            loss_error = relative(loss, ref_loss)
            grad_error = relative(grads, ref_grads) if grads is not None else None
            passed = loss_error < tolerance and (grad_error is None or grad_error < tolerance)
            section["checks"].append({"check": f"attention {requested}->{backend}: loss"
                                      f"{' and gradients' if backward else ''} match the fp32 dense reference "
                                      f"(rel. {loss_error:.2g}{f', {grad_error:.2g}' if grad_error is not None else ''}"
                                      f" < {tolerance:g})", "passed": passed})
            reset_peak(device)

            def step(backward=backward) -> None:
                loss_and_grads(model, speed, speed_noised, backward)

            times, warm = timed_calls(step, device, plan.warmup, plan.max_reps, row_deadline)
            seconds = statistics.median(times)
            tflops = flops * (1.0 if backward else 1 / 3) / seconds / 1e12  # forward alone: 2 of the 6
            row.update(backend=backend, status=("fallback" if reason else "ok") if passed else "error",
                       reason=reason if passed else f"differs from the reference; {reason or ''}".rstrip("; "),
                       passes="fwd+bwd" if backward else "fwd", loss_rel_error=loss_error, grad_rel_error=grad_error,
                       reps=len(times), warmup_s=warm, step_ms=seconds * 1e3,
                       tokens_per_s=speed_cpu.num_real_tokens / seconds, tflops=tflops,
                       mfu=tflops / env["peak_tflops"] if env.get("peak_tflops") else None,
                       peak_mem_gib=peak_gib(device))
        except Exception as err:  # noqa: BLE001 - recorded; the other backends still run
            row.update(status="error", reason=error_text(err))
            section["checks"].append({"check": f"attention {requested}", "passed": False, "detail": error_text(err)})
        section["rows"].append(row)
    section["status"] = section_status(section["rows"])
    return section


def measure_evaluation(plan: Plan, device: torch.device, work: Path) -> dict:
    """Held-out losses and samples as the trainer makes them (pipelines/train/evaluate.py) with the GPU's
    attention (flex where flash-attn is missing), counting the compilations of the attention kernel."""
    import torch._dynamo

    import lance_core.model.lance as lance_module
    from bench.gpu.train_check import write_shards
    from lance_core.flow import LossConfig
    from lance_core.model import attention, build_model
    from lance_core.tokenizer import ByteTokenizer
    from pipelines.train.config import DataSection, EvalSection
    from pipelines.train.evaluate import HeldOut, SampleWriter
    from pipelines.train.plan import make_plan as make_data_plan

    dtype = getattr(torch, plan.dtype)
    backend = "flex" if attention.flex_attention is not None else "per_sample"
    cfg = model_config(plan, backend)
    shards = write_shards(plan, work / "eval-latents")
    data = DataSection(uris=(str(shards),), token_budget=plan.train_tokens, holdout_per_task=3)
    tasks = ("t2i", "t2v", "i2i", "v2v", "i2t", "v2t")
    data_plan = make_data_plan(data, dict.fromkeys(tasks, 1.0))
    tokenizer = ByteTokenizer()
    held = HeldOut(data_plan, data, cfg, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg).to(dtype).eval()
    lengths: set[int] = set()
    original = attention.prepare_attention

    def recording(layout, name, block_size):
        if name == "flex":
            lengths.add(len(layout))
        return original(layout, name, block_size)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    attention.prepare_attention = lance_module.prepare_attention = recording
    try:
        started = time.perf_counter()
        losses = held.losses(model, cfg, LossConfig(), device, 0)
        writer = SampleWriter(cfg, tokenizer, held, EvalSection(sampling_steps=4, max_caption_tokens=8), device, dtype)
        result = writer.write(model, 1, work / "samples", 0)
        writer.close()
        seconds = time.perf_counter() - started
    finally:
        attention.prepare_attention = lance_module.prepare_attention = original
    compiles = counters["stats"]["unique_graphs"] - before
    buckets = {attention.flex_bucket_length(n, cfg.flex_block_size) for n in lengths}
    finite = all(math.isfinite(v) for v in losses.values())
    checks = [
        {"check": f"evaluation: held-out losses of {len(losses)} tasks finite", "passed": finite},
        {"check": f"evaluation: samples written ({', '.join(sorted(p.name for p in (work / 'samples').glob('*.png')))})",
         "passed": any((work / "samples").glob("*_image.png"))},
    ]
    if backend == "flex":
        checks.append({"check": f"evaluation: flex compiled {compiles} graph(s) for {len(lengths)} sequence lengths "
                                f"in {len(buckets)} length buckets", "passed": compiles <= 2 * len(buckets) + 2})
    row = {"status": "ok" if all(c["passed"] for c in checks) else "error", "backend": backend, "seconds": seconds,
           "heldout": losses, "lengths": sorted(lengths), "buckets": sorted(buckets), "compiles": compiles,
           "caption": result.get("caption_generated"), "reason": None}
    return {"status": row["status"], "rows": [row], "checks": checks}


def _vit_side(value: int, factor: int) -> int:
    return max(factor, value // factor * factor)


def measure_encoders(plan: Plan, device: torch.device, deadline: float) -> dict:
    """The precompute's encoders (lance_core/encoders) as its actors run them: uint8 pixels to the device,
    the model in the encoders' dtype (bf16 on a GPU); images at the production batch size and one 6 s clip."""
    from lance_core.config import model_preset
    from lance_core.encoders import QwenViT, WanVAE

    dtype = getattr(torch, plan.dtype)
    cfg = model_preset(plan.preset)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # convolution algorithms chosen once, in the warm-up
    frames, height, width = plan.clip
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (plan.vae_batch, 3, 1, plan.vae_image_side, plan.vae_image_side),
                           dtype=torch.uint8, generator=generator)
    clip = torch.randint(0, 256, (1, 3, frames, height, width), dtype=torch.uint8, generator=generator)
    factor = cfg.vit.patch_size * cfg.vit.spatial_merge_size
    vit_images = [torch.randint(0, 256, (1, 3, plan.vit_side, plan.vit_side), dtype=torch.uint8, generator=generator)
                  for _ in range(plan.vit_batch)]
    vit_clip = [torch.randint(0, 256, (frames, 3, _vit_side(height, factor), _vit_side(width, factor)),
                              dtype=torch.uint8, generator=generator)]
    if device.type == "cuda":
        images, clip = images.pin_memory(), clip.pin_memory()
    vae = WanVAE.from_config(cfg.vae).eval().to(device, dtype)
    vit = QwenViT.from_config(cfg.vit).eval().to(device, dtype)
    cases = [
        ("vae", f"VAE {plan.vae_batch} images {plan.vae_image_side}²", lambda: vae.encode(images, dtype=torch.float32),
         plan.vae_batch, "images/s"),
        ("vae", f"VAE 1 clip {frames}x{height}x{width}", lambda: vae.encode(clip, dtype=torch.float32), 1, "clips/s"),
        ("vit", f"ViT {plan.vit_batch} images {plan.vit_side}²", lambda: vit.encode_many(vit_images),
         plan.vit_batch, "images/s"),
        ("vit", f"ViT 1 clip {frames}x{_vit_side(height, factor)}x{_vit_side(width, factor)}",
         lambda: vit.encode_many(vit_clip), 1, "clips/s"),
    ]
    section: dict = {"config": {"preset": plan.preset, "dtype": plan.dtype, "weights": "random",
                                "vae_parameters": sum(p.numel() for p in vae.parameters()),
                                "vit_parameters": sum(p.numel() for p in vit.parameters())},
                     "rows": [], "checks": []}
    for index, (encoder, variant, call, items, unit) in enumerate(cases):
        row_deadline = share_until(deadline, 1.0, len(cases) - index)
        row = {"encoder": encoder, "variant": variant, "status": "error", "reason": None}
        try:
            reset_peak(device)
            out = call()
            latents = out if encoder == "vae" else out[0][0]
            finite = bool(torch.isfinite(latents).all())
            times, _ = timed_calls(call, device, max(0, plan.warmup - 1), max(1, plan.max_reps // 2), row_deadline)
            seconds = statistics.median(times)
            row.update(status="ok" if finite else "error", reason=None if finite else "non-finite output",
                       output_shape=list(latents.shape), reps=len(times), batch_ms=seconds * 1e3,
                       rate=items / seconds, unit=unit, peak_mem_gib=peak_gib(device))
            section["checks"].append({"check": f"encoders: {variant} in {plan.dtype} gives finite values "
                                               f"{list(latents.shape)}", "passed": finite})
        except Exception as err:  # noqa: BLE001 - recorded; the next case still runs
            row.update(status="error", reason=error_text(err))
            section["checks"].append({"check": f"encoders: {variant}", "passed": False, "detail": error_text(err)})
        section["rows"].append(row)
    section["status"] = section_status(section["rows"])
    return section


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broadcast_worker(rank: int, world: int, backend: str, port: int, sizes: tuple[int, ...], reps: int,
                     out_path: str) -> None:
    """One rank: ``reps`` timed broadcasts from rank 0 of each size after two warm-up ones; rank 0 writes
    the seconds of each to ``out_path``."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = []
    for size in sizes:
        buffer = torch.empty(size // 2, dtype=torch.bfloat16, device=device)
        for _ in range(2):
            dist.broadcast(buffer, src=0)
        sync(device)
        seconds = []
        for _ in range(reps):
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            dist.broadcast(buffer, src=0)
            sync(device)
            seconds.append(time.perf_counter() - start)
        results.append({"bytes": buffer.numel() * buffer.element_size(), "seconds": seconds})
        del buffer
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def measure_broadcast(plan: Plan, deadline: float, children: list) -> dict:
    """``children``: where the rank processes are listed while they run (the watchdog ends them)."""
    import torch.multiprocessing as mp

    if plan.dry_run:
        backend, world = "gloo", 2
        note = "dry run: gloo between 2 CPU processes in place of NCCL"
    else:
        world = torch.cuda.device_count()
        if world < 2:
            return {"status": "skipped", "reason": f"{world} GPU: a broadcast needs at least 2", "rows": []}
        backend, note = "nccl", None
    with tempfile.TemporaryDirectory(prefix="lance-bcast-") as tmp:
        out_path = str(Path(tmp) / "bcast.json")
        context = mp.start_processes(broadcast_worker, args=(world, backend, free_port(), plan.broadcast_bytes,
                                                             plan.broadcast_reps, out_path),
                                     nprocs=world, join=False, start_method="spawn")
        children[:] = context.processes
        deadline = max(deadline, time.perf_counter() + 20.0)  # the ranks import torch and meet first
        try:
            while not context.join(timeout=1.0):
                if time.perf_counter() > deadline:
                    raise TimeoutError("broadcast ranks still running at the end of the part's time share: ended")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            children.clear()
        results = json.loads(Path(out_path).read_text())
    rows = []
    for result in results:
        seconds = statistics.median(result["seconds"])
        # broadcast: algorithm bandwidth = bus bandwidth (nccl-tests' definition) = bytes / time
        rows.append({"status": "fallback" if note else "ok", "reason": note, "backend": backend, "ranks": world,
                     "bytes": result["bytes"], "reps": len(result["seconds"]), "ms": seconds * 1e3,
                     "gb_per_s": result["bytes"] / seconds / 1e9})
    return {"status": section_status(rows), "reason": note, "rows": rows}


# ------------------------------------------------------------------------------------------- report
def table_rows(payload: dict) -> list[dict]:
    """One line per measurement (or per skipped / failed part) for the printed table."""
    lines = []
    env = payload["environment"]
    if env["status"] != "ok":
        lines.append({"part": "environment", "status": env["status"], "note": env.get("reason")})
    else:
        lines.append({"part": "environment", "variant": env.get("device_name") or env["device"], "status": "ok",
                      "rate": env.get("matmul_tflops"), "unit": "TFLOP/s matmul",
                      "note": f"MFU peak {env['peak_tflops']:.4g} TFLOP/s ({env['peak_source']}); flash-attn "
                              f"{env['flash_attn']['version'] if env['flash_attn']['available'] else 'no'}"})
    for part in list(PARTS)[1:]:
        section = payload[part]
        if not section.get("rows"):
            lines.append({"part": part, "status": section["status"], "note": section.get("reason")})
        for row in section.get("rows") or []:
            line = {"part": part, "status": row["status"], "note": row.get("reason"), "mem": row.get("peak_mem_gib")}
            if part == "training":
                line.update(variant=f"zero{row['zero_stage']} {row['policies']}", rate=row.get("tokens_per_s"),
                            unit="tokens/s", ms=row.get("step_ms"), tflops=row.get("tflops"), mfu=row.get("mfu"))
            elif part == "grpo_learner":
                line.update(variant=row["precision"], ms=row.get("update_ms"))
            elif part == "attention":
                line.update(variant=f"{row['requested']}->{row.get('backend', '?')} {row.get('passes', '')}",
                            rate=row.get("tokens_per_s"), unit="tokens/s", ms=row.get("step_ms"),
                            tflops=row.get("tflops"), mfu=row.get("mfu"))
            elif part == "evaluation":
                line.update(variant=f"{row.get('backend')}: {row.get('compiles')} compiles / "
                                    f"{len(row.get('lengths') or [])} lengths", ms=(row.get("seconds") or 0) * 1e3)
            elif part == "encoders":
                line.update(variant=row.get("variant"), rate=row.get("rate"), unit=row.get("unit"),
                            ms=row.get("batch_ms"))
            else:
                line.update(variant=f"{row['backend']} x{row['ranks']} {row['bytes'] / 2**20:.0f} MiB",
                            rate=row.get("gb_per_s"), unit="GB/s", ms=row.get("ms"))
            lines.append(line)
    return lines


COLUMNS = [("part", "part", "s"), ("variant", "variant", "s"), ("status", "status", "s"), ("rate", "rate", ".4g"),
           ("unit", "unit", "s"), ("ms", "ms", ".1f"), ("tflops", "TFLOP/s", ".3g"), ("mfu", "MFU", ".3f"),
           ("mem", "peak GiB", ".1f")]


def checks_of(payload: dict) -> list[dict]:
    return [{"part": part, **check} for part in PARTS for check in payload[part].get("checks") or []]


def not_as_on_gpu(payload: dict) -> list[dict]:
    """Every row or part that fell back, was skipped or failed, with its reason."""
    return [{"part": line["part"], "variant": line.get("variant"), "status": line["status"], "reason": line["note"]}
            for line in table_rows(payload)
            if line["status"] not in ("ok", "fallback") or (line["status"] == "fallback" and line["part"] != "environment")]


def render(payload: dict) -> None:
    payload["not_as_on_gpu"] = not_as_on_gpu(payload)
    checks = checks_of(payload)
    payload["checks_passed"] = sum(c["passed"] for c in checks)
    payload["checks_failed"] = sum(not c["passed"] for c in checks)
    mode = "dry run (CPU, tiny widths)" if payload["dry_run"] else "GPU"
    budget = f" of a {payload['budget_s']:.0f} s budget" if payload.get("budget_s") else ""
    print(f"\n{mode}: {payload['elapsed_s']:.0f} s{budget}")
    if payload.get("setup_note"):
        print(f"setup: {payload['setup_note']}")
    lines = table_rows(payload)
    print_table(lines, COLUMNS)
    for line in lines:
        if line.get("note"):
            print(f"  {line['part']} {line.get('variant') or ''}: {line['note']}")
    print()
    for check in checks:
        detail = f" ({check['detail']})" if check.get("detail") else ""
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}{detail}")
    print(f"{payload['checks_passed']} passed, {payload['checks_failed']} failed")


def default_out() -> Path:
    """$OUT/gpu_bench.json when OUT is set (the GPU machine's output folder), else bench/results/."""
    return Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else RESULTS / "gpu_bench.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths: the same code, not timed")
    parser.add_argument("--out", help="JSON path (default $OUT/gpu_bench.json, else bench/results/gpu_bench.json)")
    parser.add_argument("--layers", type=int, help="model layers (default 2)")
    parser.add_argument("--budget-s", type=float, help="GPU: total time budget in seconds (default 420)")
    parser.add_argument("--setup-note", default="", help="what the setup did, recorded")
    args = parser.parse_args(argv)
    plan = make_plan(args)
    if plan.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(1)  # tiny ops: more threads only contend with other work on a shared host
    budget = Budget(None if plan.dry_run else (args.budget_s or 420.0))
    device = torch.device(plan.device)
    header = {"dry_run": plan.dry_run, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "setup_note": args.setup_note or None, "plan": asdict(plan)}
    report = Report(Path(args.out) if args.out else default_out(), PARTS, budget, header, render)
    if not plan.dry_run:
        report.start_watchdog(grace=20.0)
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = (f"CUDA not available to torch {torch.__version__} (built for CUDA {torch.version.cuda}): "
                  f"check the driver (nvidia-smi) against this build")
        for part in PARTS:
            report.payload[part] = {"status": "error" if part == "environment" else "skipped", "reason": reason,
                                    "rows": []}
        report.finish()
        return 2
    from bench.gpu.train_check import measure_grpo_learner, measure_training

    work = Path(tempfile.mkdtemp(prefix="lance-gpu-check-"))
    report.run_part("environment", lambda _: measure_environment(plan, device), plan.min_part_s)
    env = report.payload["environment"]
    report.run_part("training", lambda _: measure_training(plan, device, work / "training"), plan.min_part_s)
    report.run_part("grpo_learner", lambda _: measure_grpo_learner(plan, device), plan.min_part_s)
    report.run_part("attention", lambda until: measure_attention(plan, device, env, until), plan.min_part_s)
    report.run_part("evaluation", lambda _: measure_evaluation(plan, device, work / "evaluation"), plan.min_part_s)
    report.run_part("encoders", lambda until: measure_encoders(plan, device, until), plan.min_part_s)
    report.run_part("nccl_broadcast", lambda until: measure_broadcast(plan, until, report.children), plan.min_part_s)
    report.finish()
    return 0 if report.payload["checks_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
