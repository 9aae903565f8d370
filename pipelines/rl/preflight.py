"""Before a GRPO run does any work: its paths checked, and what a rerun does with the run folder decided
(pipelines/runtime/run_folder.py). A run whose latest checkpoint is of its last epoch is complete: a rerun
says so and returns that run's summary without starting Ray.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lance_core.config import PathRole, path_fields
from pipelines.runtime.preflight import check_paths
from pipelines.runtime.run_folder import RunFolder, RunMode

from .config import GRPOConfig

log = logging.getLogger("lance.grpo")

GRPO_RESUMABLE = ("epochs", "checkpoint", "gallery_size", "tensorboard", "eval",
                  "ray_address", "ray_num_cpus", "placement", "rewards.max_restarts",
                  "rewards.call_timeout_s", "rewards.start_timeout_s", "rollout.weight_sync")
"""Fields a resumed run may change: the epochs to run to (more continue a finished run), checkpointing, what
is logged and evaluated, where Ray runs and how actors are placed, reward actor restarts and timeouts, how
weights reach the rollout actors. The model, the prompts, the rollout, the rewards and the learner must stay
the same."""


def with_initial_checkpoint(cfg: GRPOConfig, checkpoint: str | None) -> GRPOConfig:
    """``cfg`` whose ``model.weights.lance`` is the checkpoint given (``--checkpoint``), validated (made
    absolute) like the config's own, so that it is checked and recorded with the run."""
    if not checkpoint:
        return cfg
    data = cfg.model_dump()
    data["model"]["weights"]["lance"] = str(checkpoint)
    return GRPOConfig.model_validate(data)


def check_grpo_paths(cfg: GRPOConfig, run_dir: Path) -> None:
    """ConfigError naming each path (and flag) that cannot serve: a missing prompts file, checkpoint,
    tokenizer folder, model weights or OCR / CLIP model file, a run folder that is a file."""
    fields = [*path_fields(cfg), ("output", str(run_dir), PathRole("output"))]
    check_paths(fields, "grpo", flags={"prompts.path": "--prompts", "model.weights.lance": "--checkpoint",
                                       "output": "--output"})


def latest_epoch(run_dir: Path) -> int | None:
    """The epoch of the run folder's latest checkpoint (``checkpoints/latest`` names ``epoch_<N>``)."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return int(tag.removeprefix("epoch_")) if tag.removeprefix("epoch_").isdigit() else None


def settle_rerun(cfg: GRPOConfig, run_dir: Path, mode: RunMode = "auto") -> dict | None:
    """Check the paths, then resume / start afresh / refuse (RunFolderError) by the run folder's recorded
    config; returns the recorded summary when the run is already complete (nothing is to be run)."""
    check_grpo_paths(cfg, run_dir)
    folder = RunFolder("grpo", str(run_dir))
    done = latest_epoch(run_dir)
    action = folder.settle(cfg.model_dump(mode="json"), GRPO_RESUMABLE, mode, holds_run=done is not None,
                           schema=GRPOConfig)
    summary = run_dir / "summary.json"
    if action == "resume" and done is not None and done >= cfg.epochs - 1 and summary.is_file():
        log.info(f"the run in {run_dir} is complete: its latest checkpoint is of epoch {done + 1} of {cfg.epochs}; "
                 "nothing ran now (a higher --steps continues it, --overwrite starts afresh)")
        return json.loads(summary.read_text()) | {"complete_before": True}
    return None
