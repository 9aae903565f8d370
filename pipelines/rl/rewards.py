"""The reward actor pool: N actors, each holding every reward model of the run, fed with decoded
micro-batches as they arrive. A batch is owned by exactly one slot at a time; when an actor dies, or is
still busy with one batch after ``call_timeout_s`` (hung), it is killed, its slot gets a new actor in
the same placement bundle, and its batches are queued again for any live actor. Its late results are
never read, so nothing is lost and every batch is scored once.

Errors inside a reward cost the run only the scores concerned: an image a reward raises on scores 0 for
that reward (reason ``error:<ExceptionType>``, counted in the result's ``errors``). An error that escapes
the worker anyway (the batch's images cannot be fetched, ...) sends the batch once more, to another
actor when there is one; failing again, all its images score 0, counted as errors of every reward."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, GetTimeoutError, ObjectLostError, OwnerDiedError,
                            RayActorError, RayError)

from lance_core.rewards import RewardSpec, WeightedReward, error_reason
from pipelines.runtime.run_log import ActorLog

if TYPE_CHECKING:  # the actor process imports this module; keep it free of torch
    from .config import RewardPoolConfig

log = logging.getLogger("lance.grpo")

IN_FLIGHT_PER_ACTOR = 2
PROBE_TIMEOUT_S = 10.0
"""How long a reward actor gets to answer when a call failed without naming which actor died."""
"""Batches queued on an actor at once: the next one is already there when the current one ends."""


class RewardWorker(ActorLog):
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
        out = self.reward(list(images), prompts, targets, isolate_errors=True)
        return {"total": out.total, "components": out.components, "reasons": out.reasons, "details": out.details,
                "errors": out.errors, "busy_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


@dataclass
class _Batch:
    batch_id: int
    images: ray.ObjectRef
    prompts: list[str]
    targets: list[str | None]
    failed_on: int | None = None
    """The slot whose actor raised on this batch; it is sent once more, elsewhere when possible."""
    hung_before: bool = False
    """An actor hung scoring this batch once already (and was replaced)."""


@dataclass
class _Slot:
    index: int
    actor: object
    starting: ray.ObjectRef | None = None
    """The actor's ``info`` call while its constructor (loading the reward models) runs."""
    info: dict | None = None
    since: float = 0.0
    """When the slot's current work began, as seen from the driver: the start of the actor, else the call
    at the head of its queue (the actor scores one batch at a time, in order)."""
    restarts: int = 0
    in_flight: dict = field(default_factory=dict)
    """ObjectRef -> _Batch."""

    def deadline(self, cfg: RewardPoolConfig) -> float | None:
        if self.starting is not None:
            return self.since + cfg.start_timeout_s
        if self.in_flight:
            return self.since + cfg.call_timeout_s
        return None


