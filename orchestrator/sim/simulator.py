"""``simulate(job, plan) -> Estimate``: memory and step time of one plan, without a GPU.

The memory model (:mod:`.memory`) and the time model (:mod:`.step_time`) are written over
numpy arrays with one entry per plan (:class:`~meshpilot.orchestrator.plan.codec.PlanArrays`);
:func:`evaluate` scores any number of plans at once, and :func:`simulate` is the same code on a
batch of one, so the planner and the simulator can never disagree. Collective costs come from
:mod:`meshpilot.comm.cost_model` with the group spans taken from the plan's :class:`RankLayout`;
DeepSpeed's settings from the config the worker runs (:mod:`.deepspeed_settings`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from meshpilot.orchestrator.config.schema import Accelerator, ClusterConfig, JobConfig, Optimizer
from meshpilot.orchestrator.plan import text
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan
from meshpilot.orchestrator.sim.deepspeed_settings import deepspeed_settings
from meshpilot.orchestrator.sim.error_bands import REGIMES, ErrorBands, load_error_bands, regime_codes
from meshpilot.orchestrator.sim.estimate import GIB, MEMORY_KEYS, TIME_KEYS, Estimate, SimulatorConstants
from meshpilot.orchestrator.sim.flops import BACKPROP_PASSES, ZEROTH_ORDER_PASSES, forward_flops, peak_flops
from meshpilot.orchestrator.sim.memory import ModelTerms, memory_terms, model_terms
from meshpilot.orchestrator.sim.step_time import time_terms

log = logging.getLogger(__name__)


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
    regime: np.ndarray                # each plan's regime, an index into error_bands.REGIMES
    band: np.ndarray                  # measured relative error band of that regime (:mod:`.error_bands`)
    margin_gib: np.ndarray            # GiB added to the GPU peak for "fits with margin": min(band x peak, band GiB)
    fits_margin: np.ndarray           # GPU and host peaks fit raised by their margins, and the largest request has room
    host_margin_gib: np.ndarray       # GiB added to the host peak for "fits with margin" (ErrorBands.host_margin_gib_of)
    request_room: np.ndarray          # the step's largest single allocation fits in the card's room above the peak
    host_usable_gib: float = 0.0      # host memory a node's training processes may use (:func:`host_usable_gib`)

    @property
    def fits(self) -> np.ndarray:
        return self.fits_gpu & self.fits_cpu

    @property
    def risky(self) -> np.ndarray:
        """Predicted to fit, but not with the measured error band of the plan's regime."""
        return self.fits & ~self.fits_margin


def host_usable_gib(cluster: ClusterConfig, constants: SimulatorConstants | None = None) -> float:
    """Host memory a node's training processes may use (GiB): ``memory_usage_threshold`` x ``cpu_memory_gib``, where
    Ray's memory monitor starts killing workers, less what the node holds beside them (the system's own use and
    Ray's processes with the driver: ``SimulatorConstants.node_base_gib`` and ``ray_node_gib``), which the monitor
    counts too."""
    c = constants or SimulatorConstants()
    return max(float(cluster.cpu_memory_gib) * float(cluster.memory_usage_threshold)
               - c.node_base_gib - c.ray_node_gib, 0.0)


