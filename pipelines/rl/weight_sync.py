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

Under NCCL a collective's ``wait()`` only makes the current CUDA stream wait for it: each member waits for
completion on the host with a deadline of its own (:func:`wait_work`), and a member whose sync fails aborts its
process group (a stream waiting on a collective that never ends is freed only by an abort). Actors made with
:func:`weight_group_actor` also take :meth:`WeightGroupMember.abort_weight_group` while another of their calls
is stuck; ``WeightSync(..., concurrent_abort=True)`` then aborts the members still in a failed sync at once.
"""

from __future__ import annotations

import logging
import threading
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
"""A sync (or joining the group) not done after this long fails on that member (then: object store)."""
WATCHDOG_MARGIN_S = 60.0
"""An NCCL group's timeout is SYNC_TIMEOUT_S + this: our deadline and abort come before NCCL's watchdog,
which by default tears the process down at the group's timeout."""
REPORT_GRACE_S = 30.0
"""How long past the sync timeout the driver waits for the members' reports."""
ABORT_GROUP = "weight_sync_abort"
"""The Ray concurrency group in which ``abort_weight_group`` runs (see :func:`weight_group_actor`)."""


class WeightSyncError(RuntimeError):
    """A collective sync cannot go ahead: no group, a collective failed, timed out or was aborted, another
    version or other tensors than expected."""


def weight_group_actor(cls):
    """``ray.remote`` of an actor class that mixes in :class:`WeightGroupMember`, with :data:`ABORT_GROUP`
    declared (Ray only takes concurrency groups here, not in ``.options``; calling a group an actor did not
    declare kills it). Its other methods still run one at a time."""
    return ray.remote(concurrency_groups={ABORT_GROUP: 1})(cls)


