"""The reward actor pool: N actors, each holding every reward model of the run, fed with decoded
micro-batches as they arrive. A batch is owned by exactly one slot at a time; when an actor dies its
slot gets a new actor in the same placement bundle and its batches are queued again, so nothing is
lost and every batch is scored once."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from lance_core.rewards import RewardSpec, WeightedReward

if TYPE_CHECKING:  # the actor process imports this module; keep it free of torch
    from .config import RewardPoolConfig

IN_FLIGHT_PER_ACTOR = 2
"""Batches queued on an actor at once: the next one is already there when the current one ends."""


class RewardWorker:
    """Actor body: scores batches of images with the composed reward."""

    def __init__(self, specs: list[dict], torch_threads: int) -> None:
        self.reward = WeightedReward([RewardSpec.model_validate(s) for s in specs])
        if "torch" in sys.modules:  # a torch reward model (CLIP) was loaded
            sys.modules["torch"].set_num_threads(torch_threads)
        self.pid = os.getpid()

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": self.pid}

    def score(self, images: np.ndarray, prompts: list[str], targets: list[str | None]) -> dict:
        started, cpu = time.perf_counter(), time.process_time()
        out = self.reward(list(images), prompts, targets)
        return {"total": out.total, "components": out.components, "reasons": out.reasons, "details": out.details,
                "busy_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


@dataclass
class _Batch:
    batch_id: int
    images: ray.ObjectRef
    prompts: list[str]
    targets: list[str | None]


@dataclass
class _Slot:
    index: int
    actor: object
    restarts: int = 0
    in_flight: dict = field(default_factory=dict)
    """ObjectRef -> _Batch."""


class RewardPool:
    def __init__(self, cfg: RewardPoolConfig, make_actor) -> None:
        """``make_actor(slot_index)`` starts a RewardWorker actor for a slot (in its placement bundle)."""
        self.cfg = cfg
        self.make_actor = make_actor
        self.slots = [_Slot(i, make_actor(i)) for i in range(cfg.actors.count)]
        self.queue: deque[_Batch] = deque()
        self.results: dict[int, dict] = {}
        self.restarts = 0
        self.busy_s = 0.0
        self.first_submit: float | None = None
        self.last_result: float | None = None

    def wait_ready(self) -> list[dict]:
        return ray.get([slot.actor.info.remote() for slot in self.slots])

    def reset_clock(self) -> None:
        self.busy_s = 0.0
        self.first_submit = self.last_result = None

    # ------------------------------------------------------------------------------------ scheduling
    def submit(self, batch_id: int, images: ray.ObjectRef, prompts: list[str], targets: list[str | None]) -> None:
        if self.first_submit is None:
            self.first_submit = time.perf_counter()
        self.queue.append(_Batch(batch_id, images, prompts, targets))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            slot = min(self.slots, key=lambda s: len(s.in_flight))
            if len(slot.in_flight) >= IN_FLIGHT_PER_ACTOR:
                return
            batch = self.queue.popleft()
            ref = slot.actor.score.remote(batch.images, batch.prompts, batch.targets)
            slot.in_flight[ref] = batch

    def in_flight(self) -> list[ray.ObjectRef]:
        return [ref for slot in self.slots for ref in slot.in_flight]

    def pending(self) -> bool:
        return bool(self.queue) or any(slot.in_flight for slot in self.slots)

    def handle(self, ref: ray.ObjectRef) -> None:
        """Take a finished reference: store its result, or replace a dead actor and queue its batches again."""
        slot = next(s for s in self.slots if ref in s.in_flight)
        try:
            result = ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            self._replace(slot)
            return
        batch = slot.in_flight.pop(ref)
        if batch.batch_id not in self.results:
            self.results[batch.batch_id] = result
            self.busy_s += result["busy_s"]
        self.last_result = time.perf_counter()
        self._dispatch()

    def _replace(self, slot: _Slot) -> None:
        if slot.restarts >= self.cfg.max_restarts:
            raise RuntimeError(f"reward actor slot {slot.index} died {slot.restarts + 1} times "
                               f"(rewards.max_restarts = {self.cfg.max_restarts})")
        lost = list(slot.in_flight.values())
        slot.in_flight.clear()
        with contextlib.suppress(ValueError, RayActorError):  # the actor may be gone already
            ray.kill(slot.actor, no_restart=True)
        slot.actor = self.make_actor(slot.index)
        slot.restarts += 1
        self.restarts += 1
        self.queue.extendleft(reversed(lost))
        self._dispatch()

    def drain(self) -> None:
        while self.pending():
            ready, _ = ray.wait(self.in_flight(), num_returns=1)
            for ref in ready:
                self.handle(ref)

    def take(self, batch_id: int) -> dict:
        return self.results.pop(batch_id)

    def utilisation(self) -> float | None:
        """Busy seconds over (actors x wall seconds from the first submission to the last result)."""
        if self.first_submit is None or self.last_result is None:
            return None
        wall = max(self.last_result - self.first_submit, 1e-9)
        return self.busy_s / (len(self.slots) * wall)

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