def evaluate(job: JobConfig, arrays: PlanArrays, constants: SimulatorConstants | None = None, *,
             headroom: float = 0.0, terms: ModelTerms | None = None, bands: ErrorBands | None = None) -> Scores:
    """Score every plan of ``arrays`` (no validity checks: that is Plan.check's job).

    ``bands``: the measured error bands (default: those shipped, :func:`load_error_bands`); a plan
    fits with margin when its GPU and host peaks times (1 + its regime's band) fit."""
    c = constants or SimulatorConstants()
    mt = terms or model_terms(job.model)
    ds = deepspeed_settings(job, arrays)
    mem = memory_terms(mt, job, arrays, c, ds)
    tim = time_terms(mt, job, arrays, c, ds)
    step = sum(tim[k] for k in TIME_KEYS)
    tokens = float(job.train.global_batch * job.train.seq_len)
    cl = job.cluster
    peak = peak_flops(cl, job.train.precision)
    fpt = forward_flops(mt.matmul_params, mt.layers, job.train.seq_len, mt.hidden)
    useful = np.where(arrays.zeroth_order, ZEROTH_ORDER_PASSES, BACKPROP_PASSES) * fpt * tokens   # sim.flops' rule
    peak_gib = mem["peak"] / GIB
    cpu_gib = mem["cpu_node"] / GIB
    # the host's usable memory: Ray's memory monitor kills a worker above memory_usage_threshold x the node's memory
    usable = host_usable_gib(cl, c)
    gpu_cap, cpu_cap = cl.gpu.memory_gib * (1.0 - headroom), usable * (1.0 - headroom)
    regime = regime_codes(arrays, ds.overlap_comm)
    eb = bands or load_error_bands()
    band = eb.band_of(regime)
    margin_gib = eb.margin_gib_of(regime, peak_gib)
    host_margin = eb.host_margin_gib_of(regime, cpu_gib)
    # the step's largest single allocation needs room beside the peak once the cache may be in pieces
    # (memory.largest_request)
    request_room = mem["largest_request"] / GIB <= gpu_cap - peak_gib
    return Scores(memory=mem, time=tim, peak_gib=peak_gib, cpu_node_gib=cpu_gib, step_time_s=step,
                  tokens_per_s=tokens / step, mfu=useful / (step * arrays.world * peak),
                  fits_gpu=peak_gib <= gpu_cap, fits_cpu=cpu_gib <= cpu_cap, regime=regime, band=band,
                  margin_gib=margin_gib, host_margin_gib=host_margin, request_room=request_room, host_usable_gib=usable,
                  # strictly below the card: a held-out run that ran out of memory counts as measured at the card,
                  # so a margin that only reaches it is a margin its run already failed (sim/error_bands.py)
                  fits_margin=(peak_gib + margin_gib < gpu_cap) & (cpu_gib + host_margin <= cpu_cap) & request_room)


