"""One ``meshpilot run``, from the job to its summary, without the command line and without Ray.

Order (everything that can be wrong with the job is found before any resource is taken):

1. :func:`plan_job`: the job's fixed plan or the planner's choice (``plan: auto``), and the
   simulator's fit check (:func:`fit_check`), which refuses a plan that does not fit with the
   simulator's numbers and the changes that make it fit, unless forced; :func:`check_worker`
   checks that the worker function can be found;
2. :meth:`RunSession.create`: the run directory (state.json, events.jsonl, job.yaml,
   controller.log, logs/) and its entry in the runs index;
3. :meth:`RunSession.connect`: the connection to the cluster, made by a callable the caller
   passes in (the command line passes Ray's), recorded in state.json;
4. :meth:`RunSession.run`: the :class:`~meshpilot.orchestrator.run.controller.Controller` over
   the worker group the caller's factory builds; every transition and (throttled) progress is
   persisted, and tokens/s is tracked over a sliding window;
5. :meth:`RunSession.finish`: the summary dict (:func:`summarize`: time, tokens/s, MFU, memory
   peaks per rank beside the simulator's prediction), written to state.json, events.jsonl and
   ``<run_dir>/summary.json``.

Out of memory (a worker's CUDA OOM, Ray's memory monitor, a SIGKILL with the node's memory
near its limit: see ``meshpilot.launch.group``) is never retried with the same plan. With a fixed
plan the run fails with :func:`oom_message` (the kind, the measured and predicted peaks, the
simulator's suggestions; ``meshpilot run`` exits 4). With ``plan: auto`` the session falls back
(:func:`fallback_plan`) to the best-ranked plan not yet tried whose predicted peak (GPU for a
GPU OOM, host per node for a host OOM) is below the failed plan's and, in the failed plan's
regime, fits even with the error the failure showed (:func:`observed_error`: the regime's
margin was too small), at most ``max_fallbacks`` times; the new plan resumes from the run's checkpoints only when its fingerprint and world size
are the old plan's (the workers' checkpoint compatibility check), else it starts from step 0 in
a fresh folder ``<run_dir>/fallback-<n>-<fingerprint>``. Each decision is an ``oom`` event in
events.jsonl.

Nothing here imports Ray, torch or :mod:`meshpilot.launch`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from meshpilot.orchestrator.config.inputs import check_inputs, check_writable_dir
from meshpilot.orchestrator.config.loader import dump_job
from meshpilot.orchestrator.config.schema import Accelerator, JobConfig
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.plan.text import fingerprint as plan_fingerprint
from meshpilot.orchestrator.run.controller import Controller, FailurePolicy, Outcome, PlanSwitch, TransitionHook
from meshpilot.orchestrator.run.protocol import (DEFAULT_WORKER, MEMORY_PEAK_KEYS, Failure, FailureKind, JobStatus,
                                                 Progress, WorkerGroup)
from meshpilot.orchestrator.run.store import (PRIVATE, TERMINAL_STATES, JobState, RunLock, RunStore, new_run_id,
                                              safe_run_id)
from meshpilot.orchestrator.sim.calibration import predicted_vs_measured
from meshpilot.orchestrator.sim.estimate import Estimate
from meshpilot.orchestrator.sim.flops import mfu as mfu_of
from meshpilot.orchestrator.sim.planner import choose_plan, search
from meshpilot.orchestrator.sim.simulator import simulate, suggestions

log = logging.getLogger("meshpilot.run")

# (run_dir, log_path(rank)) -> the worker group of the run; after an out-of-memory fallback it is
# called with the new plan too, as make_group(run_dir, log_path, plan=plan)
GroupFactory = Callable[..., WorkerGroup]
ProgressHook = Callable[[Progress, Optional[float]], None]      # (rank 0's progress, tokens/s or None)


class Connection(Protocol):
    """A connection to the cluster the workers run on."""
    address: str

    def close(self) -> None: ...


# --- everything checkable without resources ------------------------------------------------

def plan_job(job: JobConfig, *, force: bool = False) -> tuple[Plan, Estimate]:
    """The plan to run (the job's own, or the planner's for ``plan: auto``) and its estimate."""
    # the data (a dataset whose cache is missing is tokenized here, before any worker starts: workers
    # only memory-map it); the run directory is checked by create()
    for note in check_inputs(job, check_output=False):
        log.warning("%s", note)
    plan = choose_plan(job)
    if job.plan.auto and not records_safely(job, plan):
        # plan: auto with the allocator's history: the best-ranked fitting plan whose recording has not crashed
        res = search(job, top=1)
        plan = next((p for p in map(res.arrays.plan, map(int, res.ranked)) if records_safely(job, p)), plan)
        log.info("train.memory_history: plan: auto takes %s, the best-ranked plan that can record", plan.describe())
    check_recording(job, plan)
    return plan, fit_check(job, plan, force=force)


def check_recording(job: JobConfig, plan: Plan) -> None:
    """Refuse ``train.memory_history`` on a plan whose recording has always crashed: activation checkpointing with a
    custom autograd Function inside the recomputed block (DeepSpeed's ZeRO-3 linear, an expert layer's all-to-all).
    On torch 2.11 every such run failed in its first backward with a SystemError from autograd's engine (four of
    four: two ZeRO-3 + optimizer offload, a ZeRO-3 with DeepSpeed's defaults, an ep=2 Mixtral; 2026-11-30-s6 hist3,
    2026-11-30-s9 call1 and call3, 2026-12-01-s11 tr), while the same plans ran without recording and ZeRO 0-2 dense
    plans with checkpointing recorded fine."""
    if not (job.train.memory_history and job.cluster.accelerator == Accelerator.GPU and plan.checkpoints_activations):
        return
    if plan.zero_stage == 3 or job.model.num_experts > 0:
        what = "ZeRO-3" if plan.zero_stage == 3 else "an expert model"
        raise ConfigError("train.memory_history", True,
                          reason=f"recording the allocator's history crashed every run of {what} with activation "
                                 "checkpointing in its first backward (torch 2.11: a SystemError from autograd's "
                                 "engine in the recomputed block)",
                          fix="set train.memory_history=false, or record the plan without checkpointing "
                              "(plan.activation_checkpointing=none)")


def records_safely(job: JobConfig, plan: Plan) -> bool:
    """Whether :func:`check_recording` lets ``plan`` run (``plan: auto`` and the out-of-memory fallback pass over the
    plans it refuses instead of failing on them)."""
    try:
        check_recording(job, plan)
    except ConfigError:
        return False
    return True


def fit_check(job: JobConfig, plan: Plan, *, force: bool = False) -> Estimate:
    """The simulator's Estimate of ``plan``; raises ConfigError if it does not fit, unless ``force``."""
    est = simulate(job, plan)
    if est.fits or force:
        if not est.fits:
            log.warning("running a plan the simulator says does not fit (--force): %s", "; ".join(est.reasons))
        return est
    reasons = "; ".join(est.reasons) or "over the memory limit"
    fitting = suggestions(plan, job, fitting_only=True)
    fix = ("try " + ", or ".join(fitting[:3])) if fitting else "use a larger cluster or a smaller model/batch"
    raise ConfigError("plan", plan.describe(),
                      reason=f"does not fit: predicted peak {est.peak_memory_gib:.2f} GiB per device, "
                             f"{est.gpu_memory_gib:.2f} GiB available ({reasons})",
                      fix=fix + "; or pass --force to run it anyway")


