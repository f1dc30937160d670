"""GPU memory outside torch's caching allocator, per measured run: NVML peak - torch reserved peak.

The simulator's fixed costs (``cuda_context_gib``, ``nccl_base_gib``, ``nccl_per_group_gib``,
``deepspeed_engine_groups``, ``zero3_engine_groups`` in orchestrator/sim/estimate.py) are read
off this table, not fitted: what NVML sees that torch's allocator does not is the CUDA context,
cuBLAS workspaces and loaded kernels, and NCCL's buffers per communicator. Reads the committed
measurement JSONs (measure_deepspeed.py, measure_zo.py) and `meshpilot run` directories
(summary.json, per-rank peaks); prints one row per run and the values per regime.

    python benchmarks/fixed_costs.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEASUREMENTS = ["results/2026-11-27-h200x4/deepspeed_measurements_shard1.json",
                "results/2026-11-27-h200x4/deepspeed_measurements_shard2.json",
                "results/2026-11-27-h200x2/deepspeed_measurements_dp2.json",
                "results/2026-11-27-h200x2/deepspeed_measurements_offload.json",
                "results/2026-11-27-h200x4/zo_measurements.json"]
# meshpilot runs with clean NVML readings (not 2026-11-29-s2-h200x2/hf7b: see its README)
RUN_GLOBS = ["results/2026-11-29-h200x2/run_*", "results/2026-11-29-s2-h200x2/z3knobs/*",
             "results/2026-11-29-s2-h200x2/edge13b/*", "results/2026-11-29-s2-h200x2/hf7b_z3/zero3_*"]


def _regime(plan: dict, ranks: int, zeroth_order: bool) -> str:
    if zeroth_order:
        return f"zeroth order, {ranks} rank(s)"
    return f"DeepSpeed ZeRO-{'3' if int(plan.get('zero_stage') or 0) == 3 else '0..2'}, {ranks} ranks"


def rows() -> list[tuple[str, str, float]]:
    """(run, regime, NVML - reserved in GiB) for every run with both peaks."""
    out = []
    for rel in MEASUREMENTS:
        data = json.loads((HERE / rel).read_text())
        for r in data.get("results", []):
            nvml, reserved = r.get("nvml_peak_gib"), r.get("max_reserved_gib")
            if r.get("status") != "ok" or not nvml or not reserved:
                continue
            plan = r["job"].get("plan") or {}
            zo = r.get("kind") == "zo"
            ranks = len(nvml) if zo else int(plan.get("dp") or 1) * int(plan.get("tp") or 1)
            out.append((r["name"], _regime(plan, ranks, zo), max(nvml) - max(reserved)))
    for pattern in RUN_GLOBS:
        for run in sorted(HERE.glob(pattern)):
            summary = run / "summary.json"
            if not summary.is_file():
                continue
            s = json.loads(summary.read_text())
            peaks = list((s.get("memory_peaks_gib") or {}).values())
            if s.get("status") != "succeeded" or not peaks or not all(p.get("nvml") and p.get("reserved") for p in peaks):
                continue
            plan = (s.get("predicted_vs_measured") or {}).get("plan_config") or {}
            zo = (plan.get("zo") or {}).get("mode", "none") != "none"
            out.append((f"{run.parent.name}/{run.name}", _regime(plan, len(peaks), zo),
                        max(p["nvml"] - p["reserved"] for p in peaks)))
    return out


def main() -> int:
    table = rows()
    print(f"{'run':40s} {'regime':34s} {'NVML - reserved (GiB)':>22s}")
    for name, regime, gib in table:
        print(f"{name:40s} {regime:34s} {gib:22.2f}")
    print(f"\n{'regime':34s} {'runs':>4s} {'min':>6s} {'median':>7s} {'max':>6s}")
    for regime in sorted({r for _, r, _ in table}):
        vals = [g for _, r, g in table if r == regime]
        print(f"{regime:34s} {len(vals):4d} {min(vals):6.2f} {statistics.median(vals):7.2f} {max(vals):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
