"""The planner: enumerate every valid plan for a job's cluster, score them all, rank those that fit.

Enumeration. A *structure* is (dp, tp, ep, zero stage, optimizer/parameter offload, sequence
parallelism, DeepSpeed's overlap_comm) or, for ``train.optimizer: zo-sgd``, (zo mode, pertp, zo dp).
overlap_comm is enumerated both ways at ZeRO >= 1 (at stage 0 it does nothing), unless
``plan.comm_overlap`` fixes it or ``train.deepspeed_extra`` sets ``zero_optimization.overlap_comm``
(which the worker would run whatever the plan says): then only that value. With overlap the
simulator charges the side streams' memory and credits the reductions it hides, so ``plan: auto``
takes it where it fits and is faster, and the lean setting where memory is tight; where it gains
nothing the overlapping row is not ranked at all (:func:`dominated_overlap`). Each structure is
validated once with :meth:`Plan.check` (the same rules the executor applies); the micro-batch
sizes dividing ``global_batch / dp`` and the activation-checkpointing choices are then
expanded without further checks, since they cannot make a valid structure invalid. All
plans are scored in one vectorised call (:func:`meshpilot.orchestrator.sim.simulator.evaluate`).

World sizes. A plan uses all the cluster's GPUs or a divisor of their number (an equal share
of a node, or whole nodes when the count is a multiple of gpus_per_node): a job whose batch
does not divide over every GPU still gets a plan, and ``--objective cost`` can prefer fewer
GPUs when communication dominates. Plans with other world sizes would leave ragged remainders
of nodes idle and are not considered.

Fields set in the job's plan section while ``plan: auto`` constrain the search to that value.

Margin. Plans that fit with the measured error band of their regime (:mod:`.error_bands`) rank
before those that fit only as predicted ("risky"); ``plan: auto`` therefore takes a risky plan
only when no plan fits with margin, and :attr:`SearchResult.margin_note` says which band was
applied to the chosen plan and where it comes from. Risky plans whose modelled reserve would pass the card (their
peak is the card, sim/memory.py) come after the other risky ones.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from meshpilot.orchestrator.config.schema import ZO_PERTP, Checkpointing, JobConfig, Offload, Optimizer, ZOMode
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan import text
from meshpilot.orchestrator.plan.codec import PlanArrays, PlanColumns
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan
from meshpilot.orchestrator.sim.error_bands import REGIMES, ErrorBands, load_error_bands
from meshpilot.orchestrator.sim.estimate import Estimate, SimulatorConstants
from meshpilot.orchestrator.sim.memory import model_terms
from meshpilot.orchestrator.sim.simulator import Scores, estimate_at, evaluate, simulate

log = logging.getLogger(__name__)

OBJECTIVES = ("throughput", "memory", "cost")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class RejectedGroup:
    """Plans dropped for one reason, with the closest one to fitting."""
    reason: str
    count: int
    best_plan: str = ""
    best_value: float = float("nan")

    def line(self, limit_gib: float | None = None) -> str:
        if self.reason == "gpu_memory":
            return (f"{self.count} plans need more than {limit_gib:.1f} GiB per GPU, best of them "
                    f"{self.best_value:.1f} GiB: {self.best_plan}")
        if self.reason == "cpu_memory":
            return (f"{self.count} plans need more host memory per node than available, best of them "
                    f"{self.best_value:.1f} GiB: {self.best_plan}")
        return f"{self.count} plans are invalid ({self.reason})"


@dataclass
class SearchResult:
    job: JobConfig
    objective: str
    headroom: float
    arrays: PlanArrays
    scores: Scores
    ranked: np.ndarray                        # indices of fitting plans, best first
    top: list[Estimate]
    rejected: list[RejectedGroup]
    enumerated: int                           # structures x micro-batches x checkpointing, before checks
    invalid: int
    elapsed_s: float
    fixed: Estimate | None = None             # the job's own plan when its plan section is fixed
    notes: list[str] = field(default_factory=list)
    bands: ErrorBands | None = None

    @property
    def risky(self) -> int:
        """Fitting plans that do not fit with their regime's measured error band."""
        return int(self.scores.risky.sum())

    @property
    def margin_note(self) -> str:
        """The margin the best plan was chosen with, and its evidence (empty when nothing fits)."""
        if not len(self.ranked) or self.bands is None:
            return ""
        i = int(self.ranked[0])
        band = self.bands.of(REGIMES[int(self.scores.regime[i])])
        host = self.bands.host
        host_why = (f"; host: +{host.band:.0%} or +{host.band_gib:.1f} GiB per node, whichever is less, over "
                    f"{host.runs} held-out runs" if host.measured else "")
        if bool(self.scores.fits_margin[i]):
            return f"margin: {band.why()}{host_why}; {self.risky} risky plan(s) ranked after those with margin"
        return (f"margin: no plan fits with its measured error band; the best plan is risky ({band.why()}): "
                "watch its first steps' memory, or give it more room (more GPUs, checkpointing, offload)")

    @property
    def scored(self) -> int:
        return self.arrays.n

    @property
    def best(self) -> Plan | None:
        return self.arrays.plan(int(self.ranked[0])) if len(self.ranked) else None

    @property
    def limit_gib(self) -> float:
        return self.job.cluster.gpu.memory_gib * (1.0 - self.headroom)

    def rejected_lines(self) -> list[str]:
        return [g.line(self.limit_gib) for g in self.rejected]

    def find(self, plan: Plan) -> int | None:
        """Index of ``plan`` among the scored plans (None if it was not enumerated)."""
        return self.arrays.find(plan)


