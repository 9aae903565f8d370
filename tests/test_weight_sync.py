"""Weight sync by collective broadcast between plain tensor actors on the local Ray: exact weights, version
checks, the object-store fallback when the group breaks or a receiver stalls, a new group when a receiver is
replaced. NCCL's semantics (``wait()`` returns at once, the work completes later or never) with fake works."""

from __future__ import annotations

import importlib
import threading
import time

import pytest
import ray
import torch

from pipelines.rl.weight_sync import (
    GroupSpec,
    TensorSet,
    WeightGroup,
    WeightSync,
    WeightSyncError,
    buckets,
    layout_key,
    wait_work,
    weight_group_actor,
)

SHAPES = {"a.weight": (64, 33), "a.bias": (33,), "b.weight": (1000, 70), "c": (7,)}


def test_buckets_keep_order_and_dtype():
    named = [("x", torch.zeros(10)), ("y", torch.zeros(10)), ("z", torch.zeros(4, dtype=torch.bfloat16)),
             ("w", torch.zeros(100)), ("v", torch.zeros(2))]
    out = buckets(named, limit=80)
    assert [[n for n, _ in b] for b in out] == [["x", "y"], ["z"], ["w"], ["v"]]
    assert layout_key(named) != layout_key(named[:-1])


@pytest.fixture
def actors(ray_local):
    remote = ray.remote(TensorSet).options(num_cpus=0)
    sender = remote.remote(SHAPES, seed=1)
    receivers = [remote.remote(SHAPES) for _ in range(2)]
    yield sender, receivers
    for actor in [sender, *receivers]:
        ray.kill(actor, no_restart=True)


def _same(sender, receivers, version):
    _, sent = ray.get(sender.state.remote())
    for receiver in receivers:
        got_version, got = ray.get(receiver.state.remote())
        assert got_version == version
        assert all(torch.equal(got[n], sent[n]) for n in SHAPES)


def test_collective_sync_exact_versioned_with_fallback(actors):
    sender, receivers = actors
    warnings = []
    sync = WeightSync(sender, receivers, "collective", timeout_s=10, log=warnings.append)
    assert sync.push(1) == "collective", warnings
    _same(sender, receivers, 1)
    ray.get(sender.perturb.remote())
    assert sync.push(2) == "collective" and sync.groups == 1 and not warnings
    _same(sender, receivers, 2)

    # a receiver told to expect another version refuses the weights and keeps its own
    ray.get(sender.perturb.remote())
    refs = [sender.send_weights.remote(3), receivers[0].receive_weights.remote(4),
            receivers[1].receive_weights.remote(3)]
    with pytest.raises(WeightSyncError, match="version 3 broadcast, version 4 expected"):
        ray.get(refs[1])
    ray.get([refs[0], refs[2]])
    assert ray.get(receivers[0].state.remote())[0] == 2

    # a broken group (a receiver left it): the sync goes through the object store, the next one rebuilds it
    ray.get(receivers[1].leave_weight_group.remote())
    assert sync.push(5) == "object_store" and sync.fallbacks == 1 and "object store" in warnings[0]
    _same(sender, receivers, 5)
    ray.get(sender.perturb.remote())
    assert sync.push(6) == "collective" and sync.groups == 2
    _same(sender, receivers, 6)

    # a receiver killed and replaced: a new group with the new actor
    ray.kill(receivers[1], no_restart=True)
    receivers[1] = ray.remote(TensorSet).options(num_cpus=0).remote(SHAPES)
    assert sync.push(7, receivers) == "collective" and sync.groups == 3
    _same(sender, receivers, 7)
    sync.close()


def test_object_store_mode(actors):
    sender, receivers = actors
    sync = WeightSync(sender, receivers, "object_store")
    assert sync.push(3) == "object_store" and sync.groups == 0
    _same(sender, receivers, 3)


# ---------------------------------------------------------------------------------------- NCCL-like fakes
class FakeWork:
    """NCCL-like work: ``wait()`` returns at once (it only orders the stream), ``is_completed()`` turns true
    after ``polls`` checks, never if ``polls`` is None (a stalled peer)."""

    def __init__(self, polls: int | None, on_wait=None, on_done=None, on_check=None) -> None:
        self.polls, self.on_wait, self.on_done, self.on_check = polls, on_wait, on_done, on_check
        self.waited, self.checks, self.done = False, 0, False

    def wait(self) -> bool:
        self.waited = True
        if self.on_wait:
            self.on_wait()
        return True

    def is_completed(self) -> bool:
        assert self.waited, "polled before wait()"
        self.checks += 1
        if self.on_check:
            self.on_check(self)
        if not self.done and self.polls is not None and self.checks > self.polls:
            self.done = True
            if self.on_done:
                self.on_done()
        return self.done


