"""One prepared GPU check: what a single GPU machine does with the Lance training and precompute code.

    bash bench/gpu/run.sh [--dry-run]     # fresh machine: own venv, flash-attn if a wheel installs fast, then this
    python bench/gpu/check.py [--dry-run] [--out FILE] [--layers N] [--tokens L] [--budget-s S]

Parts, each in its own function and guarded (a failure is recorded in the JSON and the next part runs):

- ``environment``: torch, CUDA, the device, flash-attn, the MFU peak (``pipelines.train.metrics``: the
  datasheet bf16 table, else a matmul probe) and a bf16 matmul measured in this run (the same-run baseline).
- ``model_step``: bf16 forward + backward of the ``lance-3b`` widths (hidden, heads, KV heads, MLP) with
  fewer layers (``--layers``) on one packed sequence of synthetic samples of every task (``--tokens``),
  with the flash-attention varlen backend (torch SDPA per sample when flash-attn is missing, said so) and
  with flex attention. Tokens/s counts real tokens; FLOPs are the training metric's (``pack_flops``:
  6·N_active + attention summed per sample); MFU is over the peak of ``environment``.
- ``vae_encode``: the full-size Wan2.2 VAE (random weights, the preset's VAE config) encoding images at
  768² (the released image bucket), in bf16 and in float32 (what ``lance precompute`` runs today).
- ``vit_encode``: the Qwen2.5-VL-3B vision tower (random weights) on 672² images, bf16 and float32.
- ``nccl_broadcast``: GB/s of a broadcast across all GPUs (skipped, with the reason, on one GPU).

Timing: warm-up calls (flex compiles there), ``torch.cuda.synchronize`` around every timed call, the
median of the timed calls; peak memory from ``torch.cuda.max_memory_allocated``. A total time budget
(``--budget-s``) is shared among the parts by weight; a part stops timing at its share (at least one
timed call) and is skipped when nothing is left; a watchdog records the part still running and ends the
process if the budget is overrun by more than a grace period. The JSON is rewritten after every part.

``--dry-run``: the same code paths on the CPU at the ``tiny`` preset's widths and a few hundred tokens
(bf16 when the CPU runs it, else float32), gloo between two processes in place of NCCL; every part that
cannot run as on the GPU records why (flash-attn needs CUDA; flex attention has no CPU backward).
"""

from __future__ import annotations

import argparse
import json
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

PARTS = {"environment": 0.3, "model_step": 5.0, "vae_encode": 1.5, "vit_encode": 1.5, "nccl_broadcast": 0.7}
"""The parts in order, each with its weight: the share of the time left that it may spend."""
BACKEND_WEIGHTS = {"flash": 2.0, "flex": 3.0}
"""Shares of the model_step time: flex compiles its forward and backward kernels in its warm-up."""


@dataclass(frozen=True)
class Plan:
    """Sizes and settings of one mode (GPU or dry run)."""

    dry_run: bool
    device: str
    dtype: str
    preset: str
    layers: int
    tokens: int
    image_side: int
    """Latent tokens per side of the synthetic images and video frames of the pack."""
    warmup: int
    max_reps: int
    vae_side: int
    vae_batch: int
    vit_side: int
    vit_batch: int
    broadcast_bytes: tuple[int, ...]
    broadcast_reps: int
    min_part_s: float
    """A part is skipped when less than this is left of the budget."""


