"""Weights from the learner to the rollout actors by collective broadcast, the object store as fallback.

The learner (rank 0) and the rollout actors (ranks 1..N) form a process group of their own, built directly
on a TCPStore the learner serves at its node's IP, apart from the default group DeepSpeed may hold in the
learner: gloo, or NCCL when every member holds its weights on a GPU. A sync broadcasts a header (version,
layout key), then the trained tensors flattened into buckets of one dtype (``BUCKET_BYTES`` at most);
each receiver checks the version it was told to expect and that both sides hold the same tensors. A sync
that fails logs a warning and goes through the object store; the group is built anew for the next one,
and whenever the set of rollout actors changes.

    sync = WeightSync(learner, rollouts, "collective")
    sync.push(version)            # -> "collective" or "object_store"

The actors mix in :class:`WeightGroupMember` and define ``device`` and ``synced_weights()``.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal

import ray
import torch
from torch import distributed as dist

log = logging.getLogger("lance.grpo")

BUCKET_BYTES = 64 << 20
SYNC_TIMEOUT_S = 120.0
"""A collective op (or joining the group) not done after this long fails the sync (then: object store)."""


class WeightSyncError(RuntimeError):
    """A collective sync cannot go ahead: no group, another version or other tensors than expected."""


def buckets(named: list[tuple[str, torch.Tensor]], limit: int = BUCKET_BYTES) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors of one dtype, at most ``limit`` bytes a bucket (a larger tensor is a bucket alone)."""
    out, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if not out or out[-1][0][1].dtype != tensor.dtype or size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append((name, tensor))
        size += nbytes
    return out


def layout_key(named: list[tuple[str, torch.Tensor]]) -> int:
    """CRC of the names, shapes and dtypes in order: sender and receivers must agree on it."""
    text = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in named)
    return zlib.crc32(text.encode())


@dataclass(frozen=True)
class GroupSpec:
    address: str
    port: int
    world: int
    backend: Literal["gloo", "nccl"]
    prefix: str
    timeout_s: float = SYNC_TIMEOUT_S