def check_worker(ref: str) -> None:
    """The worker function ``MODULE:FUNCTION`` exists. meshpilot's own worker is only located
    (``find_spec``): importing it would import torch and DeepSpeed into the driver, which
    never uses them (seconds of start-up); a user's module is imported and its function
    checked."""
    mod, _, name = ref.partition(":")
    if ref == DEFAULT_WORKER:
        if importlib.util.find_spec(mod) is None:
            raise ConfigError("--worker", ref, reason=f"cannot find {mod}", fix="reinstall meshpilot")
        return
    try:
        m = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError("--worker", ref, reason=f"cannot import {mod}: {e}",
                          fix="the training worker module must be installed on the driver and every node") from None
    if not callable(getattr(m, name or "run_worker", None)):
        raise ConfigError("--worker", ref, reason=f"{mod} has no function {name or 'run_worker'}")


def bytecode_hint(environ: Mapping[str, str]) -> Optional[str]:
    """A warning when the workers will compile their imports from source at every start.

    With PYTHONDONTWRITEBYTECODE set and no PYTHONPYCACHEPREFIX, a Python install that shipped
    without .pyc files (some container images) compiles torch, DeepSpeed and Ray from source in
    every worker process: 5.3 s of rank 0's 12 s start-up on 4 x H200, and command to first step
    28.5-31.2 s instead of 13.6-15.0 s (benchmarks/results/2026-11-27-s5-h200x4)."""
    if environ.get("PYTHONDONTWRITEBYTECODE") and not environ.get("PYTHONPYCACHEPREFIX"):
        return ("PYTHONDONTWRITEBYTECODE is set: where torch/DeepSpeed were installed without .pyc files, every "
                "worker compiles them from source at start-up (seconds per worker); unset it, or set "
                "PYTHONPYCACHEPREFIX to a writable folder")
    return None


