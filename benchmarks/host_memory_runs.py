"""Host memory at its edge: `meshpilot run` of plans whose host memory the simulator puts near or over the node.

Issue #15 item 2 and #16 item 3: a plan fits only if its host memory per node stays below what Ray's
memory monitor allows (``cluster.memory_usage_threshold`` x ``cluster.cpu_memory_gib``), and a worker killed
for host memory must end the run classified as ``host_oom``. Each case is one `meshpilot run` (``--force``
where the simulator says it does not fit, so that it gets its chance to fail) in its own process group,
with a wall-time limit; the whole set is bounded by ``--budget-s`` (cases that no longer fit in it are
skipped and listed). Random weights (no checkpoint: nothing file-backed inflates the readings).

Per case: the prediction (GPU peak, host per node, the usable host memory, fits), the outcome (exit
status, run status, the failure kind the controller recorded), the measured GPU peak (NVML) and host peaks
from summary.json (each rank's RssAnon + RssShmem and ru_maxrss, the node's host memory as
``predicted_vs_measured`` combines it), and the node's MemTotal - MemAvailable sampled by this script from
outside the run (its peak minus its value before the run: this also covers runs that were killed, whose
workers report nothing).

    python benchmarks/host_memory_runs.py --out $R/host                    # 2 x H200, 256 GiB host, 32 cores
    python benchmarks/host_memory_runs.py --out /tmp/h --dry-run           # predictions and commands only
    python benchmarks/host_memory_runs.py --out $R/host --cases z3both_13b z2off_7b_mb2   # a second call

The cases run in the order listed (most informative first); with the default budget the last ones may
not fit in one 600 s call: run them in a second call with ``--cases``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import kill_process_group, metadata, precompile_ops, write_json  # noqa: E402

GIB = 2**30
JOB = "benchmarks/configs/h200x2_check.yaml"
# the 2 x H200 device machine (256 GiB host, 32 cores); gpus_per_node=1 cases use one of its GPUs. The host
# memory is the machine's MemTotal when the cases run (what Ray's memory monitor takes as the total), 256 GiB
# in a dry run
CLUSTER = ["cluster.cpu_cores=32"]
DRY_RUN_HOST_GIB = 256.0
BASE = ["train.steps=3", "train.seq_len=2048", "train.checkpoint_final=false", "train.checkpoint_every=0",
        "train.eval_every=0"]


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    timeout_s: float            # this case's wall-time limit (13B models build in about 35 s)
    note: str                   # what the case tests (documentation only, never used to score)


# the overrides the cases share: two GPUs of one node at global batch 16, full checkpointing, ZeRO-3 + optimizer
# offload of llama-2-13b at micro-batch 1, ZeRO-3 sub-groups of 5e8 elements
DP2 = ("cluster.gpus_per_node=2", "train.global_batch=16", "plan.dp=2")
AC = ("plan.activation_checkpointing=full",)
Z3OPT = ("plan.zero_stage=3", "plan.offload_optimizer=cpu")
Z3OPT_13B = ("model=llama-2-13b", *DP2, *Z3OPT, "plan.micro_batch=1", *AC)
SG5E8 = ("train.deepspeed_extra={zero_optimization: {sub_group_size: 500000000}}",)
L39 = ("model.layers=39", "model.name=llama-13b-39l")

CASES = (
    Case("z2off_13b_mb4", ("model=llama-2-13b", *DP2, "plan.zero_stage=2", "plan.offload_optimizer=cpu",
                           "plan.micro_batch=4", *AC), 150,
         "issue #15's run: ZeRO-2 + optimizer offload, 2 accumulation steps; Ray's memory monitor killed it"),
    Case("zo2_opt13b", ("model=opt-13b", "cluster.gpus_per_node=1", "train.optimizer=zo-sgd", "train.global_batch=1",
                        "plan.dp=1", "plan.zo.mode=zo2", "plan.micro_batch=1"), 240,
         "ZO2 on one GPU (issue #15: host predicted about 40% low)"),
    Case("z3opt_13b", Z3OPT_13B, 150,
         "ZeRO-3 + optimizer offload: host memory predicted just under the usable limit"),
    Case("z2off_7b_mb2", ("model=llama-2-7b", *DP2, "plan.zero_stage=2", "plan.offload_optimizer=cpu",
                          "plan.micro_batch=2", *AC), 200,
         "ZeRO-2 + optimizer offload that fits: the host prediction against a whole run"),
    Case("z3both_13b", ("model=llama-2-13b", *DP2, *Z3OPT, "plan.offload_params=cpu", "plan.micro_batch=1", *AC), 150,
         "ZeRO-3 + optimizer and parameter offload: predicted over the host"),
    # 2026-11-30 session 7 (predicted before it runs, results/2026-11-30-s7-cpu/preregistered): z3opt_13b ran out of
    # host memory at 237.6 GiB on the node; with sub-groups of 5e8 elements its transient fp32 gradient buffer halves
    # and the host model puts it 3 GiB under the 239.2 GiB Ray allows on the 251.8 GiB machine, with margin
    Case("z3opt_13b_sg5e8", (*Z3OPT_13B, *SG5E8), 200,
         "ZeRO-3 + optimizer offload at the host's edge, on the side predicted to fit (236.1 of 239.2 GiB)"),
    # 2026-11-30 session 8: z3opt_13b_sg5e8 ran its first step and ran out of host memory in the second, as z3opt_13b
    # had. The 7B ZeRO-3 + optimizer-offload runs' peak RSS rose 1.20 GiB per rank from the first step to the second.
    # Mechanism under test (benchmarks/host_copy_probe.py): DeepSpeedCPUAdam creates its moments in the first step,
    # and each sub-group's fp32 -> GPU bf16 copy converts on the host (w x sub-group bytes), so the first step's peak
    # holds the last sub-group's temporary and the second the largest one's: +2 x (1e9 - 0.369e9) bytes = 1.17 GiB
    # per rank at sub-groups of 1e9 (llama-2-7b, 3.369e9 elements per rank), +2 x (5e8 - 3.69e8) = 0.24 GiB at 5e8
    Case("z3offopt_7b_sg1e9", ("model=llama-2-7b", *DP2, *Z3OPT, "plan.micro_batch=8", *AC), 130,
         "ZeRO-3 + optimizer offload, sub-groups of 1e9: the second step's host peak over the first's"),
    Case("z3offopt_7b_sg5e8", ("model=llama-2-7b", *DP2, *Z3OPT, "plan.micro_batch=8", *AC, *SG5E8), 130,
         "the same with sub-groups of 5e8"),
    # 2026-11-30 session 8, after the host model counts the step's conversion copy, pinned memory's bookkeeping and
    # what the node holds beside the workers (predicted before they run: results/2026-11-30-s8-h200x2/preregistered):
    # llama-2-13b cut to 39 layers, on either side of the fits-with-margin line
    Case("z3opt_13b39l_sg5e8", (*Z3OPT_13B, *L39, *SG5E8), 190,
         "ZeRO-3 + optimizer offload 2.8 GiB under the usable host memory: fits with margin"),
    Case("z3opt_13b39l", (*Z3OPT_13B, *L39), 190,
         "the same with sub-groups of 1e9, 0.9 GiB under the usable host memory: risky"),
)


# --- the prediction (in this process: no GPU touched) ---------------------------------------------

def predict(overrides: list[str]) -> dict:
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.simulator import simulate
    job = load_job(JOB, overrides)
    e = simulate(job)
    return dict(plan=e.plan, fits=e.fits, peak_gpu_gib=round(e.peak_memory_gib, 2),
                host_node_gib=round(e.cpu_memory_gib_per_node, 2), host_usable_gib=round(e.cpu_memory_available_gib, 2),
                host_offload_gib=round(e.memory_breakdown_gib["cpu_offload"], 2), reasons=e.reasons,
                memory_usage_threshold=job.cluster.memory_usage_threshold)


# --- the node's memory, sampled from outside the run ---------------------------------------------

def node_sampler():
    """The peak of the node's used memory over a run (as Ray's memory monitor counts it: MemTotal - MemAvailable, or
    a binding memory cgroup's usage), every 50 ms: the sampler and the reading a training rank uses
    (:mod:`meshpilot.orchestrator.train.memory_peaks`)."""
    from meshpilot.orchestrator.config.node_limits import memory_limit
    from meshpilot.orchestrator.train.memory_peaks import PeakSampler
    limit = memory_limit()
    return PeakSampler(limit.used_bytes if limit else (lambda: None), interval_s=0.05,
                       name="node-used-sampler").start()


def node_rise(sampler) -> dict:
    """Stop ``sampler``; its value at the start, its peak and the rise between them (GiB)."""
    peak = sampler.stop()
    start = sampler.first.get(sampler.PRIMARY)
    gib = (lambda b: None if b is None else b / GIB)
    return dict(node_used_before_gib=gib(start), node_used_peak_gib=gib(peak),
                node_used_rise_gib=None if peak is None or start is None else (peak - start) / GIB)


def host_total_gib() -> float:
    """This node's MemTotal (GiB), 0 where /proc/meminfo cannot be read."""
    from meshpilot.orchestrator.train.memory_peaks import node_memory_bytes
    m = node_memory_bytes()
    return 0.0 if m is None else m[0] / GIB