def _fixed(pc_value, options):
    return [pc_value] if pc_value is not None else list(options)


def _overlap_options(extra) -> tuple[bool, ...]:
    """overlap_comm values worth scoring at ZeRO >= 1: both, or the one ``train.deepspeed_extra`` forces."""
    z = (extra or {}).get("zero_optimization") or {}
    forced = z.get("overlap_comm") if hasattr(z, "get") else None
    return (False, True) if forced is None else (bool(forced),)


def _structures(job: JobConfig, constrain: bool):
    """Yield (a plan of the structure, its data-parallel degree, the comm_overlap values to expand) for
    every candidate structure; the plan's micro-batch and accumulation are placeholders (1, 1) that
    :func:`enumerate_plans` sets, its comm_overlap the first of those values (the only one that can make
    it invalid: a fixed ``plan.comm_overlap=true`` at stage 0)."""
    c, t, m = job.cluster, job.train, job.model
    pc = job.plan if constrain else None
    G = c.nodes * c.gpus_per_node
    worlds = set(_divisors(G))
    gb = t.global_batch
    get = (lambda name: getattr(pc, name)) if pc is not None else (lambda name: None)
    if t.optimizer == Optimizer.ZO_SGD:
        modes = _fixed(pc.zo.mode if pc else None, (ZOMode.MEZO, ZOMode.ZO2))
        for mode, pertp in itertools.product(modes, _fixed(pc.zo.pertp if pc else None, ZO_PERTP)):
            for zdp in _fixed(pc.zo.dp if pc else None, [d for d in _divisors(gb) if d * pertp <= G]):
                if pertp * zdp in worlds:
                    yield Plan(zo_mode=mode, zo_pertp=pertp, zo_dp=zdp, comm_overlap=bool(pc and pc.comm_overlap)), \
                        zdp, (bool(pc and pc.comm_overlap),)
        return
    offload_opts = tuple(Offload) if t.optimizer == Optimizer.ADAMW else (Offload.NONE,)
    overlaps = _overlap_options(t.deepspeed_extra)
    for tp in _fixed(get("tp"), _divisors(c.gpus_per_node)):
        for dp in _fixed(get("dp"), [d for d in _divisors(gb) if d * tp <= G and d * tp in worlds]):
            eps = [e for e in _divisors(m.num_experts) if dp % e == 0] if m.num_experts else [1]
            for ep in _fixed(get("ep"), eps):
                for zero in _fixed(get("zero_stage"), (0, 1, 2) if m.num_experts else (0, 1, 2, 3)):
                    # offload needs ZeRO (optimizer: stage >= 1, parameters: stage 3); unless the user fixed
                    # the field, skip those combinations here instead of counting them as invalid
                    oos = offload_opts if zero >= 1 else (Offload.NONE,)
                    for oo in _fixed(get("offload_optimizer"), oos):
                        for op in _fixed(get("offload_params"), tuple(Offload) if zero == 3 else (Offload.NONE,)):
                            for sp in _fixed(get("sequence_parallel"), (False, True) if tp > 1 else (False,)):
                                ovs = tuple(_fixed(get("comm_overlap"), overlaps if zero >= 1 else (False,)))
                                yield Plan(dp=dp, tp=tp, ep=ep, zero_stage=zero, offload_optimizer=oo,
                                           offload_params=op, sequence_parallel=sp, comm_overlap=ovs[0]), dp, ovs