class WeightGroup:
    """One member's end of the group."""

    def __init__(self, spec: GroupSpec, rank: int, store: dist.TCPStore | None = None) -> None:
        timeout = timedelta(seconds=spec.timeout_s)
        self.spec, self.rank = spec, rank
        self.server = store  # rank 0 keeps its store (the server) alive
        store = store or dist.TCPStore(spec.address, spec.port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(spec.prefix, store)
        if spec.backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, spec.world, timeout)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
            self.pg = dist.ProcessGroupGloo(prefixed, rank, spec.world, options)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.pg.broadcast([tensor], options).wait()

    def _wire(self, device: torch.device) -> torch.device:
        return device if self.spec.backend == "nccl" else torch.device("cpu")

    @torch.no_grad()
    def send(self, weights: dict[str, torch.Tensor], version: int) -> None:
        named = list(weights.items())
        device = self._wire(named[0][1].device)
        self._broadcast(torch.tensor([version, layout_key(named)], dtype=torch.int64, device=device))
        for bucket in buckets(named):
            self._broadcast(torch.cat([t.detach().reshape(-1) for _, t in bucket]).to(device))

    @torch.no_grad()
    def receive(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Copy the broadcast tensors into ``weights`` (in place) if the version is the one expected."""
        named = list(weights.items())
        device = self._wire(named[0][1].device)
        header = torch.zeros(2, dtype=torch.int64, device=device)
        self._broadcast(header)
        sent_version, key = header.tolist()
        if key != layout_key(named):
            raise WeightSyncError("the learner sends other tensors (names, shapes or dtypes) than this actor holds")
        for bucket in buckets(named):
            flat = torch.empty(sum(t.numel() for _, t in bucket), dtype=bucket[0][1].dtype, device=device)
            self._broadcast(flat)
            if sent_version == version:
                for (_, tensor), part in zip(bucket, flat.split([t.numel() for _, t in bucket])):
                    tensor.copy_(part.view_as(tensor))
        if sent_version != version:
            raise WeightSyncError(f"weights of version {sent_version} broadcast, version {version} expected; "
                                  "kept the previous weights")


class WeightGroupMember:
    """Mixin of the actors in the group. The actor defines ``device`` and ``synced_weights()`` (the live
    tensors synced, by name, in the same order on every member); a receiver may override ``weights_received``."""

    device: torch.device
    _weight_server: dist.TCPStore | None = None
    _weight_group: WeightGroup | None = None

    def synced_weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weights_received(self, version: int) -> None:
        pass

    def weight_device(self) -> str:
        return self.device.type

    def serve_weight_group(self, timeout_s: float = SYNC_TIMEOUT_S) -> tuple[str, int]:
        """(rank 0) A new store for a new group, at this node's IP and a free port: (address, port)."""
        self.leave_weight_group()
        address = ray.util.get_node_ip_address()
        self._weight_server = dist.TCPStore(address, 0, is_master=True, wait_for_workers=False,
                                            timeout=timedelta(seconds=timeout_s))
        return address, self._weight_server.port

    def join_weight_group(self, spec: dict, rank: int) -> None:
        """Blocks until every member has joined."""
        self._weight_group = WeightGroup(GroupSpec(**spec), rank, self._weight_server if rank == 0 else None)

    def leave_weight_group(self) -> None:
        self._weight_group = None
        self._weight_server = None

    def _group(self) -> WeightGroup:
        if self._weight_group is None:
            raise WeightSyncError("this actor is in no weight group")
        return self._weight_group

    def send_weights(self, version: int) -> float:
        started = time.perf_counter()
        self._group().send(self.synced_weights(), version)
        return time.perf_counter() - started

    def receive_weights(self, version: int) -> int:
        self._group().receive(self.synced_weights(), version)
        self.weights_received(version)
        return version


class TensorSet(WeightGroupMember):
    """Actor body holding named tensors: a stand-in for the learner and rollout actors (tests, bench)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        generator = torch.Generator().manual_seed(seed or 0)
        self.device = torch.device("cpu")
        self.weights = {name: (torch.randn(shape, generator=generator) if seed is not None
                               else torch.zeros(shape)).to(dtype) for name, shape in shapes.items()}
        self.version = -1

    def synced_weights(self) -> dict[str, torch.Tensor]:
        return self.weights

    def weights_received(self, version: int) -> None:
        self.version = version

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.weights.items()}

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        for name, value in weights.items():
            self.weights[name].copy_(value)
        self.version = version
        return version

    def state(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.version, self.weights

    def perturb(self) -> None:
        for tensor in self.weights.values():
            tensor.add_(1)


def _key(actor) -> str:
    return actor._actor_id.hex()


class WeightSync:
    """The driver's side: pushes the sender's weights to the receivers, collectively or by the object store
    (the sender's ``get_weights`` and each receiver's ``set_weights(weights, version)``)."""

    def __init__(self, sender, receivers: list, mode: Literal["collective", "object_store"] = "collective",
                 timeout_s: float = SYNC_TIMEOUT_S, log=log.warning) -> None:
        self.sender, self.receivers, self.mode, self.timeout_s, self.log = sender, list(receivers), mode, timeout_s, log
        self.members: list | None = None
        """The receivers of the live group (None: none built, or broken by a failed sync)."""
        self.groups = 0
        self.fallbacks = 0

    def _build(self) -> None:
        members = [self.sender, *self.receivers]
        devices = ray.get([m.weight_device.remote() for m in members])  # waits for the actors to start
        backend = "nccl" if all(d == "cuda" for d in devices) else "gloo"
        address, port = ray.get(self.sender.serve_weight_group.remote(self.timeout_s), timeout=self.timeout_s)
        self.groups += 1
        spec = asdict(GroupSpec(address, port, len(members), backend, f"weights/{self.groups}", self.timeout_s))
        ray.get([m.join_weight_group.remote(spec, rank) for rank, m in enumerate(members)],
                timeout=self.timeout_s + 30)
        self.members = list(self.receivers)

    def _drop(self) -> None:
        for member in [self.sender, *(self.members or [])]:
            member.leave_weight_group.remote()  # queued behind a broadcast still waiting; a dead actor ignores it
        self.members = None

    def push(self, version: int, receivers: list | None = None) -> str:
        """Send the sender's weights as ``version``; returns how: ``collective`` or ``object_store``."""
        if receivers is not None:
            self.receivers = list(receivers)
        if self.mode == "collective":
            try:
                if self.members is None or [_key(r) for r in self.members] != [_key(r) for r in self.receivers]:
                    self._drop()
                    self._build()
                ray.get([self.sender.send_weights.remote(version),
                         *[r.receive_weights.remote(version) for r in self.receivers]], timeout=self.timeout_s + 30)
                return "collective"
            except Exception as err:  # noqa: BLE001 -- any failure of the group falls back
                self.fallbacks += 1
                self.log(f"collective weight sync of version {version} failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); sent through the object store, the "
                         "group is built anew for the next sync")
                self._drop()
        weights = self.sender.get_weights.remote()
        ray.get([r.set_weights.remote(weights, version) for r in self.receivers])
        return "object_store"

    def close(self) -> None:
        if self.members is not None:
            self._drop()
