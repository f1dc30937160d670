"""`plan: auto`'s choice against the plans it passed over, all measured through `meshpilot run` in one call.

Issue #15's last target: the chosen plan's measured throughput within 5% of the best measured plan of the
same job, on a model the simulator was not calibrated on. One job (``--job``: llama-2-13b, the default, or
llama-3-8b; full fine-tune, seq 2048, global batch 16, bf16 AdamW, 2 x H200, built-in model, random weights); the
runs: ``plan=auto`` (the
controller plans, then trains what it chose) and each alternative plan of ``ALTERNATIVES`` (``--force``
where the simulator says it does not fit or fits only without its error band). Per run: the plan that ran,
the prediction (step time, peak, fits, risky), the measured median step time (the first step left out),
tokens/s and NVML peak. The summary gives the chosen plan's tokens/s over the best measured.

    python benchmarks/plan_choice_runs.py --out $R/choice --budget-s 560
    python benchmarks/plan_choice_runs.py --out $R/choice8b --job llama-3-8b --timeout-s 90 --budget-s 240
    python benchmarks/plan_choice_runs.py --out /tmp/c --dry-run
    python benchmarks/plan_choice_runs.py --out /tmp/c --job llama-2-7b-one --cpu-cores 16 --host-gib 125.8 --dry-run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402
from host_memory_runs import JOB, fmt, host_total_gib, run_within_budget  # noqa: E402

GLOBAL_BATCH, SEQ_LEN = 16, 2048
COMMON = ["cluster.gpus_per_node=2", f"train.global_batch={GLOBAL_BATCH}", f"train.seq_len={SEQ_LEN}", "train.steps=4",
          "train.checkpoint_final=false", "train.checkpoint_every=0", "train.eval_every=0"]
# per job (--job): the model and the alternatives to plan: auto's choice, the plans the planner ranks near it and
# the one a user would try first on 2 x 141 GB
JOBS = {
    "llama-2-13b": (["model=llama-2-13b"], {
        "z3_mb8x1_ckpt": ["plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=8", "plan.activation_checkpointing=full"],
        "z3_mb2x4_ckpt": ["plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=2", "plan.activation_checkpointing=full"],
        # plan: auto's choice before the ZeRO-3 pass model and the bands in GiB (2026-11-30-s2 choice/auto)
        "z3_mb4x2_ckpt": ["plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=4", "plan.activation_checkpointing=full"],
        "z3_tp2_mb8x2_sp": ["plan.dp=1", "plan.tp=2", "plan.zero_stage=3", "plan.micro_batch=8",
                            "plan.activation_checkpointing=full", "plan.sequence_parallel=true"],
    }),
    # 2026-11-30 session 6: a second job, llama-3-8b (planned ZeRO-2 at micro-batch 1 x 8 with overlap_comm)
    "llama-3-8b": (["model=llama-3-8b"], {
        "z1_mb1x8": ["plan.dp=2", "plan.zero_stage=1", "plan.micro_batch=1", "plan.activation_checkpointing=none"],
        "tp2_z1_mb2x8_sp": ["plan.dp=1", "plan.tp=2", "plan.zero_stage=1", "plan.micro_batch=2",
                            "plan.activation_checkpointing=none", "plan.sequence_parallel=true"],
        "z2_mb8x1_ckpt": ["plan.dp=2", "plan.zero_stage=2", "plan.micro_batch=8", "plan.activation_checkpointing=full"],
    }),
    # 2026-11-30 session 9: a third job, transformers' llama-2-7b (model.implementation: hf; planned ZeRO-1 2 x 4 with
    # overlap_comm), against the next-ranked plan of another stage and the first ZeRO-3 plan
    "hf-llama-2-7b": (["model=llama-2-7b", "model.implementation=hf"], {
        "z2_mb2x4_ov": ["plan.dp=2", "plan.zero_stage=2", "plan.micro_batch=2", "plan.activation_checkpointing=none",
                        "plan.comm_overlap=true"],
        "z3_mb4x2": ["plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=4", "plan.activation_checkpointing=none"],
    }),
    # 2026-12-01 session 10: one GPU of the 1 x H200 kind (run with --cpu-cores 16), opt-2.7b (planned ZeRO-0 8 x 2),
    # against the next-ranked plan of another stage and the next micro-batch
    "opt-2.7b-one": (["model=opt-2.7b", "cluster.gpus_per_node=1"], {
        "z1_mb8x2": ["plan.dp=1", "plan.zero_stage=1", "plan.micro_batch=8", "plan.activation_checkpointing=none"],
        "z0_mb4x4": ["plan.dp=1", "plan.zero_stage=0", "plan.micro_batch=4", "plan.activation_checkpointing=none"],
    }),
    # 2026-12-01 session 13: llama-2-7b on one GPU of the 1 x H200 kind (--cpu-cores 16 --host-gib 125.8), where only
    # ZeRO-3 fits (planned 8 x 2 with checkpointing), against the faster plan the band makes risky (16 x 1, 132.6 GiB
    # predicted), the next micro-batch and the fastest plan with parameter offload
    "llama-2-7b-one": (["model=llama-2-7b", "cluster.gpus_per_node=1"], {
        "z3_mb16x1_ckpt": ["plan.dp=1", "plan.zero_stage=3", "plan.micro_batch=16", "plan.activation_checkpointing=full"],
        "z3_mb4x4_ckpt": ["plan.dp=1", "plan.zero_stage=3", "plan.micro_batch=4", "plan.activation_checkpointing=full"],
        "z3offp_mb16x1_ckpt": ["plan.dp=1", "plan.zero_stage=3", "plan.micro_batch=16",
                               "plan.activation_checkpointing=full", "plan.offload_params=cpu"],
    }),
    # the same session: opt-6.7b on the same kind (planned ZeRO-3 8 x 2 with checkpointing), against the next
    # micro-batch and the fastest plan without checkpointing
    "opt-6.7b-one": (["model=opt-6.7b", "cluster.gpus_per_node=1"], {
        "z3_mb4x4_ckpt": ["plan.dp=1", "plan.zero_stage=3", "plan.micro_batch=4", "plan.activation_checkpointing=full"],
        "z3_mb2x8": ["plan.dp=1", "plan.zero_stage=3", "plan.micro_batch=2", "plan.activation_checkpointing=none"],
    }),
}
TIMEOUT_S = 150.0


def prediction(overrides: list[str]) -> dict:
    """The simulator's view of the plan ``overrides`` name (``plan=auto``: the planner's choice)."""
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.planner import search
    from meshpilot.orchestrator.sim.simulator import simulate
    job = load_job(JOB, overrides)
    e = simulate(job, search(job).best if job.plan.auto else None)
    return dict(plan=e.plan, plan_config=e.plan_config, step_time_s=e.step_time_s, tokens_per_s=e.tokens_per_s,
                peak_gpu_gib=e.peak_memory_gib, fits=e.fits, fits_with_margin=e.fits_with_margin, notes=e.notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=560.0)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--job", choices=sorted(JOBS), default="llama-2-13b", help="the job (default llama-2-13b)")
    ap.add_argument("--runs", nargs="*", default=None,
                    help="names among auto and the job's alternatives (" + "; ".join(
                        f"{k}: {', '.join(v[1])}" for k, v in JOBS.items()) + "; default all)")
    ap.add_argument("--timeout-s", type=float, default=TIMEOUT_S, help=f"per run (default {TIMEOUT_S:.0f})")
    ap.add_argument("--cpu-cores", type=int, default=32, help="cluster.cpu_cores (default 32, the 2 x H200 kind)")
    ap.add_argument("--host-gib", type=float, default=256.0,
                    help="cluster.cpu_memory_gib of a dry run (default 256, the 2 x H200 kind; a run takes the machine's)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    host_gib = a.host_gib if a.dry_run else round(host_total_gib(), 1) or 256.0
    model_sets, alternatives = JOBS[a.job]
    # the job's own settings after COMMON, so that a job may name its GPUs per node
    base = [f"cluster.cpu_cores={a.cpu_cores}", f"cluster.cpu_memory_gib={host_gib}", *COMMON, *model_sets]
    runs = [(k, v) for k, v in [("auto", ["plan=auto"]), *alternatives.items()] if a.runs is None or k in a.runs]
    t0 = time.monotonic()
    rows, skipped = [], []
    for name, plan_sets in runs:
        overrides = [*base, *plan_sets]
        pred = prediction(overrides)
        row = dict(name=name, overrides=overrides, predicted=pred)
        force = name != "auto" and not pred["fits_with_margin"]
        ran = run_within_budget(overrides, force, a.out / name, a.timeout_s, a.budget_s - (time.monotonic() - t0),
                                a.dry_run)
        if ran is None:
            skipped.append(name)
            continue
        row.update(ran, forced=force)
        if "measured" in row:
            st = row["measured"].get("step_time_s")
            row["measured"]["tokens_per_s"] = GLOBAL_BATCH * SEQ_LEN / st if st else None
        rows.append(row)
        m = row.get("measured") or {}
        print(f"{name:16s} {pred['plan']:34s} {row['outcome']:14s} predicted {pred['step_time_s']:.3f} s "
              f"{pred['peak_gpu_gib']:.1f} GiB{'' if pred['fits_with_margin'] else ' (no margin)'}; measured "
              f"{fmt(m.get('step_time_s'), '{:.3f}')} s, {fmt(m.get('tokens_per_s'), '{:,.0f}')} tokens/s, "
              f"{fmt(m.get('nvml_peak_gib'))} GiB", flush=True)
    ran = [r for r in rows if (r.get("measured") or {}).get("tokens_per_s")]
    summary = None
    if ran:
        best = max(ran, key=lambda r: r["measured"]["tokens_per_s"])
        auto = next((r for r in ran if r["name"] == "auto"), None)
        summary = dict(best=best["name"], best_tokens_per_s=best["measured"]["tokens_per_s"],
                       chosen_tokens_per_s=auto["measured"]["tokens_per_s"] if auto else None,
                       ratio=(auto["measured"]["tokens_per_s"] / best["measured"]["tokens_per_s"]) if auto else None)
        print(f"\nbest measured: {best['name']} ({best['measured']['tokens_per_s']:,.0f} tokens/s); plan: auto's choice "
              f"at {fmt(summary['ratio'], '{:.3f}')}x of it")
    if skipped:
        print(f"skipped (budget): {', '.join(skipped)}")
    write_json(a.out / "plan_choice_runs.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                     rows=rows, skipped=skipped, summary=summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
