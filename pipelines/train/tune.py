"""Hyper-parameter sweeps with Ray Tune: every trial is a real training run (a ``TorchTrainer`` launched
from the trial), its reports forwarded to Tune, ASHA (or FIFO) deciding which trials go on.

What is searched comes from the config's ``tune:`` section (:class:`TuneSection`): dotted config fields
with their distributions (by default the learning rate, the CE loss weight and the mixture's
understanding share). Trials are compared on the held-out loss ``heldout_total`` (mean generation MSE +
0.25 · mean understanding CE), which does not depend on the trial's own loss weights. The winner is
written as a config file that ``lance train --config`` takes back.

A rerun into the same sweep folder (pipelines/runtime/run_folder.py): of the same config, a finished sweep
is reported (its best trial and config file) and nothing runs; an unfinished one continues its unfinished
trials (``Tuner.restore``; each trial's trainer resumes from its own checkpoint); of another config, it is
refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from lance_core.packing import UNDERSTANDING_TASKS
from pipelines.runtime.run_folder import RunFolder, RunMode

from .config import UNDERSTANDING_SHARE, SearchDimension, TrainConfig, TuneSection, load_train_config
from .driver import PLAN_FILE, ensure_train_ray, prepare_run, storage_and_log_dir
from .preflight import check_train_paths

log = logging.getLogger("lance.tune")

METRIC = "heldout_total"
TRIAL_DRIVER_CPUS = 0.1
"""A trial only launches its trainer; the trainer's workers reserve their own CPUs."""
BEST_CONFIG, BEST_TRIAL = "best_config.yaml", "best_trial.json"
EXPERIMENT = "tune"
"""Ray Tune's experiment folder inside the sweep folder."""
TUNE_RESUMABLE = ("max_failures", "debug", "scaling.worker_start_timeout_s", "data.storage")
"""Fields a resumed sweep may change: restarts, fault injection, the workers' start timeout, how shards are
read. The search space, the trials' config and their step count must stay the same."""


class SweepFailed(RuntimeError):
    """Every trial of the sweep failed; the message holds the first error."""


@dataclass
class SweepOutcome:
    best: dict
    """The best trial: its ``params``, ``heldout_total``, ``step`` and the number of ``trials``."""
    config_path: Path
    """``best_config.yaml``: a training config ``lance train --config`` takes."""
    complete_before: bool = False
    """The sweep had finished in an earlier run: nothing ran now."""


def trial_config(base: TrainConfig, params: dict) -> TrainConfig:
    """``base`` with the trial's values of the search space (dotted field names) and its name."""
    data = base.model_dump()
    for key, value in params.items():
        if key == "name":
            data["name"] = value
        elif key == UNDERSTANDING_SHARE:
            data["mixture"]["weights"] = _with_understanding_share(data["mixture"]["weights"], value)
        else:
            *sections, field = key.split(".")
            node = data
            for section in sections:
                node = node[section]
            node[field] = value
    return load_train_config(data)


def _with_understanding_share(weights: dict[str, float], share: float) -> dict[str, float]:
    und = [t for t in weights if t in UNDERSTANDING_TASKS]
    gen = [t for t in weights if t not in UNDERSTANDING_TASKS]
    if not (und and gen):
        return weights
    und_total, gen_total = sum(weights[t] for t in und), sum(weights[t] for t in gen)
    return {t: (share * weights[t] / und_total if t in und else (1 - share) * weights[t] / gen_total)
            for t in weights}


def best_config_data(base: TrainConfig, params: dict, name: str) -> dict:
    """The winning trial as a training config (plain data for YAML): the base, its values, a new name."""
    best = trial_config(base, {**params, "name": name})
    return best.model_dump(mode="json")


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


def _trial(params: dict, base: str, plan_path: str, sweep_dir: str, one_at_a_time: bool) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .driver import build_trainer

    if one_at_a_time:
        release_stopped_trainers()
    name = f"trial-{ray.tune.get_context().get_trial_id()}"
    cfg = trial_config(TrainConfig.model_validate_json(base), params | {"name": name})
    cfg = cfg.model_copy(update={"output": sweep_dir, "log_dir": None})
    build_trainer(cfg, Path(plan_path), Path(sweep_dir) / name, callbacks=[TuneReportCallback()]).fit()


