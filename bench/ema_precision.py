"""How far an EMA of the weights moves in a bf16 run: the project's fp32 EMA of DeepSpeed's master weights
(pipelines/runtime/ema.py) against the bf16 copy updated with ``lerp_`` in bf16 that the trainers kept
before, both against a float64 reference average of the same master weights.

    python bench/ema_precision.py [--steps 1000] [--decay 0.9999] [--quick] [--out FILE]

One process, one rank (gloo), a DeepSpeed engine in bf16 (ZeRO-2) over a small MLP trained on random
regression batches with AdamW; after every optimizer step the EMA updates and the reference takes the full
fp32 masters (DeepSpeed's ``safe_get_full_fp32_param``). Printed per average: how far it moved from the
start (max |Δ|), its distance to the reference (max abs), and how far the master weights themselves moved.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from bench.common import load_average, print_table, write_json


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(steps: int, decay: float, width: int, lr: float) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from pipelines.runtime.deepspeed_config import engine_config
    from pipelines.runtime.ema import ShardedEMA

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
    config = engine_config(micro_batch=8, accumulation=1, grad_clip=1.0, zero_stage=2, bf16=True, on_gpu=False)
    config["zero_allow_untested_optimizer"] = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    ema = ShardedEMA(named, decay)

    def masters() -> dict[str, torch.Tensor]:
        return {n: safe_get_full_fp32_param(p).detach().double() for n, p in named}

    start = masters()
    reference = {n: v.clone() for n, v in start.items()}
    old = {n: v.to(torch.bfloat16) for n, v in start.items()}  # the previous bf16 average
    target = torch.nn.Linear(width, width)
    generator = torch.Generator().manual_seed(1)
    began = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(8, width, generator=generator).to(torch.bfloat16)
        with torch.no_grad():
            y = target(x.float()).to(torch.bfloat16)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        engine.backward(loss)
        engine.step()
        ema.update()
        now = masters()
        for name, value in now.items():
            reference[name] += (1 - decay) * (value - reference[name])
            old[name].lerp_(value.to(torch.bfloat16), 1 - decay)
    seconds = time.perf_counter() - began
    final = masters()
    ours = ema.full_state()

    def worst(values: dict[str, torch.Tensor], against: dict[str, torch.Tensor]) -> float:
        return max(float((values[n].double().view_as(against[n]) - against[n]).abs().max()) for n in against)

    return {
        "steps": steps, "decay": decay, "width": width, "lr": lr, "seconds": seconds,
        "params_moved": worst(final, start), "reference_moved": worst(reference, start),
        "rows": [
            {"average": "fp32 EMA of the fp32 masters (now)", "moved": worst(ours, start),
             "error": worst(ours, reference)},
            {"average": "bf16 copy, lerp_ in bf16 (before)", "moved": worst(old, start),
             "error": worst(old, reference)},
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--decay", type=float, default=0.9999)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="100 steps, decay 0.999")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    steps, decay = (100, 0.999) if args.quick else (args.steps, args.decay)
    torch.set_num_threads(1)
    result = run(steps, decay, args.width, args.lr)
    result["load_average"] = load_average()
    print(f"\nEMA over {steps} bf16 steps, decay {decay}: master weights moved {result['params_moved']:.3g} (max |Δ|), "
          f"the fp64 reference average {result['reference_moved']:.3g}")
    print_table(result["rows"], [("average", "average", "s"), ("moved", "moved (max |Δ|)", ".3g"),
                                 ("error", "vs fp64 reference (max abs)", ".3g")])
    write_json("ema_precision", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
