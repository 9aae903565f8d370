"""The GRPO loop: rollout workers stream decoded micro-batches to the reward pool and trajectories to the
driver; once every group's rewards are in, advantages are computed per group, the learner ranks update
(pipelines/rl/learner_group.py: each trains its share of the groups), and rank 0's new weights go to the
rollout workers (pipelines/rl/weight_sync.py: a collective broadcast, or the
object store). With ``rollout.async`` the rollouts of epoch k+1 run with the weights of epoch k while the
learner trains on epoch k (``rollout/staleness`` 1 instead of 0).

    metrics = run_grpo(cfg, run_dir)            # -> summary dict, also written to run_dir/summary.json
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from lance_core.config import resolve_user_path
from lance_core.rl import Advantages, group_advantages
from pipelines.runtime.checkpointing import DamagedCheckpointError, verify_checkpoint, write_manifest
from pipelines.runtime.local_files import write_text_atomic
from pipelines.runtime.ray_session import ensure_ray, repo_pythonpath
from pipelines.runtime.run_folder import RunMode
from pipelines.runtime.run_log import MetricsLog

from .config import GRPOConfig
from .learner_group import LearnerGroup
from .metrics import console_line, reward_metrics, write_gallery
from .placement import create_placement
from .policy import check_checkpoint
from .preflight import settle_rerun, with_initial_checkpoint
from .prompts import Prompt, epoch_prompts, load_prompts
from .rewards import RewardPool, RewardWorker
from .rollout import GroupTask, RolloutWorker, group_seed
from .weight_sync import WeightSync, weight_group_actor

log = logging.getLogger("lance.grpo")


@dataclass
class Generation:
    """An epoch's rollouts with their rewards and advantages, ready for the learner."""

    epoch: int
    tasks: list[GroupTask]
    trajectories: list
    """(reference to a list of group payloads, their group ids), in the order they arrived."""
    image_batches: list
    scores: dict[int, dict]
    advantages: Advantages
    started: float
    timings: dict[str, float]
    gallery: bool
    """The images are kept for the gallery."""


