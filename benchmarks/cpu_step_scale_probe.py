"""The offloaded step's host rates (`meshpilot probe`'s CPU Adam part) at the probe's size and at a training-sized
partition, on one rank's threads.

`meshpilot probe` times DeepSpeedCPUAdam, the in-place fp32 gradient scaling and the fp32 -> pinned 16-bit cast
on ``adam_params`` parameters (2^26 on a GPU machine: 1 GiB of Adam state). A rank of a 7B-class plan updates
billions. This script calls the probe's own function (:func:`meshpilot.comm.probe.probe_cpu_adam`) at each size of
``--gparams`` with the threads `meshpilot run` gives one rank here (``clusters.threads_per_rank``), so the rates the
simulator takes from the probe can be checked against the rates at the size a plan runs. Host memory: 18 bytes a
parameter (fp32 parameter, gradient, two moments, the 16-bit copy).

    python benchmarks/cpu_step_scale_probe.py --out $R/cpustep --gparams 0.067 2.1
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
    a = ap.parse_args()
    import torch

    from meshpilot.comm.probe import ProbeSettings, probe_cpu_adam
    from meshpilot.orchestrator.config.clusters import threads_per_rank
    threads = a.threads or threads_per_rank(os.cpu_count() or 1, max(1, torch.cuda.device_count()))
    rows = []
    print(f"{'G params':>9s} {'threads':>7s} {'Adam G/s':>9s} {'scale G/s':>10s} {'cast G/s':>9s} "
          f"{'(scale+cast)/Adam time':>23s}")
    for g in a.gparams:
        s = probe_cpu_adam(ProbeSettings(adam_params=int(g * 1e9), adam_steps=a.steps), threads=threads)
        extra = s.gparams_per_s / s.grad_scale_gparams_per_s + s.gparams_per_s / s.cast_gparams_per_s
        rows.append(asdict(s))
        print(f"{g:9.3f} {threads:7d} {s.gparams_per_s:9.3f} {s.grad_scale_gparams_per_s:10.3f} "
              f"{s.cast_gparams_per_s:9.3f} {extra:23.2f}", flush=True)
    write_json(a.out / "cpu_step_scale_probe.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                          threads=threads, rows=rows))
    print(json.dumps({"wrote": str(a.out / "cpu_step_scale_probe.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