def wait_work(work, deadline: float, backend: str, aborted: threading.Event | None = None) -> None:
    """Return once the collective ``work`` is done, on the device too; raise :class:`WeightSyncError` if it
    failed, if ``aborted`` is set or (NCCL) if it is not done at ``deadline`` (``time.monotonic()``).

    gloo's ``wait()`` blocks the host until the op is done or gloo's timeout. NCCL's only makes the current
    stream wait for it, so the host polls ``is_completed()`` after it."""
    try:
        work.wait()
    except Exception as err:
        raise WeightSyncError(f"collective failed: {err}") from err
    if backend == "nccl":
        pause = 1e-4
        while not work.is_completed():
            if aborted is not None and aborted.is_set():
                break
            if time.monotonic() >= deadline:
                raise WeightSyncError("timed out: a collective of the weight sync is not done (a member stalled)")
            time.sleep(pause)
            pause = min(2 * pause, 0.01)
    if aborted is not None and aborted.is_set():
        raise WeightSyncError("the weight group was aborted")
    error = getattr(work, "exception", lambda: None)()
    if error is not None:
        raise WeightSyncError(f"collective failed: {error}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


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
    """One member's end of the group: its process group ``pg`` (and, on rank 0, the store's server)."""

    def __init__(self, spec: GroupSpec, rank: int, pg, server: dist.TCPStore | None = None) -> None:
        self.spec, self.rank, self.pg = spec, rank, pg
        self.server = server  # rank 0 keeps its store (the server) alive
        self.aborted = threading.Event()
        self._abort_lock = threading.Lock()

    @classmethod
    def connect(cls, spec: GroupSpec, rank: int, server: dist.TCPStore | None = None) -> WeightGroup:
        timeout = timedelta(seconds=spec.timeout_s)
        store = server or dist.TCPStore(spec.address, spec.port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(spec.prefix, store)
        if spec.backend == "nccl":
            pg = dist.ProcessGroupNCCL(prefixed, rank, spec.world,
                                       timedelta(seconds=spec.timeout_s + WATCHDOG_MARGIN_S))
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
            pg = dist.ProcessGroupGloo(prefixed, rank, spec.world, options)
        return cls(spec, rank, pg, server)

    def abort(self) -> None:
        """Abort the process group (NCCL: its communicators; a pending collective ends with an error) or shut it
        down (gloo: a pending op still ends at gloo's timeout). Once; from any thread."""
        with self._abort_lock:
            if self.aborted.is_set():
                return
            self.aborted.set()
            stop = getattr(self.pg, "abort" if self.spec.backend == "nccl" else "shutdown", None)
            if stop is not None:
                try:
                    stop()
                except Exception as err:  # noqa: BLE001 -- the group is dropped anyway
                    log.warning(f"weight group {self.spec.prefix}: {self.spec.backend} abort failed ({err})")

    def _start(self, tensor: torch.Tensor):
        """Broadcast from rank 0; what the current stream does next is ordered after it."""
        if self.aborted.is_set():
            raise WeightSyncError("the weight group was aborted")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        try:
            work = self.pg.broadcast([tensor], options)
            work.wait()
        except Exception as err:
            raise WeightSyncError(f"collective failed: {err}") from err
        return work

    def _finish(self, works: list, deadline: float) -> None:
        for work in works:
            wait_work(work, deadline, self.spec.backend, self.aborted)

    def _wire(self, device: torch.device) -> torch.device:
        return device if self.spec.backend == "nccl" else torch.device("cpu")

    @torch.no_grad()
    def send(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Returns once every broadcast is done on the device."""
        deadline = time.monotonic() + self.spec.timeout_s
        named = list(weights.items())
        device = self._wire(named[0][1].device)
        works = [self._start(torch.tensor([version, layout_key(named)], dtype=torch.int64, device=device))]
        for bucket in buckets(named):
            works.append(self._start(torch.cat([t.detach().reshape(-1) for _, t in bucket]).to(device)))
        self._finish(works, deadline)
        _synchronize(named[0][1].device)

    @torch.no_grad()
    def receive(self, weights: dict[str, torch.Tensor], version: int) -> int:
        """Copy the broadcast tensors into ``weights`` (in place) if their version is ``version``; returns the
        version sent, once the copies are done on the device."""
        deadline = time.monotonic() + self.spec.timeout_s
        named = list(weights.items())
        device = self._wire(named[0][1].device)
        header = torch.zeros(2, dtype=torch.int64, device=device)
        self._finish([self._start(header)], deadline)
        sent_version, key = header.tolist()
        if key != layout_key(named):
            raise WeightSyncError("the learner sends other tensors (names, shapes or dtypes) than this actor holds")
        works = []
        for bucket in buckets(named):
            flat = torch.empty(sum(t.numel() for _, t in bucket), dtype=bucket[0][1].dtype, device=device)
            works.append(self._start(flat))
            if sent_version == version:
                for (_, tensor), part in zip(bucket, flat.split([t.numel() for _, t in bucket])):
                    tensor.copy_(part.view_as(tensor))
        self._finish(works, deadline)
        _synchronize(named[0][1].device)  # the copies into the live tensors
        return sent_version


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
        self._weight_group = WeightGroup.connect(GroupSpec(**spec), rank, self._weight_server if rank == 0 else None)

    def leave_weight_group(self) -> None:
        if self._weight_group is not None:
            self._weight_group.abort()
        self._weight_group = None
        self._weight_server = None

    def abort_weight_group(self, prefix: str) -> None:
        """Abort the group ``prefix`` if it is this actor's; a sync of this actor in it (running, or queued
        behind other calls) then fails at once. Run in :data:`ABORT_GROUP` beside a stuck call; the group is
        dropped by ``leave_weight_group``."""
        group = self._weight_group
        if group is not None and group.spec.prefix == prefix:
            group.abort()

    def _group(self) -> WeightGroup:
        if self._weight_group is None:
            raise WeightSyncError("this actor is in no weight group")
        return self._weight_group

    def send_weights(self, version: int) -> float:
        """Seconds from the start until every receiver has the weights (the broadcasts are done)."""
        group = self._group()
        started = time.perf_counter()
        try:
            group.send(self.synced_weights(), version)
        except BaseException:
            self.leave_weight_group()
            raise
        return time.perf_counter() - started

    def receive_weights(self, version: int) -> int:
        group = self._group()
        try:
            sent_version = group.receive(self.synced_weights(), version)
        except BaseException:
            self.leave_weight_group()
            raise
        if sent_version != version:
            raise WeightSyncError(f"weights of version {sent_version} broadcast, version {version} expected; "
                                  "kept the previous weights")
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
    (the sender's ``get_weights`` and each receiver's ``set_weights(weights, version)``).

    ``concurrent_abort``: every member was made with :func:`weight_group_actor`; when a sync fails, the members
    still in it have their group aborted at once instead of failing at their own deadline."""

    def __init__(self, sender, receivers: list, mode: Literal["collective", "object_store"] = "collective",
                 timeout_s: float = SYNC_TIMEOUT_S, log=log.warning, concurrent_abort: bool = False) -> None:
        self.sender, self.receivers, self.mode, self.timeout_s, self.log = sender, list(receivers), mode, timeout_s, log
        self.concurrent_abort = concurrent_abort
        self.members: list | None = None
        """The receivers of the live group (None: none built, or broken by a failed sync)."""
        self.groups = 0
        self.fallbacks = 0

    @property
    def _prefix(self) -> str:
        return f"weights/{self.groups}"

    def _build(self) -> None:
        members = [self.sender, *self.receivers]
        devices = ray.get([m.weight_device.remote() for m in members])  # waits for the actors to start
        backend = "nccl" if all(d == "cuda" for d in devices) else "gloo"
        address, port = ray.get(self.sender.serve_weight_group.remote(self.timeout_s), timeout=self.timeout_s)
        self.groups += 1
        spec = asdict(GroupSpec(address, port, len(members), backend, self._prefix, self.timeout_s))
        ray.get([m.join_weight_group.remote(spec, rank) for rank, m in enumerate(members)],
                timeout=self.timeout_s + REPORT_GRACE_S)
        self.members = list(self.receivers)

    def _drop(self) -> None:
        for member in [self.sender, *(self.members or [])]:
            member.leave_weight_group.remote()  # queued behind a sync still running; a dead actor ignores it
        self.members = None

    def _sync(self, version: int) -> None:
        """Raises unless every member reports its part of the sync done. After the first failure (or none
        reported by the deadline) the members still in the sync have their group aborted (with
        ``concurrent_abort``) and are given a grace period to report."""
        members = [self.sender, *self.receivers]
        refs = [self.sender.send_weights.remote(version), *[r.receive_weights.remote(version) for r in self.receivers]]
        pending = dict(zip(refs, members))
        deadline = time.monotonic() + self.timeout_s + REPORT_GRACE_S
        failure = None
        while pending and failure is None:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                failure = WeightSyncError(f"{len(pending)} of {len(members)} members did not report the sync "
                                          f"within {self.timeout_s + REPORT_GRACE_S:.0f}s")
                break
            del pending[ready[0]]
            try:
                ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 -- reported below
                failure = err
        if failure is None:
            return
        if pending and self.concurrent_abort:
            aborts = [m.abort_weight_group.options(concurrency_group=ABORT_GROUP).remote(self._prefix)
                      for m in pending.values()]
            ray.wait(aborts + list(pending), num_returns=len(aborts) + len(pending), timeout=REPORT_GRACE_S)
        raise failure

    def push(self, version: int, receivers: list | None = None) -> str:
        """Send the sender's weights as ``version``; returns how: ``collective`` or ``object_store``."""
        if receivers is not None:
            self.receivers = list(receivers)
        if self.mode == "collective":
            try:
                if self.members is None or [_key(r) for r in self.members] != [_key(r) for r in self.receivers]:
                    self._drop()
                    self._build()
                self._sync(version)
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
