"""Predicted against measured, per run, and the refit of a cluster's calibration from recorded runs.

Two things live here, both pure numpy (no torch):

1. :func:`predicted_vs_measured`: what a finished run measured beside what the simulator predicts
   for its job and plan, written to ``summary.json`` under ``predicted_vs_measured`` by
   :mod:`meshpilot.orchestrator.run.session` and shown by ``meshpilot status RUN --json``:

   - per rank: the NVML peak sampled through the run (the simulator's peak is NVML-level),
     torch's allocated and reserved peaks (the memory model's allocated and
     allocated x (1 + fragmentation) + model-load hole), and the peak resident set of the worker
     process beside the predicted host memory of one rank (host memory per node / ranks on the
     node). On CPU workers (gloo) there is no NVML: the device row is the worker's peak RSS against
     the predicted peak (the memory model treats a CPU worker's memory as its device);
   - per rank, also the peak of the worker's RssAnon + RssShmem (``host``: its resident memory
     without page cache, pinned buffers included) beside the same per-rank prediction;
   - per node: the host memory peak as Ray's memory monitor counts it (:func:`node_host_memory_gib`:
     the node's MemTotal - MemAvailable at its peak, less its value when the workers started, plus
     the workers' own RssAnon + RssShmem at that start), against the predicted host memory per node;
     for results without those readings (older runs), the sum of the peak RSS of the node's workers
     (an upper bound: the workers' peaks need not coincide). Rank r runs on node
     r // (ranks per node), ranks per node = min(world size, gpus_per_node);
   - the median step time (rank 0's steps, the first left out when there are more than two) and
     the median forward + backward and optimizer phases
     (:class:`meshpilot.orchestrator.train.metrics.PhaseTimer`), beside the step time and the
     phase groups of the time model (compute + communication: forward, backward, recompute,
     tensor-parallel, data-parallel, ZeRO-3 gathers, all-to-all; optimizer: optimizer step, CPU
     Adam, offload copies);
   - the simulator's identity: the package version and a fingerprint (SHA-256 of the constants
     and of the cluster's calibration section).

2. :func:`calibrate`: a refit of the calibratable quantities from runs (``meshpilot calibrate``).
   Time: the unknowns are x = (1/R, 1/beta, 1/A, z) with R the achieved matrix rate
   (``calibration.matmul_tflops``), beta a common factor on the four intra-node bus bandwidths
   (``calibration.*_busbw_gbs``, each kept in its ratio to the others), A the CPU Adam rate
   of an offloading rank (``calibration.cpu_adam_rank_gparams_per_s``) and z ZeRO-3's host time per
   fetched tensor per pass (``calibration.zero3_fetch_ms``: the host CPU's part of a host-bound pass,
   informed by ZeRO-3 runs whose passes sit on that floor; at most :data:`ZERO3_FETCH_MS_MAX`). Each run gives one
   observation per measured quantity: its forward + backward time and its optimizer time when the
   phases were measured, its median step time otherwise; the simulator's prediction f_i(x) is
   affine in each of the unknowns wherever the step is GPU-bound and communication is not
   hidden behind compute (the max() of the host-bound and overlap terms is the only
   non-linearity). The fit minimises the relative squared error
   ``sum_i ((y_i - f_i(x)) / y_i)^2`` by Gauss-Newton: with the Jacobian J (finite differences of
   the simulator, exact for an affine f) and W = diag(1/y_i), each iteration solves the linear
   least squares ``min |W (J dx - (y - f(x)))|`` in closed form (``numpy.linalg.lstsq``); for an
   affine f the first iteration is the exact solution. A quantity that changes no prediction
   (no run depends on it: no offload run for A, one rank for beta) keeps its old value, and so
   does one that cannot be told apart from the others with these runs (the Jacobian's columns
   are dependent) or whose fit is not physical (not positive; a matmul rate above the card's
   datasheet; a bandwidth factor outside :data:`BUSBW_FACTOR_RANGE`), in which case the others are
   fitted again without it; the output says which.
   Memory: the fixed device memory per rank d (``calibration.device_fixed_gib``: CUDA context
   and whatever the mechanism model misses, the allocator's unmodelled reserve included) is the
   least-squares constant of the residuals r_i = measured peak_i - model_i (the model with d = 0;
   the measured peak is the largest rank's NVML peak, RSS on CPU workers): d = mean(r_i). The host
   memory of a training process h (``calibration.host_process_gib``, GPU runs only) solves
   min sum_i (r_i - n_i h)^2 with r_i = measured host per node - model with h = 0, n_i ranks per
   node: h = sum n_i r_i / sum n_i^2. A non-positive fit keeps the old value.
   ``meshpilot probe`` results (``--probe``) first replace the calibration fields they measured (the
   mean over several probes); the run fit starts from there.
   Matmul rate by shape class (``calibration.matmul_tflops_by_shape``): a run's class is
   :func:`meshpilot.orchestrator.config.schema.shape_class` of its per-shard hidden size (hidden / tp) and
   tokens per micro-batch (micro_batch x seq_len), each rounded down to a power of two (``h4096_t2048``:
   hidden per shard in [4096, 8192), tokens in [2048, 4096)). The fit is done twice: first as above with
   the single rate R (x shape factor) from every fit run, the per-class rates left out, so that R stays the
   rate of plans outside the calibrated classes; then, when the fit runs cover two classes or more (or a
   class that already has a rate, from a probe or an earlier calibration), with one unknown 1/R_c per
   class of the fit runs in place of 1/R, starting from the first fit. The bandwidth and CPU Adam factors
   are those of the second fit where it fits them (else of the first). A class whose runs are all
   host-bound or fp32 (no prediction depends on R_c), that the runs cannot tell apart from the other
   quantities, or that only held-out runs are in, gets no rate (or keeps its old one): its plans use R x
   shape factor, and the output says why per class. A probe measures its matmuls at one shape (the
   ``settings`` of its JSON: ``matmul_hidden``, ``matmul_tokens``, tp 1): its rate is also the rate of that
   class.
   Held-out runs (``holdout_every`` K: the K-th, 2K-th, ... run in the order of run ids, when there
   are at least :data:`MIN_RUNS_FOR_HOLDOUT` runs) are never used in a fit; their rows are reported
   apart.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from meshpilot.orchestrator.config.loader import job_to_dict, recorded_job
from meshpilot.orchestrator.config.schema import (Accelerator, CalibrationConfig, ClusterConfig, JobConfig,
                                                  parse_shape_class, shape_class)
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan
from meshpilot.orchestrator.sim.estimate import GIB, SimulatorConstants
from meshpilot.orchestrator.sim.simulator import evaluate
from meshpilot.orchestrator.sim.step_time import achieved_rate, cpu_adam_rate

MIN_RUNS_FOR_HOLDOUT = 4
"""A held-out split is made only with at least this many runs."""
MIN_RUNS = 1
"""Runs that must inform a quantity (its predictions depend on it) for it to be fitted."""
BUSBW_FIELDS = {"all_reduce": "allreduce_busbw_gbs", "all_gather": "allgather_busbw_gbs",
                "reduce_scatter": "reducescatter_busbw_gbs", "all_to_all": "alltoall_busbw_gbs"}
COMPUTE_COMM_KEYS = ("forward", "backward", "recompute", "tp_communication", "dp_reduction_exposed",
                     "zero3_gathers", "expert_alltoall")
OPTIMIZER_KEYS = ("optimizer_step", "cpu_optimizer", "offload_transfers")
TIME_PARAMS = ("matmul_tflops", "busbw", "cpu_adam_rank_gparams_per_s", "zero3_fetch_ms")
DIRECT = ("zero3_fetch_ms",)
"""Time quantities fitted as themselves (the prediction is affine in a host time); the others as inverses of rates."""
BY_SHAPE = "matmul_tflops_by_shape"
"""The calibration field of the per-class matmul rates; a class's quantity is named ``BY_SHAPE.<class>``."""
_SENSITIVITY = 1e-6      # relative change of a prediction below which a run does not inform a quantity


