"""Plans as columns of integer arrays: the form in which the simulator scores any number of plans at once.

One row per plan, one column per field (:data:`FIELDS`); choices are coded as integers:
offloads, activation checkpointing and DeepSpeed's overlap_comm (``overlap``) as 0/1, the
zeroth-order mode as its index in :data:`ZO_MODES` (0 none, 1 mezo, 2 zo2). :func:`encode` and :meth:`PlanArrays.plan` are
inverse to each other. Columns derived from the plan rules (``world``, ``zo2_slices``) come from
the same functions as :class:`Plan`'s properties (:func:`.plan.world_size_of`,
:func:`.plan.zo2_upload_slices_of`), evaluated over the arrays.

Group spans. For communication costs every row also carries the spans ``(n, nodes, per_node)``
of rank 0's tp, dp, ep, edp groups and of the whole world, from the plan's rank layout
(:func:`structure_spans`), computed once per distinct (dp, tp, ep, zo mode, pertp, zo dp).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np

from meshpilot.comm.cost_model import span_of
from meshpilot.comm.layout import build_layout

from meshpilot.orchestrator.config.schema import Checkpointing, Offload, ZOMode
from meshpilot.orchestrator.plan.plan import Plan, world_size_of, zo2_upload_slices_of

FIELDS = ("dp", "tp", "ep", "zero", "off_opt", "off_param", "micro_batch", "grad_accum", "ac", "sp",
          "zo", "zo_pertp", "zo_dp", "overlap")
"""Column names, in row order."""
ZO_MODES = tuple(ZOMode)
"""The zeroth-order mode of code i (the ``zo`` column)."""
_ZO_CODE = {m: i for i, m in enumerate(ZO_MODES)}
_MB, _GA, _AC, _OV = FIELDS.index("micro_batch"), FIELDS.index("grad_accum"), FIELDS.index("ac"), FIELDS.index("overlap")

Span = tuple[int, int, int]


def encode(plan: Plan) -> tuple[int, ...]:
    """The row of ``plan`` (see :data:`FIELDS`)."""
    return (plan.dp, plan.tp, plan.ep, plan.zero_stage, int(plan.offloads_optimizer), int(plan.offloads_params),
            plan.micro_batch, plan.grad_accum, int(plan.checkpoints_activations), int(plan.sequence_parallel),
            _ZO_CODE[plan.zo_mode], plan.zo_pertp, plan.zo_dp, int(plan.comm_overlap))


def structure_spans(dp: int, tp: int, ep: int, zo: int, pertp: int, zo_dp: int,
                    gpus_per_node: int) -> tuple[Span, Span, Span, Span, Span]:
    """Spans (n, nodes, per_node) of the tp, dp, ep, edp and world groups of rank 0's layout.

    Every group of one kind has the same shape in these layouts, so rank 0's are representative
    (the most loaded rank for communication)."""
    lay = build_layout(dp=dp, tp=tp, ep=ep, pertp=pertp, zo_dp=zo_dp, zeroth_order=zo > 0,
                       gpus_per_node=gpus_per_node)
    g = lay.groups_of(0)

    def sp(group: Sequence[int]) -> Span:
        s = span_of(group, gpus_per_node)
        return s.n, s.nodes, s.per_node

    return sp(g.tp), sp(g.dp), sp(g.ep), sp(g.edp), sp(tuple(range(lay.world_size)))


class PlanArrays:
    """Plans as columns of numpy int64 arrays (one attribute per name of :data:`FIELDS`), plus
    ``world``, ``zo2_slices`` and the ``*_span`` arrays of shape (3, n): n, nodes, per node."""

    FIELDS = FIELDS

    def __init__(self, cols: dict[str, Sequence[int] | np.ndarray], gpus_per_node: int):
        for k in FIELDS:
            setattr(self, k, np.asarray(cols[k], dtype=np.int64))
        self.n = len(self.dp)
        self.gpus_per_node = gpus_per_node
        self.world = world_size_of(self.dp, self.tp, self.zo_pertp, self.zo_dp, self.zeroth_order)
        spans = np.zeros((5, 3, self.n))
        keys = np.stack([self.dp, self.tp, self.ep, self.zo, self.zo_pertp, self.zo_dp], axis=1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        for i, row in enumerate(uniq):
            spans[:, :, inv == i] = np.array(structure_spans(*map(int, row), gpus_per_node))[:, :, None]
        self.tp_span, self.dp_span, self.ep_span, self.edp_span, self.world_span = (spans[i] for i in range(5))
        self.zo2_slices = zo2_upload_slices_of(self.world, self.zo2, gpus_per_node)

    # --- the Plan properties, per row --------------------------------------------------------
    @property
    def zeroth_order(self) -> np.ndarray:
        return self.zo != _ZO_CODE[ZOMode.NONE]

    @property
    def zo2(self) -> np.ndarray:
        return self.zo == _ZO_CODE[ZOMode.ZO2]

    @property
    def offloads_optimizer(self) -> np.ndarray:
        return self.off_opt.astype(bool)

    @property
    def offloads_params(self) -> np.ndarray:
        return self.off_param.astype(bool)

    @property
    def checkpoints_activations(self) -> np.ndarray:
        return self.ac.astype(bool)

    @property
    def comm_overlap(self) -> np.ndarray:
        return self.overlap.astype(bool)

    # --- conversions -----------------------------------------------------------------------
    @classmethod
    def from_plans(cls, plans: Sequence[Plan], gpus_per_node: int) -> "PlanArrays":
        builder = PlanColumns()
        for p in plans:
            builder.append(p)
        return builder.build(gpus_per_node)

    def plan(self, i: int) -> Plan:
        """Row ``i`` as a Plan (the inverse of :func:`encode`)."""
        return Plan(dp=int(self.dp[i]), tp=int(self.tp[i]), ep=int(self.ep[i]), zero_stage=int(self.zero[i]),
                    offload_optimizer=Offload.CPU if self.off_opt[i] else Offload.NONE,
                    offload_params=Offload.CPU if self.off_param[i] else Offload.NONE,
                    micro_batch=int(self.micro_batch[i]), grad_accum=int(self.grad_accum[i]),
                    activation_checkpointing=Checkpointing.FULL if self.ac[i] else Checkpointing.NONE,
                    sequence_parallel=bool(self.sp[i]), zo_mode=ZO_MODES[int(self.zo[i])],
                    zo_pertp=int(self.zo_pertp[i]), zo_dp=int(self.zo_dp[i]), comm_overlap=bool(self.overlap[i]))

    def find(self, plan: Plan) -> int | None:
        """Index of the first row equal to ``plan`` (None if there is none)."""
        row = encode(plan)
        mask = np.ones(self.n, dtype=bool)
        for k, v in zip(FIELDS, row):
            mask &= getattr(self, k) == v
        idx = np.flatnonzero(mask)
        return int(idx[0]) if len(idx) else None


class PlanColumns:
    """Rows collected one plan, or one plan's batch and checkpointing variants, at a time."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, plan: Plan) -> None:
        self._rows.append(encode(plan))

    def append_variants(self, plan: Plan, batches: Iterable[tuple[int, int]], checkpointing: Iterable[bool],
                        overlaps: Iterable[bool] | None = None) -> None:
        """``plan`` once per ((micro_batch, grad_accum), checkpoints activations, comm_overlap) of the product
        of ``batches``, ``checkpointing`` and ``overlaps`` (default: the plan's own), without building a Plan
        per row."""
        base = list(encode(plan))
        ovs = (plan.comm_overlap,) if overlaps is None else overlaps
        for (mb, ga), ac, ov in itertools.product(batches, checkpointing, ovs):
            base[_MB], base[_GA], base[_AC], base[_OV] = mb, ga, int(ac), int(ov)
            self._rows.append(tuple(base))

    def build(self, gpus_per_node: int) -> PlanArrays:
        rows = np.array(self._rows, dtype=np.int64).reshape(len(self._rows), len(FIELDS))
        return PlanArrays({k: rows[:, j] for j, k in enumerate(FIELDS)}, gpus_per_node)