def _distribution(dimension: SearchDimension):
    from ray import tune

    if dimension.loguniform is not None:
        return tune.loguniform(*dimension.loguniform)
    if dimension.uniform is not None:
        return tune.uniform(*dimension.uniform)
    return tune.choice(list(dimension.choice))


def _scheduler(sweep: TuneSection, steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=steps, grace_period=sweep.scheduler.grace_period,
                         reduction_factor=sweep.scheduler.reduction_factor)


def sweep_config(base: TrainConfig) -> TrainConfig:
    """The config every trial starts from: held-out loss and reports every half grace period, no samples,
    no export, one checkpoint at the end."""
    every = max(1, base.tune.scheduler.grace_period // 2)
    return base.model_copy(update={
        "eval": base.eval.model_copy(update={"samples": False, "heldout_every": every}),
        "metrics": base.metrics.model_copy(update={"report_every": every}),
        "checkpoint": base.checkpoint.model_copy(update={"export_safetensors": False, "keep_last": 1,
                                                         "every_steps": base.steps}),
    })


def run_sweep(base: TrainConfig, resume: bool = False):
    """Run the sweep of ``base.tune`` (``base`` as :func:`sweep_config` makes it); with ``resume``, continue
    the unfinished trials of the sweep folder's experiment if there is one. Returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep = base.tune
    _, sweep_dir = prepare_run(base)
    ensure_train_ray()
    space = {key: _distribution(dimension) for key, dimension in sweep.search_space.items()}
    trial = tune.with_parameters(_trial, base=base.model_dump_json(), plan_path=str(sweep_dir / PLAN_FILE),
                                 sweep_dir=str(sweep_dir), one_at_a_time=sweep.max_concurrent == 1)
    trainable = tune.with_resources(trial, {"cpu": TRIAL_DRIVER_CPUS})
    experiment = str(sweep_dir / EXPERIMENT)
    if resume and tune.Tuner.can_restore(experiment):
        log.info(f"continuing the unfinished trials of {experiment}")
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True).fit()
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", scheduler=_scheduler(sweep, base.steps),
                                    num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent,
                                    search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                                                     max_concurrent=sweep.max_concurrent)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(sweep_dir)),
    )
    return tuner.fit()


def sweep(base: TrainConfig, best_name: str, best_steps: int, mode: RunMode = "auto") -> SweepOutcome:
    """Run, continue or report the sweep of ``base`` into ``<output>/<name>`` (``mode`` as ``--resume`` /
    ``--overwrite``); write the best trial as a training config named ``best_name`` with ``best_steps``."""
    swept = sweep_config(base)
    check_train_paths(swept)
    directory = storage_and_log_dir(swept)[1]
    best_file, trial_file = directory / BEST_CONFIG, directory / BEST_TRIAL
    folder = RunFolder("tune", str(directory))
    action = folder.settle(swept.model_dump(mode="json"), TUNE_RESUMABLE, mode, schema=type(swept),
                           holds_run=folder.holds(EXPERIMENT, BEST_CONFIG))
    if action == "resume" and best_file.is_file() and trial_file.is_file():
        log.info(f"the sweep in {directory} is complete; nothing ran now (--overwrite starts it afresh)")
        return SweepOutcome(json.loads(trial_file.read_text()), best_file, complete_before=True)
    grid = run_sweep(swept, resume=action == "resume")
    errors = [r.error for r in grid if r.error]
    if len(errors) == len(grid):
        raise SweepFailed(f"every trial failed; first error: {errors[0]}")
    best = best_params(grid, base)
    data = best_config_data(base, best["params"], best_name)
    data["steps"] = best_steps  # the sweep's short trials set none of it
    best_file.write_text(yaml.safe_dump(data, sort_keys=False))
    trial_file.write_text(json.dumps(best, indent=2))
    return SweepOutcome(best, best_file)


def best_params(grid, base: TrainConfig) -> dict:
    best = grid.get_best_result()
    return {"params": {k: best.config[k] for k in base.tune.search_space}, METRIC: best.metrics.get(METRIC),
            "step": best.metrics.get("step"), "trials": len(grid)}