# --- the simulator's predictions for one run --------------------------------------------------

def constants_fingerprint(constants: SimulatorConstants, calibration: CalibrationConfig) -> str:
    """SHA-256 (16 hex digits) of the simulator's constants and a cluster's calibration section."""
    cal = {k: v for k, v in dataclasses.asdict(calibration).items() if not (k == BY_SHAPE and not v)}
    blob = json.dumps([dataclasses.asdict(constants), cal], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def simulator_identity(cluster: ClusterConfig, constants: SimulatorConstants | None = None) -> dict[str, str]:
    """The package version and a fingerprint of the constants and the cluster's calibration."""
    try:
        version = importlib.metadata.version("meshpilot")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version,
            "constants_fingerprint": constants_fingerprint(constants or SimulatorConstants(), cluster.calibration)}


def run_shape_class(job: JobConfig, plan: Plan) -> str:
    """The matmul shape class of a plan (per-shard hidden size, tokens per micro-batch), as the time model
    selects ``calibration.matmul_tflops_by_shape``."""
    return shape_class(job.model.hidden / plan.tp, plan.micro_batch * job.train.seq_len)


def ranks_per_node(job: JobConfig, plan: Plan) -> int:
    return max(1, min(plan.world_size, job.cluster.gpus_per_node))


def predict(job: JobConfig, plan: Plan, constants: SimulatorConstants | None = None) -> dict[str, Any]:
    """The predictions a run is compared with (GiB and seconds); see the module docstring."""
    arrays = PlanArrays.from_plans([plan], job.cluster.gpus_per_node)
    s = evaluate(job, arrays, constants)
    t = {k: float(v[0]) for k, v in s.time.items()}
    n = ranks_per_node(job, plan)
    host_node = float(s.cpu_node_gib[0])
    return dict(device_peak_gib=float(s.peak_gib[0]), allocated_gib=float(s.memory["allocated"][0]) / GIB,
                reserved_gib=float(s.memory["reserved"][0]) / GIB, host_node_gib=host_node,
                host_rank_gib=host_node / n, step_time_s=float(s.step_time_s[0]),
                phases_s={"forward_backward": sum(t[k] for k in COMPUTE_COMM_KEYS),
                          "optimizer": sum(t[k] for k in OPTIMIZER_KEYS)})


# --- what a run measured ----------------------------------------------------------------------

def median_step_time(step_times: Sequence[float]) -> Optional[float]:
    """Median of the step times, the first left out when there are more than two."""
    xs = [float(x) for x in step_times if x is not None]
    xs = xs[1:] if len(xs) > 2 else xs
    return float(statistics.median(xs)) if xs else None


def measured_from_results(job: JobConfig, plan: Plan, results: Sequence[Mapping[str, Any]],
                          step_times: Optional[Sequence[float]] = None) -> dict[str, Any]:
    """Peaks per rank and per node, the median step time and phases from the workers' results.

    ``step_times``: rank 0's step times when the results do not carry them (older runs: read from
    metrics.jsonl)."""
    on_cpu = job.cluster.accelerator == Accelerator.CPU
    n = ranks_per_node(job, plan)
    per_rank: dict[int, dict[str, Optional[float]]] = {}
    for i, r in enumerate(results):
        peaks = r.get("memory_peaks_gib") or {}
        per_rank[int(r.get("rank", i))] = {k: (None if peaks.get(k) is None else float(peaks[k]))
                                           for k in ("nvml", "allocated", "reserved", "host_rss")}
    nodes: dict[int, Optional[float]] = {}
    for rank, p in per_rank.items():
        node = rank // n
        if p["host_rss"] is None or (node in nodes and nodes[node] is None):
            nodes[node] = None
        else:
            nodes[node] = (nodes.get(node) or 0.0) + p["host_rss"]
    node_host = node_host_memory_gib(results, n)
    for i, r in enumerate(results):
        per_rank[int(r.get("rank", i))]["host"] = (r.get("host_memory_gib") or {}).get("host")
    host_source = "sum of the node's workers' peak RSS"
    if node_host and set(node_host) == set(nodes):
        nodes, host_source = node_host, NODE_HOST_SOURCE
    device_key = "host_rss" if on_cpu else "nvml"
    device = [p[device_key] for p in per_rank.values()]
    r0 = next((r for r in results if r.get("rank") == 0), results[0] if results else {})
    times = r0.get("step_times_s") or step_times or []
    return dict(per_rank=per_rank, host_node_gib=nodes,
                device_peak_gib=max(device) if device and None not in device else None,
                device_peak_source="host RSS of the worker (CPU workers)" if on_cpu else "NVML, sampled through the run",
                host_node_peak_gib=(max(nodes.values()) if nodes and None not in nodes.values() else None),
                host_node_source=host_source,
                step_time_s=median_step_time(times), steps_timed=len(times),
                phases_s=_phase_groups(r0.get("phases_s")))