def check_resume_steps(run_dir: Path, steps: int) -> None:
    """Refuse, before any resource is taken, a ``train.steps`` below the step of the checkpoint the
    run would resume from (``RUN_DIR/checkpoints/latest`` and its ``meshpilot.json``, read as plain
    JSON: the workers check the checkpoint fully). A larger value extends the run (the workers log it)."""
    root = run_dir / "checkpoints"
    try:
        tag = (root / "latest").read_text().strip()
        meta = json.loads((root / tag / "meshpilot.json").read_text())
        step = int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return                        # no checkpoint yet, or a damaged one: the workers decide
    if step > steps:
        raise ConfigError("train.steps", steps, reason=f"is below the step of the checkpoint this run would resume "
                          f"from ({root / tag}: step {step})",
                          fix=f"set train.steps>={step} to continue the run, or use another --run-dir")
    if int(meta.get("total_steps") or steps) != steps:
        log.warning("train.steps=%d: extending the run resumed at step %d (its checkpoint was written by a run of %s "
                    "steps); the learning-rate schedule changes from there", steps, step, meta.get("total_steps"))


# --- out of memory ----------------------------------------------------------------------------

def oom_message(failure: Failure, job: JobConfig, plan: Plan, estimate: Optional[Estimate]) -> str:
    """Why the run stops on an out-of-memory failure: the kind, the measured peak ("-" when the
    worker reported none), the simulator's predicted peak and its suggestions."""
    gpu = failure.kind is FailureKind.GPU_OOM
    measured = "-" if failure.memory_peak_gib is None else f"{failure.memory_peak_gib:.2f} GiB"
    if estimate is None:
        predicted = "-"
    elif gpu:
        predicted = f"{estimate.peak_memory_gib:.2f} GiB per GPU (of {estimate.gpu_memory_gib:.2f} GiB)"
    else:
        predicted = (f"{estimate.cpu_memory_gib_per_node:.2f} GiB host memory per node (of "
                     f"{estimate.cpu_memory_available_gib:.2f} GiB usable); {estimate.peak_memory_gib:.2f} GiB per GPU")
    try:
        tips = suggestions(plan, job)[:4]
    except Exception as e:          # never lose the message for want of suggestions
        log.warning("no suggestions: %s", e)
        tips = []
    split = fragmentation_tip(failure.message, job) if gpu else None
    if split:
        tips = [split, *tips]
    who = f" on rank {failure.rank}" if failure.rank is not None else ""
    return (f"out of memory ({failure.kind.value}){who} with plan {plan.describe()}: measured peak {measured}, "
            f"predicted peak {predicted}; not retried with the same plan. "
            + ("Suggestions: " + ", ".join(tips) if tips else "Suggestions: a larger cluster or a smaller batch")
            + f". Cause: {failure.message[:300]}")


_CUDA_OOM = re.compile(r"Tried to allocate ([0-9.]+) GiB.*?([0-9.]+) GiB is reserved by PyTorch but unallocated", re.S)


def fragmentation_tip(message: str, job: JobConfig) -> Optional[str]:
    """``train.max_split_size_mb=512`` where PyTorch's out-of-memory message says the cache held at least half the
    failed request in free blocks it could not use (the request found the cached memory in pieces) and the job sets
    neither allocator option. Measured: three plans that failed so at their second step ran with it, at the card,
    while plans away from the edge reserved more with it (benchmarks/results/2026-11-30-s5-h200x2)."""
    m = _CUDA_OOM.search(message or "")
    if m is None or job.train.max_split_size_mb is not None or job.train.expandable_segments:
        return None
    request, cached = float(m.group(1)), float(m.group(2))
    if cached < 0.5 * request:
        return None
    return (f"train.max_split_size_mb=512 ({cached:.1f} GiB was cached in pieces too small for the "
            f"{request:.1f} GiB request)")


