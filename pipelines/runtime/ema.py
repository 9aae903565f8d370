"""An exponential moving average of the trained weights, in fp32, sharded the way the optimizer shards its
fp32 master weights; one class for the supervised trainer and the GRPO learner.

Why fp32 and why the master weights: with decay 0.9999 an update moves the average by 1e-4 of the
difference to the weights, far below bf16's resolution (2⁻⁸ relative), so a bf16 average hardly moves at
all. Each rank therefore keeps, per trained parameter, an fp32 average of the fragment of the fp32 master
weights that DeepSpeed keeps on that rank:

- ZeRO-3: the rank's partition of the parameter (``safe_get_local_fp32_param``);
- ZeRO-1/2 and bf16 without ZeRO: the fragment DeepSpeed links to the parameter (``param._hp_mapping``,
  the flat fp32 partition its optimizer steps);
- no optimizer wrapper (fp32, ZeRO-0): the parameter itself, cut into equal fragments over the ranks.

So the average costs 4 bytes per trained parameter divided by the data-parallel ranks, like the master
weights themselves. A fragment is addressed by (start, length) in the flattened parameter: saved shards can
be read back at any number of ranks and any ZeRO stage (:meth:`ShardedEMA.load`), and :meth:`full` puts a
whole parameter together on one rank (the export).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .collectives import reduce_to

EMA_FOLDER = "ema"
LEGACY_EMA_FILE = "ema.pt"


@dataclass
class Fragment:
    """This rank's part of one parameter: elements [start, start + value.numel()) of the flattened tensor."""

    start: int
    value: torch.Tensor
    """fp32, 1-D, on the training device."""
    shape: tuple[int, ...]

    @property
    def full_numel(self) -> int:
        return math.prod(self.shape)


def _rank_and_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def master_fragment(param: torch.nn.Parameter, group=None) -> tuple[int, torch.Tensor]:
    """(start, 1-D view) of the fp32 master values of ``param`` that this rank's optimizer holds; the view may
    be empty. Views of the optimizer's buffers: read them after its step."""
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        from deepspeed.utils import safe_get_local_fp32_param

        rank = dist.get_rank(param.ds_process_group)
        partition = param.ds_tensor.ds_numel
        start = min(rank * partition, param.ds_numel)
        length = max(0, min(partition, param.ds_numel - start))
        return start, safe_get_local_fp32_param(param).reshape(-1)[:length]
    if hasattr(param, "_hp_mapping"):  # DeepSpeed's fp32 fragment linked to a low-precision parameter
        mapping = param._hp_mapping
        if mapping is None:
            return 0, param.detach().new_zeros(0, dtype=torch.float32)
        address = mapping.lp_fragment_address
        return address.start, mapping.hp_fragment.reshape(-1)[:address.numel]
    rank, world = _rank_and_world(group)
    flat = param.detach().reshape(-1)
    per_rank = math.ceil(flat.numel() / world)
    start = min(rank * per_rank, flat.numel())
    return start, flat[start:start + per_rank]