NODE_HOST_SOURCE = ("the node's MemTotal - MemAvailable at its peak, minus its value when the workers "
                    "started, plus the workers' RssAnon + RssShmem then")


def node_host_memory_gib(results: Sequence[Mapping[str, Any]], ranks_on_node: int) -> dict[int, Optional[float]]:
    """Each node's measured host memory (GiB) from its ranks' ``host_memory_gib``
    (:func:`meshpilot.orchestrator.train.memory_peaks.host_memory_gib`), as Ray's memory monitor counts it:
    max over the node's ranks of MemTotal - MemAvailable at its peak, minus the smallest value at a
    rank's start (the node before this job's allocations), plus the sum of the ranks' RssAnon + RssShmem
    at their start (the processes' own memory by then, which the prediction's per-process term holds).
    Nodes whose ranks lack a reading are left out; {} for results without ``host_memory_gib``."""
    by_node: dict[int, list[Mapping[str, Any]]] = {}
    for i, r in enumerate(results):
        by_node.setdefault(int(r.get("rank", i)) // max(1, ranks_on_node), []).append(r.get("host_memory_gib") or {})
    out: dict[int, Optional[float]] = {}
    for node, hs in by_node.items():
        need = ("node_used_peak", "node_used_start", "host_start")
        if all(h.get(k) is not None for h in hs for k in need):
            out[node] = (max(float(h["node_used_peak"]) for h in hs) - min(float(h["node_used_start"]) for h in hs)
                         + sum(float(h["host_start"]) for h in hs))
    return out


def _phase_groups(phases: Optional[Mapping[str, float]]) -> Optional[dict[str, float]]:
    if not phases or any(phases.get(k) is None for k in ("forward", "backward", "optimizer")):
        return None
    return {"forward_backward": float(phases["forward"]) + float(phases["backward"]),
            "optimizer": float(phases["optimizer"])}


def _pair(measured: Optional[float], predicted: Optional[float]) -> dict[str, Optional[float]]:
    err = None if measured in (None, 0) or predicted is None else (predicted - measured) / measured
    return {"measured": measured, "predicted": predicted, "error": err}


def predicted_vs_measured(job: JobConfig, plan: Plan, results: Sequence[Mapping[str, Any]],
                          constants: SimulatorConstants | None = None,
                          step_times: Optional[Sequence[float]] = None) -> dict[str, Any]:
    """The ``predicted_vs_measured`` entry of summary.json (see the module docstring); ``error`` is
    (predicted - measured) / measured."""
    m = measured_from_results(job, plan, results, step_times)
    p = predict(job, plan, constants)
    on_cpu = job.cluster.accelerator == Accelerator.CPU
    per_rank = {}
    for rank, peaks in sorted(m["per_rank"].items()):
        row = {"host_rss": _pair(peaks["host_rss"], p["device_peak_gib"] if on_cpu else p["host_rank_gib"])}
        if not on_cpu and peaks.get("host") is not None:      # RssAnon + RssShmem (page cache left out)
            row["host"] = _pair(peaks["host"], p["host_rank_gib"])
        if not on_cpu:
            row.update(nvml=_pair(peaks["nvml"], p["device_peak_gib"]),
                       allocated=_pair(peaks["allocated"], p["allocated_gib"]),
                       reserved=_pair(peaks["reserved"], p["reserved_gib"]))
        per_rank[str(rank)] = row
    phases = m["phases_s"] or {}
    return dict(
        simulator=simulator_identity(job.cluster, constants), plan_config=plan.to_config(),
        accelerator=str(job.cluster.accelerator), ranks_per_node=ranks_per_node(job, plan),
        per_rank=per_rank,
        per_node={str(k): {"host_peak_gib": _pair(v, p["host_node_gib"]),
                           "source": m["host_node_source"]} for k, v in sorted(m["host_node_gib"].items())},
        step_time_s=dict(_pair(m["step_time_s"], p["step_time_s"]), steps=m["steps_timed"],
                         statistic="median of rank 0's steps, the first left out when there are more than two"),
        phases_s={k: _pair(phases.get(k), v) for k, v in p["phases_s"].items()})


# --- recorded runs ----------------------------------------------------------------------------

@dataclass
class RecordedRun:
    """One run directory as the fit reads it."""
    run_id: str
    run_dir: Path
    date: str
    job: JobConfig
    plan: Plan
    measured: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    step_times: Optional[list[float]] = None        # rank 0's, from metrics.jsonl when the results lack them

    def comparison(self) -> dict[str, Any]:
        """The run's ``predicted_vs_measured`` as recorded, or computed now for a summary without one."""
        recorded = self.summary.get("predicted_vs_measured")
        if recorded:
            return recorded
        out = predicted_vs_measured(self.job, self.plan, self.summary.get("results") or [], step_times=self.step_times)
        out["computed_by"] = "meshpilot status (the summary predates these rows)"
        return out

    @property
    def shape_class(self) -> str:
        return run_shape_class(self.job, self.plan)

    @property
    def shape(self) -> tuple[str, str, int, int]:
        c = self.job.cluster
        return (str(c.accelerator), c.gpu.name, int(c.nodes), int(c.gpus_per_node))


def load_run(run_dir: str | Path) -> RecordedRun:
    """Read RUN_DIR/summary.json and RUN_DIR/job.yaml (plain JSON and YAML, nothing unpickled).

    ConfigError (key ``RUN_DIR``) when the summary or the job is missing or unreadable, or the run
    did not succeed (its peaks and times are not those of a whole run)."""
    d = Path(run_dir)
    key = "RUN_DIR"
    if not d.is_dir():
        raise ConfigError(key, str(d), reason="is not a directory", fix="give the run directories `meshpilot run` wrote")
    try:
        summary = json.loads((d / "summary.json").read_text())
    except FileNotFoundError:
        raise ConfigError(key, str(d), reason="has no summary.json (the run has not finished, or is not a run "
                          "directory)", fix="wait for the run to end, or leave this directory out") from None
    except (OSError, ValueError) as e:
        raise ConfigError(key, str(d), reason=f"summary.json cannot be read: {e}") from None
    if not isinstance(summary, dict):
        raise ConfigError(key, str(d), reason="summary.json does not hold a mapping")
    if summary.get("status") != "succeeded":
        raise ConfigError(key, str(d), reason=f"the run did not succeed (status {summary.get('status')!r}): its "
                          "peaks and step times are not those of a whole run", fix="leave this directory out")
    import yaml                       # the job as plain YAML; the loader re-validates it
    try:
        raw = yaml.safe_load((d / "job.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(key, str(d), reason=f"job.yaml cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(key, str(d), reason="job.yaml does not hold a mapping")
    pvm = summary.get("predicted_vs_measured") or {}
    if pvm.get("plan_config"):                     # the plan that ran (plan: auto, fallbacks)
        raw["plan"] = dict(pvm["plan_config"])
    elif (raw.get("plan") or {}).get("auto"):
        from meshpilot.orchestrator.plan.text import parse
        raw["plan"] = {}
        job = recorded_job(raw, parse(str(summary.get("plan", ""))))
        return _recorded(d, summary, job)
    job = recorded_job(raw)
    return _recorded(d, summary, job)


def _recorded(d: Path, summary: dict[str, Any], job: JobConfig) -> RecordedRun:
    plan = resolve_plan(job)
    results = summary.get("results") or []
    step_times = None
    r0 = next((r for r in results if r.get("rank") == 0), results[0] if results else {})
    if not r0.get("step_times_s"):
        step_times = _metrics_step_times(d / "metrics.jsonl")
        if not step_times and summary.get("tokens_per_s"):
            step_times = [job.train.global_batch * job.train.seq_len / float(summary["tokens_per_s"])]
    measured = measured_from_results(job, plan, results, step_times)
    try:
        state = json.loads((d / "state.json").read_text())
        created = float(state.get("created") or 0.0)
    except (OSError, ValueError, AttributeError):
        created = 0.0
    when = created or (d / "summary.json").stat().st_mtime
    return RecordedRun(run_id=d.resolve().name, run_dir=d, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when)),
                       job=job, plan=plan, measured=measured, summary=summary, step_times=step_times)


def _metrics_step_times(path: Path) -> list[float]:
    out: list[float] = []
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(float(json.loads(line)["step_time_s"]))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return out


def check_shapes(runs: Sequence[RecordedRun]) -> None:
    """All runs on one cluster shape (accelerator, GPU, nodes, GPUs per node); ConfigError otherwise."""
    shapes = {r.shape for r in runs}
    if len(shapes) > 1:
        listing = "; ".join(f"{r.run_id}: {r.shape[0]} {r.shape[2]} x {r.shape[3]} {r.shape[1]}" for r in runs)
        raise ConfigError("RUN_DIR", " ".join(str(r.run_dir) for r in runs)[:300],
                          reason=f"runs from different cluster shapes ({listing})",
                          fix="calibrate each cluster shape separately (one command per shape)")


def read_probe(path: str | Path) -> dict[str, Any]:
    """The ``calibration`` mapping of a ``meshpilot probe --json`` file (plain JSON)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("--probe", str(path), reason=f"cannot be read as JSON: {e}",
                          fix="give the file `meshpilot probe --json FILE` wrote") from None
    cal = data.get("calibration") if isinstance(data, dict) else None
    if not isinstance(cal, dict):
        raise ConfigError("--probe", str(path), reason="has no 'calibration' mapping",
                          fix="give the file `meshpilot probe --json FILE` wrote")
    known = {f.name for f in dataclasses.fields(CalibrationConfig)}
    out = {k: v for k, v in cal.items() if k in known and v is not None and k != BY_SHAPE}
    by_shape: dict[str, float] = {}
    for key, rate in (cal.get(BY_SHAPE) or {}).items():
        try:
            parse_shape_class(key)
            rate = float(rate)
        except (TypeError, ValueError) as e:
            raise ConfigError("--probe", str(path), reason=f"calibration.{BY_SHAPE}: {e}") from None
        if not rate > 0:
            raise ConfigError("--probe", str(path), reason=f"calibration.{BY_SHAPE}.{key}={rate} is not positive")
        by_shape[key] = rate
    # the probe times its matmul mix at one shape (comm/probe.py: tp 1, settings.matmul_hidden and matmul_tokens)
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    hidden, tokens = settings.get("matmul_hidden"), settings.get("matmul_tokens")
    if out.get("matmul_tflops") and isinstance(hidden, (int, float)) and isinstance(tokens, (int, float)) \
            and hidden >= 1 and tokens >= 1:
        by_shape.setdefault(shape_class(hidden, tokens), float(out["matmul_tflops"]))
    if by_shape:
        out[BY_SHAPE] = by_shape
    return out


# --- the fit --------------------------------------------------------------------------------

@dataclass
class FittedQuantity:
    name: str                 # CalibrationConfig field(s)
    old: Optional[float]
    new: Optional[float]
    runs: int                 # runs that informed it
    fitted: bool
    note: str = ""
    run_ids: list[str] = field(default_factory=list)     # those runs (a shape class: the runs in it)


@dataclass
class RunRow:
    run_id: str
    held_out: bool
    measured: dict[str, Optional[float]]
    before: dict[str, Optional[float]]
    after: dict[str, Optional[float]]
    shape_class: str = ""                      # the run's matmul shape class (run_shape_class)


@dataclass
class CalibrationResult:
    cluster: ClusterConfig                     # the input cluster with the new calibration
    quantities: list[FittedQuantity]
    rows: list[RunRow]
    fit_runs: list[RecordedRun]
    held_out: list[RecordedRun]
    probes: list[str] = field(default_factory=list)


def copy_calibration(cal: CalibrationConfig, **changes: Any) -> CalibrationConfig:
    """A copy that shares no mapping with ``cal`` (``dataclasses.replace`` alone would share the by-shape dict)."""
    changes.setdefault(BY_SHAPE, dict(getattr(cal, BY_SHAPE)))
    return dataclasses.replace(cal, **changes)


def with_calibration(job: JobConfig, cal: CalibrationConfig) -> JobConfig:
    return dataclasses.replace(job, cluster=dataclasses.replace(job.cluster, calibration=cal))


def _effective(cal: CalibrationConfig, job: JobConfig, c: SimulatorConstants) -> dict[str, Any]:
    """The rates the simulator uses for ``job`` under ``cal`` (where ``cal`` leaves a field unset)."""
    cl = job.cluster
    bw = {op: float(getattr(cal, f) or cl.intra_node_bandwidth_gbs) for op, f in BUSBW_FIELDS.items()}
    return dict(matmul_tflops=float(cal.matmul_tflops or _datasheet_tflops(job) * c.matmul_efficiency), busbw=bw)


def _datasheet_tflops(job: JobConfig) -> float:
    """The card's 16-bit datasheet rate for the job's precision (TFLOP/s)."""
    gpu = job.cluster.gpu
    return float(gpu.bf16_tflops if str(job.train.precision) == "bf16" else gpu.fp16_tflops)


def _observations(run: RecordedRun, pred: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(name, measured, predicted) time observations of one run."""
    m = run.measured
    if m["phases_s"]:
        return [(k, float(m["phases_s"][k]), float(pred["phases_s"][k])) for k in ("forward_backward", "optimizer")
                if m["phases_s"][k] and m["phases_s"][k] > 0]
    if m["step_time_s"]:
        return [("step", float(m["step_time_s"]), float(pred["step_time_s"]))]
    return []


def calibrate(runs: Sequence[RecordedRun], cluster: ClusterConfig, *, probes: Sequence[Mapping[str, Any]] = (),
              probe_names: Sequence[str] = (), holdout_every: int = 4,
              constants: SimulatorConstants | None = None) -> CalibrationResult:
    """Refit ``cluster``'s calibration from ``runs`` (and probe calibrations); see the module docstring."""
    c = constants or SimulatorConstants()
    if not runs:
        raise ConfigError("RUN_DIR", reason="no run directories given", fix="meshpilot calibrate RUN_DIR [RUN_DIR ...]")
    check_shapes(runs)
    if str(cluster.accelerator) != runs[0].shape[0] or cluster.gpu.name != runs[0].shape[1]:
        raise ConfigError("--cluster", cluster.name, reason=f"is {cluster.accelerator} {cluster.gpu.name} but the runs "
                          f"ran on {runs[0].shape[0]} {runs[0].shape[1]}",
                          fix="give the cluster the runs ran on (default: the first run's)")
    ordered = sorted(runs, key=lambda r: r.run_id)
    k = int(holdout_every)
    held = [r for i, r in enumerate(ordered) if k > 0 and len(ordered) >= MIN_RUNS_FOR_HOLDOUT and (i + 1) % k == 0]
    fit = [r for r in ordered if r not in held]
    old = cluster.calibration
    cal = copy_calibration(old)
    quantities: list[FittedQuantity] = []
    # probe results replace the fields they measured (mean over probes; per shape class for the by-shape rates)
    if probes:
        keys = sorted({k for p in probes for k in p if k not in ("measured_on", BY_SHAPE)})
        for key in keys:
            vals = [float(p[key]) for p in probes if p.get(key) is not None]
            setattr(cal, key, float(np.mean(vals)))
            quantities.append(FittedQuantity(key, getattr(old, key), float(np.mean(vals)), 0, True,
                                             f"mean of {len(vals)} probe(s)"))
        for cls in sorted({cls for p in probes for cls in (p.get(BY_SHAPE) or {})}):
            vals = [float(p[BY_SHAPE][cls]) for p in probes if cls in (p.get(BY_SHAPE) or {})]
            cal.matmul_tflops_by_shape[cls] = float(np.mean(vals))
            quantities.append(FittedQuantity(f"{BY_SHAPE}.{cls}", old.matmul_tflops_by_shape.get(cls),
                                             float(np.mean(vals)), 0, True, f"mean of {len(vals)} probe(s)"))
    cal, time_q = _fit_times_by_shape(fit, held, cal, c)
    cal, mem_q = _fit_memory(fit, cal, c)
    quantities += time_q + mem_q
    cal.measured_on = (f"meshpilot calibrate, {len(fit)} run(s) ({', '.join(r.run_id for r in fit)[:200]}), "
                       f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    rows = [RunRow(r.run_id, r in held, _row_measured(r), _row_pred(r, old, c), _row_pred(r, cal, c),
                   shape_class=r.shape_class) for r in ordered]
    return CalibrationResult(cluster=dataclasses.replace(cluster, calibration=cal), quantities=quantities, rows=rows,
                             fit_runs=fit, held_out=held, probes=list(probe_names))


def _row_measured(r: RecordedRun) -> dict[str, Optional[float]]:
    m = r.measured
    return dict(step_time_s=m["step_time_s"], device_peak_gib=m["device_peak_gib"],
                host_node_gib=None if r.job.cluster.accelerator == Accelerator.CPU else m["host_node_peak_gib"])


def _row_pred(r: RecordedRun, cal: CalibrationConfig, c: SimulatorConstants) -> dict[str, Optional[float]]:
    p = predict(with_calibration(r.job, cal), r.plan, c)
    return dict(step_time_s=p["step_time_s"], device_peak_gib=p["device_peak_gib"], host_node_gib=p["host_node_gib"])


def _class_name(cls: str) -> str:
    return f"{BY_SHAPE}.{cls}"


def _class_of(name: str) -> Optional[str]:
    """The shape class of a per-class quantity name (``BY_SHAPE.<class>``), None for the other quantities."""
    return name[len(BY_SHAPE) + 1:] if name.startswith(BY_SHAPE + ".") else None


def _value(cal: CalibrationConfig, name: str) -> Optional[float]:
    """The calibration value a time quantity of the fit stands for."""
    cls = _class_of(name)
    if cls is not None:
        return cal.matmul_tflops_by_shape.get(cls)
    return {"matmul_tflops": cal.matmul_tflops, "busbw": cal.allreduce_busbw_gbs,
            "cpu_adam_rank_gparams_per_s": cal.cpu_adam_rank_gparams_per_s, "zero3_fetch_ms": cal.zero3_fetch_ms}[name]


def _fit_times_by_shape(fit: Sequence[RecordedRun], held: Sequence[RecordedRun], cal: CalibrationConfig,
                        c: SimulatorConstants) -> tuple[CalibrationConfig, list[FittedQuantity]]:
    """The single-rate fit, then the per-class fit where it applies, and a quantity per class saying what
    became of it (module docstring)."""
    classes: dict[str, list[str]] = {}
    for r in fit:
        classes.setdefault(r.shape_class, []).append(r.run_id)
    held_only: dict[str, list[str]] = {}
    for r in held:
        if r.shape_class not in classes:
            held_only.setdefault(r.shape_class, []).append(r.run_id)
    old_by_shape = dict(cal.matmul_tflops_by_shape)
    per_class = len(classes) > 1 or any(k in old_by_shape for k in classes)
    # first fit: the single rate x shape factor, from every fit run (no class rate in the way); ZeRO-3's host time
    # waits for the per-class fit where there is one (with one rate for all classes it would take up their
    # differences)
    single, q_single = _fit_times(fit, copy_calibration(cal, matmul_tflops_by_shape={}), c,
                                  skip=DIRECT if per_class else ())
    single.matmul_tflops_by_shape = dict(old_by_shape)
    out_q = list(q_single)
    out = single
    if fit and per_class:
        out, q_class = _fit_times(fit, single, c, classes=list(classes))
        by_name = {q.name: q for q in q_single}
        out_q = [by_name["matmul_tflops"]]
        if out_q[0].fitted:
            out_q[0].note = ("the single rate (x shape factor) of the plans outside the fitted shape classes, "
                             "fitted from every fit run")
        for q in q_class:
            cls = _class_of(q.name)
            if cls is not None:
                if not q.fitted:
                    q.note = (q.note.removesuffix("; kept") + f"; {_fallback(cls, old_by_shape)} (fit runs in it: "
                              f"{', '.join(classes[cls])})")
                out_q.append(q)
            elif q.name in DIRECT:             # ZeRO-3's host time: the per-class fit's word (the single fit skipped it)
                out_q.append(q)
            elif q.fitted:                     # the per-class fit's bandwidth and CPU Adam factors win
                q.old = by_name[q.name].old
                out_q.append(q)
            else:                              # else those of the single-rate fit (the per-class fit kept them)
                out_q.append(by_name[q.name])
    elif fit:
        (cls, ids), = classes.items()
        out_q.append(FittedQuantity(_class_name(cls), None, None, len(ids), False,
                                    "the fit runs are all in this one shape class: matmul_tflops is fitted from them "
                                    "and applies here with the shape factor (runs in two classes or more fit one "
                                    "rate per class)", run_ids=ids))
    for cls, ids in sorted(held_only.items()):
        out_q.append(FittedQuantity(_class_name(cls), old_by_shape.get(cls), old_by_shape.get(cls), 0, False,
                                    "only held-out runs are in this class (never used in a fit); "
                                    + _fallback(cls, old_by_shape), run_ids=ids))
    return out, out_q


def _fallback(cls: str, old_by_shape: Mapping[str, float]) -> str:
    if cls in old_by_shape:
        return f"keeps its old rate {old_by_shape[cls]:.4g} TFLOP/s"
    return "no class rate: its plans use matmul_tflops x shape factor"


def _apply(cal: CalibrationConfig, x: np.ndarray, active: Sequence[str], base_bw: dict[str, float]) -> CalibrationConfig:
    out = copy_calibration(cal)
    for name, val in zip(active, x):
        val = float(val)
        if name == "matmul_tflops":
            out.matmul_tflops = 1.0 / val
        elif name == "busbw":
            for op, f in BUSBW_FIELDS.items():
                setattr(out, f, base_bw[op] / val)
        elif _class_of(name) is not None:
            out.matmul_tflops_by_shape[_class_of(name)] = 1.0 / val
        elif name == "zero3_fetch_ms":
            out.zero3_fetch_ms = val
        else:
            out.cpu_adam_rank_gparams_per_s = 1.0 / val
    return out


def _class_rate(runs: Sequence[RecordedRun], cls: str, cal: CalibrationConfig, c: SimulatorConstants) -> float:
    """TFLOP/s the time model gives the first run of class ``cls`` under ``cal`` (a starting point)."""
    r = next(r for r in runs if r.shape_class == cls)
    job = with_calibration(r.job, cal)
    return float(achieved_rate(job, job.model.hidden / r.plan.tp, r.plan.micro_batch * job.train.seq_len, c)) / 1e12


def _fit_times(runs: Sequence[RecordedRun], cal: CalibrationConfig, c: SimulatorConstants,
               classes: Sequence[str] = (), skip: Sequence[str] = ()) -> tuple[CalibrationConfig, list[FittedQuantity]]:
    """Gauss-Newton on the relative time errors in x = (1/R, 1/beta, 1/A, z) (module docstring); with
    ``classes``, one 1/R_c per shape class in place of 1/R; ``skip``: quantities left out (not reported)."""
    q: list[FittedQuantity] = []
    rate_names = [_class_name(k) for k in classes] if classes else ["matmul_tflops"]
    names = rate_names + [n for n in TIME_PARAMS[1:] if n not in skip]
    if not runs:
        return cal, [FittedQuantity(_label(n), None, None, 0, False, "no runs in the fit set") for n in names]
    eff = _effective(cal, runs[0].job, c)
    base_bw = eff["busbw"]
    adam0 = cal.cpu_adam_rank_gparams_per_s or _model_adam_rate(runs, c)
    x0 = {"matmul_tflops": 1.0 / eff["matmul_tflops"], "busbw": 1.0, "cpu_adam_rank_gparams_per_s": 1.0 / adam0,
          "zero3_fetch_ms": cal.zero3_fetch_ms or c.zero3_fetch_s * 1e3}
    x0.update({_class_name(k): 1.0 / _class_rate(runs, k, cal, c) for k in classes})
    olds = {n: _value(cal, n) for n in names}

    def f(x: np.ndarray, active: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        cand = _apply(cal, x, active, base_bw)
        ys, fs, owner = [], [], []
        for i, r in enumerate(runs):
            for _, y, pred in _observations(r, predict(with_calibration(r.job, cand), r.plan, c)):
                ys.append(y)
                fs.append(pred)
                owner.append(i)
        return np.array(ys), np.array(fs), owner

    x = np.array([x0[n] for n in names])
    y, f0, owner = f(x, names)
    if not len(y):
        return cal, [FittedQuantity(_label(n), olds[n], olds[n], 0, False, "no run has a step time") for n in names]
    J = _jacobian(lambda xx: f(xx, names)[1], x, f0, _steps(names))
    rel = np.abs(J * x[None, :]) / y[:, None]                   # relative change of each prediction per unit change
    informed_by = {n: sorted({owner[i] for i in np.nonzero(rel[:, j] > _SENSITIVITY)[0]}) for j, n in enumerate(names)}
    informing = {n: len(v) for n, v in informed_by.items()}
    active = [n for n in names if informing[n] >= MIN_RUNS]
    notes = {n: f"no run depends on it ({_why_none(n)}); kept" for n in names if n not in active}
    # drop quantities that the runs cannot tell apart (dependent columns), the least informative first
    while active:
        idx = [names.index(n) for n in active]
        A = (J[:, idx] * x[idx][None, :]) / y[:, None]
        if np.linalg.matrix_rank(A, tol=1e-9 * max(1.0, float(np.abs(A).max()))) == len(active):
            break
        weakest = min(active, key=lambda n: float(np.linalg.norm(rel[:, names.index(n)])))
        active.remove(weakest)
        notes[weakest] = "cannot be told apart from " + ", ".join(_label(n) for n in active) + " with these runs " \
                         "(add runs that differ in its share of the step); kept"
    def gauss_newton(active: Sequence[str]) -> np.ndarray:
        xa = np.array([x0[n] for n in active])
        for _ in range(20):
            if not active:
                break
            ya, fa, _ = f(xa, active)
            Ja = _jacobian(lambda xx: f(xx, active)[1], xa, fa, _steps(active))
            w = 1.0 / ya
            dx = np.linalg.lstsq(Ja * w[:, None], (ya - fa) * w, rcond=None)[0]
            xa = xa + dx
            if np.all(np.abs(dx) <= 1e-13 * np.abs(xa)):
                break
        return xa

    # a quantity the fit drives out of its physical range (module docstring) is kept at its old value and
    # the others are fitted again without it: the runs attribute to it time that belongs elsewhere
    xa = gauss_newton(active)
    while active:
        bad = [(n, float(v)) for n, v in zip(active, xa) if not _plausible(n, float(v), runs[0].job)]
        if not bad:
            break
        # one at a time, the bandwidth first (the usual sink of misattributed time), then refit the rest
        n, v = next((b for b in bad if b[0] == "busbw"), bad[0])
        notes[n] = f"the fit gave a non-physical value ({_shown(n, v, base_bw)}); kept"
        active = [m for m in active if m != n]
        xa = gauss_newton(active)
    good = list(active)
    out = _apply(cal, np.array([xa[active.index(n)] for n in good]), good, base_bw)
    for n in names:
        new = _value(out, n)
        q.append(FittedQuantity(_label(n), olds[n], float(new) if n in good else olds[n], informing[n], n in good,
                                notes.get(n, ""), run_ids=[runs[i].run_id for i in informed_by[n]]))
    return out, q


BUSBW_FACTOR_RANGE = (0.1, 1.25)
"""The fitted common factor on the bus bandwidths must lie in this range of the cluster's own values
(the link's nominal rate, or its last calibration): above, collectives would outrun the link; far below,
the runs are blaming communication for time spent elsewhere (e.g. ZeRO-3's host-bound hooks)."""


ZERO3_FETCH_MS_MAX = 20.0
"""A fitted ZeRO-3 host time per fetched tensor above this (ms) is refused: 1.2 ms was measured on H200 hosts
(benchmarks/results/2026-11-30-s3-h200x2); more than 16x that is time the runs lose elsewhere."""


def _plausible(name: str, x: float, job: JobConfig) -> bool:
    """Whether the fitted ``1 / value`` ``x`` of ``name`` is physical: positive and finite; a matmul rate
    at most the card's datasheet rate; the bandwidth factor within :data:`BUSBW_FACTOR_RANGE`."""
    if not (x > 0 and np.isfinite(x)):
        return False
    if name == "matmul_tflops" or _class_of(name) is not None:
        return 1.0 / x <= _datasheet_tflops(job) * 1.0001
    if name == "busbw":
        return BUSBW_FACTOR_RANGE[0] <= 1.0 / x <= BUSBW_FACTOR_RANGE[1]
    if name == "zero3_fetch_ms":
        return x <= ZERO3_FETCH_MS_MAX
    return True


def _shown(name: str, x: float, base_bw: Mapping[str, float]) -> str:
    if name in DIRECT:
        return f"{x:.4g}"
    if not (x > 0 and np.isfinite(x)):
        return "inf" if x == 0 else f"{1.0 / x:.4g}"
    if name == "busbw":
        return f"bus bandwidth x {1.0 / x:.3g}, e.g. {base_bw['all_reduce'] / x:.4g} GB/s all-reduce"
    return f"{1.0 / x:.4g}"


def _label(name: str) -> str:
    return "*_busbw_gbs (all four, one factor)" if name == "busbw" else name


def _why_none(name: str) -> str:
    if _class_of(name) is not None:
        return "every run in this shape class is host-bound or fp32"
    return {"matmul_tflops": "every run is host-bound or fp32",
            "busbw": "no run communicates over intra-node links",
            "cpu_adam_rank_gparams_per_s": "no run offloads the optimizer",
            "zero3_fetch_ms": "no ZeRO-3 run is host-bound on its fetches"}[name]


def _model_adam_rate(runs: Sequence[RecordedRun], c: SimulatorConstants) -> float:
    """The time model's CPU Adam rate of one rank (G params/s, :func:`.step_time.cpu_adam_rate`), a starting
    point only."""
    cl = runs[0].job.cluster
    return float(cpu_adam_rate(cl, c, max(1, min(runs[0].plan.world_size, cl.gpus_per_node)))) / 1e9


def _steps(names: Sequence[str]) -> np.ndarray:
    """Relative difference steps: 25% for the inverse rates; 1% for ZeRO-3's host time, whose runs switch between
    host-bound and compute-bound passes at a max(): a run whose passes are compute-bound must not be counted as
    informing it because a large step crossed that boundary."""
    return np.array([0.01 if n in DIRECT else 0.25 for n in names])


def _jacobian(fn, x: np.ndarray, f0: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Forward differences with steps of ``steps`` (relative, :func:`_steps`) of each (positive) unknown: exact
    where fn is affine."""
    J = np.zeros((len(f0), len(x)))
    for j in range(len(x)):
        h = float(steps[j]) * x[j]
        xx = x.copy()
        xx[j] += h
        J[:, j] = (fn(xx) - f0) / h
    return J


def _fit_memory(runs: Sequence[RecordedRun], cal: CalibrationConfig,
                c: SimulatorConstants) -> tuple[CalibrationConfig, list[FittedQuantity]]:
    """The device and host fixed costs per rank (closed forms of the module docstring)."""
    mech = dataclasses.replace(cal, device_fixed_gib=0.0, host_process_gib=0.0)      # the model without them
    dev_res, host_res, host_n = [], [], []
    for r in runs:
        p = predict(with_calibration(r.job, mech), r.plan, c)
        m = r.measured
        if m["device_peak_gib"] is not None:
            dev_res.append(m["device_peak_gib"] - p["device_peak_gib"])
        if r.job.cluster.accelerator != Accelerator.CPU and m["host_node_peak_gib"] is not None:
            host_res.append(m["host_node_peak_gib"] - p["host_node_gib"])
            host_n.append(float(ranks_per_node(r.job, r.plan)))
    out = dataclasses.replace(cal)
    q = []
    for name, n_runs, value, none_why in (
            ("device_fixed_gib", len(dev_res), float(np.mean(dev_res)) if dev_res else None,
             "no run has a device peak (NVML, or RSS on CPU workers)"),
            ("host_process_gib", len(host_res),
             float(np.sum(np.array(host_n) * np.array(host_res)) / np.sum(np.square(host_n))) if host_res else None,
             "no GPU run with every worker's RSS (on CPU workers RSS is the device row)")):
        old = getattr(cal, name)
        if n_runs < MIN_RUNS or value is None:
            q.append(FittedQuantity(name, old, old, 0, False, none_why + "; kept"))
        elif value <= 0:
            q.append(FittedQuantity(name, old, old, n_runs, False, f"the fit gave {value:.4g} GiB (the rest of the "
                                    "model already over-predicts); kept"))
        else:
            setattr(out, name, value)
            q.append(FittedQuantity(name, old, value, n_runs, True))
    return out, q


# --- the written cluster ----------------------------------------------------------------------

def cluster_mapping(cluster: ClusterConfig) -> dict[str, Any]:
    """The cluster as plain data (a ``local`` cluster renamed, so that loading it does not detect again)."""
    job = JobConfig(cluster=cluster)
    data = job_to_dict(job)["cluster"]
    if data.get("name") == "local":
        data["name"] = "local-calibrated"
    return data


def cluster_yaml_text(result: CalibrationResult, command: str) -> str:
    """The calibrated cluster as YAML, with its provenance as comments."""
    import yaml
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# Cluster calibrated by `meshpilot calibrate` on {now}",
             f"# command: {command}",
             f"# simulator: {simulator_identity(result.cluster)['version']}",
             "# runs used in the fit (run id, date):"]
    lines += [f"#   {r.run_id}  {r.date}  plan {r.plan.describe()}" for r in result.fit_runs] or ["#   none"]
    if result.held_out:
        lines.append("# runs held out (never used in the fit):")
        lines += [f"#   {r.run_id}  {r.date}" for r in result.held_out]
    for p in result.probes:
        lines.append(f"# probe: {p}")
    lines.append("# calibration:")
    for qq in result.quantities:
        state = "fitted" if qq.fitted else "kept"
        ids = f": {', '.join(qq.run_ids)}"[:300] if _class_of(qq.name) is not None and qq.run_ids else ""
        lines.append(f"#   {qq.name}: {state} {qq.old} -> {qq.new} ({qq.runs} run(s){ids})"
                     f"{'; ' + qq.note if qq.note else ''}")
    by_shape = result.cluster.calibration.matmul_tflops_by_shape
    if by_shape or any(_class_of(qq.name) is not None for qq in result.quantities):
        lines.append(f"# {BY_SHAPE}: TFLOP/s per shape class h<H>_t<T> (hidden / tp in [H, 2H), micro_batch x seq_len "
                     "in [T, 2T)); plans in no listed class use matmul_tflops x shape factor. Runs per class:")
        counts: dict[str, list[str]] = {}
        for r in result.fit_runs:
            counts.setdefault(r.shape_class, []).append(r.run_id)
        for cls in sorted(set(by_shape) | set(counts)):
            rate = f"{by_shape[cls]:.6g} TFLOP/s" if cls in by_shape else "no class rate"
            fitted = next((qq for qq in result.quantities
                           if qq.name == _class_name(cls) and qq.fitted and qq.runs), None)
            source = (f"fitted from {', '.join(fitted.run_ids)}" if fitted is not None
                      else "not from these runs (probe or earlier calibration)" if cls in by_shape else "")
            fit_ids = (f"; fit runs in the class: {', '.join(counts[cls])}"
                       if cls in counts and (fitted is None or fitted.run_ids != counts[cls]) else "")
            lines.append(f"#   {cls}: {rate}{'; ' + source if source else ''}{fit_ids}"[:400])
    body = yaml.safe_dump(cluster_mapping(result.cluster), sort_keys=False)
    return "\n".join(lines) + "\n" + body
