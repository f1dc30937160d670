"""The planner's overlap_comm choice, measured: one plan with ``plan.comm_overlap`` false and true.

Issue #16 item 5: the DeepSpeed knobs meshpilot generates are part of the plan, and the simulator
predicts what each choice costs and gains. For one fixed plan (default: llama-2-7b, dp=2, ZeRO-2,
micro-batch 1 x 8, no checkpointing, where the simulator predicts the largest gain of overlap) this
writes the DeepSpeed config of each choice with meshpilot's own builder, runs both through the same
loop (``benchmarks/autotune_train.py``: random weights, ``--warmup`` untimed and ``--steps`` timed
steps), alternating order over ``--repeats``, and reports beside each the simulator's step time and
peak, and which choice ``plan: auto`` (restricted to this plan) makes. Ratios are against the lean
run of the same call.

    python3 benchmarks/overlap_choice.py --out $R/overlap                 # 2 x H200, ~3 min
    python3 benchmarks/overlap_choice.py --out /tmp/o --dry-run           # predictions and configs only
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autotuner_vs_plan import GPU_SETS, final_run, launcher, run_env  # noqa: E402
from harness import metadata, precompile_ops, write_json  # noqa: E402

JOB = "benchmarks/configs/h200x2_check.yaml"
PLAN = ["plan.dp=2", "plan.tp=1", "plan.zero_stage=2", "plan.micro_batch=1", "plan.activation_checkpointing=none",
        "plan.offload_optimizer=none", "plan.offload_params=none"]


def predictions(sets: list[str]) -> dict[str, Any]:
    """The simulator's step time and peak for each choice, the DeepSpeed config of each, and the choice
    ``plan: auto`` makes when restricted to this plan."""
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.sim.planner import search
    from meshpilot.orchestrator.sim.simulator import simulate
    from meshpilot.strategies.deepspeed_config import deepspeed_config
    out: dict[str, Any] = {}
    for name, flag in (("lean", "false"), ("overlap", "true")):
        job = load_job(JOB, [*sets, *PLAN, f"plan.comm_overlap={flag}"])
        e = simulate(job)
        out[name] = dict(step_time_s=e.step_time_s, peak_gib=e.peak_memory_gib, fits=e.fits,
                         deepspeed_config=deepspeed_config(job, resolve_plan(job), on_cpu=False))
    auto = load_job(JOB, [*sets, "plan=auto", *PLAN])
    best = search(auto).best
    out["planner_choice"] = None if best is None else ("overlap" if best.comm_overlap else "lean")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", nargs="*", default=None, help="job overrides (default: llama-2-7b on 2 x H200)")
    ap.add_argument("--repeats", type=int, default=1, help="lean/overlap pairs, alternating order")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--run-timeout-s", type=float, default=90.0)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    sets = list(a.set) if a.set is not None else list(GPU_SETS)
    a.out.mkdir(parents=True, exist_ok=True)
    pred = predictions(sets)
    for name in ("lean", "overlap"):
        p = pred[name]
        print(f"predicted {name:8s} step {p['step_time_s']:.3f} s, peak {p['peak_gib']:.1f} GiB, fits {p['fits']}")
    print(f"plan: auto restricted to this plan chooses: {pred['planner_choice']}", flush=True)
    if a.dry_run:
        return 0
    launch, extra = launcher(a.out)
    env = run_env(extra, cpu=False, world=2)
    data: dict[str, Any] = dict(benchmark="overlap_choice", **metadata(), command=" ".join([sys.executable, *sys.argv]),
                                job=dict(file=JOB, overrides=[*sets, *PLAN]), predicted=pred, runs=[])
    data["op_build"] = precompile_ops(env, 300, a.out, ["fused_adam"])
    order = [("lean", "overlap") if i % 2 == 0 else ("overlap", "lean") for i in range(a.repeats)]
    for i, pair in enumerate(order):
        for name in pair:
            row = final_run(f"{name}{i}", pred[name]["deepspeed_config"], launch=launch, env=env, world=2, job=JOB,
                            sets=[*sets, *PLAN], warmup=a.warmup, steps=a.steps, timeout_s=a.run_timeout_s,
                            work=a.out, gpus=True)
            row["choice"] = name
            data["runs"].append(row)
            print(f"{name}{i}: {row['status']} tokens/s {row.get('tokens_per_s')} median {row.get('median_step_s')} s "
                  f"NVML {(row.get('nvml') or {}).get('nvml_peak_all_gib')}", flush=True)
            write_json(a.out / "overlap_choice.json", data)
    summary = {}
    for name in ("lean", "overlap"):
        ok = [r for r in data["runs"] if r["choice"] == name and r.get("status") == "ok"]
        peaks = [max((r.get("nvml") or {}).get("nvml_peak_all_gib") or [0.0]) for r in ok]
        summary[name] = dict(median_step_s=statistics.median(r["median_step_s"] for r in ok) if ok else None,
                             nvml_peak_gib=max(peaks) if peaks else None,
                             predicted_step_s=pred[name]["step_time_s"], predicted_peak_gib=pred[name]["peak_gib"])
    lean, ov = summary["lean"]["median_step_s"], summary["overlap"]["median_step_s"]
    data["summary"] = summary
    data["speedup_overlap_over_lean"] = {"measured": lean / ov if lean and ov else None,
                                         "predicted": pred["lean"]["step_time_s"] / pred["overlap"]["step_time_s"]}
    write_json(a.out / "overlap_choice.json", data)
    print(f"\n{'choice':8s} {'step s':>7s} {'pred s':>7s} {'NVML GiB':>9s} {'pred GiB':>9s}")
    for name, s in summary.items():
        f = (lambda v, fmt: "-" if v is None else format(v, fmt))
        print(f"{name:8s} {f(s['median_step_s'], '7.3f')} {f(s['predicted_step_s'], '7.3f')} "
              f"{f(s['nvml_peak_gib'], '9.1f')} {f(s['predicted_peak_gib'], '9.1f')}")
    print(f"overlap / lean speed-up: measured {data['speedup_overlap_over_lean']['measured']}, "
          f"predicted {data['speedup_overlap_over_lean']['predicted']:.3f}; planner chose {pred['planner_choice']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