class FakeNCCL:
    """The receiving end of an NCCL broadcast of ``payloads``, one per op. The host sees an op's data only once
    it completed: the header (op 0, read on the host) lands then. Device work issued after ``wait()`` is
    ordered after the op: the buckets (copied on the device) land at ``wait()``. From op ``stall_at`` on,
    nothing completes or lands (a peer never joins)."""

    def __init__(self, payloads: list[torch.Tensor] | None = None, polls: int = 3, stall_at: int | None = None,
                 on_check=None) -> None:
        self.payloads, self.polls, self.stall_at, self.on_check = payloads, polls, stall_at, on_check
        self.works: list[FakeWork] = []
        self.calls: list[str] = []

    def broadcast(self, tensors, options):
        index, tensor = len(self.works), tensors[0]
        stalled = self.stall_at is not None and index >= self.stall_at

        def land():
            if self.payloads is not None and not stalled:
                tensor.copy_(self.payloads[index])

        work = FakeWork(None if stalled else self.polls, on_wait=land if index else None,
                        on_done=None if index else land, on_check=self.on_check)
        self.works.append(work)
        return work

    def abort(self) -> None:
        self.calls.append("abort")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def _member(pg, backend: str = "nccl", timeout_s: float = 60.0, seed: int | None = None,
            rank: int = 1) -> TensorSet:
    """A member (not an actor) in group ``weights/7`` over the fake process group ``pg``."""
    member = TensorSet(SHAPES, seed=seed)
    member._weight_group = WeightGroup(GroupSpec("127.0.0.1", 0, 3, backend, "weights/7", timeout_s), rank, pg)
    return member


