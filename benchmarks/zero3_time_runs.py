"""ZeRO-3 step time by pass: a fit set of small models and a held-out set twice their size, through `meshpilot run`.

Issue #15 item 3. The simulator adds ZeRO-3's per-tensor fetch/release host time to the compute of a micro-batch;
the 13B runs of 2026-11-29/30 say the pass takes max(compute, fetch floor) instead (micro-batch 1 x 8 predicted
17-21% short, 8 x 1 and 4 x 2 17-27% long). The cost per fetched tensor is a fitted quantity, so the set is split
by size before anything is run:

* fit: llama-1b (16 layers, 1.1B, 114 fetched tensors), its layers stacked 32 deep (2.1B, 226 tensors: 7B's
  count at a third of its bytes) and llama-2-7b's layers 8 deep (1.9B, 58 tensors: about the bytes of the
  32-deep one with a quarter of its tensors), each at micro-batch 1 x 8 (the host floor) and 8 x 1 (compute-bound);
* held out: llama-2-7b (6.7B, over 3x the largest fitted) at 1 x 8, 2 x 4 and 8 x 1 (the last two with
  checkpointing), and the committed 13B runs of 2026-11-29-s2 and 2026-11-30-s2;
* new (``--runs l3_8b_mb1 ...``, run after the fit, predicted by the fitted simulator): llama-3-8b (grouped-query
  attention, 128k vocabulary) and opt-6.7b (LayerNorm and biases), host-bound and compute-bound.

Per run: the prediction of the simulator at hand (step, its time breakdown), the measured median step (first
left out) and the per-step forward / backward / optimizer phases the workers record (PhaseTimer). Built-in model,
random weights, seq 2048, global batch 16, bf16 AdamW, ZeRO-3 dp=2 on 2 x H200.

    python benchmarks/zero3_time_runs.py --out $R/z3time --budget-s 540
    python benchmarks/zero3_time_runs.py --out /tmp/z --dry-run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402
from host_memory_runs import CLUSTER, JOB, fmt, run_within_budget  # noqa: E402

BASE = ["cluster.gpus_per_node=2", "train.global_batch=16", "train.seq_len=2048", "train.steps=4",
        "train.checkpoint_final=false", "train.checkpoint_every=0", "train.eval_every=0", "plan.dp=2",
        "plan.zero_stage=3"]
DEEP_1B = ["model=llama-1b", "model.layers=32", "model.name=llama-1b-32l"]     # 1b's layers 32 deep: 2.1B, 226 tensors
SHALLOW_7B = ["model=llama-2-7b", "model.layers=8", "model.name=llama-7b-8l"]   # 7b's layers 8 deep: 1.9B, 58 tensors
# (name, set, overrides, time limit s)
RUNS = [
    ("1b_mb1", "fit", ["model=llama-1b", "plan.micro_batch=1"], 80),
    ("1b_mb8", "fit", ["model=llama-1b", "plan.micro_batch=8"], 80),
    ("1b32l_mb1", "fit", [*DEEP_1B, "plan.micro_batch=1"], 80),
    ("1b32l_mb8", "fit", [*DEEP_1B, "plan.micro_batch=8"], 80),
    ("7b8l_mb1", "fit", [*SHALLOW_7B, "plan.micro_batch=1"], 80),
    ("7b8l_mb8", "fit", [*SHALLOW_7B, "plan.micro_batch=8"], 80),
    ("7b_mb1", "held out", ["model=llama-2-7b", "plan.micro_batch=1"], 120),
    ("7b_mb2_ckpt", "held out", ["model=llama-2-7b", "plan.micro_batch=2", "plan.activation_checkpointing=full"], 120),
    ("7b_mb8_ckpt", "held out", ["model=llama-2-7b", "plan.micro_batch=8", "plan.activation_checkpointing=full"], 120),
    # after the fit: models of other shapes, predicted by the fitted simulator before they ran
    ("l3_8b_mb1", "new", ["model=llama-3-8b", "plan.micro_batch=1"], 130),
    ("l3_8b_mb4_ckpt", "new", ["model=llama-3-8b", "plan.micro_batch=4", "plan.activation_checkpointing=full"], 130),
    ("opt67_mb1", "new", ["model=opt-6.7b", "plan.micro_batch=1"], 130),
    ("opt67_mb8_ckpt", "new", ["model=opt-6.7b", "plan.micro_batch=8", "plan.activation_checkpointing=full"], 130),
]


def prediction(overrides: list[str]) -> dict:
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.simulator import simulate
    e = simulate(load_job(JOB, overrides))
    return dict(plan=e.plan, step_time_s=e.step_time_s, time_breakdown_s=e.time_breakdown_s,
                peak_gpu_gib=e.peak_memory_gib, fits=e.fits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--runs", nargs="*", default=None, help=f"names among {', '.join(r[0] for r in RUNS)}")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows, skipped = [], []
    for name, part, plan_sets, limit in RUNS:
        if a.runs is not None and name not in a.runs:
            continue
        overrides = [*CLUSTER, *BASE, *plan_sets]
        pred = prediction(overrides)
        row = dict(name=name, set=part, overrides=overrides, predicted=pred)
        ran = run_within_budget(overrides, not pred["fits"], a.out / name, limit,
                                a.budget_s - (time.monotonic() - t0), a.dry_run)
        if ran is None:
            skipped.append(name)
            continue
        row.update(ran)
        rows.append(row)
        m = row.get("measured") or {}
        print(f"{name:12s} {part:8s} {pred['plan']:34s} {row['outcome']:10s} predicted {pred['step_time_s']:.3f} s; "
              f"measured {fmt(m.get('step_time_s'), '{:.3f}')} s, phases {m.get('phases_s')}", flush=True)
    if skipped:
        print(f"skipped (budget): {', '.join(skipped)}")
    write_json(a.out / "zero3_time_runs.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                    rows=rows, skipped=skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
