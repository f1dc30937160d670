"""Process groups built from the plan's rank layout.

:func:`build_process_groups` is collective: every rank must call it with the same layout,
because ``torch.distributed.new_group`` must be called by all ranks for every group in the
same order. It first all-gathers each rank's layout fingerprint and fails fast, naming the
ranks, if any rank computed a different layout.

The returned :class:`ProcessGroups` is passed explicitly to whatever needs it (there is no
module-level group registry). It also implements DeepSpeed's ``mpu`` interface
(``get_model_parallel_*`` / ``get_data_parallel_*``), so ZeRO shards only across the
data-parallel ranks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .layout import Group, RankGroups, RankLayout

log = logging.getLogger(__name__)


class LayoutMismatchError(RuntimeError):
    pass


@dataclass
class ProcessGroups:
    """This rank's groups. A group of one rank is still a real ProcessGroup (collectives on it are no-ops)."""
    layout: RankLayout
    ranks: RankGroups
    tp: Any
    dp: Any
    ep: Any
    edp: Any
    zo_pert: Any
    zo_dp: Any
    world: Any = field(default=None)

    @property
    def tp_size(self) -> int:
        return len(self.ranks.tp)

    @property
    def tp_rank(self) -> int:
        return self.ranks.tp_rank

    @property
    def dp_size(self) -> int:
        return len(self.ranks.dp)

    @property
    def dp_rank(self) -> int:
        return self.ranks.dp_rank

    @property
    def ep_size(self) -> int:
        return len(self.ranks.ep)

    @property
    def ep_rank(self) -> int:
        return self.ranks.ep_rank

    @property
    def edp_size(self) -> int:
        return len(self.ranks.edp)

    @property
    def zo_dp_size(self) -> int:
        return len(self.ranks.zo_dp)

    @property
    def zo_dp_rank(self) -> int:
        """This rank's zeroth-order data-parallel index: its position in its zo dp group (both ranks
        of a perturbation pair have the same index, so they read the same batch)."""
        return self.ranks.zo_dp.index(self.ranks.rank)

    # --- DeepSpeed mpu interface ---------------------------------------------------------
    def get_model_parallel_group(self):
        return self.tp

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    # DeepSpeed >= 0.10 also asks for these names
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def check_layout_agreement(layout: RankLayout) -> None:
    """All-gather every rank's layout fingerprint; raise naming the ranks that disagree with rank 0."""
    world = dist.get_world_size()
    if world != layout.world_size:
        raise LayoutMismatchError(f"rank {dist.get_rank()}: the plan needs {layout.world_size} ranks but "
                                  f"torch.distributed was initialised with {world}")
    mine = layout.fingerprint()
    prints: list[Any] = [None] * world
    dist.all_gather_object(prints, mine)
    bad = [r for r, fp in enumerate(prints) if fp != prints[0]]
    if bad:
        raise LayoutMismatchError(f"ranks {bad} computed a rank layout ({[prints[r] for r in bad]}) different from "
                                  f"rank 0's ({prints[0]}): every rank must load the same job and plan")


def build_process_groups(layout: RankLayout, *, timeout: timedelta | None = None,
                         check: bool = True) -> ProcessGroups:
    """Create (collectively) every group of the layout and return this rank's.

    Requires torch.distributed to be initialised. Each distinct group kind is created once
    per group with ``new_group`` (identical calls, identical order on every rank).
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
    if check:
        check_layout_agreement(layout)
    rank = dist.get_rank()
    made: dict[Group, Any] = {}
    mine: dict[str, Any] = {}
    for kind, groups in layout.all_group_kinds().items():
        for g in groups:
            if g not in made:
                made[g] = dist.new_group(list(g), timeout=timeout) if len(g) < layout.world_size else dist.group.WORLD
            if rank in g:
                mine[kind] = made[g]
    rg = layout.groups_of(rank)
    log.debug("rank %d: groups tp=%s dp=%s ep=%s edp=%s", rank, rg.tp, rg.dp, rg.ep, rg.edp)
    return ProcessGroups(layout=layout, ranks=rg, world=dist.group.WORLD, **mine)