# --- one case --------------------------------------------------------------------------------------

def run_case(overrides: list[str], force: bool, run_dir: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "meshpilot.orchestrator.cli", "run", JOB, *overrides,
           "--run-dir", str(run_dir), "--no-progress", "--max-restarts", "0", *(["--force"] if force else [])]
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    node = node_sampler()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_process_group(p)                               # the run's whole process group (its Ray too)
        rc = 124
    wall = time.perf_counter() - t0
    log.close()
    return dict(rc=rc, wall_s=round(wall, 1), command=" ".join(cmd), **node_rise(node))


def measured(run_dir: Path) -> dict:
    """What summary.json and events.jsonl say about the run (None where the run left nothing)."""
    s_path, e_path = run_dir / "summary.json", run_dir / "events.jsonl"
    s = json.loads(s_path.read_text()) if s_path.exists() else {}
    events = [json.loads(x) for x in e_path.read_text().splitlines() if x.strip()] if e_path.exists() else []
    oom = [e for e in events if e.get("event") == "oom" or '"oom"' in json.dumps(e)[:40]]
    failures = s.get("failures") or []
    kind = (oom[0].get("failure") if oom else None) or (failures[0].split(":")[0] if failures else None)
    results = s.get("results") or []
    peaks = s.get("memory_peaks_gib") or {}
    top = (lambda k: max((v.get(k) or 0 for v in peaks.values()), default=0) or None)   # largest over ranks
    pvm = s.get("predicted_vs_measured") or {}
    nodes = {k: v.get("host_peak_gib") for k, v in (pvm.get("per_node") or {}).items()}
    step = pvm.get("step_time_s") or {}
    return dict(status=s.get("status"), out_of_memory=s.get("out_of_memory"), failure_kind=kind,
                failures=failures[:2], oom_events=oom[:2],
                nvml_peak_gib=top("nvml"), allocated_gib=top("allocated"), reserved_gib=top("reserved"),
                host_rss_gib={r: v.get("host_rss") for r, v in peaks.items()},
                host_anon_shmem_gib={r.get("rank", i): (r.get("host_memory_gib") or {}).get("host")
                                     for i, r in enumerate(results)},
                host_memory_gib={r.get("rank", i): r.get("host_memory_gib") for i, r in enumerate(results)},
                host_node=nodes, host_node_source={k: v.get("source") for k, v in (pvm.get("per_node") or {}).items()},
                step_time_s=step.get("measured"), step_time_predicted_s=step.get("predicted"),
                memory_vs_prediction=pvm.get("memory_gib"),
                # rank 0's per-step forward / backward / optimizer medians (the workers' PhaseTimer)
                phases_s=next((r.get("phases_s") for r in results if r.get("rank") == 0), None))