def observed_error(job: JobConfig, kind: FailureKind, predicted_gib: float, measured_gib: Optional[float]) -> float:
    """How far a run that ran out of memory exceeded its prediction, at least: it needed more than
    the capacity (the card for a GPU OOM; 95% of the node's memory, where Ray's memory monitor
    kills, for a host OOM) or than its measured peak. ``max(capacity, measured) / predicted - 1``."""
    cap = job.cluster.gpu.memory_gib if kind is FailureKind.GPU_OOM else 0.95 * job.cluster.cpu_memory_gib
    return max(0.0, max(cap, measured_gib or 0.0) / predicted_gib - 1.0) if predicted_gib > 0 else 0.0


def fallback_plan(job: JobConfig, failed: list[Plan], kind: FailureKind, below_gib: float,
                  *, headroom: float = 0.05, regime: str = "", error: float = 0.0) -> Optional[tuple[Plan, Estimate]]:
    """The planner's best-ranked fitting plan (those with their measured error band first), not
    one of ``failed`` nor one whose recording ``train.memory_history`` refuses (:func:`records_safely`),
    whose predicted peak (per GPU for a GPU OOM, host memory per node for a host OOM) is below
    ``below_gib``; None if none. A plan of the failed plan's ``regime`` must moreover fit with the
    ``error`` that regime just showed (:func:`observed_error`): its margin was too small."""
    from meshpilot.orchestrator.sim.error_bands import REGIMES
    res = search(job, headroom=headroom, top=1)
    tried = {plan_fingerprint(p) for p in failed}
    gpu = kind is FailureKind.GPU_OOM
    vals = res.scores.peak_gib if gpu else res.scores.cpu_node_gib
    cap = (job.cluster.gpu.memory_gib if gpu else job.cluster.cpu_memory_gib) * (1.0 - headroom)
    codes = res.scores.regime
    for i in res.ranked:
        i = int(i)
        if float(vals[i]) >= below_gib:
            continue
        if regime and REGIMES[int(codes[i])] == regime and float(vals[i]) * (1.0 + error) > cap:
            continue
        p = res.arrays.plan(i)
        if plan_fingerprint(p) in tried or not records_safely(job, p):
            continue
        return p, simulate(job, p, headroom=headroom)
    return None


def can_resume(old: Plan, new: Plan) -> bool:
    """Whether ``new`` can load ``old``'s checkpoints: the workers' check compares plan fingerprints
    and world sizes (orchestrator/train/checkpoint.py)."""
    return plan_fingerprint(old) == plan_fingerprint(new) and old.world_size == new.world_size


# --- persisting and measuring the run -------------------------------------------------------

class StatePersister:
    """Controller hooks -> state.json / events.jsonl (progress throttled to twice a second)."""

    def __init__(self, store: RunStore, state: JobState):
        self.store, self.state = store, state
        self._last_write = 0.0

    def transition(self, old: JobStatus, new: JobStatus, reason: str, info: dict[str, Any]) -> None:
        s = self.state
        s.state, s.message = new.value, reason
        s.attempt, s.restarts = info.get("attempt", s.attempt), info.get("restarts", s.restarts)
        if "pids" in info:
            s.worker_pids = list(info["pids"])
        self.store.append_event("transition", old=old.value, new=new.value, reason=reason, **info)
        self._write(s)

    def progress(self, p: Progress, tokens_per_s: Optional[float]) -> None:
        s = self.state
        s.step = p.step
        loss = p.metrics.get("loss")
        s.loss = float(loss) if loss is not None else s.loss
        s.tokens_per_s = tokens_per_s
        now = time.time()
        if now - self._last_write >= 0.5:
            self._last_write = now
            self._write(s)

    def _write(self, s: JobState) -> None:
        """A failed state write (a full disk) must not kill the controller: it is logged, and the
        final state is written again at the end (in place if the disk is still full)."""
        try:
            self.store.write(s)
        except OSError as e:
            log.error("could not write %s (%s): %s", self.store.state_path, s.state, e)


class Throughput:
    """tokens/s over a sliding window of (time, step) samples of the current attempt."""

    WINDOW = 20

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.samples: list[tuple[float, int]] = []

    def reset(self) -> None:
        """A new gang: the gap before its first step is not training time."""
        self.samples = []

    def add(self, step: int, now: Optional[float] = None) -> Optional[float]:
        now = time.monotonic() if now is None else now
        if self.samples and step < self.samples[-1][1]:
            self.samples = []  # a restart resumed from an earlier step
        if not self.samples or step != self.samples[-1][1]:
            self.samples.append((now, step))
        self.samples = self.samples[-self.WINDOW:]
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) * self.tokens_per_step / (t1 - t0) if t1 > t0 and s1 > s0 else None


