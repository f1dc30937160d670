"""``simulate(job, plan) -> Estimate``: memory and step time of one plan, without a GPU.

The memory model (:mod:`.memory_model`) and the time model (:mod:`.time_model`) are written
over numpy arrays with one entry per plan; :func:`evaluate` scores any number of plans at
once, and :func:`simulate` is the same code on a batch of one, so the planner and the
simulator can never disagree. Collective costs come from :mod:`meshpilot.comm.cost_model`
with the group spans taken from the plan's :class:`RankLayout`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from meshpilot.comm.cost_model import span_of
from meshpilot.comm.layout import build_layout

from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.sim.estimate import GIB, MEMORY_KEYS, TIME_KEYS, Estimate, SimulatorConstants
from meshpilot.orchestrator.sim.memory import ModelTerms, memory_terms, model_terms
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan
from meshpilot.orchestrator.sim.flops import BACKPROP_PASSES, ZEROTH_ORDER_PASSES, forward_flops, peak_flops
from meshpilot.orchestrator.sim.step_time import time_terms

log = logging.getLogger(__name__)

_ZO = {"none": 0, "mezo": 1, "zo2": 2}
_ZO_NAMES = {v: k for k, v in _ZO.items()}


def structure_spans(dp: int, tp: int, ep: int, zo: int, pertp: int, zo_dp: int, gpus_per_node: int):
    """Spans (n, nodes, per_node) of the tp, dp, ep, edp and world groups of rank 0's layout.

    Every group of one kind has the same shape in these layouts, so rank 0's are representative
    (the most loaded rank for communication). Computed once per distinct structure of a batch."""
    lay = build_layout(dp=dp, tp=tp, ep=ep, pertp=pertp, zo_dp=zo_dp, zeroth_order=zo > 0,
                       gpus_per_node=gpus_per_node)
    g = lay.groups_of(0)
    world = tuple(range(lay.world_size))
    sp = lambda grp: (lambda s: (s.n, s.nodes, s.per_node))(span_of(grp, gpus_per_node))  # noqa: E731
    return sp(g.tp), sp(g.dp), sp(g.ep), sp(g.edp), sp(world)


class PlanArrays:
    """Plans as columns of numpy arrays (the form the models evaluate)."""
    FIELDS = ("dp", "tp", "ep", "zero", "off_opt", "off_param", "micro_batch", "grad_accum", "ac", "sp",
              "zo", "zo_pertp", "zo_dp")

    def __init__(self, cols: dict[str, np.ndarray], gpus_per_node: int):
        for k in self.FIELDS:
            setattr(self, k, np.asarray(cols[k], dtype=np.int64))
        self.n = len(self.dp)
        self.world = np.where(self.zo > 0, self.zo_pertp * self.zo_dp, self.dp * self.tp)
        spans = np.zeros((5, 3, self.n))
        keys = np.stack([self.dp, self.tp, self.ep, self.zo, self.zo_pertp, self.zo_dp], axis=1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        for i, row in enumerate(uniq):
            spans[:, :, inv.reshape(-1) == i] = np.array(structure_spans(*map(int, row), gpus_per_node))[:, :, None]
        self.tp_span, self.dp_span, self.ep_span, self.edp_span, self.world_span = (spans[i] for i in range(5))
        # ZO2 ranks that all share one node upload blocks in slices (the worker's default): 1/n each
        self.zo2_slices = np.where((self.world_span[1] == 1) & (self.world > 1), self.world, 1)

    @classmethod
    def from_plans(cls, plans: Sequence[Plan], gpus_per_node: int) -> "PlanArrays":
        cols = dict(dp=[p.dp for p in plans], tp=[p.tp for p in plans], ep=[p.ep for p in plans],
                    zero=[p.zero_stage for p in plans], off_opt=[p.offload_optimizer != "none" for p in plans],
                    off_param=[p.offload_params != "none" for p in plans], micro_batch=[p.micro_batch for p in plans],
                    grad_accum=[p.grad_accum for p in plans],
                    ac=[p.activation_checkpointing != "none" for p in plans],
                    sp=[p.sequence_parallel for p in plans], zo=[_ZO[p.zo_mode] for p in plans],
                    zo_pertp=[p.zo_pertp for p in plans], zo_dp=[p.zo_dp for p in plans])
        return cls(cols, gpus_per_node)

    def plan(self, i: int) -> Plan:
        zo = int(self.zo[i])
        return Plan(dp=int(self.dp[i]), tp=int(self.tp[i]), ep=int(self.ep[i]), zero_stage=int(self.zero[i]),
                    offload_optimizer="cpu" if self.off_opt[i] else "none",
                    offload_params="cpu" if self.off_param[i] else "none", micro_batch=int(self.micro_batch[i]),
                    grad_accum=int(self.grad_accum[i]), activation_checkpointing="full" if self.ac[i] else "none",
                    sequence_parallel=bool(self.sp[i]), zo_mode=_ZO_NAMES[zo], zo_pertp=int(self.zo_pertp[i]),
                    zo_dp=int(self.zo_dp[i]))


@dataclass
class Scores:
    """Everything :func:`evaluate` computes, one array entry per plan."""
    memory: dict[str, np.ndarray]     # bytes
    time: dict[str, np.ndarray]       # seconds
    peak_gib: np.ndarray
    cpu_node_gib: np.ndarray
    step_time_s: np.ndarray
    tokens_per_s: np.ndarray
    mfu: np.ndarray
    fits_gpu: np.ndarray
    fits_cpu: np.ndarray

    @property
    def fits(self) -> np.ndarray:
        return self.fits_gpu & self.fits_cpu


def evaluate(job: JobConfig, arrays: PlanArrays, constants: SimulatorConstants | None = None, *,
             headroom: float = 0.0, terms: ModelTerms | None = None) -> Scores:
    """Score every plan of ``arrays`` (no validity checks: that is Plan.check's job)."""
    c = constants or SimulatorConstants()
    mt = terms or model_terms(job.model)
    mem = memory_terms(mt, job, arrays, c)
    tim = time_terms(mt, job, arrays, c)
    step = sum(tim[k] for k in TIME_KEYS)
    tokens = float(job.train.global_batch * job.train.seq_len)
    cl = job.cluster
    peak = peak_flops(cl, job.train.precision)
    fpt = forward_flops(mt.matmul_params, mt.layers, job.train.seq_len, mt.hidden)
    useful = np.where(arrays.zo > 0, ZEROTH_ORDER_PASSES, BACKPROP_PASSES) * fpt * tokens   # sim.flops' rule
    peak_gib = mem["peak"] / GIB
    cpu_gib = mem["cpu_node"] / GIB
    return Scores(memory=mem, time=tim, peak_gib=peak_gib, cpu_node_gib=cpu_gib, step_time_s=step,
                  tokens_per_s=tokens / step, mfu=useful / (step * arrays.world * peak),
                  fits_gpu=peak_gib <= cl.gpu.memory_gib * (1.0 - headroom),
                  fits_cpu=cpu_gib <= cl.cpu_memory_gib * (1.0 - headroom))


def suggestions(plan: Plan, job: JobConfig) -> list[str]:
    """Changes that lower GPU memory for a plan that does not fit, most effective first."""
    out = []
    if plan.zeroth_order:
        if plan.zo_mode == "mezo":
            out.append("plan.zo.mode=zo2")
    else:
        if plan.zero_stage < 3 and plan.dp > 1:
            out.append("plan.zero_stage=3")
        if plan.offload_optimizer == "none" and plan.zero_stage >= 1 and job.train.optimizer == "adamw":
            out.append("plan.offload_optimizer=cpu")
        elif plan.offload_optimizer == "none" and job.train.optimizer == "adamw":
            out.append("plan.zero_stage=2 plan.offload_optimizer=cpu")
        if plan.zero_stage == 3 and plan.offload_params == "none":
            out.append("plan.offload_params=cpu")
        if plan.activation_checkpointing == "none":
            out.append("plan.activation_checkpointing=full")
    if plan.micro_batch > 1:
        out.append(f"plan.micro_batch={max(1, plan.micro_batch // 2)}")
    if not plan.zeroth_order and plan.tp < job.cluster.gpus_per_node:
        out.append(f"plan.tp={plan.tp * 2}")
    return out


def describe(plan: Plan) -> str:
    """A short one-line name of a plan (see :meth:`Plan.describe`)."""
    return plan.describe()


_SHORT_KEYS = {"dp": "plan.dp", "tp": "plan.tp", "ep": "plan.ep", "zero": "plan.zero_stage",
               "ac": "plan.activation_checkpointing", "zo": "plan.zo.mode", "pertp": "plan.zo.pertp", "zo_dp": "plan.zo.dp"}
_SHORT_FLAGS = {"off_opt": "plan.offload_optimizer=cpu", "off_param": "plan.offload_params=cpu",
                "sp": "plan.sequence_parallel=true"}


def plan_overrides(text: str) -> list[str]:
    """Dotlist overrides for a plan written as :func:`describe` prints it (``dp=4 tp=1 zero=3 mb=2x2 ac=full``)
    or as overrides (``plan.dp=4 plan.zero_stage=3``); the two forms may be mixed."""
    out: list[str] = []
    for tok in text.split():
        key, _, val = tok.partition("=")
        if key.startswith("plan."):
            out.append(tok)
        elif key in _SHORT_FLAGS and not val:
            out.append(_SHORT_FLAGS[key])
        elif key == "mb" and val:
            out.append(f"plan.micro_batch={val.split('x')[0]}")
        elif key in _SHORT_KEYS and val:
            out.append(f"{_SHORT_KEYS[key]}={val}")
        else:
            from meshpilot.orchestrator.errors import ConfigError
            raise ConfigError("--explain", tok, reason="not a plan field",
                              fix="write the plan as the table prints it (dp=4 tp=1 zero=3 mb=2x2 ac=full) "
                                  "or as overrides (plan.dp=4 plan.zero_stage=3)")
    return out


def estimate_at(job: JobConfig, arrays: PlanArrays, scores: Scores, i: int, headroom: float = 0.0) -> Estimate:
    """The :class:`Estimate` of entry ``i`` of an evaluated batch."""
    plan = arrays.plan(i)
    cl = job.cluster
    mem = {k: float(scores.memory[k][i]) / GIB for k in MEMORY_KEYS}
    mem["cpu_offload"] = float(scores.memory["cpu_offload"][i]) / GIB
    tim = {k: float(scores.time[k][i]) for k in TIME_KEYS}
    peak = float(scores.peak_gib[i])
    cpu = float(scores.cpu_node_gib[i])
    avail = cl.gpu.memory_gib * (1.0 - headroom)
    reasons = []
    if not scores.fits_gpu[i]:
        tips = suggestions(plan, job)
        reasons.append(f"needs {peak:.1f} GiB per GPU, {avail:.1f} available"
                       + (f" (with {headroom:.0%} headroom)" if headroom else "")
                       + ("; try " + " or ".join(tips[:3]) if tips else ""))
    if not scores.fits_cpu[i]:
        reasons.append(f"needs {cpu:.1f} GiB of host memory per node, {cl.cpu_memory_gib * (1 - headroom):.1f} "
                       "available; lower the offload (plan.offload_params=none) or use more nodes")
    return Estimate(plan=describe(plan), plan_config=plan.to_config(), world_size=plan.world_size,
                    fits=bool(scores.fits_gpu[i] and scores.fits_cpu[i]), peak_memory_gib=peak,
                    gpu_memory_gib=float(cl.gpu.memory_gib), cpu_memory_gib_per_node=cpu,
                    cpu_memory_available_gib=float(cl.cpu_memory_gib), step_time_s=float(scores.step_time_s[i]),
                    tokens_per_s=float(scores.tokens_per_s[i]), mfu=float(scores.mfu[i]),
                    memory_breakdown_gib=mem, time_breakdown_s=tim, reasons=reasons)


def simulate(job: JobConfig, plan: Plan | None = None, *, constants: SimulatorConstants | None = None,
             headroom: float = 0.0) -> Estimate:
    """Predict peak GPU memory (NVML level), host memory and step time of ``plan`` for ``job``.

    ``plan`` None uses the job's fixed plan section (:func:`resolve_plan`); the plan is checked
    (:meth:`Plan.check`, which raises ConfigError) before anything is computed.
    """
    plan = plan if plan is not None else resolve_plan(job)
    plan.check(job.model, job.train, job.cluster)
    arrays = PlanArrays.from_plans([plan], job.cluster.gpus_per_node)
    est = estimate_at(job, arrays, evaluate(job, arrays, constants, headroom=headroom), 0, headroom)
    log.debug("simulated %s: peak %.2f GiB, step %.3f s", est.plan, est.peak_memory_gib, est.step_time_s)
    return est
