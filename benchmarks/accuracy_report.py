"""Predicted vs measured: the simulator's accuracy on the GPU measurements, and a fit of its constants.

Reads measurement JSON(s) written by measure_deepspeed.py / measure_zo.py / train_bench.py, runs
``meshpilot.orchestrator.sim.simulator.simulate`` on exactly the measured jobs, and prints per config:
measured NVML peak vs predicted peak (error %), measured vs predicted median step time
(error %), and measured OOM vs predicted fits. Summary: peak-memory MAPE, step-time MAPE and
the count of configurations predicted to fit that ran out of memory (the target is 0).

Calibrate / holdout: the successful configs are split alternately in file order (every other
one calibrates). Constants of :class:`SimulatorConstants` are fitted on the calibration half
by coordinate descent over a multiplicative grid (memory constants minimise the peak-memory
MAPE, with a large penalty for every "predicted fits but OOMed"; time constants minimise the
step-time MAPE) and the error is reported on the holdout half, before and after the fit.
``--split stratified`` alternates within (kind, status, ZeRO-3, accumulation, offload) groups
instead, so that each regime with two or more configs has one in the calibration half;
``--fit-metrics time`` fits only the time constants (the memory ones stay as given); single
fields may be named too (``--fit-metrics time,cuda_context_gib,fragmentation``). The
fitted constants are written to YAML (``constants:`` mapping of field -> value) that
:func:`load_constants` reads back (``simulate(job, constants=load_constants(path))``).

    python benchmarks/accuracy_report.py results/deepspeed_measurements.json results/zo_measurements.json \\
        --fit-out benchmarks/results/fitted_constants.yaml [--cluster-profile profile.yaml] [--json report.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Constants fitted, and to which metric each belongs (fields of SimulatorConstants).
MEMORY_CONSTANTS = ("cuda_context_gib", "nccl_base_gib", "fragmentation", "model_load_fragmentation", "working_set_factor",
                    "logits_saved_bytes", "logits_backward_bytes", "logits_forward_only_bytes")
TIME_CONSTANTS = ("matmul_efficiency", "layer_overhead_s", "grad_hook_s", "step_overhead_s", "step_tensor_s",
                  "hbm_efficiency", "zero3_fetch_s", "zero3_module_hook_s", "zero3_step_tensor_s", "cpu_adam_gparams_per_core", "cpu_adam_node_gparams_per_s",
                  "pcie_efficiency", "overlap_comm_fraction")
GRID = (0.5, 0.7, 0.85, 0.95, 1.05, 1.2, 1.45, 2.0)
OOM_PENALTY = 100.0          # percentage points per "predicted fits but OOMed" in the memory objective


# --- measurements ------------------------------------------------------------------------------

@dataclass
class Case:
    """One measured config with the job the simulator predicts."""
    name: str
    kind: str
    status: str                       # ok | oom | ...
    peak_gib: float | None            # measured NVML peak (max over the config's GPUs, training window)
    reserved_gib: float | None
    allocated_gib: float | None
    step_s: float | None
    job: Any
    plan: Any
    source: str

    @property
    def oom(self) -> bool:
        return self.status == "oom"

    @property
    def has_peak(self) -> bool:
        return self.status == "ok" and bool(self.peak_gib)

    @property
    def has_step(self) -> bool:
        return self.status == "ok" and bool(self.step_s)

    @property
    def usable(self) -> bool:
        return self.has_peak or self.has_step


def _max(xs: Any) -> float | None:
    vals = [x for x in (xs or []) if isinstance(x, (int, float))]
    return max(vals) if vals else None


def load_cases(paths: Sequence[str], cluster_profile: str | None = None) -> tuple[list[Case], list[dict[str, Any]]]:
    from meshpilot.orchestrator.config.loader import job_from_dict
    from meshpilot.orchestrator.plan.plan import resolve_plan
    cases, meta = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta.append({k: v for k, v in data.items() if k not in ("results", "rows")})
        if data.get("benchmark") == "train_bench":
            cases.extend(train_bench_cases(data, str(path), cluster_profile))
            continue
        for r in data.get("results", []):
            if r.get("status") not in ("ok", "oom"):
                print(f"note: {r.get('name')}: status {r.get('status')} is not scored ({str(r.get('error'))[:120]})",
                      file=sys.stderr)
                continue
            overrides = list(r.get("overrides") or [])
            if cluster_profile:
                overrides.append(f"cluster={cluster_profile}")
            elif "H200" in str(data.get("card", "")):
                # the device tool may lend H200s (141 GB) in place of H100s: predict for the card measured
                overrides.append("cluster=h200-sxm-4")
            if not cluster_profile and data.get("host_cpus"):
                # and for the host measured: CPU Adam scales with its cores (the 2-GPU machine has 32, not 64)
                overrides.append(f"cluster.cpu_cores={int(data['host_cpus'])}")
            raw = dict(r["job"])
            if r.get("kind", "deepspeed") == "deepspeed":
                # predict the configuration that was measured: measure_deepspeed ran DeepSpeed's defaults
                stage = int((raw.get("plan") or {}).get("zero_stage") or 0)
                raw["train"] = dict(raw.get("train") or {}, deepspeed_extra=deepspeed_defaults(stage))
                # ... on Hugging Face's LlamaForCausalLM (transformers' model class, loaded per parameter)
                overrides.append("model.implementation=hf")
            job = job_from_dict(raw, overrides)
            peak = _max(r.get("nvml_peak_gib")) or _max(r.get("nvml_peak_all_gib"))
            cases.append(Case(name=r["name"], kind=r.get("kind", "deepspeed"), status=r["status"], peak_gib=peak,
                              reserved_gib=_max(r.get("max_reserved_gib")), allocated_gib=_max(r.get("max_allocated_gib")),
                              step_s=r.get("step_time_s"), job=job, plan=resolve_plan(job), source=str(path)))
    return cases, meta


def deepspeed_defaults(stage: int) -> dict[str, Any]:
    """DeepSpeed 0.19's own ZeRO defaults (deepspeed/runtime/zero/config.py), which
    benchmarks/measure_deepspeed.py left in place, as a ``train.deepspeed_extra`` over meshpilot's config.
    overlap_comm defaults to true at stage 3 and false below."""
    if stage == 0:
        return {}
    z: dict[str, Any] = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "overlap_comm": stage == 3}
    if stage == 3:
        z.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5,
                 stage3_max_live_parameters=1e9)
    return {"zero_optimization": z}


def train_bench_cases(data: dict[str, Any], source: str, cluster_profile: str | None = None) -> list[Case]:
    """Cases from a train_bench.py JSON (the built-in model through meshpilot's worker): one per
    config, its step time the median of the meshpilot launches' medians, its peak the largest
    NVML reading over ranks and launches (taken after the last step; torch's caching allocator
    keeps the peak reserved, so this is the NVML peak plus what the process freed to the driver)."""
    from meshpilot.orchestrator.config.loader import job_from_dict
    from meshpilot.orchestrator.plan.plan import resolve_plan
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in data.get("rows", []):
        if r.get("mode") == "meshpilot" and r.get("step_time_s"):
            by_config.setdefault(r["config"], []).append(r)
    cluster = cluster_profile or ("h200-sxm-4" if "H200" in str(data.get("card", "")) else "h100-sxm-4")
    out = []
    for name, rows in by_config.items():
        r = rows[0]
        world = int(r["world"])
        plan = {"dp": world, "tp": 1, "micro_batch": int(r["global_batch"]) // world, **r["plan"]}
        train = {"seq_len": int(r["seq_len"]), "global_batch": int(r["global_batch"]), "precision": "bf16",
                 "steps": 10, "data": "synthetic", "expandable_segments": bool(r.get("expandable_segments", False))}
        job = job_from_dict({"model": r["model"], "cluster": cluster, "train": train, "plan": plan},
                            [f"cluster.gpus_per_node={world}"])
        nvml = [m.get("nvml_used") for x in rows for m in (x.get("memory") or []) if m and m.get("nvml_used")]
        out.append(Case(name=f"{name}_dp{world}", kind="train_bench", status="ok",
                        peak_gib=max(nvml) / 2**30 if nvml else None,
                        reserved_gib=_max([m.get("torch_reserved_peak", 0) / 2**30 for x in rows for m in x["memory"] if m]),
                        allocated_gib=_max([m.get("torch_allocated_peak", 0) / 2**30 for x in rows for m in x["memory"] if m]),
                        step_s=statistics.median(x["step_time_s"] for x in rows), job=job, plan=resolve_plan(job),
                        source=source))
    return out


# --- prediction and errors ------------------------------------------------------------------------

Predictor = Callable[[Any, Any, Any], Any]     # (job, plan, constants) -> Estimate-like (.fits .peak_memory_gib .step_time_s)


def default_predictor() -> Predictor:
    from meshpilot.orchestrator.sim.simulator import simulate
    return lambda job, plan, constants: simulate(job, plan, constants=constants)


@dataclass
class Row:
    case: Case
    fits: bool
    peak_gib: float
    step_s: float

    @property
    def mem_err(self) -> float | None:
        c = self.case
        return None if not c.has_peak else 100.0 * (self.peak_gib - c.peak_gib) / c.peak_gib

    @property
    def time_err(self) -> float | None:
        c = self.case
        return None if not c.has_step else 100.0 * (self.step_s - c.step_s) / c.step_s

    @property
    def missed_oom(self) -> bool:
        """Predicted to fit, ran out of memory: the error users pay for."""
        return self.case.oom and self.fits


def predict(cases: Sequence[Case], constants: Any, predictor: Predictor) -> list[Row]:
    out = []
    for c in cases:
        e = predictor(c.job, c.plan, constants)
        out.append(Row(case=c, fits=bool(e.fits), peak_gib=float(e.peak_memory_gib), step_s=float(e.step_time_s)))
    return out


@dataclass
class Summary:
    n: int
    mem_mape: float | None
    time_mape: float | None
    missed_oom: int
    false_oom: int                   # predicted not to fit, ran

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(rows: Sequence[Row]) -> Summary:
    me = [abs(r.mem_err) for r in rows if r.mem_err is not None]
    te = [abs(r.time_err) for r in rows if r.time_err is not None]
    return Summary(n=len(rows), mem_mape=statistics.fmean(me) if me else None,
                   time_mape=statistics.fmean(te) if te else None,
                   missed_oom=sum(r.missed_oom for r in rows),
                   false_oom=sum((not r.fits) and r.case.status == "ok" for r in rows))


# --- fitting --------------------------------------------------------------------------------

def _regime(c: Case, stratified: bool) -> tuple:
    if not stratified:
        return (c.kind, c.status)
    p = c.plan
    return (c.kind, c.status, p.zero_stage == 3, p.grad_accum > 1, p.offload_optimizer != "none")


def split(cases: Sequence[Case], stratified: bool = False) -> tuple[list[Case], list[Case]]:
    """Alternate in file order within each (kind, status) group: every other config calibrates.

    A config measured more than once (e.g. on the 4-GPU and the 2-GPU machine) goes whole to one
    half, so a holdout config is never the repeat of a calibration one.
    ``stratified``: the groups are (kind, status, ZeRO-3, gradient accumulation, optimizer offload), so that
    every regime the time model treats differently has a calibration config when it has two or more."""
    cal, hold = [], []
    for key in dict.fromkeys(_regime(c, stratified) for c in cases):
        names = list(dict.fromkeys(c.name for c in cases if _regime(c, stratified) == key))
        to_cal = set(names[0::2])
        for c in cases:
            if _regime(c, stratified) == key:
                (cal if c.name in to_cal else hold).append(c)
    order = {id(c): i for i, c in enumerate(cases)}
    return sorted(cal, key=lambda c: order[id(c)]), sorted(hold, key=lambda c: order[id(c)])


def _objective(rows: Sequence[Row], metric: str) -> float:
    s = summarize(rows)
    if metric == "memory":
        return (s.mem_mape or 0.0) + OOM_PENALTY * s.missed_oom
    return s.time_mape or 0.0


def fit_constants(cases: Sequence[Case], base: Any, predictor: Predictor, *, sweeps: int = 2,
                  fields: dict[str, Sequence[str]] | None = None, log: Callable[[str], None] = lambda s: None) -> Any:
    """Coordinate descent of ``base``'s fields over a multiplicative grid, per metric.

    For each metric (memory, time) and each of its fields in turn, try field * g for g in
    GRID (g ** (1/k) in sweep k, a finer grid) and keep the value with the lowest objective on
    ``cases``; repeat ``sweeps`` times or until a sweep improves nothing.
    Fields whose value is 0 are tried at a small absolute grid instead. Pure: returns a new
    constants object.
    """
    fields = fields or {"memory": MEMORY_CONSTANTS, "time": TIME_CONSTANTS}
    c = base
    names = {f.name for f in dataclasses.fields(base)}
    for metric, keys in fields.items():
        keys = [k for k in keys if k in names]
        best = _objective(predict(cases, c, predictor), metric)
        for sweep in range(sweeps):
            improved = False
            step = 1.0 / (sweep + 1)               # later sweeps refine: factors g ** (1 / sweep)
            for k in keys:
                v0 = getattr(c, k)
                cands = [v0 * g ** step for g in GRID] if v0 else [0.1, 0.3, 0.5, 0.7, 0.9]
                for v in cands:
                    if k in ("fragmentation", "overlap_comm_fraction", "matmul_efficiency", "hbm_efficiency",
                             "pcie_efficiency") and not 0.0 <= v <= 1.0:
                        continue
                    trial = c.replace(**{k: type(v0)(v) if isinstance(v0, int) else v})
                    obj = _objective(predict(cases, trial, predictor), metric)
                    if obj < best - 1e-9:
                        best, c, improved = obj, trial, True
                log(f"  {metric} sweep {sweep + 1}: {k} = {getattr(c, k):.6g} (objective {best:.3f})")
            if not improved and sweep > 0:
                break
    return c


def fit_fields(spec: Sequence[str]) -> dict[str, list[str]]:
    """{metric: fields} from names: "memory" / "time" (every constant of that metric) or single fields of
    MEMORY_CONSTANTS / TIME_CONSTANTS (e.g. ``("time", "cuda_context_gib", "fragmentation")``)."""
    out: dict[str, list[str]] = {"memory": [], "time": []}
    for name in spec:
        if name in ("memory", "time"):
            out[name] += [k for k in (MEMORY_CONSTANTS if name == "memory" else TIME_CONSTANTS) if k not in out[name]]
        elif name in MEMORY_CONSTANTS:
            out["memory"].append(name)
        elif name in TIME_CONSTANTS:
            out["time"].append(name)
        else:
            raise ValueError(f"{name!r} is neither memory, time nor a fitted constant "
                             f"({', '.join(MEMORY_CONSTANTS + TIME_CONSTANTS)})")
    return {k: v for k, v in out.items() if v}


def save_constants(path: str | Path, constants: Any, info: dict[str, Any]) -> None:
    body = {"constants": {f.name: getattr(constants, f.name) for f in dataclasses.fields(constants)}, "fit": info}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("# SimulatorConstants fitted by benchmarks/accuracy_report.py; load with\n"
                          "# benchmarks.accuracy_report.load_constants(path) (or SimulatorConstants(**data['constants']))\n"
                          + yaml.safe_dump(body, sort_keys=False))


def load_constants(path: str | Path):
    """A SimulatorConstants from a file written by :func:`save_constants` (unknown fields are rejected)."""
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    data = yaml.safe_load(Path(path).read_text())
    vals = data.get("constants", data)
    known = {f.name for f in dataclasses.fields(SimulatorConstants)}
    vals = dict(vals)
    # files written before the DeepSpeed settings were read from the config builder: the bucket sizes and
    # overlap came from constants then; the overlap fraction kept its value under a new name
    if "overlap_comm_stage3" in vals and "overlap_comm_fraction" in known:
        vals.setdefault("overlap_comm_fraction", vals.pop("overlap_comm_stage3"))
    for old in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_max_live_parameters", "stage0_allreduce_bucket", "overlap_comm_stage012"):
        if old not in known and vals.pop(old, None) is not None:
            print(f"note: {path}: {old} now comes from the DeepSpeed config, not the constants", file=sys.stderr)
    bad = sorted(set(vals) - known)
    if bad:
        raise ValueError(f"{path}: unknown SimulatorConstants fields {bad}")
    return SimulatorConstants(**vals)


# --- printing ----------------------------------------------------------------------------------

def _f(v: float | None, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        width = "".join(ch for ch in fmt.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(v, fmt)


def table(rows: Sequence[Row], title: str, holdout: set[str] | None = None) -> str:
    lines = [title,
             f"{'config':32s} {'set':4s} {'measured':8s} {'pred':5s} {'NVML GiB':>9s} {'pred GiB':>9s} {'err%':>7s} "
             f"{'step s':>8s} {'pred s':>8s} {'err%':>7s}"]
    for r in rows:
        c = r.case
        st = "oom" if c.oom else "ran"
        s = "" if holdout is None else ("hold" if c.name in holdout else "cal")
        flag = "  <-- predicted fits, OOMed" if r.missed_oom else ("  (predicted OOM, ran)" if (not r.fits and not c.oom) else "")
        lines.append(f"{c.name:32s} {s:4s} {st:8s} {'fits' if r.fits else 'OOM':5s} {_f(c.peak_gib, '9.2f')} "
                     f"{r.peak_gib:9.2f} {_f(r.mem_err, '+7.1f')} {_f(c.step_s, '8.3f')} {r.step_s:8.3f} "
                     f"{_f(r.time_err, '+7.1f')}{flag}")
    return "\n".join(lines)


def summary_line(label: str, s: Summary) -> str:
    return (f"{label:28s} n={s.n:3d}  peak-memory MAPE {_f(s.mem_mape, '5.1f')}%  step-time MAPE "
            f"{_f(s.time_mape, '5.1f')}%  predicted-fits-but-OOMed {s.missed_oom}  predicted-OOM-but-ran {s.false_oom}")


def run_report(cases: Sequence[Case], predictor: Predictor, base: Any, *, fit: bool = True, sweeps: int = 2,
               out: Callable[[str], None] = print, stratified: bool = False,
               metrics: Sequence[str] = ("memory", "time")) -> dict[str, Any]:
    cal, hold = split(cases, stratified)
    hold_names = {c.name for c in hold}
    before = predict(cases, base, predictor)
    out(table(before, "predicted (default constants) vs measured", hold_names))
    res: dict[str, Any] = dict(default=dict(all=summarize(before).to_dict(),
                                            calibrate=summarize([r for r in before if r.case.name not in hold_names]).to_dict(),
                                            holdout=summarize([r for r in before if r.case.name in hold_names]).to_dict()))
    out("")
    out(summary_line("default, all", summarize(before)))
    res["rows_default"] = [_row_dict(r) for r in before]
    if not fit or not [c for c in cal if c.usable]:
        return res
    out(f"\nfitting constants on {len(cal)} calibration configs ({sum(c.usable for c in cal)} with measurements)")
    fitted = fit_constants(cal, base, predictor, sweeps=sweeps, log=out, fields=fit_fields(metrics))
    after = predict(cases, fitted, predictor)
    out("")
    out(table(after, "predicted (fitted constants) vs measured", hold_names))
    out("")
    for label, rows_b, rows_a in (("calibrate", [r for r in before if r.case.name not in hold_names],
                                   [r for r in after if r.case.name not in hold_names]),
                                  ("holdout", [r for r in before if r.case.name in hold_names],
                                   [r for r in after if r.case.name in hold_names])):
        out(summary_line(f"{label}, default constants", summarize(rows_b)))
        out(summary_line(f"{label}, fitted constants", summarize(rows_a)))
    res["fitted"] = dict(calibrate=summarize([r for r in after if r.case.name not in hold_names]).to_dict(),
                         holdout=summarize([r for r in after if r.case.name in hold_names]).to_dict(),
                         all=summarize(after).to_dict())
    res["rows_fitted"] = [_row_dict(r) for r in after]
    res["calibrate"] = sorted(c.name for c in cal)
    res["holdout"] = sorted(hold_names)
    res["constants"] = {f.name: getattr(fitted, f.name) for f in dataclasses.fields(fitted)}
    res["changed"] = {f.name: [getattr(base, f.name), getattr(fitted, f.name)] for f in dataclasses.fields(fitted)
                      if getattr(base, f.name) != getattr(fitted, f.name)}
    res["_fitted_obj"] = fitted
    return res


def _row_dict(r: Row) -> dict[str, Any]:
    c = r.case
    return dict(name=c.name, kind=c.kind, status=c.status, measured_peak_gib=c.peak_gib, predicted_peak_gib=r.peak_gib,
                mem_err_pct=r.mem_err, measured_step_s=c.step_s, predicted_step_s=r.step_s, time_err_pct=r.time_err,
                predicted_fits=r.fits, missed_oom=r.missed_oom, measured_reserved_gib=c.reserved_gib,
                measured_allocated_gib=c.allocated_gib)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("measurements", nargs="+", help="JSON files from measure_deepspeed.py / measure_zo.py / train_bench.py")
    p.add_argument("--cluster-profile", default=None, help="cluster YAML (e.g. from `meshpilot probe`) for every job")
    p.add_argument("--constants", default=None, help="start from these constants (YAML from --fit-out)")
    p.add_argument("--fit-out", default=None, help="write the fitted constants to this YAML")
    p.add_argument("--no-fit", action="store_true", help="only the predicted vs measured table")
    p.add_argument("--sweeps", type=int, default=2, help="coordinate-descent sweeps per metric")
    p.add_argument("--json", default=None, help="write the report (rows and summaries) as JSON")
    p.add_argument("--fit-metrics", default="all",
                   help="which constants to fit, comma-separated: all (default), memory, time, or single fields "
                        "(e.g. time,cuda_context_gib,fragmentation)")
    p.add_argument("--split", choices=("alternate", "stratified"), default="alternate",
                   help="calibration/holdout split: every other config per (kind, status), or per regime "
                        "(kind, status, ZeRO-3, accumulation, offload)")
    args = p.parse_args(argv)

    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    base = load_constants(args.constants) if args.constants else SimulatorConstants()
    cases, meta = load_cases(args.measurements, args.cluster_profile)
    if not cases:
        print("no scorable results (status ok or oom) in the given files", file=sys.stderr)
        return 1
    for m in meta:
        print(f"measured on {m.get('card')} x{m.get('gpus')}, {m.get('date')}: {m.get('benchmark')} "
              f"(torch {m.get('versions', {}).get('torch')}, deepspeed {m.get('versions', {}).get('deepspeed')}, "
              f"transformers {m.get('versions', {}).get('transformers')})")
    res = run_report(cases, default_predictor(), base, fit=not args.no_fit, sweeps=args.sweeps,
                     stratified=args.split == "stratified",
                     metrics=("memory", "time") if args.fit_metrics == "all" else tuple(args.fit_metrics.split(",")))
    fitted = res.pop("_fitted_obj", None)
    if fitted is not None and args.fit_out:
        save_constants(args.fit_out, fitted, dict(measurements=[str(x) for x in args.measurements],
                                                 measured_on=[f"{m.get('card')} {m.get('date')}" for m in meta],
                                                 split=args.split, fitted_metrics=args.fit_metrics, calibrate=res["calibrate"], holdout=res["holdout"],
                                                 holdout_fitted=res["fitted"]["holdout"],
                                                 holdout_default=res["default"]["holdout"]))
        print(f"\nwrote fitted constants to {args.fit_out}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, **res), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
