"""The caching allocator's reserve, measured through `meshpilot run`, in both of its modes.

Issue #15 item 1: on the built-in model without activation checkpointing the NVML peak sat 17-28% above
the prediction, the allocated peak within 8% of it: the rest was PyTorch's caching allocator keeping
13-20 GiB reserved above the live tensors (benchmarks/results/2026-11-30-h200x2). The worker puts the
allocator in the mode ``train.expandable_segments`` names (default false, torch's own); this set measures
what expandable segments do to the reserve, the peak and the step time, against torch's default mode in
the same call, and gives the simulator's allocator model held-out rows in the default mode.

Cases are `meshpilot run`s (built-in model, random weights, a few steps; ``--force`` where the simulator
says a plan does not fit). ``part`` says which half a case belongs to: ``calibration`` (models up to
2.7B, where a fraction may be fitted; none was: the expandable-segments reserve followed no rule) or
``held-out`` (7B and 13B: at least twice the size, never fitted on). Per case: predicted and measured NVML peak, torch's allocated and reserved peaks (the
reserve is their difference), and the median step time beside its prediction.

    python benchmarks/allocator_runs.py --out $R/alloc --budget-s 540
    python benchmarks/allocator_runs.py --out /tmp/a --dry-run                 # predictions and commands only
    python benchmarks/allocator_runs.py --out $R/alloc2 --cases z1_7b_mb4_exp tp2_7b_exp
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402
from host_memory_runs import CLUSTER, fmt, host_total_gib, predict, run_within_budget  # noqa: E402

BASE = ["train.steps=4", "train.seq_len=2048", "train.checkpoint_final=false", "train.checkpoint_every=0",
        "train.eval_every=0", "cluster.gpus_per_node=2", "train.global_batch=16"]
EXP, STD = "train.expandable_segments=true", "train.expandable_segments=false"
Z2_7B = ("model=llama-2-7b", "plan.dp=2", "plan.zero_stage=2", "plan.micro_batch=1",
         "plan.activation_checkpointing=none")
# plans measured in both modes (each once with EXP, once with STD)
Z1_7B_MB4 = ("model=llama-2-7b", "plan.dp=2", "plan.zero_stage=1", "plan.micro_batch=4",
             "plan.activation_checkpointing=none", "plan.comm_overlap=true")
TP2_7B = ("model=llama-2-7b", "plan.dp=1", "plan.tp=2", "plan.zero_stage=0", "plan.micro_batch=4",
          "plan.activation_checkpointing=none")
EP2_MOE = ("model=mixtral-8x7b", "model.layers=4", "plan.dp=2", "plan.ep=2", "plan.zero_stage=1",
           "plan.micro_batch=4", "plan.activation_checkpointing=none")
Z1_OPT27B = ("model=opt-2.7b", "plan.dp=2", "plan.zero_stage=1", "plan.micro_batch=4",
             "plan.activation_checkpointing=none", "plan.comm_overlap=true")

@dataclass(frozen=True)
class Case:
    name: str
    part: str                    # calibration | held-out
    overrides: tuple[str, ...]
    timeout_s: float


CASES = (
    # the A/B pairs: the same plan in both modes, one after the other
    Case("z2_7b_lean_std", "held-out", (*Z2_7B, "plan.comm_overlap=false", STD), 110),
    Case("z2_7b_lean_exp", "held-out", (*Z2_7B, "plan.comm_overlap=false", EXP), 110),
    Case("z2_7b_overlap_std", "held-out", (*Z2_7B, "plan.comm_overlap=true", STD), 110),
    Case("z2_7b_overlap_exp", "held-out", (*Z2_7B, "plan.comm_overlap=true", EXP), 110),
    # calibration: small models, no checkpointing (the activations' mix of sizes is what fragments)
    Case("z2_1b_mb8_exp", "calibration", ("model=llama-1b", "plan.dp=2", "plan.zero_stage=2", "plan.micro_batch=8",
                                         "plan.activation_checkpointing=none", EXP), 80),
    Case("z1_opt27b_mb4_exp", "calibration", (*Z1_OPT27B, EXP), 90),
    # held out, further regimes
    Case("z1_7b_mb4_exp", "held-out", (*Z1_7B_MB4, EXP), 110),
    Case("tp2_7b_exp", "held-out", (*TP2_7B, EXP), 110),
    Case("ep2_moe_exp", "held-out", (*EP2_MOE, EXP), 110),
    Case("z3_13b_exp", "held-out", ("model=llama-2-13b", "plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=1",
                                    "plan.activation_checkpointing=full", EXP), 150),
    # the same regimes in torch's default mode, after the allocator phases were added to the simulator
    Case("z1_7b_mb4_std", "held-out", (*Z1_7B_MB4, STD), 110),
    Case("tp2_7b_std", "held-out", (*TP2_7B, STD), 110),
    Case("ep2_moe_std", "held-out", (*EP2_MOE, STD), 110),
    Case("z2_7b_mb8_std", "held-out", ("model=llama-2-7b", "plan.dp=2", "plan.zero_stage=2", "plan.micro_batch=8",
                                       "plan.activation_checkpointing=none", STD), 110),
    Case("z1_opt27b_mb4_std", "held-out", (*Z1_OPT27B, STD), 90),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", nargs="*", default=None, help=f"names among {', '.join(c.name for c in CASES)}")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-time budget of the whole set (default 540)")
    ap.add_argument("--settle-s", type=float, default=3.0, help="pause between cases")
    ap.add_argument("--dry-run", action="store_true", help="predictions and commands only; nothing is run")
    a = ap.parse_args()
    unknown = set(a.cases or []) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; choose among {[c.name for c in CASES]}")
    cases = [c for c in CASES if a.cases is None or c.name in a.cases]
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    host_gib = 256.0 if a.dry_run else round(host_total_gib(), 1) or 256.0
    rows, skipped = [], []
    for c in cases:
        overrides = [*CLUSTER, f"cluster.cpu_memory_gib={host_gib}", *BASE, *c.overrides]
        pred = predict(overrides)
        row = dict(case=c.name, part=c.part, overrides=overrides, predicted=pred, forced=not pred["fits"])
        ran = run_within_budget(overrides, not pred["fits"], a.out / c.name, c.timeout_s,
                                a.budget_s - (time.monotonic() - t_start), a.dry_run)
        if ran is None:
            skipped.append(c.name)
            continue
        row.update(ran)
        if not a.dry_run:
            time.sleep(a.settle_s)
        rows.append(row)
        m = row.get("measured") or {}
        print(f"{c.name:20s} {row['outcome']:14s} predicted {pred['peak_gpu_gib']:.1f} GiB "
              f"({'fits' if pred['fits'] else 'forced'}); NVML {fmt(m.get('nvml_peak_gib'))}, allocated "
              f"{fmt(m.get('allocated_gib'))}, reserved {fmt(m.get('reserved_gib'))} GiB; step "
              f"{fmt(m.get('step_time_s'), '{:.3f}')} s (predicted {fmt(m.get('step_time_predicted_s'), '{:.3f}')})",
              flush=True)
    print(f"\n{'case':20s} {'part':11s} {'outcome':14s} {'pred':>6s} {'NVML':>6s} {'err %':>6s} {'alloc':>6s} "
          f"{'resv':>6s} {'reserve':>7s} {'step':>6s} {'pred':>6s}")
    for r in rows:
        m = r.get("measured") or {}
        p, n = r["predicted"]["peak_gpu_gib"], m.get("nvml_peak_gib")
        err = None if not n else 100.0 * (p - n) / n
        res = None if not (m.get("reserved_gib") and m.get("allocated_gib")) else m["reserved_gib"] - m["allocated_gib"]
        print(f"{r['case']:20s} {r['part']:11s} {r['outcome']:14s} {p:6.1f} {fmt(n):>6s} {fmt(err, '{:+.1f}'):>6s} "
              f"{fmt(m.get('allocated_gib')):>6s} {fmt(m.get('reserved_gib')):>6s} {fmt(res):>7s} "
              f"{fmt(m.get('step_time_s'), '{:.3f}'):>6s} {fmt(m.get('step_time_predicted_s'), '{:.3f}'):>6s}")
    if skipped:
        print(f"skipped (over the {a.budget_s:.0f} s budget): {', '.join(skipped)}")
    write_json(a.out / "allocator_runs.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                   dry_run=a.dry_run, budget_s=a.budget_s, host_gib=host_gib,
                                                   rows=rows, skipped=skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
