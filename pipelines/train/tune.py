"""Hyper-parameter sweeps with Ray Tune: every trial is a real training run (a ``TorchTrainer`` launched
from the trial), its reports forwarded to Tune, ASHA stopping the trials that trail at each rung.

Searched: the learning rate (log-uniform), the CE loss weight (the MSE weight stays 1), and the mixture's
understanding share (i2t + v2t against the generation tasks). Trials are compared on the held-out loss
``heldout_total`` (mean generation MSE + 0.25 · mean understanding CE), which does not depend on the
trial's own loss weights.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from lance_core.config import StrictModel
from lance_core.packing import UNDERSTANDING_TASKS

from .config import TrainConfig
from .plan import DataPlan
from .trainer import ensure_ray, prepare_run

METRIC = "heldout_total"
TRIAL_DRIVER_CPUS = 0.1
"""A trial only launches its trainer; the trainer's workers reserve their own CPUs."""


class TuneSection(StrictModel):
    num_samples: int = Field(4, ge=1)
    max_concurrent: int = Field(1, ge=1)
    lr: tuple[float, float] = (3e-4, 5e-3)
    """Log-uniform range of the learning rate."""
    ce_weight: tuple[float, float] = (0.1, 1.0)
    understanding_share: tuple[float, float] = (0.1, 0.5)
    """Range of the mixture weight of understanding tasks (the rest goes to generation tasks)."""
    grace_period: int = Field(4, ge=1)
    """Steps every trial runs before ASHA may stop it."""
    reduction_factor: int = Field(2, ge=2)
    seed: int = 0


def trial_config(base: TrainConfig, params: dict) -> TrainConfig:
    weights = dict(base.mixture.weights)
    und = [t for t in weights if t in UNDERSTANDING_TASKS]
    gen = [t for t in weights if t not in UNDERSTANDING_TASKS]
    if und and gen:
        share = params["understanding_share"]
        und_total, gen_total = sum(weights[t] for t in und), sum(weights[t] for t in gen)
        weights = {t: (share * weights[t] / und_total if t in und else (1 - share) * weights[t] / gen_total)
                   for t in weights}
    return base.model_copy(update={
        "optim": base.optim.model_copy(update={"lr": params["lr"]}),
        "loss": base.loss.model_copy(update={"ce_weight": params["ce_weight"]}),
        "mixture": base.mixture.model_copy(update={"weights": weights}),
        "name": params["name"],
    })


def release_stopped_trainers() -> int:
    """Remove this job's placement groups other than the calling trial's own. Call with one trial at a
    time only: every other placement group of the job then belongs to a trainer whose trial ASHA stopped.

    Tune stops a trial by killing its actor, which takes the trainer's controller with it; Ray Train's own
    cleaner then frees the worker group's resources through the state API, which cannot tell which
    cluster to ask when several Ray instances run on one host."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util import get_current_placement_group
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    own = get_current_placement_group()
    released = 0
    for pg_id, info in placement_group_table().items():
        if info["state"] == "CREATED" and pg_id.endswith(job) and (own is None or pg_id != own.id.hex()):
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
            released += 1
    return released


def _trial(params: dict, base: str, plan: str, sweep_dir: str, one_at_a_time: bool) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .trainer import build_trainer

    if one_at_a_time:
        release_stopped_trainers()
    name = f"trial-{ray.tune.get_context().get_trial_id()}"
    cfg = trial_config(TrainConfig.model_validate_json(base), params | {"name": name})
    cfg = cfg.model_copy(update={"output": sweep_dir, "log_dir": None})
    build_trainer(cfg, DataPlan.from_json(plan), Path(sweep_dir) / name, callbacks=[TuneReportCallback()]).fit()


def run_sweep(base: TrainConfig, sweep: TuneSection):
    """Run the sweep; returns Tune's ResultGrid (``get_best_result()`` gives the winner)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    every = max(1, sweep.grace_period // 2)
    base = base.model_copy(update={
        "eval": base.eval.model_copy(update={"samples": False, "heldout_every": every}),
        "metrics": base.metrics.model_copy(update={"report_every": every}),
        "checkpoint": base.checkpoint.model_copy(update={"export_safetensors": False, "keep_last": 1,
                                                         "every_steps": base.steps}),
    })
    plan, sweep_dir = prepare_run(base)
    ensure_ray()
    space = {
        "lr": tune.loguniform(*sweep.lr),
        "ce_weight": tune.uniform(*sweep.ce_weight),
        "understanding_share": tune.uniform(*sweep.understanding_share),
    }
    trial = tune.with_parameters(_trial, base=base.model_dump_json(), plan=plan.to_json(), sweep_dir=str(sweep_dir),
                                 one_at_a_time=sweep.max_concurrent == 1)
    scheduler = ASHAScheduler(time_attr="step", max_t=base.steps, grace_period=sweep.grace_period,
                              reduction_factor=sweep.reduction_factor)
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": TRIAL_DRIVER_CPUS}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=scheduler, num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent,
                                    search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                                                     max_concurrent=sweep.max_concurrent)),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir)),
    )
    return tuner.fit()


def best_params(grid) -> dict:
    best = grid.get_best_result()
    keys = ("lr", "ce_weight", "understanding_share")
    return {"params": {k: best.config[k] for k in keys}, METRIC: best.metrics.get(METRIC),
            "step": best.metrics.get("step"), "trials": len(grid)}