def make_plan(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        return Plan(dry_run=True, device="cpu", dtype="bfloat16" if cpu_runs_bf16() else "float32", preset="tiny",
                    layers=args.layers or 2, tokens=args.tokens or 1024, image_side=4, warmup=1, max_reps=2,
                    vae_side=32, vae_batch=2, vit_side=56, vit_batch=2, broadcast_bytes=(2**20,),
                    broadcast_reps=3, min_part_s=1.0)
    # 8 layers of the 3B widths at 32k tokens: ~2 B parameters, ~50 GiB of activations without checkpointing;
    # images of 32² latents (512 px) so that a pack holds ~16 samples of every task
    return Plan(dry_run=False, device="cuda", dtype="bfloat16", preset="lance-3b", layers=args.layers or 8,
                tokens=args.tokens or 32768, image_side=32, warmup=2, max_reps=10, vae_side=768, vae_batch=8,
                vit_side=672, vit_batch=8, broadcast_bytes=(64 * 2**20, GIB), broadcast_reps=10, min_part_s=10.0)


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
    """The preset's widths with ``plan.layers`` layers; two latent frames for the synthetic video tasks
    (the position table is not trained, so its size changes no FLOPs)."""
    from lance_core.config import model_preset

    frames = {"max_latent_frames": 2} if plan.preset == "lance-3b" else {}
    return model_preset(plan.preset, num_layers=plan.layers, attention_backend=backend, **frames)


def fill_pack(cfg, tokens: int, image_side: int):
    """Synthetic samples of every task in turn, each added while it fits ``tokens``, padded to it."""
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
        raise ValueError(f"--tokens {tokens} holds no sample (the smallest takes a few hundred tokens)")
    return pack_samples(samples, cfg, pad_to=tokens)


def backend_choice(requested: str, device: torch.device, flash: dict) -> tuple[str, str | None, bool]:
    """(backend to run, why it is not ``requested`` or not as on the GPU, whether backward runs)."""
    from lance_core.model import attention

    if requested == "flash":
        if device.type != "cuda":
            return "per_sample", "flash-attn needs CUDA: torch SDPA per sample instead", True
        if attention.flash_attn_func is None:
            why = flash.get("error") or "flash-attn not installed"
            return "per_sample", f"flash-attn unavailable ({why}): torch SDPA per sample instead", True
        return "flash", None, True
    if attention.flex_attention is None:
        raise RuntimeError(f"torch {torch.__version__} has no flex attention (needs >= 2.5)")
    if device.type != "cuda":
        return "flex", "torch flex attention has no CPU backward: forward only", False
    return "flex", None, True


def training_step(model, batch, noised, backward: bool):
    """One call of the training loss (``compute_losses``) on the pack, with its backward when ``backward``
    (else under ``no_grad``)."""
    from lance_core.flow import LossConfig, compute_losses

    loss_cfg = LossConfig()

    def step() -> None:
        if backward:
            model.zero_grad(set_to_none=True)
            compute_losses(model, batch, loss_cfg, noised=noised).total.backward()
        else:
            with torch.no_grad():
                compute_losses(model, batch, loss_cfg, noised=noised)

    return step


def measure_model_step(plan: Plan, device: torch.device, env: dict, deadline: float) -> dict:
    from lance_core.flops import count_parameters
    from lance_core.flow import LossConfig, noise_latents
    from lance_core.model import build_model
    from pipelines.train.metrics import pack_flops

    cfg = model_config(plan, "auto")
    batch_cpu = fill_pack(cfg, plan.tokens, plan.image_side)
    with torch.device(device):  # parameters created and initialised on the device
        model = build_model(cfg)
    model = model.to(dtype=getattr(torch, plan.dtype))
    counts = count_parameters(model)
    flops = pack_flops(batch_cpu, cfg, counts)
    batch = batch_cpu.to(device)
    noised = noise_latents(batch, LossConfig(), torch.Generator().manual_seed(0))
    section = {"config": {"preset_widths": plan.preset, "hidden_size": cfg.hidden_size, "layers": cfg.num_layers,
                          "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                          "intermediate_size": cfg.intermediate_size, "dtype": plan.dtype,
                          "max_latent_frames": cfg.max_latent_frames},
               "parameters": counts.as_dict(),
               "pack": {"tokens": len(batch_cpu), "real_tokens": batch_cpu.num_real_tokens,
                        "samples": batch_cpu.num_samples, "tasks": batch_cpu.sample_tasks,
                        "image_side_latents": plan.image_side, "train_flops": flops},
               "rows": []}
    weights_left = sum(BACKEND_WEIGHTS.values())
    for requested, weight in BACKEND_WEIGHTS.items():
        row_deadline = share_until(deadline, weight, weights_left)
        weights_left -= weight
        row = {"requested": requested, "status": "error", "reason": None}
        try:
            backend, reason, backward = backend_choice(requested, device, env.get("flash_attn", {}))
            model.cfg = model_config(plan, backend)  # the backbone reads the backend from its config
            row.update(backend=backend, status="fallback" if reason else "ok", reason=reason,
                       passes="fwd+bwd" if backward else "fwd")
            reset_peak(device)
            times, warm = timed_calls(training_step(model, batch, noised, backward), device, plan.warmup,
                                      plan.max_reps, row_deadline)
            seconds = statistics.median(times)
            tflops = flops * (1.0 if backward else 1 / 3) / seconds / 1e12  # forward alone: 2 of the 6
            row.update(reps=len(times), warmup_s=warm, step_ms=seconds * 1e3,
                       tokens_per_s=batch_cpu.num_real_tokens / seconds, tflops=tflops,
                       mfu=tflops / env["peak_tflops"] if env.get("peak_tflops") else None,
                       of_matmul=tflops / env["matmul_tflops"] if env.get("matmul_tflops") else None,
                       peak_mem_gib=peak_gib(device))
        except Exception as err:  # noqa: BLE001 - recorded; the other backend still runs
            row.update(status="error", reason=error_text(err))
        finally:
            model.zero_grad(set_to_none=True)
        section["rows"].append(row)
    flash_row, flex_row = section["rows"]
    if flash_row.get("tokens_per_s") and flex_row.get("tokens_per_s") and flash_row["passes"] == flex_row["passes"]:
        flash_row["vs_flex"] = flash_row["tokens_per_s"] / flex_row["tokens_per_s"]
    section["status"] = section_status(section["rows"])
    return section


def encoder_dtypes(plan: Plan) -> list[str]:
    """The run's dtype first, then float32 (the precompute pipeline's) as the same-run baseline."""
    return list(dict.fromkeys([plan.dtype, "float32"]))


def measure_vae(plan: Plan, device: torch.device, deadline: float) -> dict:
    from lance_core.config import model_preset
    from lance_core.encoders import WanVAE

    cfg = model_preset(plan.preset).vae
    vae = WanVAE.from_config(cfg).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # convolution algorithms chosen once, in the warm-up
    pixels = torch.rand(plan.vae_batch, 3, 1, plan.vae_side, plan.vae_side, device=device) * 2 - 1
    section = {"config": {"preset": cfg.preset, "base_dim": vae.autoencoder.config.base_dim,
                          "latent_channels": cfg.latent_channels, "weights": "random",
                          "parameters": sum(p.numel() for p in vae.parameters()),
                          "image_side": plan.vae_side, "batch": plan.vae_batch},
               "rows": []}
    dtypes = encoder_dtypes(plan)
    for index, dtype in enumerate(dtypes):
        row_deadline = share_until(deadline, 1.0, len(dtypes) - index)
        row = {"dtype": dtype, "status": "ok", "reason": None}
        try:
            vae.to(device=device, dtype=getattr(torch, dtype))
            reset_peak(device)
            times, warm = timed_calls(lambda: vae.encode(pixels), device, plan.warmup, plan.max_reps, row_deadline)
            seconds = statistics.median(times)
            row.update(reps=len(times), warmup_s=warm, batch_ms=seconds * 1e3, images_per_s=plan.vae_batch / seconds,
                       megapixels_per_s=plan.vae_batch * plan.vae_side**2 / seconds / 1e6,
                       peak_mem_gib=peak_gib(device))
        except Exception as err:  # noqa: BLE001 - recorded; the next dtype still runs
            row.update(status="error", reason=error_text(err))
        section["rows"].append(row)
    add_ratio(section["rows"], "images_per_s")
    section["status"] = section_status(section["rows"])
    return section


def measure_vit(plan: Plan, device: torch.device, deadline: float) -> dict:
    from lance_core.config import model_preset
    from lance_core.encoders import QwenViT

    cfg = model_preset(plan.preset).vit
    vit = QwenViT.from_config(cfg)
    clips = [torch.rand(1, 3, plan.vit_side, plan.vit_side, device=device) for _ in range(plan.vit_batch)]
    patches_per_image = (plan.vit_side // cfg.patch_size) ** 2
    tokens_per_image = patches_per_image // cfg.spatial_merge_size**2
    section = {"config": {"preset": cfg.preset, "weights": "random",
                          "parameters": sum(p.numel() for p in vit.parameters()),
                          "attention": getattr(vit.tower.config, "_attn_implementation", None),
                          "image_side": plan.vit_side, "batch": plan.vit_batch,
                          "patches_per_image": patches_per_image, "tokens_per_image": tokens_per_image},
               "rows": []}
    dtypes = encoder_dtypes(plan)
    for index, dtype in enumerate(dtypes):
        row_deadline = share_until(deadline, 1.0, len(dtypes) - index)
        row = {"dtype": dtype, "status": "ok", "reason": None}
        try:
            vit.to(device=device, dtype=getattr(torch, dtype))
            reset_peak(device)
            times, warm = timed_calls(lambda: vit.encode_many(clips), device, plan.warmup, plan.max_reps,
                                      row_deadline)
            seconds = statistics.median(times)
            row.update(reps=len(times), warmup_s=warm, batch_ms=seconds * 1e3,
                       tokens_per_s=plan.vit_batch * tokens_per_image / seconds,
                       patches_per_s=plan.vit_batch * patches_per_image / seconds,
                       images_per_s=plan.vit_batch / seconds, peak_mem_gib=peak_gib(device))
        except Exception as err:  # noqa: BLE001 - recorded; the next dtype still runs
            row.update(status="error", reason=error_text(err))
        section["rows"].append(row)
    add_ratio(section["rows"], "tokens_per_s")
    section["status"] = section_status(section["rows"])
    return section


def add_ratio(rows: list[dict], key: str) -> None:
    """``vs_float32``: each row's ``key`` over the float32 row's (the precompute pipeline's dtype)."""
    base = next((r.get(key) for r in rows if r["dtype"] == "float32"), None)
    for row in rows:
        if base and row.get(key):
            row["vs_float32"] = row[key] / base


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
            if part == "model_step":
                line.update(variant=f"{row['requested']}->{row.get('backend', '?')} {row.get('passes', '')}",
                            rate=row.get("tokens_per_s"), unit="tokens/s", ms=row.get("step_ms"),
                            tflops=row.get("tflops"), mfu=row.get("mfu"), ratio=row.get("vs_flex"), ratio_of="flex")
            elif part in ("vae_encode", "vit_encode"):
                key, unit = ("images_per_s", "images/s") if part == "vae_encode" else ("tokens_per_s", "tokens/s")
                line.update(variant=row["dtype"], rate=row.get(key), unit=unit, ms=row.get("batch_ms"),
                            ratio=row.get("vs_float32"), ratio_of="float32")
            else:
                line.update(variant=f"{row['backend']} x{row['ranks']} {row['bytes'] / 2**20:.0f} MiB",
                            rate=row.get("gb_per_s"), unit="GB/s", ms=row.get("ms"))
            if line.get("ratio") is None:
                line.pop("ratio_of", None)
            lines.append(line)
    return lines


COLUMNS = [("part", "part", "s"), ("variant", "variant", "s"), ("status", "status", "s"), ("rate", "rate", ".4g"),
           ("unit", "unit", "s"), ("ms", "ms/call", ".1f"), ("tflops", "TFLOP/s", ".3g"), ("mfu", "MFU", ".3f"),
           ("ratio", "ratio", ".3f"), ("ratio_of", "vs", "s"), ("mem", "peak GiB", ".1f")]


def not_as_on_gpu(payload: dict) -> list[dict]:
    """Every row or part that fell back, was skipped or failed, with its reason."""
    return [{"part": line["part"], "variant": line.get("variant"), "status": line["status"], "reason": line["note"]}
            for line in table_rows(payload)
            if line["status"] not in ("ok", "fallback") or (line["status"] == "fallback" and line["part"] != "environment")]


def print_report(payload: dict) -> None:
    mode = "dry run (CPU, tiny widths)" if payload["dry_run"] else "GPU"
    print(f"\n{mode}: {payload['elapsed_s']:.0f} s of a {payload['budget_s']:.0f} s budget")
    if payload.get("setup_note"):
        print(f"setup: {payload['setup_note']}")
    lines = table_rows(payload)
    print_table(lines, COLUMNS)
    for line in lines:
        if line.get("note"):
            print(f"  {line['part']} {line.get('variant') or ''}: {line['note']}")


def render(payload: dict) -> None:
    payload["not_as_on_gpu"] = not_as_on_gpu(payload)
    print_report(payload)


def default_out() -> Path:
    """$OUT/gpu_bench.json when OUT is set (the GPU machine's output folder), else bench/results/."""
    return Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else RESULTS / "gpu_bench.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, seconds: the same code paths")
    parser.add_argument("--out", help="JSON path (default $OUT/gpu_bench.json, else bench/results/gpu_bench.json)")
    parser.add_argument("--layers", type=int, help="model layers (default 8 on the GPU, 2 in the dry run)")
    parser.add_argument("--tokens", type=int, help="packed tokens per step (default 32768 on the GPU, 1024 dry)")
    parser.add_argument("--budget-s", type=float, help="total time budget in seconds (default 400 on the GPU, 45 dry)")
    parser.add_argument("--setup-note", default="", help="what the setup did (flash-attn install...), recorded")
    args = parser.parse_args(argv)
    plan = make_plan(args)
    if plan.dry_run:
        torch.set_num_threads(1)  # tiny ops: more threads only contend with other work on a shared host
    budget = Budget(args.budget_s or (45.0 if plan.dry_run else 400.0))
    device = torch.device(plan.device)
    header = {"dry_run": plan.dry_run, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "setup_note": args.setup_note or None, "plan": asdict(plan)}
    report = Report(Path(args.out) if args.out else default_out(), PARTS, budget, header, render)
    report.start_watchdog(grace=10.0 if plan.dry_run else 20.0)
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = (f"CUDA not available to torch {torch.__version__} (built for CUDA {torch.version.cuda}): "
                  f"check the driver (nvidia-smi) against this build")
        for part in PARTS:
            report.payload[part] = {"status": "error" if part == "environment" else "skipped", "reason": reason,
                                    "rows": []}
        report.finish()
        return 2
    report.run_part("environment", lambda _: measure_environment(plan, device), plan.min_part_s)
    env = report.payload["environment"]
    report.run_part("model_step", lambda until: measure_model_step(plan, device, env, until), plan.min_part_s)
    report.run_part("vae_encode", lambda until: measure_vae(plan, device, until), plan.min_part_s)
    report.run_part("vit_encode", lambda until: measure_vit(plan, device, until), plan.min_part_s)
    report.run_part("nccl_broadcast", lambda until: measure_broadcast(plan, until, report.children), plan.min_part_s)
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