def enumerate_plans(job: JobConfig, *, constrain: bool = True) -> tuple[PlanArrays, dict[str, int], int]:
    """All valid plans as arrays, the count of invalid structures by error key, and the total enumerated."""
    t = job.train
    rows = PlanColumns()
    invalid: dict[str, int] = {}
    enumerated = 0
    pc = job.plan if constrain else None
    ac_opts = ([pc.activation_checkpointing != Checkpointing.NONE] if (pc and pc.activation_checkpointing)
               else [False, True])
    for structure, dpn, overlaps in _structures(job, constrain):
        mbs = _divisors(t.global_batch // dpn)
        if pc is not None and pc.micro_batch is not None:
            mbs = [mb for mb in mbs if mb == pc.micro_batch]
        acs = [False] if structure.zeroth_order else ac_opts
        n = len(mbs) * len(acs) * len(overlaps)
        enumerated += n
        if not n:
            continue
        batches = [(mb, t.global_batch // (mb * dpn)) for mb in mbs]
        probe = structure.replace(micro_batch=batches[0][0], grad_accum=batches[0][1])
        try:
            probe.check(job.model, t, job.cluster)
        except ConfigError as e:
            key = f"{e.key}: {e.reason or e}"
            invalid[key] = invalid.get(key, 0) + n
            continue
        rows.append_variants(probe, batches, acs, overlaps)
    return rows.build(job.cluster.gpus_per_node), invalid, enumerated


def dominated_overlap(arrays: PlanArrays, scores: Scores) -> np.ndarray:
    """Rows with comm_overlap whose lean twin (the row before, equal in every other field, as
    :func:`enumerate_plans` appends them) is at least as fast with no more memory: overlap_comm hides
    nothing there, so the row is not ranked (it would only repeat its twin, costlier)."""
    out = np.zeros(arrays.n, dtype=bool)
    if arrays.n < 2:
        return out
    twin = arrays.overlap[1:].astype(bool) & ~arrays.overlap[:-1].astype(bool)
    for k in arrays.FIELDS:
        if k != "overlap":
            col = getattr(arrays, k)
            twin &= col[1:] == col[:-1]
    st, peak = scores.step_time_s, scores.peak_gib
    out[1:] = twin & (st[1:] >= st[:-1]) & (peak[1:] >= peak[:-1])
    return out


def rank_order(scores: Scores, arrays: PlanArrays, idx: np.ndarray, objective: str) -> np.ndarray:
    """``idx`` sorted best first by the objective (ties: faster, then fewer GPUs, then less memory)."""
    st, peak, world = scores.step_time_s[idx], scores.peak_gib[idx], arrays.world[idx]
    if objective == "throughput":
        keys = (peak, world, st)
    elif objective == "memory":
        keys = (world, st, peak)
    elif objective == "cost":
        keys = (peak, st, world * st)   # GPU-seconds per step (= per token: tokens per step are fixed)
    else:
        raise ConfigError("--objective", objective, allowed=OBJECTIVES)
    return idx[np.lexsort(keys)]


def search(job: JobConfig, *, objective: str = "throughput", headroom: float = 0.05, top: int = 10,
           constants: SimulatorConstants | None = None) -> SearchResult:
    """Score every valid plan for ``job`` and rank those that fit (see the module docstring).

    ``headroom`` is the fraction of GPU (and host) memory kept free. With a fixed plan section the
    whole space is searched and the job's own plan is simulated beside it (``result.fixed``).
    """
    if objective not in OBJECTIVES:
        raise ConfigError("--objective", objective, allowed=OBJECTIVES)
    if not 0.0 <= headroom < 1.0:
        raise ConfigError("--headroom", headroom, reason="must be a fraction in [0, 1)", fix="e.g. --headroom 0.05")
    if top < 1:
        raise ConfigError("--top", top, reason="must be at least 1")
    t0 = time.perf_counter()
    fixed_plan = None if job.plan.auto else resolve_plan(job)
    arrays, invalid, enumerated = enumerate_plans(job, constrain=job.plan.auto)
    bands = load_error_bands()
    scores = evaluate(job, arrays, constants, headroom=headroom, terms=model_terms(job.model), bands=bands)
    keep = ~dominated_overlap(arrays, scores)
    at_card = scores.memory["at_card"] > 0          # risky plans whose modelled reserve reaches the card go last
    ranked = np.concatenate([rank_order(scores, arrays, np.flatnonzero(scores.fits_margin & scores.fits & keep),
                                        objective),
                             rank_order(scores, arrays, np.flatnonzero(scores.risky & ~at_card & keep), objective),
                             rank_order(scores, arrays, np.flatnonzero(scores.risky & at_card & keep), objective)])
    rejected = [RejectedGroup(reason=k, count=n) for k, n in sorted(invalid.items(), key=lambda kv: -kv[1])]
    for reason, mask in (("gpu_memory", ~scores.fits_gpu), ("cpu_memory", scores.fits_gpu & ~scores.fits_cpu)):
        idx = np.flatnonzero(mask)
        if len(idx):
            vals = scores.peak_gib if reason == "gpu_memory" else scores.cpu_node_gib
            b = int(idx[np.argmin(vals[idx])])
            rejected.append(RejectedGroup(reason, len(idx), text.describe(arrays.plan(b)), float(vals[b])))
    top_est = [estimate_at(job, arrays, scores, int(i), headroom) for i in ranked[:top]]
    result = SearchResult(job=job, objective=objective, headroom=headroom, arrays=arrays, scores=scores,
                          ranked=ranked, top=top_est, rejected=rejected, enumerated=enumerated,
                          invalid=sum(invalid.values()), elapsed_s=0.0, bands=bands)
    if fixed_plan is not None:
        result.fixed = simulate(job, fixed_plan, constants=constants, headroom=headroom)
    result.elapsed_s = time.perf_counter() - t0
    log.info("planner: %d plans enumerated, %d invalid, %d scored, %d fit, %.3f s", enumerated, result.invalid,
             arrays.n, len(ranked), result.elapsed_s)
    return result


def choose_plan(job: JobConfig, *, objective: str = "throughput", headroom: float = 0.05,
                constants: SimulatorConstants | None = None) -> Plan:
    """The best plan for ``job`` (its fixed plan when the plan section is not ``auto``).

    Raises ConfigError when no plan fits, with the rejection summary as the reason."""
    if not job.plan.auto:
        return resolve_plan(job)
    res = search(job, objective=objective, headroom=headroom, top=1, constants=constants)
    if res.best is None:
        raise ConfigError("plan", "auto", reason="no plan fits: " + "; ".join(res.rejected_lines()),
                          fix="use more GPUs (cluster.nodes), a smaller train.seq_len or global_batch, "
                              "or allow offload (train.optimizer=adamw)")
    return res.best
