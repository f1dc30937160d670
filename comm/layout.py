"""Rank layout: which ranks form each tensor-, data-, expert- and zeroth-order group.

Pure arithmetic on the plan's degrees, computed the same way on every rank (and by the
simulator, which uses the same lists to know which collectives cross nodes).

Dense plans lay ranks out as a grid ``rank = d * tp + t`` (d < dp, t < tp): tensor-parallel
groups are rows (contiguous ranks, so inside a node when ``gpus_per_node % tp == 0``),
data-parallel groups are columns. Expert parallelism re-divides each data-parallel column
into ``dp / ep`` contiguous chunks of ``ep`` ranks (one expert-parallel group each); the
ranks at the same position of every chunk replicate the same experts and form an
expert-data-parallel group. Zeroth-order plans use ``rank = z * pertp + s``: perturbation
pairs are rows (s = 0 evaluates +eps, s = 1 evaluates -eps), ZO data-parallel groups columns.
Ranks are placed on nodes in blocks: node = rank // gpus_per_node.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

Group = tuple[int, ...]


@dataclass(frozen=True)
class RankGroups:
    """The groups one rank belongs to (each a sorted tuple of global ranks)."""
    rank: int
    node: int
    tp: Group
    dp: Group
    ep: Group
    edp: Group
    zo_pert: Group
    zo_dp: Group

    @property
    def tp_rank(self) -> int:
        return self.tp.index(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dp.index(self.rank)

    @property
    def ep_rank(self) -> int:
        return self.ep.index(self.rank)

    @property
    def zo_sign(self) -> int:
        """+1 for the rank that evaluates theta + eps*z, -1 for its partner (pertp = 2)."""
        return 1 if self.zo_pert.index(self.rank) == 0 else -1


@dataclass(frozen=True)
class RankLayout:
    world_size: int
    gpus_per_node: int
    tp_groups: tuple[Group, ...]
    dp_groups: tuple[Group, ...]
    ep_groups: tuple[Group, ...]
    edp_groups: tuple[Group, ...]
    zo_pert_groups: tuple[Group, ...]
    zo_dp_groups: tuple[Group, ...]

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    @property
    def nodes_used(self) -> int:
        return (self.world_size - 1) // self.gpus_per_node + 1

    def spans_nodes(self, group: Group) -> bool:
        return len({self.node_of(r) for r in group}) > 1

    def groups_of(self, rank: int) -> RankGroups:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")

        def find(groups: tuple[Group, ...]) -> Group:
            return next(g for g in groups if rank in g)

        return RankGroups(rank=rank, node=self.node_of(rank), tp=find(self.tp_groups), dp=find(self.dp_groups),
                          ep=find(self.ep_groups), edp=find(self.edp_groups),
                          zo_pert=find(self.zo_pert_groups), zo_dp=find(self.zo_dp_groups))

    def all_group_kinds(self) -> dict[str, tuple[Group, ...]]:
        return {"tp": self.tp_groups, "dp": self.dp_groups, "ep": self.ep_groups, "edp": self.edp_groups,
                "zo_pert": self.zo_pert_groups, "zo_dp": self.zo_dp_groups}

    def fingerprint(self) -> str:
        """A short hash that is equal on two ranks iff they computed the same layout."""
        text = repr((self.world_size, self.gpus_per_node, sorted(self.all_group_kinds().items())))
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _grid(rows: int, cols: int) -> tuple[tuple[Group, ...], tuple[Group, ...]]:
    """Rows and columns of ``arange(rows*cols).reshape(rows, cols)``."""
    r = tuple(tuple(i * cols + j for j in range(cols)) for i in range(rows))
    c = tuple(tuple(i * cols + j for i in range(rows)) for j in range(cols))
    return r, c


def build_layout(*, dp: int, tp: int = 1, ep: int = 1, pertp: int = 1, zo_dp: int = 1,
                 zeroth_order: bool = False, gpus_per_node: int) -> RankLayout:
    """The layout for the given degrees. Validation of the degrees is the plan's job;
    this only asserts the arithmetic it relies on."""
    if zeroth_order:
        world = pertp * zo_dp
        pert, zdp = _grid(zo_dp, pertp)
        singles = tuple((r,) for r in range(world))
        return RankLayout(world, gpus_per_node, tp_groups=singles, dp_groups=zdp, ep_groups=singles,
                          edp_groups=zdp, zo_pert_groups=pert, zo_dp_groups=zdp)
    assert dp % ep == 0, "ep must divide dp"
    world = dp * tp
    tp_groups, dp_groups = _grid(dp, tp)
    ep_groups: list[Group] = []
    edp_groups: list[Group] = []
    for col in dp_groups:                      # one column per tensor-parallel index
        chunks = [col[i:i + ep] for i in range(0, dp, ep)]
        ep_groups += chunks
        edp_groups += [tuple(ch[j] for ch in chunks) for j in range(ep)]
    singles = tuple((r,) for r in range(world))
    return RankLayout(world, gpus_per_node, tp_groups=tp_groups, dp_groups=dp_groups,
                      ep_groups=tuple(sorted(ep_groups)), edp_groups=tuple(sorted(edp_groups)),
                      zo_pert_groups=singles, zo_dp_groups=dp_groups)
