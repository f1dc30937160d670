"""ZeRO-3 settings: meshpilot's generated DeepSpeed config against DeepSpeed's defaults, same plan, same loop.

Issue #16 item 5: the DeepSpeed config meshpilot generates must be at least as fast as
DeepSpeed's defaults for the same plan. Each variant is one `meshpilot run` of the same job
and plan from the same Hugging Face checkpoint (written first, random weights, not timed),
differing only in ``train.deepspeed_extra``:

* ``meshpilot``: the generated config (strategies/deepspeed_config.py);
* ``ds_defaults``: DeepSpeed 0.19's own ZeRO-3 defaults (overlap_comm on, 5e8 buckets, prefetch
  5e7, persistence threshold 1e5, max live 1e9);
* ``overlap``: the generated config with only overlap_comm turned on.

The plan's own knob (``plan.comm_overlap``, issue #16 item 5), on any plan given with ``--plan``:

* ``lean`` / ``overlap_plan``: ``plan.comm_overlap=false`` / ``true`` (the same configs as
  ``meshpilot`` / ``overlap``, set through the plan instead of ``deepspeed_extra``);
* ``planner``: ``plan: auto`` constrained to the given plan's fields (offloads none), so the planner
  chooses overlap_comm; the row records the plan it ran (``plan_run``).

Measured against predicted, one stage-2 and one stage-3 job on 2 x H200 (llama-2-7b ZeRO-2 mb 1x8:
the simulator predicts overlap 9% faster for +0.8 GiB and the planner takes it; llama-2-13b ZeRO-3 mb
1x8 with checkpointing: no gain for +2.2 GiB, the planner keeps the lean setting)::

    python benchmarks/zero3_knobs.py --model llama-2-7b --ckpt /tmp/llama7b-hf --out $R/knob_z2 \
        --variants lean overlap_plan planner \
        --plan plan.tp=1 plan.dp=2 plan.zero_stage=2 plan.micro_batch=1 plan.activation_checkpointing=none \
        --set cluster=h200-sxm-4 cluster.gpus_per_node=2 cluster.cpu_memory_gib=256 cluster.cpu_cores=32
    python benchmarks/zero3_knobs.py --model llama-2-13b --ckpt /tmp/llama13b-hf --out $R/knob_z3 \
        --variants lean overlap_plan planner \
        --set cluster=h200-sxm-4 cluster.gpus_per_node=2 cluster.cpu_memory_gib=256 cluster.cpu_cores=32

Reported per variant: median step time and tokens/s (the run summary), NVML peak per GPU, and
the ratio to the ``meshpilot`` variant measured in the same call.

    python benchmarks/zero3_knobs.py --model llama-2-13b --ckpt /tmp/llama13b-hf --out $R/z3knobs \\
        --set cluster=h200-sxm-4 cluster.gpus_per_node=2 cluster.cpu_memory_gib=256 cluster.cpu_cores=32
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402
from hf_startup import checkpoint_args, ensure_checkpoint, run_one, warm  # noqa: E402

Z = "train.deepspeed_extra.zero_optimization"
VARIANTS = {
    "meshpilot": [],
    "ds_defaults": [f"{Z}.overlap_comm=true", f"{Z}.reduce_bucket_size=500000000",
                    f"{Z}.stage3_prefetch_bucket_size=50000000", f"{Z}.stage3_param_persistence_threshold=100000",
                    f"{Z}.stage3_max_live_parameters=1000000000"],
    "overlap": [f"{Z}.overlap_comm=true"],
    "lean": ["plan.comm_overlap=false"],
    "overlap_plan": ["plan.comm_overlap=true"],
    "planner": ["plan.auto=true", "plan.offload_optimizer=none", "plan.offload_params=none"],
}
DEFAULT_VARIANTS = ["meshpilot", "ds_defaults", "overlap"]
PLAN = ["plan.tp=1", "plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=1", "plan.activation_checkpointing=full"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkpoint_args(ap, "llama-2-13b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--plan", nargs="+", default=PLAN, help="the plan's overrides (default: the 13B ZeRO-3 one)")
    ap.add_argument("--set", nargs="*", default=[])
    a = ap.parse_args()
    ensure_checkpoint(a)
    warm(a.ckpt)
    sets = [*a.set, f"model={a.ckpt}", f"train.steps={a.steps}", f"train.global_batch={a.global_batch}",
            "train.seq_len=2048", "train.checkpoint_final=false", *a.plan]
    rows = []
    for name in a.variants:
        # --force: the simulator predicts this plan over the card (issue #15: it ran at 110 GiB)
        r = run_one(a.job, sets, [], [*VARIANTS[name], "--force"], a.out / name)
        s = json.loads((a.out / name / "summary.json").read_text()) if (a.out / name / "summary.json").exists() else {}
        pvm = s.get("predicted_vs_measured") or {}
        step = (pvm.get("step_time_s") or {}).get("measured")
        peaks = [v.get("nvml") for v in (s.get("memory_peaks_gib") or {}).values() if v.get("nvml")]
        r.update(variant=name, overrides=VARIANTS[name], tokens_per_s=s.get("tokens_per_s"), median_step_s=step, predicted_step_s=(pvm.get("step_time_s") or {}).get("predicted"),
                 phases_s=pvm.get("phases_s"),
                 nvml_peak_gib=max(peaks) if peaks else None, predicted_tokens_per_s=s.get("predicted_tokens_per_s"),
                 predicted_peak_gib=s.get("predicted_peak_memory_gib"))
        state = a.out / name / "state.json"
        r["plan_run"] = json.loads(state.read_text()).get("plan") if state.exists() else None
        rows.append(r)
        print(f"{name:12s} rc={r['rc']} tokens/s {r['tokens_per_s']} peak {r['nvml_peak_gib']} GiB", flush=True)
    base = next((r for r in rows if r["variant"] in ("meshpilot", "lean") and r["tokens_per_s"]), None)
    print(f"\n{'variant':12s} {'tokens/s':>9s} {'vs meshpilot':>12s} {'NVML GiB':>9s} {'pred tok/s':>10s} {'pred GiB':>9s}")
    for r in rows:
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base and r["tokens_per_s"] else float("nan")
        print(f"{r['variant']:12s} {r['tokens_per_s'] or float('nan'):9.0f} {ratio:12.2f} "
              f"{r['nvml_peak_gib'] or float('nan'):9.1f} {r['predicted_tokens_per_s'] or float('nan'):10.0f} "
              f"{r['predicted_peak_gib'] or float('nan'):9.1f}")
    write_json(a.out / "zero3_knobs.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                               model=a.model, plan=a.plan, rows=rows))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