class RewardPool:
    def __init__(self, cfg: RewardPoolConfig, make_actor) -> None:
        """``make_actor(slot_index)`` starts a RewardWorker actor for a slot (in its placement bundle)."""
        self.cfg = cfg
        self.make_actor = make_actor
        self.names = [spec.name for spec in cfg.terms]
        self.slots = [self._start(_Slot(i, None)) for i in range(cfg.actors.count)]
        self.queue: deque[_Batch] = deque()
        self.results: dict[int, dict] = {}
        self.restarts = 0
        self.lost_inputs = 0
        """Batches whose images were lost before scoring (their groups dropped)."""
        self.busy_s = 0.0
        self.first_submit: float | None = None
        self.last_result: float | None = None

    def _start(self, slot: _Slot) -> _Slot:
        slot.actor = self.make_actor(slot.index)
        slot.starting, slot.info, slot.since = slot.actor.info.remote(), None, time.perf_counter()
        return slot

    def _started(self, slot: _Slot, info: dict) -> None:
        slot.starting, slot.info, slot.since = None, info, time.perf_counter()

    def wait_ready(self) -> list[dict]:
        starting = [slot for slot in self.slots if slot.starting is not None]
        infos = ray.get([slot.starting for slot in starting], timeout=self.cfg.start_timeout_s)
        for slot, info in zip(starting, infos):
            self._started(slot, info)
        return [slot.info for slot in self.slots]

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
            batch = self.queue[0]
            slots = [s for s in self.slots if s.index != batch.failed_on] or self.slots
            slot = min(slots, key=lambda s: (len(s.in_flight), s.starting is not None))
            if len(slot.in_flight) >= IN_FLIGHT_PER_ACTOR:
                return
            self.queue.popleft()
            if slot.starting is None and not slot.in_flight:
                slot.since = time.perf_counter()
            ref = slot.actor.score.remote(batch.images, batch.prompts, batch.targets)
            slot.in_flight[ref] = batch

    def in_flight(self) -> list[ray.ObjectRef]:
        """The pool's references to wait on: the scoring calls, and the start of new actors."""
        return [ref for slot in self.slots
                for ref in ([slot.starting] if slot.starting is not None else []) + list(slot.in_flight)]

    def pending(self) -> bool:
        return bool(self.queue) or any(slot.in_flight for slot in self.slots)

    def wait(self, others: list = ()) -> list:
        """Wait for one of ``others`` or of the pool's references, at most until the next deadline of an
        actor; take the pool's results, replace hung actors, and return the ready ones of ``others``."""
        own = self.in_flight()
        deadlines = [d for slot in self.slots if (d := slot.deadline(self.cfg)) is not None]
        timeout = max(min(deadlines) - time.perf_counter(), 0.0) if deadlines else None
        ready, _ = ray.wait([*others, *own], num_returns=1, timeout=timeout)
        mine = set(own)
        for ref in ready:
            if ref in mine:
                self.handle(ref)
        self._replace_hung()
        return [ref for ref in ready if ref not in mine]

    def handle(self, ref: ray.ObjectRef) -> None:
        """Take a finished reference: store its result, or replace a dead actor and queue its batches again.
        A reference of an actor replaced since is ignored."""
        slot = next((s for s in self.slots if ref == s.starting or ref in s.in_flight), None)
        if slot is None:
            return
        if ref == slot.starting:
            try:
                self._started(slot, ray.get(ref))
            except RayError:  # its constructor raised, or it died starting
                self._replace(slot)
            return
        try:
            result = ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError, ObjectLostError, OwnerDiedError) as error:
            if self._input_lost(slot, error):
                self._lose(slot, ref, error)
            else:
                self._replace(slot)
            return
        except RayError as error:  # escaped the worker's per-image handling; the actor lives on
            batch = slot.in_flight.pop(ref)
            slot.since = time.perf_counter()
            if batch.failed_on is None:
                log.warning("reward actor slot %d failed on batch %d (%r); sending it once more",
                            slot.index, batch.batch_id, error)
                batch.failed_on = slot.index
                self.queue.appendleft(batch)
            else:
                log.warning("batch %d failed again (%r); its %d images score 0", batch.batch_id, error,
                            len(batch.prompts))
                self._store(batch, self._failed(batch, error))
            self._dispatch()
            return
        batch = slot.in_flight.pop(ref)
        slot.since = time.perf_counter()
        self._store(batch, result)
        self._dispatch()

    def _input_lost(self, slot: _Slot, error: RayError) -> bool:
        """Whether a failed call lost its input (the images: their rollout actor or node died) rather than the
        reward actor: the error names another actor, or the object itself, or the reward actor still answers."""
        if isinstance(error, (ObjectLostError, OwnerDiedError)):
            return True
        failed = getattr(error, "actor_id", None)
        if failed:
            return failed != slot.actor._actor_id.hex()
        try:
            ray.get(slot.actor.info.remote(), timeout=min(self.cfg.call_timeout_s, PROBE_TIMEOUT_S))
        except (RayError, TimeoutError):
            return False
        return True

    def _lose(self, slot: _Slot, ref: ray.ObjectRef, error: RayError) -> None:
        """A batch whose images are gone: nothing to score or to resend; its groups are dropped (counted)."""
        batch = slot.in_flight.pop(ref)
        slot.since = time.perf_counter()
        log.warning("batch %d lost its images (%s); its %d groups are dropped, reward actor slot %d kept",
                    batch.batch_id, type(error).__name__, len(batch.prompts), slot.index)
        self.lost_inputs += 1
        self._store(batch, {**self._failed(batch, error), "errors": {}, "lost_input": True})
        self._dispatch()

    def _store(self, batch: _Batch, result: dict) -> None:
        if batch.batch_id not in self.results:
            self.results[batch.batch_id] = result
            self.busy_s += result["busy_s"]
        self.last_result = time.perf_counter()

    def _failed(self, batch: _Batch, error: RayError) -> dict:
        """A batch no actor could score: 0 for every image, an error of every reward."""
        count = len(batch.prompts)
        reason = error_reason(getattr(error, "cause", None) or error)
        return {"total": [0.0] * count, "components": {name: [0.0] * count for name in self.names},
                "reasons": {name: [reason] * count for name in self.names}, "details": {},
                "errors": dict.fromkeys(self.names, count), "busy_s": 0.0, "cpu_s": 0.0}

    def _replace_hung(self) -> None:
        now = time.perf_counter()
        for slot in self.slots:
            deadline = slot.deadline(self.cfg)
            if deadline is None or now <= deadline:
                continue
            watched = [slot.starting] if slot.starting is not None else list(slot.in_flight)
            done, _ = ray.wait(watched, num_returns=len(watched), timeout=0)
            if done:  # finished meanwhile, not hung
                for ref in done:
                    self.handle(ref)
                continue
            log.warning("reward actor slot %d is hung (%s for over %.0fs); replacing it", slot.index,
                        "starting" if slot.starting is not None else "scoring one batch", now - slot.since)
            self._replace(slot, hung=slot.starting is None)

    def _replace(self, slot: _Slot, hung: bool = False) -> None:
        """A new actor in ``slot``; its batches are sent again. With ``hung``, the batch it hung on (the head of
        its queue) gets the rule of a batch that raised: sent once more, and if it hangs again, scored 0."""
        if slot.restarts >= self.cfg.max_restarts:
            raise RuntimeError(f"reward actor slot {slot.index} died or hung {slot.restarts + 1} times "
                               f"(rewards.max_restarts = {self.cfg.max_restarts})")
        lost = list(slot.in_flight.values())
        slot.in_flight.clear()
        if hung and lost:
            head = lost.pop(0)
            if head.hung_before:
                log.warning("batch %d hung again; its %d images score 0", head.batch_id, len(head.prompts))
                self._store(head, self._failed(head, GetTimeoutError(f"scoring hung over {self.cfg.call_timeout_s}s")))
            else:
                head.hung_before = True
                lost.insert(0, head)
        with contextlib.suppress(ValueError, RayActorError):  # the actor may be gone already
            ray.kill(slot.actor, no_restart=True)
        self._start(slot)
        slot.restarts += 1
        self.restarts += 1
        self.queue.extendleft(reversed(lost))
        self._dispatch()

    def drain(self) -> None:
        while self.pending():
            self.wait()

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
