"""``lance model-info --preset NAME [--json]``: parameter counts and FLOPs, built on the meta device."""

from __future__ import annotations

import argparse
import json

from lance_core.config import PRESETS, ConfigError, model_preset
from lance_core.flops import model_info
from lance_core.model import build_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lance model-info", description=__doc__)
    parser.add_argument("--preset", default="lance-3b", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--context", type=int, default=2304,
                        help="tokens of a sample's context for the attention FLOPs (2304 = one 768x768 image)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        cfg = model_preset(args.preset)
    except ConfigError as err:
        parser.error(str(err))
    info = model_info(cfg, build_model(cfg, device="meta"), args.context)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    rows = [
        ("preset", cfg.preset),
        ("total parameters", f"{p['total']:,}"),
        ("UND expert (layers + final norm)", f"{p['und_expert']:,}"),
        ("GEN expert (layers + final norm)", f"{p['gen_expert']:,}"),
        ("shared (embedding, heads, time embedder, latent table)", f"{p['shared']:,}"),
        ("active per token (one expert + lm_head)", f"{p['active_per_token']:,}"),
        (f"training FLOPs per token (context {args.context})", f"{info['training_flops_per_token']:.4e}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