class ShardedEMA:
    """``ema = ShardedEMA(named_params, decay)`` after ``deepspeed.initialize``; ``ema.update()`` after each
    optimizer step; ``ema.save(folder)`` / ``ema.load(folder)`` on every rank; ``ema.full(name)`` (collective)
    for the export."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float, group=None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.group = decay, group
        self.params = dict(named_params)
        self.fragments: dict[str, Fragment] = {}
        self.restart()

    def restart(self) -> None:
        """The average set to the current master weights (at the start, and after the engine was restored)."""
        for name, param in self.params.items():
            start, source = master_fragment(param, self.group)
            shape = tuple(getattr(param, "ds_shape", None) or param.shape)
            self.fragments[name] = Fragment(start, source.detach().float().clone(), shape)

    def update(self) -> None:
        """One step of the average towards the current master weights: ema ← ema + (1 − decay)·(w − ema)."""
        values, sources = [], []
        for name, param in self.params.items():
            fragment = self.fragments[name]
            if fragment.value.numel():
                values.append(fragment.value)
                sources.append(master_fragment(param, self.group)[1].detach().float())
        if values:
            torch._foreach_lerp_(values, sources, 1.0 - self.decay)

    @property
    def local_bytes(self) -> int:
        return sum(f.value.numel() * f.value.element_size() for f in self.fragments.values())

    # -------------------------------------------------------------------------------------------- whole tensors
    def full(self, name: str, dst: int = 0) -> torch.Tensor | None:
        """Collective over the group: parameter ``name`` put together (fp32, its shape) on rank ``dst``; None
        on the other ranks."""
        fragment = self.fragments[name]
        whole = torch.zeros(fragment.full_numel, dtype=torch.float32, device=fragment.value.device)
        whole[fragment.start:fragment.start + fragment.value.numel()] = fragment.value
        whole = reduce_to(whole, dst, self.group)
        return whole.view(fragment.shape) if _rank_and_world(self.group)[0] == dst else None

    def full_state(self, dst: int = 0, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
        """Collective: every parameter whole on rank ``dst``, on the CPU (in ``dtype`` when given)."""
        out = {}
        for name in self.fragments:
            value = self.full(name, dst)
            if value is not None:
                out[name] = value.to("cpu", dtype or value.dtype)
        return out if _rank_and_world(self.group)[0] == dst else None

    # -------------------------------------------------------------------------------------------- files
    @staticmethod
    def shard_path(folder: Path, rank: int) -> Path:
        return Path(folder) / EMA_FOLDER / f"rank_{rank:05d}.safetensors"

    def snapshot(self):
        """This rank's fragments copied to host memory now; the returned function writes them as
        ``ema/rank_<r>.safetensors`` (with each fragment's address) into a folder, at any later time."""
        rank = _rank_and_world(self.group)[0]
        tensors = {name: f.value.detach().to("cpu", copy=True).contiguous() for name, f in self.fragments.items()
                   if f.value.numel()}
        addresses = {name: [f.start, list(f.shape)] for name, f in self.fragments.items() if f.value.numel()}
        decay = repr(self.decay)

        def write(folder: Path) -> Path:
            path = self.shard_path(folder, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata={"addresses": json.dumps(addresses), "decay": decay})
            return path

        return write

    def save(self, folder: Path) -> Path:
        """This rank's fragments as ``ema/rank_<r>.safetensors`` (with each fragment's address)."""
        return self.snapshot()(folder)

    def load(self, folder: Path) -> bool:
        """Fill this rank's fragments from the shards saved in ``folder`` by any number of ranks (or from an
        older checkpoint's whole ``ema.pt``). False when the folder holds no EMA; an incomplete one raises."""
        folder = Path(folder)
        shards = sorted((folder / EMA_FOLDER).glob("rank_*.safetensors"))
        if shards:
            covered = {name: 0 for name in self.fragments}
            for path in shards:
                with safe_open(str(path), framework="pt") as handle:
                    addresses = json.loads(handle.metadata()["addresses"])
                    for name, (start, shape) in addresses.items():
                        if name in self.fragments:
                            covered[name] += self._copy_overlap(name, start, shape, handle.get_slice(name), path)
            missing = [name for name, count in covered.items() if count != self.fragments[name].value.numel()]
            if missing:
                raise ValueError(f"{folder / EMA_FOLDER}: the saved EMA does not cover {len(missing)} of this "
                                 f"rank's fragments (e.g. {missing[0]}): shards missing or of another model")
            return True
        legacy = folder / LEGACY_EMA_FILE
        if legacy.is_file():
            whole = torch.load(legacy, map_location="cpu", weights_only=True)
            for name in self.fragments:
                if name not in whole:
                    raise ValueError(f"{legacy}: no EMA of {name}")
                self._copy_overlap(name, 0, list(whole[name].shape), whole[name].reshape(-1), legacy)
            return True
        return False

    def _copy_overlap(self, name: str, start: int, shape: list[int], piece, where: Path) -> int:
        """Copy what a saved piece (elements [start, start + len) of ``name``) holds of this rank's fragment;
        returns how many elements that was."""
        fragment = self.fragments[name]
        if tuple(shape) != fragment.shape:
            raise ValueError(f"{where}: EMA of {name} has shape {tuple(shape)}, the model {fragment.shape}")
        length = piece.get_shape()[0] if hasattr(piece, "get_shape") else piece.numel()
        lo = max(start, fragment.start)
        hi = min(start + length, fragment.start + fragment.value.numel())
        if hi <= lo:
            return 0
        values = piece[lo - start:hi - start]
        fragment.value[lo - fragment.start:hi - fragment.start].copy_(torch.as_tensor(values).float())
        return hi - lo