def run_within_budget(overrides: list[str], force: bool, run_dir: Path, timeout_s: float, left_s: float,
                      dry_run: bool) -> dict | None:
    """One case of a set bounded by a wall-time budget: None when less than min(timeout_s, 60 s) of the budget
    is left (skip it), ``{"outcome": "dry run"}`` in a dry run, else :func:`run_case`'s fields, ``measured``
    and ``outcome``."""
    if dry_run:
        return {"outcome": "dry run"}
    if left_s < min(timeout_s, 60.0):
        return None
    row = run_case(overrides, force, run_dir, min(timeout_s, left_s))
    row["measured"] = measured(run_dir)
    row["outcome"] = outcome(row["rc"], row["measured"]["failure_kind"])
    return row


def outcome(rc: int, failure_kind: str | None = None) -> str:
    """A run's end in words from `meshpilot run`'s exit status (4: out of memory, 124: this script's time limit)."""
    if rc == 4:
        return f"out of memory ({failure_kind})" if failure_kind else "out of memory"
    return "ran" if rc == 0 else "timed out" if rc == 124 else f"exit {rc}"


def fmt(x, spec="{:.1f}") -> str:
    return "-" if x is None else spec.format(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", nargs="*", default=None, help=f"names among {', '.join(c.name for c in CASES)}")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-time budget of the whole set (default 540)")
    ap.add_argument("--settle-s", type=float, default=5.0, help="pause between cases (the last run's memory returns)")
    ap.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides for every case")
    ap.add_argument("--dry-run", action="store_true", help="predictions and commands only; nothing is run")
    ap.add_argument("--host-gib", type=float, default=None,
                    help=f"cluster.cpu_memory_gib (default: this machine's MemTotal; {DRY_RUN_HOST_GIB:g} in a dry run)")
    ap.add_argument("--no-precompile", action="store_true", help="do not build DeepSpeed's cpu_adam op first")
    a = ap.parse_args()
    cases = [c for c in CASES if a.cases is None or c.name in a.cases]
    unknown = set(a.cases or []) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; choose among {[c.name for c in CASES]}")
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    host_gib = a.host_gib or (DRY_RUN_HOST_GIB if a.dry_run else round(host_total_gib(), 1))
    if not host_gib:
        ap.error("cannot read MemTotal from /proc/meminfo: give --host-gib")
    built = None
    if not a.dry_run and not a.no_precompile:
        # DeepSpeed compiles cpu_adam on first use: build it once here, not inside the first case's time limit
        built = precompile_ops(dict(os.environ), 240.0, a.out, ["cpu_adam"])
        print(f"cpu_adam: {built}", flush=True)
    rows, skipped = [], []
    for c in cases:
        overrides = [*CLUSTER, f"cluster.cpu_memory_gib={host_gib}", *BASE, *c.overrides, *a.set]
        pred = predict(overrides)
        row = dict(case=c.name, note=c.note, overrides=overrides, predicted=pred, forced=not pred["fits"])
        run_dir = a.out / c.name
        ran = run_within_budget(overrides, not pred["fits"], run_dir, c.timeout_s,
                                a.budget_s - (time.monotonic() - t_start), a.dry_run)
        if ran is None:
            skipped.append(c.name)
            continue
        row.update(ran)
        if a.dry_run:
            row["command"] = " ".join([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", JOB, *overrides,
                                       "--run-dir", str(run_dir), "--no-progress", "--max-restarts", "0",
                                       *(["--force"] if not pred["fits"] else [])])
        else:
            time.sleep(a.settle_s)
        rows.append(row)
        m = row.get("measured") or {}
        host_node = next(iter((m.get("host_node") or {}).values()), None) or {}
        print(f"{c.name:14s} {row['outcome']:24s} predicted GPU {pred['peak_gpu_gib']:.1f} GiB, host "
              f"{pred['host_node_gib']:.1f} of {pred['host_usable_gib']:.1f} GiB/node ({'fits' if pred['fits'] else 'forced'}); "
              f"measured GPU {fmt(m.get('nvml_peak_gib'))}, host/node {fmt(host_node.get('measured'))}, "
              f"node rise {fmt(row.get('node_used_rise_gib'))} GiB", flush=True)
    print(f"\n{'case':14s} {'outcome':24s} {'GPU pred':>8s} {'GPU meas':>8s} {'host pred':>9s} {'usable':>7s} "
          f"{'host meas':>9s} {'node rise':>9s}")
    for r in rows:
        m = r.get("measured") or {}
        host_node = next(iter((m.get("host_node") or {}).values()), None) or {}
        print(f"{r['case']:14s} {r['outcome']:24s} {r['predicted']['peak_gpu_gib']:8.1f} {fmt(m.get('nvml_peak_gib')):>8s} "
              f"{r['predicted']['host_node_gib']:9.1f} {r['predicted']['host_usable_gib']:7.1f} "
              f"{fmt(host_node.get('measured')):>9s} {fmt(r.get('node_used_rise_gib')):>9s}")
    if skipped:
        print(f"skipped (over the {a.budget_s:.0f} s budget): {', '.join(skipped)}")
    write_json(a.out / "host_memory_runs.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                     dry_run=a.dry_run, budget_s=a.budget_s, host_gib=host_gib,
                                                     precompiled=built, rows=rows, skipped=skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