class GRPORun:
    def __init__(self, cfg: GRPOConfig, run_dir: Path, checkpoint: str | None = None, log=log.info) -> None:
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.prompts = load_prompts(cfg.prompts, cfg.seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        self.metrics = MetricsLog(run_dir, "epoch", cfg.tensorboard)
        started = time.perf_counter()
        self.placement = create_placement(cfg)
        data = cfg.model_dump(mode="json")
        place = self.placement
        logs = run_dir / "logs"  # every actor's output: learner-<rank>.log, rollout-<n>.log, reward-<slot>.log
        self.learners = LearnerGroup(cfg, place, checkpoint, log_dir=logs)
        self.learner = self.learners.sender
        self.rollouts = [weight_group_actor(RolloutWorker).options(**place.options(index, cfg.rollout.actors)).remote(
            data, checkpoint) for index in place.rollout]
        for number, worker in enumerate(self.rollouts):
            worker.log_to.remote(str(logs / f"rollout-{number}.log"))
        specs = [spec.model_dump(mode="json") for spec in cfg.rewards.terms]
        reward_actor = ray.remote(RewardWorker)

        def make_reward_actor(slot: int):
            options = place.options(place.reward[slot], cfg.rewards.actors, max_restarts=0)
            actor = reward_actor.options(**options).remote(specs, cfg.rewards.actors.torch_threads)
            actor.log_to.remote(str(logs / f"reward-{slot}.log"))
            return actor

        self.pool = RewardPool(cfg.rewards, make_reward_actor)
        self.weight_sync = WeightSync(self.learner, self.rollouts, cfg.rollout.weight_sync, concurrent_abort=True)
        self.learners.ready()
        self.nodes = {"learner": self.learners.node_ids(),
                      "rollout": ray.get([w.node_id.remote() for w in self.rollouts]),
                      "reward": [info["node_id"] for info in self.pool.wait_ready()]}
        self.startup_s = time.perf_counter() - started
        actors = len(self.learners.actors) + len(self.rollouts) + len(self.pool.slots)
        nodes = {node for kind in self.nodes.values() for node in kind}
        log(f"placement group and {actors} actors on {len(nodes)} node{'s' if len(nodes) > 1 else ''} ready in "
            f"{self.startup_s:.1f}s: " + "; ".join(f"{kind} {' '.join(n[:8] for n in ids)}"
                                                   for kind, ids in self.nodes.items()))
        self.next_batch = 0
        self.failed_epochs = 0

    # ------------------------------------------------------------------------------------ weights
    def broadcast(self, version: int) -> float:
        started = time.perf_counter()
        self.weight_sync.push(version, self.rollouts)
        return time.perf_counter() - started

    # ------------------------------------------------------------------------------------ one epoch
    def _tasks(self, epoch: int) -> list[GroupTask]:
        prompts = epoch_prompts(self.prompts.train, epoch, self.cfg.rollout.prompts_per_epoch)
        return [GroupTask(i, p.text, p.target, group_seed(self.cfg.seed, epoch, i)) for i, p in enumerate(prompts)]

    def _submit(self, images_ref, groups: list[GroupTask], repeat: int) -> int:
        batch_id = self.next_batch
        self.next_batch += 1
        prompts = [g.text for g in groups for _ in range(repeat)]
        targets = [g.target for g in groups for _ in range(repeat)]
        self.pool.submit(batch_id, images_ref, prompts, targets)
        return batch_id

    def generate(self, epoch: int, gallery: bool) -> Generation:
        """The epoch's rollouts with the weights the rollout workers hold, scored by the reward pool."""
        cfg = self.cfg
        size = cfg.rollout.group_size
        tasks = self._tasks(epoch)
        workers = len(self.rollouts)
        chunks = [tasks[k * len(tasks) // workers:(k + 1) * len(tasks) // workers] for k in range(workers)]
        self.pool.reset_clock()
        started = time.perf_counter()
        micro = cfg.rollout.groups_per_micro_batch
        # a stream yields, per micro-batch of its chunk, the images array and then the trajectory list
        streams = {worker.rollout.remote([t.__dict__ for t in chunk]): [0, chunk]
                   for worker, chunk in zip(self.rollouts, chunks) if chunk}
        pending_images, image_batches, trajectories = [], [], []
        rollout_s = None
        while streams or self.pool.pending():
            ready = self.pool.wait(list(streams))  # takes reward results and replaces hung reward actors itself
            if not ready:
                continue
            item = ready[0]
            try:
                ref = next(item)
            except StopIteration:
                del streams[item]
                if not streams:
                    rollout_s = time.perf_counter() - started
                    for images_ref, groups in pending_images:  # sequential mode: score after the rollout
                        image_batches.append((self._submit(images_ref, groups, size), groups,
                                              images_ref if gallery else None))
                continue
            count, chunk = streams[item]
            streams[item][0] += 1
            groups = chunk[(count // 2) * micro:(count // 2 + 1) * micro]
            if count % 2 == 1:
                trajectories.append((ref, [g.group_id for g in groups]))
            elif cfg.rewards.streaming:
                image_batches.append((self._submit(ref, groups, size), groups, ref if gallery else None))
            else:
                pending_images.append((ref, groups))
        generation_s = time.perf_counter() - started

        rewards = torch.zeros(len(tasks), size, dtype=torch.float64)
        scores, dropped = {}, set()
        for batch_id, groups, _ in image_batches:
            result = self.pool.take(batch_id)
            if result.get("lost_input"):
                dropped.update(group.group_id for group in groups)
                continue
            scores[batch_id] = result
            for k, group in enumerate(groups):
                rewards[group.group_id] = torch.tensor(result["total"][k * size:(k + 1) * size])
        if len(dropped) == len(tasks):
            raise RuntimeError(f"epoch {epoch}: the images of every group were lost before scoring")
        trajectories = [(ref, ids) for ref, ids in trajectories if not dropped.intersection(ids)]
        advantages = kept_advantages(rewards, dropped, cfg.learner.std_scope, cfg.learner.adv_clip)
        reward_s = (self.pool.last_result or started) - (self.pool.first_submit or started)
        timings = {"rollout_s": rollout_s, "reward_s": reward_s,
                   "reward_busy_s": self.pool.busy_s, "reward_tail_s": generation_s - rollout_s,
                   "generation_s": generation_s, "reward_utilisation": self.pool.utilisation() or 0.0,
                   "groups_dropped": len(dropped)}
        return Generation(epoch, tasks, trajectories, image_batches, scores, advantages, started, timings, gallery)

    def learn(self, generation: Generation) -> list:
        return self.learners.update(generation.trajectories, generation.advantages.values.tolist())

    def epoch_row(self, generation: Generation, learn: dict, sync_s: float, started: float) -> dict:
        """``started``: when the epoch's own work began (its rollouts, or in asynchronous mode the end of the
        previous epoch, whose time its rollouts shared)."""
        epoch, advantages = generation.epoch, generation.advantages
        epoch_s = time.perf_counter() - started
        images = len(generation.tasks) * self.cfg.rollout.group_size
        learn = dict(learn)
        version = learn.pop("sampled_with_version")
        row = {"epoch": epoch, **reward_metrics(generation.scores),
               "zero_spread_ratio": float(advantages.zero_spread.double().mean()),
               "zero_spread_groups": int(advantages.zero_spread.sum()), **learn,
               "rollout/weights_version": version, "rollout/staleness": epoch - version,
               "images": images, "images_per_s": images / epoch_s, "epoch_s": epoch_s, **generation.timings,
               "sync_s": sync_s, "weight_sync_fallbacks": self.weight_sync.fallbacks,
               "reward_restarts": self.pool.restarts}
        if generation.gallery and self.cfg.gallery_size:
            self._gallery(epoch, generation.image_batches, generation.scores)
        return row

    def _gallery(self, epoch: int, image_batches, scores) -> None:
        images, entries = [], []
        size = self.cfg.rollout.group_size
        for batch_id, groups, images_ref in image_batches:
            if len(images) >= self.cfg.gallery_size:
                break
            batch = ray.get(images_ref)
            result = scores[batch_id]
            for k in range(len(batch)):
                if len(images) >= self.cfg.gallery_size:
                    break
                group = groups[k // size]
                images.append(batch[k])
                entries.append({"prompt": group.text, "target": group.target, "reward": result["total"][k],
                                "components": {n: v[k] for n, v in result["components"].items()},
                                "reasons": {n: v[k] for n, v in result["reasons"].items()},
                                "details": {n: v[k] for n, v in result["details"].items()}})
        grid = write_gallery(self.run_dir / "gallery" / f"epoch_{epoch:04d}", images, entries)
        self.metrics.image("gallery", grid, epoch)

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        ev = self.cfg.eval
        prompts: list[Prompt] = self.prompts.eval or self.prompts.train[:1]
        weights = self.learners.weights(ema=ev.use_ema)
        images_ref = self.rollouts[0].evaluate.remote([p.text for p in prompts], ev.samples_per_prompt, ev.steps,
                                                      self.cfg.seed, weights)
        groups = [GroupTask(i, p.text, p.target, 0) for i, p in enumerate(prompts)]
        self.pool.reset_clock()
        batch_id = self._submit(images_ref, groups, ev.samples_per_prompt)
        self.pool.drain()
        return reward_metrics({batch_id: self.pool.take(batch_id)}, prefix="eval/reward")

    # ------------------------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, epoch: int) -> Path:
        tag = f"epoch_{epoch:04d}"
        folder = self._checkpoints() / tag
        self.learners.save(str(folder), tag, {"epoch": epoch})
        write_manifest(folder, "all", range(self.cfg.learner.ranks))  # last: every rank's share is in
        write_text_atomic(self._checkpoints() / "latest", tag)
        kept = sorted(p for p in self._checkpoints().iterdir() if p.is_dir() and p.name.startswith("epoch_"))
        for old in kept[:-self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old)
        return folder

    def resume(self) -> int:
        """The epoch to start from: after the newest intact checkpoint in the run folder (the latest, unless its
        manifest says it is damaged: then the one before, named in the log), else 0."""
        latest = self._checkpoints() / "latest"
        if not latest.is_file():
            return 0
        newest = latest.read_text().strip()
        tags = [newest] + sorted((p.name for p in self._checkpoints().glob("epoch_*")
                                  if p.is_dir() and p.name < newest), reverse=True)
        damaged = []
        for tag in tags:
            reason = verify_checkpoint(self._checkpoints() / tag, self.cfg.learner.ranks)
            if reason is not None:
                damaged.append(f"{tag}: {reason}")
                self.log(f"checkpoint {self._checkpoints() / tag} is damaged ({reason}); trying the one before it")
                continue
            state = self.learners.load(str(self._checkpoints() / tag), tag)
            start = int(state["epoch"]) + 1
            self.log(f"resumed from {self._checkpoints() / tag} (epoch {start - 1} done)")
            return start
        raise DamagedCheckpointError(f"{self._checkpoints()}: no intact checkpoint to resume from: " + "; ".join(damaged))

    # ------------------------------------------------------------------------------------ the run
    def run(self) -> dict:
        cfg = self.cfg
        start = self.resume()
        self.metrics.resume_at(start)
        self.broadcast(start)
        last = cfg.epochs - 1
        generation, mark = None, 0.0
        for epoch in range(start, cfg.epochs):
            generation = generation or self.generate(epoch, gallery=epoch in (0, last))
            learning = self.learn(generation)
            following = None
            if cfg.rollout.async_mode and epoch < last:  # the next rollouts, with the weights before this update
                following = self.generate(epoch + 1, gallery=epoch + 1 == last)
            learn = self.learners.wait(learning)
            row = self.epoch_row(generation, learn, self.broadcast(epoch + 1), max(mark, generation.started))
            if cfg.eval.every and ((epoch + 1) % cfg.eval.every == 0 or epoch == last):
                row.update(self.evaluate())
            self.metrics.append(row)
            self.log(console_line(row))
            self._check_rewards(row)
            if epoch == last or (cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0):
                self.save(epoch)
            generation, mark = following, time.perf_counter()
        history = self.metrics.history()
        summary = summarise(history, self)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _check_rewards(self, row: dict) -> None:
        """Count the epochs in a row in which every reward term failed on every image; stop at the limit."""
        names = [spec.name for spec in self.cfg.rewards.terms]
        if all(row.get(f"reward/{name}/errors", 0) >= row["reward/count"] for name in names):
            self.failed_epochs += 1
        else:
            self.failed_epochs = 0
        if self.failed_epochs >= self.cfg.rewards.max_failed_epochs:
            reasons = sorted({key.split("/reason/")[1] for key in row if "/reason/" in key and key.startswith("reward/")})
            raise RewardsFailedError(f"every reward term failed on every image for {self.failed_epochs} epochs in a "
                                     f"row (rewards.max_failed_epochs); reasons: {', '.join(reasons) or 'unknown'}")

    def shutdown(self) -> None:
        self.metrics.close()
        self.pool.shutdown()
        self.learners.kill()
        for actor in self.rollouts:
            ray.kill(actor, no_restart=True)
        self.placement.remove()


class RewardsFailedError(RuntimeError):
    """The reward terms failed on every image for ``rewards.max_failed_epochs`` epochs in a row."""


def kept_advantages(rewards: torch.Tensor, dropped: set[int], std_scope: str, clip: float) -> Advantages:
    """Group advantages over the groups not ``dropped`` (their rows stay 0 and out of a batch-wide std)."""
    kept = [group for group in range(rewards.shape[0]) if group not in dropped]
    if not dropped:
        return group_advantages(rewards, std_scope, clip)
    part = group_advantages(rewards[kept], std_scope, clip)
    values = torch.zeros(rewards.shape, dtype=part.values.dtype)
    zero_spread = torch.zeros(rewards.shape[0], dtype=torch.bool)
    values[kept], zero_spread[kept] = part.values, part.zero_spread
    return Advantages(values, zero_spread)


def summarise(history: list[dict], run: GRPORun) -> dict:
    first, last = history[0], history[-1]
    checkpoints = run.run_dir / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    return {
        "epochs": len(history), "reward_first": first["reward/mean"], "reward_last": last["reward/mean"],
        "reward_best": max(r["reward/mean"] for r in history),
        "images_per_s": sum(r["images"] for r in history) / sum(r["epoch_s"] for r in history),
        "zero_spread_ratio": sum(r["zero_spread_ratio"] for r in history) / len(history),
        "reward_restarts": run.pool.restarts, "prompts_rejected": run.prompts.rejected,
        "prompts_without_target": run.prompts.missing_target, "placement": run.nodes,
        "startup_s": run.startup_s, "checkpoint": str(latest), "model": str(latest / "model.safetensors"), "last": last,
    }


def run_grpo(cfg: GRPOConfig, run_dir: str | Path, checkpoint: str | None = None, log=log.info,
             mode: RunMode = "auto") -> dict:
    """Run GRPO into ``run_dir`` (resuming a run of the same config from its latest checkpoint; ``mode`` as
    ``--resume`` / ``--overwrite``); returns the summary metrics (a complete run's own, nothing run)."""
    cfg = with_initial_checkpoint(cfg, checkpoint)
    run_dir = Path(resolve_user_path(str(run_dir)))
    finished = settle_rerun(cfg, run_dir, mode)  # paths and the rerun, before Ray and the actors start
    if finished is not None:
        return finished
    if cfg.model.weights.lance:  # a wrong checkpoint fails here, before Ray and the actors start
        check_checkpoint(cfg, cfg.model.weights.lance)
    load_prompts(cfg.prompts, cfg.seed)
    # ray_address / RAY_ADDRESS: a cluster, whose job working_dir carries the code; else a local Ray
    started_ray = ensure_ray(cfg.ray_address, num_cpus=cfg.ray_num_cpus,
                             local_env=repo_pythonpath(keep_existing=False))
    run = None
    try:
        run = GRPORun(cfg, run_dir, cfg.model.weights.lance, log)
        return run.run()
    finally:
        if run is not None:
            run.shutdown()
        if started_ray:
            ray.shutdown()
