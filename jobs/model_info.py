"""``lance model-info --preset NAME [--json]``: parameter counts and FLOPs, built on the meta device.
A preset whose checkpoint carries the ViT (``lance-3b-video``) counts its tower in the total."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import add_log_level_option, setup_logging


def main(argv: list[str] | None = None) -> int:
    from lance_core.config import PRESETS  # plain data (pydantic, no torch): the presets for --help

    parser = argparse.ArgumentParser(prog="lance model-info", description=__doc__)
    parser.add_argument("--preset", default="lance-3b", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--context", type=int, default=2304,
                        help="tokens of a sample's context for the attention FLOPs (2304 = one 768x768 image)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_log_level_option(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError, model_preset
    from lance_core.encoders.vit import meta_vision_tower
    from lance_core.flops import model_info
    from lance_core.model import build_model

    try:
        cfg = model_preset(args.preset)
    except ConfigError as err:
        parser.error(str(err))
    vit = meta_vision_tower(cfg.vit) if cfg.vit_in_checkpoint else None
    info = model_info(cfg, build_model(cfg, device="meta"), args.context, vit)
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
        ("ViT in the checkpoint (vit_model.*, frozen)", f"{p['vit']:,}"),
        ("tensors in the checkpoint", f"{p['tensors']:,}"),
        ("active per token (one expert + lm_head)", f"{p['active_per_token']:,}"),
        (f"training FLOPs per token (context {args.context})", f"{info['training_flops_per_token']:.4e}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
