"""Weight sync by collective broadcast between plain tensor actors on the local Ray: exact weights, version
checks, the object-store fallback when the group breaks, a new group when a receiver is replaced."""

from __future__ import annotations

import pytest
import ray
import torch

from pipelines.rl.weight_sync import TensorSet, WeightSync, WeightSyncError, buckets, layout_key

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