# --- the summary ----------------------------------------------------------------------------

def memory_peaks(result: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """A rank's memory peaks (GiB) from its result's ``memory_peaks_gib``; None where unknown."""
    peaks = result.get("memory_peaks_gib") or {}
    return {k: (None if peaks.get(k) is None else float(peaks[k])) for k in MEMORY_PEAK_KEYS}


def peak_memory_of(peaks: Mapping[str, Optional[float]]) -> Optional[float]:
    """The one peak of a rank kept as ``peak_memory_gib`` in summary.json: NVML's when known, else
    torch's reserved peak, else the host RSS peak."""
    for k in ("nvml", "reserved", "host_rss"):
        if peaks.get(k) is not None:
            return peaks[k]
    return None


def startup_phases(t_command: float, connect_times: Optional[tuple[float, float]],
                   r0: Mapping[str, Any]) -> dict[str, float]:
    """Command -> rank 0's first step, in consecutive phases (seconds, in order; they add up to
    ``time_to_first_step_s``): the driver, connecting to (or starting) Ray, the placement group,
    the actor processes, the rendezvous, the worker's imports, the worker's own start-up phases
    (``startup_phases_s`` of its result) and the rest (preflight, torch.distributed, the first
    step). The gang's marks come from ``r0["launch_times"]`` (set by the launcher); a phase whose
    marks are missing is left out, and the next one starts from the last known mark."""
    lt = dict(r0.get("launch_times") or {})
    first = r0.get("first_step_time")
    marks: list[tuple[str, Optional[float]]] = [
        ("driver: plan, run directory", connect_times[0] if connect_times else None),
        ("Ray start / connect", connect_times[1] if connect_times else None),
        ("placement group", lt.get("placed")),
        ("actor processes", lt.get("actors_ready")),
        ("rendezvous", lt.get("run_called")),
        ("worker: imports (torch)", lt.get("worker_imported"))]
    out: dict[str, float] = {}
    prev = t_command
    for name, t in marks:
        if t is not None and t >= prev:
            out[name], prev = round(t - prev, 3), t
    if first is None or lt.get("worker_imported") is None or prev != lt["worker_imported"]:
        return out
    worker = {f"worker: {k}": float(v) for k, v in (r0.get("startup_phases_s") or {}).items()}
    rest = first - prev - sum(worker.values())
    if rest >= 0:
        out.update((k, round(v, 3)) for k, v in worker.items())
        out["worker: process group, first step"] = round(rest, 3)
    else:
        out["worker: start-up and first step"] = round(first - prev, 3)
    return out


def summarize(job: JobConfig, plan: Plan, estimate: Optional[Estimate], outcome: Outcome, t_command: float,
              first_seen: Optional[float], now: Optional[float] = None, *,
              connect_times: Optional[tuple[float, float]] = None) -> dict[str, Any]:
    """The run's summary: what summary.json holds and the command prints.

    ``memory_peaks_gib`` maps rank -> {nvml, allocated, reserved, host_rss} (GiB or None);
    ``predicted_peak_memory_gib`` is the simulator's NVML-level peak, comparable with ``nvml``
    only; ``peak_memory_gib`` (rank -> one number, see :func:`peak_memory_of`) is kept for
    readers of older summaries; ``startup_phases_s``: see :func:`startup_phases`;
    ``predicted_vs_measured``: every rank's NVML, allocated, reserved and RSS peaks, every node's host
    peak, the median step time and phases, each beside its prediction and the simulator's version
    and constants fingerprint (:mod:`meshpilot.orchestrator.sim.calibration`)."""
    now = time.time() if now is None else now
    results = outcome.results or []
    r0 = next((r for r in results if r.get("rank") == 0), results[0] if results else {})
    tokens_per_step = job.train.global_batch * job.train.seq_len
    tps = None
    if r0.get("first_step_time") and r0.get("last_step_time") and r0.get("last_step", 0) > r0.get("first_step", 0):
        tps = (r0["last_step"] - r0["first_step"]) * tokens_per_step / (r0["last_step_time"] - r0["first_step_time"])
    mfu = mfu_of(job, tps, plan.world_size, zeroth_order=plan.zeroth_order) if tps else None
    first_step = r0.get("first_step_time") if outcome.restarts == 0 and r0.get("first_step_time") else first_seen
    peaks = {int(r.get("rank", i)): memory_peaks(r) for i, r in enumerate(results)}
    return dict(
        status=outcome.status.value, message=outcome.message, attempts=outcome.attempts, restarts=outcome.restarts,
        failures=[str(f) for f in outcome.failures], out_of_memory=outcome.out_of_memory,
        fallbacks=outcome.fallbacks, plan=plan.describe(), world_size=plan.world_size,
        wall_s=round(now - t_command, 3),
        time_to_first_step_s=round(first_step - t_command, 3) if first_step else None,
        # the phases of the first attempt's start-up; after a restart only the driver's and Ray's
        startup_phases_s=startup_phases(t_command, connect_times, r0 if outcome.restarts == 0 else {}),
        tokens_per_s=tps, mfu=mfu,
        final_loss=r0.get("final_loss"), param_checksum=r0.get("param_checksum"),
        eval_loss=r0.get("eval_loss"), eval_perplexity=r0.get("eval_perplexity"),
        memory_peaks_gib=peaks,
        peak_memory_gib={r: peak_memory_of(p) for r, p in peaks.items()},
        predicted_peak_memory_gib=None if estimate is None else estimate.peak_memory_gib,
        predicted_tokens_per_s=None if estimate is None else estimate.tokens_per_s,
        predicted_vs_measured=_predicted_vs_measured(job, plan, results) if results else None,
        results=results)


def _predicted_vs_measured(job: JobConfig, plan: Plan, results: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Every measured peak, the median step time and phases beside the simulator's predictions
    (:func:`meshpilot.orchestrator.sim.calibration.predicted_vs_measured`); a failure to compute them
    is logged and never loses the summary."""
    try:
        return predicted_vs_measured(job, plan, results)
    except Exception as e:
        log.warning("no predicted-vs-measured rows in the summary: %s: %s", type(e).__name__, e)
        return None


# --- the session ----------------------------------------------------------------------------

class RunSession:
    """One run of one job with one plan: its run directory, its state and its controller."""

    def __init__(self, job: JobConfig, plan: Plan, estimate: Optional[Estimate], *, job_path: str,
                 run_dir: Optional[str] = None, t_command: Optional[float] = None):
        self.job, self.plan, self.estimate = job, plan, estimate
        self.t_command = time.time() if t_command is None else t_command
        job_name = job.model.name if job.model.name != "custom" else Path(job_path).stem
        self.run_id = new_run_id(job_name) if run_dir is None else safe_run_id(Path(run_dir).absolute().name)
        self.run_dir = Path(run_dir) if run_dir else Path(job.train.output_dir) / self.run_id
        self.store = RunStore(self.run_dir)
        self.state = JobState(run_id=self.run_id, run_dir=str(self.run_dir.resolve()), job_name=job_name,
                              world_size=plan.world_size, plan=plan.describe(), total_steps=job.train.steps)
        self.first_step_seen: Optional[float] = None      # wall time rank 0's first step was seen
        self.connect_times: Optional[tuple[float, float]] = None   # wall times connect() began and returned
        self._log_handler: Optional[logging.Handler] = None
        self._lock: Optional[RunLock] = None
        self.stop_signal: Optional[str] = None             # SIGUSR1/SIGUSR2 received: stop with a checkpoint
        self._old_handlers: dict[int, Any] = {}

    @classmethod
    def create(cls, job: JobConfig, plan: Plan, estimate: Optional[Estimate], *, job_path: str,
               run_dir: Optional[str] = None, t_command: Optional[float] = None) -> "RunSession":
        """A session whose run directory, state and controller log exist."""
        s = cls(job, plan, estimate, job_path=job_path, run_dir=run_dir, t_command=t_command)
        check_writable_dir("--run-dir" if run_dir else "train.output_dir", s.run_dir)
        check_resume_steps(s.run_dir, job.train.steps)
        try:
            s.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("--run-dir" if run_dir else "train.output_dir", str(s.run_dir),
                              reason=f"cannot be created: {e.strerror or e}") from None
        s._lock = RunLock(s.store.lock_path).acquire()   # a second `meshpilot run` on this directory exits 2
        try:
            s.store.create(s.state, lock=s._lock)
            _write_private(s.run_dir / "job.yaml", dump_job(job))
            s._log_handler = _controller_logging(s.store.controller_log)
        except BaseException:
            s._lock.release()
            raise
        s._catch_stop_signals()
        log.info("run %s: %s, %d worker(s), run dir %s", s.run_id, plan.describe(), plan.world_size, s.run_dir)
        return s

    def connect(self, connect: Callable[[], Connection]) -> Connection:
        """Call ``connect`` and record the address. A ConnectionError fails the run, Ctrl-C or SIGTERM
        while connecting cancels it; both are re-raised."""
        t0 = time.time()
        try:
            conn = connect()
        except ConnectionError as e:
            self.abandon("failed", f"cannot connect to Ray: {e}")
            raise
        except (SystemExit, KeyboardInterrupt):
            self.abandon("cancelled", "cancelled while Ray was starting")
            raise
        except Exception as e:                     # Ray did not start (a port taken, /tmp full, a crash)
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            self.abandon("failed", f"Ray did not start: {type(e).__name__}: {first}")
            raise ConnectionError(f"Ray did not start: {type(e).__name__}: {first}") from e
        self.connect_times = (t0, time.time())
        self.state.ray_address = conn.address
        self._write_state()
        return conn

    def run(self, make_group: GroupFactory, policy: FailurePolicy, *,
            cancel_requested: Callable[[], bool] = lambda: False, on_progress: Optional[ProgressHook] = None,
            on_transition: Optional[TransitionHook] = None, max_fallbacks: int = 2) -> Outcome:
        """Drive the controller to a terminal state. ``cancel_requested`` is polled besides the run's
        cancel file; ``on_progress`` / ``on_transition`` are called after the state is persisted.
        ``max_fallbacks``: plan changes after out-of-memory failures (``plan: auto`` only)."""
        log_path = lambda r: str(self.store.rank_log(r).resolve())          # noqa: E731
        group = make_group(str(self.run_dir.resolve()), log_path)
        persist = StatePersister(self.store, self.state)
        tput = Throughput(self.job.train.global_batch * self.job.train.seq_len)

        def progress(p: Progress) -> None:
            if self.first_step_seen is None:
                self.first_step_seen = time.time()
            tps = tput.add(p.step)
            persist.progress(p, tps)
            if on_progress is not None:
                on_progress(p, tps)

        def transition(old: JobStatus, new: JobStatus, reason: str, info: dict[str, Any]) -> None:
            persist.transition(old, new, reason, info)
            if new is JobStatus.RUNNING:
                tput.reset()
            if on_transition is not None:
                on_transition(old, new, reason, info)

        def stop_requested() -> Any:
            if self.stop_signal is not None:
                return (f"stopped on {self.stop_signal}: the workers were asked to checkpoint and stop; "
                        f"`meshpilot run <job> --run-dir {self.run_dir}` resumes")
            return cancel_requested() or self.store.cancel_requested()

        tried: list[Plan] = [self.plan]

        def on_oom(failure: Failure, fallbacks: int) -> Any:
            plan, est = self.plan, self.estimate
            stop = oom_message(failure, self.job, plan, est)
            event = dict(failure=failure.kind.value, rank=failure.rank, plan=plan.describe(),
                         measured_peak_gib=failure.memory_peak_gib,
                         predicted_peak_gib=None if est is None else est.peak_memory_gib,
                         predicted_host_gib_per_node=None if est is None else est.cpu_memory_gib_per_node)
            if not self.job.plan.auto:
                self.store.append_event("oom", decision="stop", reason="fixed plan", **event)
                return stop
            if fallbacks >= max_fallbacks:
                self.store.append_event("oom", decision="stop", reason=f"max_fallbacks={max_fallbacks} reached",
                                        **event)
                return f"{stop} Gave up after {fallbacks} fallback plan(s) (--max-fallbacks={max_fallbacks})."
            gpu = failure.kind is FailureKind.GPU_OOM
            if est is None:
                est = simulate(self.job, plan)
            below = est.peak_memory_gib if gpu else est.cpu_memory_gib_per_node
            error = observed_error(self.job, failure.kind, below, failure.memory_peak_gib)
            event.update(regime=est.regime, observed_error=round(error, 4), regime_band=est.memory_band)
            nxt = fallback_plan(self.job, tried, failure.kind, below, regime=est.regime, error=error)
            if nxt is None:
                self.store.append_event("oom", decision="stop", reason="no fitting plan with a lower peak", **event)
                return f"{stop} No other plan fits with a predicted peak below {below:.2f} GiB."
            new_plan, new_est = nxt
            tried.append(new_plan)
            resume = can_resume(plan, new_plan)
            n = len(tried) - 1
            work_dir = self.run_dir if resume else self.run_dir / f"fallback-{n}-{plan_fingerprint(new_plan)}"
            work_dir.mkdir(parents=True, exist_ok=True)
            self.plan, self.estimate = new_plan, new_est
            self.state.plan, self.state.world_size = new_plan.describe(), new_plan.world_size
            where = "from the last checkpoint" if resume else f"from step 0 in {work_dir} (its checkpoints " \
                    "cannot be loaded by the new plan)"
            reason = (f"out of memory ({failure.kind.value}) with plan {plan.describe()} (predicted peak "
                      f"{below:.2f} GiB): plan marked as not fitting, and the {est.regime.replace('_', ' ')} "
                      f"regime's margin as too small (+{est.memory_band:.0%} measured before, at least "
                      f"+{error:.0%} now); falling back to {new_plan.describe()} "
                      f"(predicted {'peak' if gpu else 'host'} "
                      f"{new_est.peak_memory_gib if gpu else new_est.cpu_memory_gib_per_node:.2f} GiB) {where}; "
                      f"fallback {fallbacks + 1}/{max_fallbacks}")
            self.store.append_event("oom", decision="fallback", new_plan=new_plan.describe(), resume=resume,
                                    work_dir=str(work_dir), new_predicted_peak_gib=new_est.peak_memory_gib, **event)
            new_group = make_group(str(work_dir.resolve()), log_path, plan=new_plan)
            return PlanSwitch(new_group, reason, dict(plan=new_plan.describe(), resume=resume))

        ctl = Controller(group, policy, on_transition=transition, on_progress=progress,
                         cancel_requested=stop_requested, on_oom=on_oom)
        try:
            return ctl.run()
        except BaseException as e:                 # a controller bug or Ctrl-C: the gang is already torn down
            self.abandon("failed", f"controller error: {type(e).__name__}: {e}")
            raise

    def finish(self, outcome: Outcome) -> dict[str, Any]:
        """Summarize the run and write the summary to state.json, events.jsonl and summary.json."""
        summary = summarize(self.job, self.plan, self.estimate, outcome, self.t_command, self.first_step_seen,
                            connect_times=self.connect_times)
        st = self.state
        if outcome.results:                # the last progress write is throttled: record where it ended
            st.step = max(int(r.get("step", st.step) or 0) for r in outcome.results)
            st.loss = summary["final_loss"] if summary["final_loss"] is not None else st.loss
        st.result = summary
        self._write_state()
        self.store.append_event("summary", **summary)
        try:
            _write_private(self.run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
        except OSError as e:                       # a full disk: state.json holds the result already
            log.error("could not write %s: %s", self.run_dir / "summary.json", e)
        return summary

    def abandon(self, status: str, reason: str) -> None:
        """Record a terminal state reached outside the controller (the cluster never came up, a crash)."""
        st = self.state
        if st.state not in TERMINAL_STATES:
            self.store.append_event("transition", old=st.state, new=status, reason=reason)
            st.state, st.message = status, reason
            self._write_state()
        log.error("run %s: %s: %s", st.run_id, status, reason)

    def _write_state(self) -> None:
        """Persist the state; a failure (a full disk beyond the in-place fallback) is logged, not
        raised, so that the run still ends and reports (``status`` then finds the last state)."""
        try:
            self.store.write(self.state)
        except OSError as e:
            log.error("could not write %s (%s): %s", self.store.state_path, self.state.state, e)

    def _catch_stop_signals(self) -> None:
        """SIGUSR1 and SIGUSR2 (a scheduler's preemption notice) stop the run like a cancel, with
        the workers' stop checkpoint, instead of killing the controller with its state left
        'running'. Only in the main thread (signal handlers cannot be installed elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, frame: Any) -> None:
            self.stop_signal = signal.Signals(signum).name
            log.warning("run %s: %s received: stopping the workers with a checkpoint", self.run_id, self.stop_signal)

        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            self._old_handlers[sig] = signal.signal(sig, handle)

    def close(self) -> None:
        """Stop writing this process's log records to the run's controller.log, restore the signal
        handlers and release the run directory's lock. Idempotent."""
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _write_private(path: Path, text: str) -> None:
    """Write a run-directory file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    with open(fd, "w") as f:
        os.fchmod(f.fileno(), PRIVATE)
        f.write(text)


def _controller_logging(path: Path) -> logging.Handler:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE))     # owner-only from the start
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s [controller] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for name in ("meshpilot", "ray"):
        logging.getLogger(name).propagate = True
    return h