def _payloads(version: int, weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    named = list(weights.items())
    header = torch.tensor([version, layout_key(named)], dtype=torch.int64)
    return [header, *[torch.cat([t.reshape(-1) for _, t in bucket]) for bucket in buckets(named)]]


def test_wait_work_awaits_nccl_completion_gloo_wait_blocks():
    work = FakeWork(polls=3)
    wait_work(work, time.monotonic() + 60, "nccl")
    assert work.waited and work.done and work.checks == 4
    gloo = FakeWork(polls=None)  # gloo's wait() returns when the op is done: no polling
    wait_work(gloo, time.monotonic() + 60, "gloo")
    assert gloo.waited and gloo.checks == 0


def test_wait_work_stalled_peer_raises_at_deadline():
    work = FakeWork(polls=None)
    with pytest.raises(WeightSyncError, match="timed out"):
        wait_work(work, time.monotonic() + 0.05, "nccl")
    assert work.waited and work.checks > 0 and not work.done


def test_receiver_reads_header_after_completion_copies_after_wait():
    sent = TensorSet(SHAPES, seed=1).weights
    pg = FakeNCCL(_payloads(4, sent))
    member = _member(pg)
    assert member.receive_weights(4) == 4 and member.version == 4
    assert all(torch.equal(member.weights[n], sent[n]) for n in SHAPES)  # header read once it had landed
    assert len(pg.works) == 1 + len(buckets(list(sent.items()))) and all(w.done for w in pg.works)
    assert pg.calls == [] and member._weight_group is not None


def test_sender_returns_after_every_broadcast_completed():
    pg = FakeNCCL(polls=2)
    member = _member(pg, seed=1, rank=0)
    assert isinstance(member.send_weights(5), float)
    # it returned, and stopped its clock, only once every broadcast had completed
    assert len(pg.works) == 1 + len(buckets(list(member.weights.items()))) and all(w.done for w in pg.works)


@pytest.mark.parametrize("stall_at", [0, 1])
def test_stalled_peer_fails_the_sync_and_aborts_the_group(stall_at):
    before = TensorSet(SHAPES).weights
    pg = FakeNCCL(_payloads(4, TensorSet(SHAPES, seed=1).weights), stall_at=stall_at)
    member = _member(pg, timeout_s=0.05)
    with pytest.raises(WeightSyncError, match="timed out"):
        member.receive_weights(4)
    assert pg.calls == ["abort"] and member._weight_group is None and member.version == -1
    assert not pg.works[stall_at].done
    if stall_at == 0:  # nothing copied from a header never received
        assert all(torch.equal(member.weights[n], before[n]) for n in SHAPES)
    sender_pg = FakeNCCL(stall_at=stall_at)
    sender = _member(sender_pg, timeout_s=0.05, seed=1, rank=0)
    with pytest.raises(WeightSyncError, match="timed out"):
        sender.send_weights(4)
    assert sender_pg.calls == ["abort"] and sender._weight_group is None


def test_abort_from_another_thread_ends_a_stalled_wait():
    started = threading.Event()
    pg = FakeNCCL(stall_at=0, on_check=lambda work: started.set())
    member = _member(pg, timeout_s=60.0)
    threading.Thread(target=lambda: started.wait(60) and member.abort_weight_group("weights/7"), daemon=True).start()
    with pytest.raises(WeightSyncError, match="aborted"):
        member.receive_weights(4)
    assert pg.calls == ["abort"]  # once: by the other thread, not again when the sync failed


def test_leave_and_abort_close_the_process_group():
    nccl, gloo = FakeNCCL(), FakeNCCL()
    member = _member(nccl)
    member.abort_weight_group("weights/6")  # another (older) group: left alone
    assert nccl.calls == []
    member.abort_weight_group("weights/7")
    member.abort_weight_group("weights/7")
    assert nccl.calls == ["abort"]
    with pytest.raises(WeightSyncError, match="aborted"):
        member.receive_weights(1)
    member = _member(gloo, backend="gloo")
    member.leave_weight_group()
    assert gloo.calls == ["shutdown"] and member._weight_group is None
    member = _member(object())  # a process group without abort()
    member.leave_weight_group()
    assert member._weight_group is None


# ---------------------------------------------------------------------------------------- a stalled receiver
class StallingTensorSet(TensorSet):
    """Busy in :meth:`hold` (a rollout, say) until its weight group is aborted: its part of a sync waits behind."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__(shapes)
        self.aborted = threading.Event()
        self.events: list[str] = []

    def abort_weight_group(self, prefix: str) -> None:
        self.events.append(f"abort {prefix}")
        super().abort_weight_group(prefix)
        self.aborted.set()

    def hold(self) -> bool:
        return self.aborted.wait(timeout=120)

    def receive_weights(self, version: int) -> int:
        try:
            return super().receive_weights(version)
        except WeightSyncError as err:
            self.events.append(f"failed {version}: {err}")
            raise

    def history(self) -> list[str]:
        return self.events


def test_stalled_receiver_falls_back_and_the_next_push_rebuilds(ray_local):
    # by its package path, which the actors' processes import (pytest imports this file as a top-level module)
    stalling = importlib.import_module("tests.test_weight_sync").StallingTensorSet
    sender = weight_group_actor(TensorSet).options(num_cpus=0).remote(SHAPES, seed=1)
    receivers = [weight_group_actor(TensorSet).options(num_cpus=0).remote(SHAPES),
                 weight_group_actor(stalling).options(num_cpus=0).remote(SHAPES)]
    warnings = []
    sync = WeightSync(sender, receivers, "collective", timeout_s=10, log=warnings.append, concurrent_abort=True)
    try:
        assert sync.push(1) == "collective", warnings
        held = receivers[1].hold.remote()
        ray.get(sender.perturb.remote())
        # the sender and the other receiver fail at their deadline; the held receiver's group is aborted
        # beside the call it is busy with, so its queued part of the sync fails at once
        assert sync.push(2) == "object_store" and sync.fallbacks == 1 and "object store" in warnings[0]
        assert ray.get(held) is True
        assert ray.get(receivers[1].history.remote()) == ["abort weights/1",
                                                          "failed 2: the weight group was aborted"]
        _same(sender, receivers, 2)
        ray.get(sender.perturb.remote())
        assert sync.push(3) == "collective" and sync.groups == 2 and sync.fallbacks == 1
        _same(sender, receivers, 3)
    finally:
        sync.close()
        for actor in [sender, *receivers]:
            ray.kill(actor, no_restart=True)
