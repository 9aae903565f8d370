"""The driver's side of the learner ranks: ``learner.ranks`` Learner actors in their placement bundles, joined
into one torch.distributed group at rank 0's node IP and a port rank 0 chose, each given its share of every
update's groups.

    learners = LearnerGroup(cfg, placement, checkpoint)   # starting: the ranks build their engines
    learners.ready()
    metrics = learners.wait(learners.update(trajectories, advantages))   # rank 0's, reduced over the ranks
"""

from __future__ import annotations

import socket
from pathlib import Path

import ray

from pipelines.runtime.run_log import ActorLog

from .config import GRPOConfig
from .learner import Learner
from .placement import Placement
from .weight_sync import WeightGroupMember, weight_group_actor


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class LearnerActor(Learner, WeightGroupMember, ActorLog):
    """The learner as a Ray actor body: the rendezvous at its node's IP, trajectories from the object store,
    and the weight-sync membership (rank 0 sends)."""

    def rendezvous(self) -> tuple[str, int]:
        """(rank 0) The learner group's address: this node's IP and a free port on it."""
        address = ray.util.get_node_ip_address()
        return address, _free_port(address)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def update(self, trajectory_refs: list, group_ids: list[int], advantages: list[list[float]]) -> dict:
        """:meth:`Learner.train_groups` over ``group_ids`` (in training order), found in the lists of group
        payloads that ``trajectory_refs`` hold."""
        payloads = {g["group_id"]: g for chunk in ray.get(trajectory_refs) for g in chunk}
        return self.train_groups([payloads[group_id] for group_id in group_ids], advantages)


def gather(refs: list) -> list:
    """``ray.get`` of every ref, raising the first failure as soon as it comes: a rank that died leaves the
    others waiting in a collective, and must not be waited behind."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def rank_shares(order: list[int], ranks: int, minibatches: int) -> list[list[int]]:
    """Each rank's groups in training order: every update's groups (``order`` cut into ``minibatches``
    consecutive runs) split into ``ranks`` consecutive runs, rank r taking the r-th of each."""
    per_update = len(order) // minibatches
    per_rank = per_update // ranks
    return [[group for update in range(minibatches)
             for group in order[update * per_update + rank * per_rank:update * per_update + (rank + 1) * per_rank]]
            for rank in range(ranks)]


class LearnerGroup:
    def __init__(self, cfg: GRPOConfig, placement: Placement, checkpoint: str | None = None,
                 log_dir: Path | None = None) -> None:
        """``log_dir``: each rank's output goes to ``log_dir/learner-<rank>.log``."""
        self.cfg = cfg
        data = cfg.model_dump(mode="json")
        remote = weight_group_actor(LearnerActor)
        self.actors = [remote.options(**placement.options(index, cfg.learner.actor)).remote(data, checkpoint, rank)
                       for rank, index in enumerate(placement.learner)]
        if log_dir is not None:
            for rank, actor in enumerate(self.actors):
                actor.log_to.remote(str(log_dir / f"learner-{rank}.log"))
        group = self.actors[0].rendezvous.remote()
        self.starting = [actor.start.remote(group) for actor in self.actors]

    def ready(self) -> None:
        """Wait until every rank has joined the group and built its engine."""
        gather(self.starting)

    @property
    def sender(self):
        """Rank 0: the sender of the weight sync, the holder of the EMA."""
        return self.actors[0]

    def weights(self, ema: bool = False):
        """A reference to rank 0's trained weights, or to the EMA's (put together by every rank)."""
        if not ema:
            return self.sender.get_weights.remote()
        refs = [actor.ema_weights.remote() for actor in self.actors]  # every rank gives its shard
        return refs[0]

    def node_ids(self) -> list[str]:
        return ray.get([actor.node_id.remote() for actor in self.actors])

    def update(self, trajectories: list, advantages: list[list[float]]) -> list:
        """Start an epoch's update on every rank; ``trajectories``: (reference to a list of group payloads, their
        group ids) in arrival order (the training order), ``advantages``: rows by group id. Returns the refs
        for :meth:`wait`."""
        where = {group: ref for ref, ids in trajectories for group in ids}
        order = [group for _, ids in trajectories for group in ids]
        refs = []
        for actor, share in zip(self.actors, rank_shares(order, len(self.actors), self.cfg.learner.minibatches)):
            needed = list(dict.fromkeys(where[group] for group in share))
            refs.append(actor.update.remote(needed, share, [advantages[group] for group in share]))
        return refs

    def wait(self, refs: list):
        """Rank 0's result of an update (or any call made on every rank)."""
        return gather(refs)[0]

    def save(self, folder: str, tag: str, client_state: dict) -> str:
        return self.wait([actor.save.remote(folder, tag, client_state) for actor in self.actors])

    def load(self, folder: str, tag: str) -> dict:
        return self.wait([actor.load.remote(folder, tag) for actor in self.actors])

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
