"""One placement group for a run: a bundle per learner rank, one per rollout worker, one per reward actor.
The strategy (SPREAD by default) spreads the bundles over the nodes; custom resources in a bundle pin
it to nodes that offer them."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ActorResources, GRPOConfig


def bundle(resources: ActorResources) -> dict[str, float]:
    out = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.resources}
    out = {key: value for key, value in out.items() if value > 0}
    return out or {"CPU": 0.01}


@dataclass
class Placement:
    group: PlacementGroup
    learner: list[int]
    rollout: list[int]
    reward: list[int]

    def options(self, index: int, resources: ActorResources, **extra) -> dict:
        """Actor options that put an actor in bundle ``index`` with the bundle's resources."""
        custom = {k: v for k, v in resources.resources.items() if v > 0}
        return dict(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, resources=custom or None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
                    **extra)

    def remove(self) -> None:
        remove_placement_group(self.group)


def create_placement(cfg: GRPOConfig) -> Placement:
    specs = [cfg.learner.actor] * cfg.learner.ranks + [cfg.rollout.actors] * cfg.rollout.actors.count \
        + [cfg.rewards.actors] * cfg.rewards.actors.count
    bundles = [bundle(spec) for spec in specs]
    group = placement_group(bundles, strategy=cfg.placement.strategy, name="")
    try:
        ray.get(group.ready(), timeout=cfg.placement.timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"placement group not ready after {cfg.placement.timeout_s:.0f}s (placement.timeout_s): bundles "
            f"{bundles} with strategy {cfg.placement.strategy} do not fit the cluster's resources "
            f"{ray.cluster_resources()}") from None
    ranks, rollouts = cfg.learner.ranks, cfg.rollout.actors.count
    return Placement(group, list(range(ranks)), list(range(ranks, ranks + rollouts)),
                     list(range(ranks + rollouts, ranks + rollouts + cfg.rewards.actors.count)))
