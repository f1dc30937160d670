"""Planner speed: plans scored per second on one CPU core, and whole searches up to 175B on 1,024 GPUs.

Targets (issue 3): >= 10,000 plans scored per second on one core; the full search for opt-175b
over 1,024 GPUs (dgx-h100, cluster.nodes=128) in under 2 s.

    python benchmarks/planner_speed.py [--out DIR] [--quick] [--repeat N]

Prints a table and writes planner_speed.json (CPU model, date, versions, numbers) into --out
(default $OUT, else the current directory). CPU only; pins numpy to one thread.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CASES = [
    ("llama-2-7b / h100-sxm-4", ["model=llama-2-7b", "cluster=h100-sxm-4", "train.global_batch=64"]),
    ("llama-2-70b / 4 x dgx-h100", ["model=llama-2-70b", "cluster=dgx-h100", "cluster.nodes=4",
                                    "train.global_batch=256", "train.seq_len=4096"]),
    ("mixtral-8x7b / 16 x dgx-h100", ["model=mixtral-8x7b", "cluster=dgx-h100", "cluster.nodes=16",
                                      "train.global_batch=512", "train.seq_len=4096"]),
    ("opt-175b / 128 x dgx-h100", ["model=opt-175b", "cluster=dgx-h100", "cluster.nodes=128",
                                   "train.global_batch=2048"]),
    ("opt-1.3b zo-sgd / 8 x dgx-h100", ["model=opt-1.3b", "cluster=dgx-h100", "cluster.nodes=8",
                                        "train.global_batch=64", "train.optimizer=zo-sgd"]),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory (default $OUT or .)")
    ap.add_argument("--quick", action="store_true", help="one repetition, two cases")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions per case (median reported)")
    args = ap.parse_args(argv)

    import numpy as np
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.memory import model_terms
    from meshpilot.orchestrator.sim.planner import enumerate_plans, search
    from meshpilot.orchestrator.sim.simulator import evaluate

    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # one core
    except (AttributeError, OSError):
        pass
    cases = [CASES[0], CASES[3]] if args.quick else CASES
    repeat = 1 if args.quick else max(1, args.repeat)
    rows = []
    for name, ov in cases:
        job = load_job(None, ["plan=auto", *ov])
        full, score, enum = [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            res = search(job, top=10)
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            arrays, _, _ = enumerate_plans(job)
            enum.append(time.perf_counter() - t0)
            mt = model_terms(job.model)
            t0 = time.perf_counter()
            evaluate(job, arrays, headroom=0.05, terms=mt)
            score.append(time.perf_counter() - t0)
        row = dict(case=name, overrides=ov, plans_scored=int(res.scored), plans_enumerated=int(res.enumerated),
                   plans_fitting=int(len(res.ranked)), best=res.top[0].plan if res.top else None,
                   search_s=statistics.median(full), enumerate_s=statistics.median(enum),
                   score_s=statistics.median(score))
        row["plans_per_s_scoring"] = row["plans_scored"] / row["score_s"]
        row["plans_per_s_end_to_end"] = row["plans_scored"] / row["search_s"]
        rows.append(row)

    hdr = (f"{'case':34} {'scored':>8} {'fit':>6} {'search s':>9} {'score s':>9} {'plans/s score':>14} "
           f"{'plans/s e2e':>12}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['case']:34} {r['plans_scored']:8d} {r['plans_fitting']:6d} {r['search_s']:9.3f} {r['score_s']:9.4f} "
              f"{r['plans_per_s_scoring']:14,.0f} {r['plans_per_s_end_to_end']:12,.0f}")
    big = next((r for r in rows if r["case"].startswith("opt-175b")), None)
    # plans/s over all cases together (a case with ~100 plans measures fixed start-up cost, not a rate)
    agg = sum(r["plans_scored"] for r in rows) / sum(r["search_s"] for r in rows)
    targets = dict(plans_per_s_end_to_end=agg, opt175b_1024gpu_search_s=big["search_s"] if big else None)
    targets["ok"] = agg >= 10_000 and (big is None or big["search_s"] < 2.0)
    print(f"\nend-to-end plans/s (all cases): {agg:,.0f} (target >= 10,000); "
          f"opt-175b on 1,024 GPUs: {targets['opt175b_1024gpu_search_s']} s (target < 2 s): "
          + ("OK" if targets["ok"] else "MISSED"))
    import meshpilot.orchestrator as mo  # noqa: F401
    out = dict(benchmark="planner_speed", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               cpu=cpu_model(), cores_used=1, python=sys.version.split()[0], numpy=np.__version__,
               platform=platform.platform(), quick=args.quick, repeat=repeat, cases=rows, targets=targets)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "planner_speed.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {d / 'planner_speed.json'}")
    return 0 if targets["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
