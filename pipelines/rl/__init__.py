"""Flow-GRPO on Ray: rollout workers, a reward actor pool, a DeepSpeed learner.

    from pipelines.rl import load_grpo_config, run_grpo
    summary = run_grpo(load_grpo_config(yaml_dict), run_dir, checkpoint=None)

Exports load lazily: reward actors import ``pipelines.rl.rewards`` without pulling in torch.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "run_grpo":
        from .loop import run_grpo

        return run_grpo
    if name in ("GRPOConfig", "load_grpo_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
