"""The offloaded step's host rates (`meshpilot probe`'s CPU Adam part) at the probe's size and at a training-sized
partition, on one rank's threads, measured as the probe does and in-process.

`meshpilot probe` times DeepSpeedCPUAdam, the in-place fp32 gradient scaling and the fp32 -> pinned 16-bit cast
on ``adam_params`` parameters (2^26 on a GPU machine: 1 GiB of Adam state), in a fresh process started with
``OMP_NUM_THREADS`` set to the threads (:func:`meshpilot.comm.probe.probe_cpu_adam`), as `meshpilot run` starts a
rank. A rank of a 7B-class plan updates billions. Per size of ``--gparams`` this script calls the probe's function
with the threads `meshpilot run` gives one rank here (``clusters.threads_per_rank``) and, with ``--in-process``, the
same measurement in this process after ``torch.set_num_threads`` (how the probe measured before 2026-12-01-s12)
and, with ``--unpinned``, on pageable parameters and gradients (the probe pins them on a GPU machine), so the rates
the simulator takes from the probe can be checked against the size a plan runs and against the way they were
measured before. Host memory: 18 bytes a parameter (fp32 parameter, gradient, two moments, 16-bit copy).

    python benchmarks/cpu_step_scale_probe.py --out $R/cpustep --gparams 0.067 2.1 --in-process
    python benchmarks/cpu_step_scale_probe.py --out $R/cpustep --gparams 0.067 0.268 2.1 --unpinned --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gparams", type=float, nargs="+", default=[2**26 / 1e9, 2.1],
                    help="partition sizes in G parameters (default: the probe's 2^26 and 2.1)")
    ap.add_argument("--threads", type=int, default=None, help="default: what `meshpilot run` gives one rank here")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--in-process", action="store_true", help="also measure in this process after set_num_threads")
    ap.add_argument("--unpinned", action="store_true", help="also measure with pageable parameters and gradients")
    ap.add_argument("--repeats", type=int, default=1, help="measurements of each size and way (fresh processes)")
    a = ap.parse_args()
    import torch

    from meshpilot.comm.probe import ProbeSettings, probe_cpu_adam, time_cpu_adam
    from meshpilot.orchestrator.config.clusters import threads_per_rank
    threads = a.threads or threads_per_rank(os.cpu_count() or 1, max(1, torch.cuda.device_count()))
    rows = []
    print(f"{'G params':>9s} {'threads':>7s} {'how':>11s} {'Adam G/s':>9s} {'scale G/s':>10s} {'cast G/s':>9s} "
          f"{'(scale+cast)/Adam time':>23s}")
    for g in a.gparams:
        settings = ProbeSettings(adam_params=int(g * 1e9), adam_steps=a.steps)
        ways = [("child", lambda: probe_cpu_adam(settings, threads=threads, cast_copies=False))]
        if a.unpinned:
            ways.append(("unpinned", lambda: probe_cpu_adam(settings, threads=threads, pinned=False, cast_copies=False)))
        if a.in_process:
            def in_process():
                torch.set_num_threads(threads)
                return time_cpu_adam(settings, threads, cast_copies=False)
            ways.append(("in-process", in_process))
        for how, measure in [w for w in ways for _ in range(a.repeats)]:
            s = measure()
            extra = s.gparams_per_s / s.grad_scale_gparams_per_s + s.gparams_per_s / s.cast_gparams_per_s
            rows.append(dict(asdict(s), how=how))
            print(f"{g:9.3f} {threads:7d} {how:>11s} {s.gparams_per_s:9.3f} {s.grad_scale_gparams_per_s:10.3f} "
                  f"{s.cast_gparams_per_s:9.3f} {extra:23.2f}", flush=True)
    write_json(a.out / "cpu_step_scale_probe.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                          threads=threads, rows=rows))
    print(json.dumps({"wrote": str(a.out / "cpu_step_scale_probe.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