def suggestions(plan: Plan, job: JobConfig, *, fitting_only: bool = False, max_changes: int = 3) -> list[str]:
    """Changes that lower GPU memory for a plan that does not fit, most effective first.

    ``fitting_only``: instead, the combinations of the fewest such changes (applied one after
    another, at most ``max_changes``) after which the plan passes :meth:`Plan.check` and the
    simulator says it fits, as override strings (``plan.zero_stage=3 plan.activation_checkpointing=full``);
    [] when none does."""
    out = []
    adamw = job.train.optimizer == Optimizer.ADAMW
    # CPU workers keep their "device" tensors in host memory: offloading to the host frees nothing there
    on_gpu = job.cluster.accelerator == Accelerator.GPU
    if plan.zeroth_order:
        if not plan.zo2 and on_gpu:
            out.append("plan.zo.mode=zo2")
    else:
        if plan.zero_stage < 3 and plan.dp > 1:
            out.append("plan.zero_stage=3")
        if not plan.offloads_optimizer and plan.zero_stage >= 1 and adamw and on_gpu:
            out.append("plan.offload_optimizer=cpu")
        elif not plan.offloads_optimizer and adamw and on_gpu:
            out.append("plan.zero_stage=2 plan.offload_optimizer=cpu")
        if plan.zero_stage == 3 and not plan.offloads_params and on_gpu:
            out.append("plan.offload_params=cpu")
        if not plan.checkpoints_activations:
            out.append("plan.activation_checkpointing=full")
    if plan.micro_batch > 1:
        out.append(f"plan.micro_batch={max(1, plan.micro_batch // 2)}")
    if not plan.zeroth_order and plan.tp < job.cluster.gpus_per_node:
        out.append(f"plan.tp={plan.tp * 2}")
    if not fitting_only:
        return out
    from meshpilot.orchestrator.errors import ConfigError
    fields = {"plan.zero_stage": "zero_stage", "plan.offload_optimizer": "offload_optimizer",
              "plan.offload_params": "offload_params", "plan.activation_checkpointing": "activation_checkpointing",
              "plan.micro_batch": "micro_batch", "plan.tp": "tp", "plan.zo.mode": "zo_mode"}

    def apply(p: Plan, changes: dict[str, str]) -> Plan:
        kw: dict[str, int | str] = {}
        for key, val in changes.items():
            name = fields[key]
            kw[name] = int(val) if isinstance(getattr(p, name), int) else val
        if "micro_batch" in kw:      # the global batch stays: accumulation makes up for the smaller micro-batch
            kw["grad_accum"] = max(1, job.train.global_batch // (int(kw["micro_batch"]) * p.data_parallel))
        return p.replace(**kw)

    level: list[tuple[dict[str, str], Plan]] = [({}, plan)]
    seen = {plan}
    for _ in range(max_changes):
        found: list[tuple[dict[str, str], Plan]] = []
        for done, p in level:
            for tip in suggestions(p, job):
                changes = dict(done)
                changes.update((key, val) for key, _, val in (tok.partition("=") for tok in tip.split()))
                alt = apply(plan, changes)
                if alt in seen:
                    continue
                seen.add(alt)
                try:
                    alt.check(job.model, job.train, job.cluster)
                except ConfigError:
                    continue
                found.append((changes, alt))
        if not found:
            return []
        fits = evaluate(job, PlanArrays.from_plans([a for _, a in found], job.cluster.gpus_per_node)).fits
        fitting = [" ".join(f"{k}={v}" for k, v in ch.items()) for (ch, _), ok in zip(found, fits) if ok]
        if fitting:
            return fitting
        level = found
    return []


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
        if cl.accelerator == Accelerator.GPU:
            fix = ("lower the offload (plan.offload_params=none), accumulate fewer micro-batches (a larger "
                   "plan.micro_batch) or use more nodes")
        else:           # CPU workers: the model's memory is the host's (sim/memory.py); the same changes lower both
            tips = [] if not scores.fits_gpu[i] else suggestions(plan, job)[:3]
            fix = ("the CPU workers' model memory is the host's: "
                   + (f"try {' or '.join(tips)}, or " if tips else "the changes above lower it too, or ")
                   + "use more nodes")
        reasons.append(f"needs {cpu:.1f} GiB of host memory per node, {scores.host_usable_gib * (1 - headroom):.1f} "
                       f"usable ({cl.memory_usage_threshold:.0%} of {cl.cpu_memory_gib:g}, Ray's "
                       "memory_usage_threshold, less what the system and Ray's own processes hold); " + fix)
    band, margin = float(scores.band[i]), float(scores.margin_gib[i])
    regime = REGIMES[int(scores.regime[i])]
    notes = []
    largest = float(scores.memory["largest_request"][i]) / GIB
    has_room = bool(scores.request_room[i])
    at_card = ""
    if bool(scores.memory["at_card"][i]):
        # sim/memory.py: the allocator returns its free cached segments when a cudaMalloc fails, so the reserve counted
        # above the live tensors (at ZeRO 0-2 the step's and the activations' blocks side by side) cannot take the card
        floor = float(scores.memory["live_floor"][i]) / GIB
        modelled = float(scores.memory["modelled_peak"][i]) / GIB
        at_card = (f"at the card: its live tensors need {floor:.1f} GiB, and the allocator's reserve as modelled would "
                   f"take it to {modelled:.1f} GiB; PyTorch's allocator returns its free cached segments and retries "
                   "when the card is full, so the plan runs at the card if the blocks it then needs hold no live "
                   "tensor, or runs out of memory (of nine such plans on H200, eight ran at 130.2-138.7 GiB of "
                   "140.4 and the one whose live tensors left 1.1 GiB failed at its second step: "
                   "benchmarks/results/2026-12-01-s11-h200x1/call1); the out-of-memory fallback takes over if it "
                   "fails")
    if at_card and bool(scores.fits[i]):
        notes.append("risky, " + at_card)
    elif bool(scores.risky[i]) and not has_room:
        room = max(avail - peak, 0.0)
        notes.append(f"risky: its largest single allocation ({largest:.1f} GiB, the optimizer step's fp32 gradient "
                     f"copy or the loss's fp32 logits) is more than the {room:.1f} GiB the card has above its "
                     "predicted peak; from the second step the allocator may find its cache in pieces (plans like "
                     "this ran a first step and failed at the second; train.max_split_size_mb=512 let them run)")
    elif bool(scores.risky[i]):
        notes.append(f"risky: fits as predicted, but not with the measured error band of its regime ({regime}: "
                     f"up to {peak + margin:.1f} GiB per GPU, {cpu + float(scores.host_margin_gib[i]):.1f} GiB host)")
    cal = cl.calibration
    if bool(arrays.offloads_optimizer[i]) and cl.accelerator == Accelerator.GPU and not cal.cpu_adam_rank_gparams_per_s:
        # the offloaded step's host time: CPU Adam (and its passes) dominate it, and it varies from host to host
        seen = ("a rank's CPU Adam ran 0.86-1.4x the probe's rate in training on three lent H200 hosts"
                if cal.cpu_adam_gparams_per_thread else
                "CPU Adam is at the constants' rate: run `meshpilot probe` on the machine (a rank's CPU Adam ran "
                "2.2-3.9 G parameters/s in training on three lent H200 hosts, 8 threads each)")
        notes.append(f"step time: {tim.get('cpu_optimizer', 0.0):.2f} s of it is the optimizer step on the host; "
                     f"{seen} (benchmarks/results/2026-12-01-s12-h200x1); `meshpilot calibrate` fits the rate "
                     "from your runs")
    if (bool(arrays.offloads_params[i]) and not bool(arrays.offloads_optimizer[i]) and int(arrays.zero[i]) == 3
            and cl.accelerator == Accelerator.GPU):
        # the optimizer on the GPU, the 16-bit partition on the host: the step's copy back is host-bound and slow
        rate = ("probed on this machine" if cal.host_cast_copy_d2h_gparams_per_s else
                "the constants' 0.33 G parameters/s, measured on one lent H200 host: run `meshpilot probe` here")
        notes.append(f"step time: {tim.get('offload_transfers', 0.0):.2f} s of it is parameter offload's transfers, "
                     "most of it the updated parameters' blocking copy from the GPU's fp32 partition into the "
                     f"host's 16-bit one, cast on the host ({rate}; benchmarks/results/2026-12-01-s13-h200x1)")
    if job.train.expandable_segments and cl.accelerator == Accelerator.GPU:
        notes.append("train.expandable_segments: the allocator's reserve is modelled for PyTorch's default mode; "
                     "with expandable segments the measured peaks ranged from 5% above to 17% below its prediction "
                     "(benchmarks/results/2026-11-30-s2-h200x2)")
    if job.train.max_split_size_mb is not None and cl.accelerator == Accelerator.GPU:
        notes.append(f"train.max_split_size_mb={job.train.max_split_size_mb}: the allocator's reserve is modelled for "
                     "PyTorch's default mode; measured with 512, three plans that ran out of memory at their second "
                     "step in the default mode ran (at the card, 0.4 s slower a step), and four others reserved "
                     "3-25 GiB more than in the default mode (benchmarks/results/2026-11-30-s5-h200x2)")
    return Estimate(plan=text.describe(plan), plan_config=plan.to_config(), world_size=plan.world_size,
                    fits=bool(scores.fits_gpu[i] and scores.fits_cpu[i]), peak_memory_gib=peak,
                    gpu_memory_gib=float(cl.gpu.memory_gib), cpu_memory_gib_per_node=cpu,
                    cpu_memory_available_gib=scores.host_usable_gib, step_time_s=float(scores.step_time_s[i]),
                    tokens_per_s=float(scores.tokens_per_s[i]), mfu=float(scores.mfu[i]),
                    memory_breakdown_gib=mem, time_breakdown_s=tim, reasons=reasons, notes=notes, at_card=at_card,
                    regime=regime, memory_band=band, memory_margin_gib=margin,
                    fits_with_margin=bool(scores.fits_margin[i]), largest_request_gib=largest,
                    largest_request_has_room=has_room)


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
