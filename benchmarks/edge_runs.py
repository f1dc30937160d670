"""Runs at the memory edge: `meshpilot run --force` of plans the simulator puts near or over the card.

Issue #15's validation asks for runs that give the simulator an honest chance to fail: plans
predicted to fit just under the card, and plans predicted not to fit, run anyway (``--force``).
Each variant is one `meshpilot run` of the same job from the same Hugging Face checkpoint
(written first in a subprocess, random weights, not timed); a run that runs out of memory ends
with exit status 4 and an ``oom`` event. Reported per variant: the prediction (peak, fits), the
outcome (ran / out of memory), the measured NVML peak and torch's reserved peak.

    python benchmarks/edge_runs.py --model llama-2-13b --ckpt /tmp/llama13b-hf --out $R/edge \\
        --set cluster.gpus_per_node=2 cluster.cpu_memory_gib=256 cluster.cpu_cores=32 \\
        --variant "mb1:plan.micro_batch=1 plan.activation_checkpointing=none" ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402
from hf_startup import checkpoint_args, ensure_checkpoint, run_one  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkpoint_args(ap, "llama-2-13b")
    ap.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE KEY=VALUE ...")
    ap.add_argument("--set", nargs="*", default=[])
    a = ap.parse_args()
    ensure_checkpoint(a)
    base = [*a.set, f"model={a.ckpt}", "train.steps=3", "train.global_batch=16", "train.seq_len=2048",
            "train.checkpoint_final=false", "plan.tp=1", "plan.dp=2", "plan.zero_stage=3"]
    rows = []
    for spec in a.variant:
        name, _, overrides = spec.partition(":")
        r = run_one(a.job, base, overrides.split(), ["--force"], a.out / name)
        s_path = a.out / name / "summary.json"
        s = json.loads(s_path.read_text()) if s_path.exists() else {}
        events = a.out / name / "events.jsonl"
        oom = [json.loads(x) for x in events.read_text().splitlines() if '"oom"' in x] if events.exists() else []
        peaks = s.get("memory_peaks_gib") or {}
        r.update(variant=name, overrides=overrides, outcome="out of memory" if r["rc"] == 4 else
                 ("ran" if r["rc"] == 0 else f"exit {r['rc']}"),
                 predicted_peak_gib=s.get("predicted_peak_memory_gib") or (oom[0].get("predicted_peak_gib") if oom else None),
                 nvml_peak_gib=max((v.get("nvml") or 0 for v in peaks.values()), default=None) or
                 (oom[0].get("measured_peak_gib") if oom else None),
                 reserved_peak_gib=max((v.get("reserved") or 0 for v in peaks.values()), default=None),
                 oom_events=oom[:2])
        rows.append(r)
        print(f"{name:10s} {r['outcome']:14s} predicted {r['predicted_peak_gib']} GiB, NVML {r['nvml_peak_gib']} GiB",
              flush=True)
    print(f"\n{'variant':10s} {'outcome':14s} {'predicted GiB':>13s} {'NVML GiB':>9s} {'reserved GiB':>12s}")
    for r in rows:
        print(f"{r['variant']:10s} {r['outcome']:14s} {r['predicted_peak_gib'] or float('nan'):13.1f} "
              f"{r['nvml_peak_gib'] or float('nan'):9.1f} {r['reserved_peak_gib'] or float('nan'):12.1f}")
    write_json(a.out / "edge_runs.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                             model=a.model, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
