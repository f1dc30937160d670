"""DistZO2: perturbation parallelism, zeroth-order data parallelism, 2D, sliced transfers.

Layout (``meshpilot.comm.layout``): ``rank = z * pertp + s``; the perturbation group of a
rank is its row (``s = 0`` has sign +1 and computes L+, ``s = 1`` sign -1 and L-), the
zeroth-order data-parallel group its column (ranks with the same sign, different data).

Per step, communication is three tiny collectives and no parameters:

- seed: ``broadcast`` of one int64 from global rank 0 over the world, so every rank
  perturbs along the same z even if their seed streams were set up differently;
- pertp = 2: ``all_gather`` of one float64 (this rank's loss) over the perturbation pair,
  giving (L+, L-) on both;
- zo dp = n: ``all_reduce(SUM)`` of the two float64 losses over the data-parallel group,
  divided by n (so g is the mean of the ranks' g, and the logged loss the mean loss).

Every rank then computes the same g = (L+ - L-) / (2 eps) and applies the same update
from the same seed: parameters stay bit-identical without being communicated
(:func:`check_identical` verifies it with a hash all-gather). The summed losses equal a
single process that averages the same per-shard losses in float64 in rank order with
zo dp = 2 exactly (a + b is one rounding either way); with more ranks gloo/NCCL may sum
in another order (float64 rounding, ~1e-16 relative).

Sliced transfer (ZO2 on one multi-GPU host): every rank keeps only its 1/n slice of each
block on the host; to upload, it copies its slice over its own PCIe link and the slices
are all-gathered (NVLink) into the full block; after the identical update each rank
writes back only its own slice. Implemented with ``torch.distributed`` so it also runs
(slowly, through host memory) under gloo on CPU.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .mezo import Role, ZOParam, param_checksum

log = logging.getLogger(__name__)


def _device_for(group: Any) -> torch.device:
    """The device a collective on ``group`` needs (NCCL: the current CUDA device)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistExchange:
    """Seed agreement and loss combination for one rank of a zeroth-order plan.

    ``groups`` is the rank's :class:`~meshpilot.comm.groups.ProcessGroups` (needs
    ``.zo_pert``, ``.zo_dp``, ``.ranks``); its perturbation group has 1 or 2 ranks.
    """

    def __init__(self, groups: Any):
        self.groups = groups
        self.pertp = len(groups.ranks.zo_pert)
        self.zo_dp = len(groups.ranks.zo_dp)
        if self.pertp not in (1, 2):
            raise ValueError(f"perturbation groups must have 1 or 2 ranks, got {self.pertp}")
        self.role = Role.BOTH if self.pertp == 1 else (Role.PLUS if groups.ranks.zo_sign > 0 else Role.MINUS)
        self.device = _device_for(groups.world if groups.world is not None else dist.group.WORLD)
        log.info("rank %d: zeroth-order role %s (pertp=%d, zo_dp=%d)", dist.get_rank(), self.role.name,
                 self.pertp, self.zo_dp)

    def agree_seed(self, seed: int) -> int:
        t = torch.tensor([seed], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def combine(self, loss_plus: float | None, loss_minus: float | None) -> tuple[float, float]:
        if self.pertp == 2:
            mine = loss_plus if self.role is Role.PLUS else loss_minus
            assert mine is not None
            parts = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(2)]
            dist.all_gather(parts, torch.tensor([mine], dtype=torch.float64, device=self.device),
                            group=self.groups.zo_pert)
            # zo_pert index 0 is the +1 rank (ranks are sorted, s = 0 first)
            loss_plus, loss_minus = float(parts[0].item()), float(parts[1].item())
        assert loss_plus is not None and loss_minus is not None
        if self.zo_dp > 1:
            t = torch.tensor([loss_plus, loss_minus], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, group=self.groups.zo_dp)
            loss_plus, loss_minus = float(t[0].item()) / self.zo_dp, float(t[1].item()) / self.zo_dp
        return loss_plus, loss_minus


def check_identical(params: Iterable[ZOParam | torch.Tensor], group: Any = None) -> str:
    """All-gather every rank's parameter hash; raise naming the ranks whose parameters
    differ from rank 0's. Returns the (common) hash."""
    mine = param_checksum(params)
    world = dist.get_world_size(group)
    hashes: list[Any] = [None] * world
    dist.all_gather_object(hashes, mine, group=group)
    bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise RuntimeError(f"zeroth-order parameters differ from rank 0's on ranks {bad}")
    return mine


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    """``all_gather_single`` (torch >= 2.13) or its older name ``all_gather_into_tensor``."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


class SlicedTransfer:
    """ZO2 block transfer where each of the ``n`` ranks of ``group`` owns 1/n of every block.

    Block of N elements, padded to ``n * k`` with ``k = ceil(N / n)``; rank r stores
    elements ``[r k, (r+1) k)`` on its host. Upload: host slice -> own part of the device
    slot (PCIe, 1/n of the block), then ``all_gather_into_tensor`` over ``group`` fills the
    slot (NVLink). Write-back: only the own part goes down. Every rank of ``group`` must
    hold the same parameters (true for all zeroth-order ranks: identical updates).
    """

    def __init__(self, group: Any = None):
        self.group = group
        self.n = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.slot_factor = self.n

    def chunk(self, numel: int) -> int:
        return -(-numel // self.n)

    def store_numel(self, numel: int) -> int:
        return self.chunk(numel)

    def make_store(self, flat: torch.Tensor, pin: bool) -> torch.Tensor:
        k = self.chunk(flat.numel())
        store = torch.zeros(k, dtype=flat.dtype, pin_memory=pin)
        part = flat[self.rank * k: (self.rank + 1) * k]
        store[: part.numel()].copy_(part)
        return store

    def upload(self, store: torch.Tensor, slot: torch.Tensor) -> None:
        k = store.numel()
        full = slot[: k * self.n]
        own = full[self.rank * k: (self.rank + 1) * k]
        own.copy_(store, non_blocking=True)
        if self.n > 1:
            _all_gather_single(full, own, group=self.group)

    def write_back(self, slot: torch.Tensor, store: torch.Tensor) -> None:
        k = store.numel()
        store.copy_(slot[self.rank * k: (self.rank + 1) * k], non_blocking=True)
