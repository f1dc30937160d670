"""The 2026-11-27 Hugging Face sets as a user would predict them after `meshpilot calibrate`: the cluster's
calibration refitted from the calibration half (per cluster shape), the held-out half predicted with it.

``benchmarks/error_bands.py`` scores the held-out half with the simulator's defaults, whose host-dependent rates (the
ZeRO-3 host time per fetched tensor, the CPU Adam rate, the fixed costs per rank) now come from the 2026-11-30 host;
those sets ran on the 2026-11-27 hosts, whose CPU ran the same 7B ZeRO-3 plan 1.46x faster. `meshpilot calibrate`
(``orchestrator/sim/calibration.py calibrate``) is how a user brings a cluster's own rates in: this script gives it
the calibration half of ``accuracy_report.split`` (the same split as the fit that set the defaults), one
calibration per cluster shape (4 x H200, 2 x H200), and prints the held-out half's errors with the defaults and with
the refitted calibration. Nothing here changes the simulator's defaults.

    python benchmarks/calibrated_holdout.py [--json-out PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy_report import load_cases, split  # noqa: E402
from error_bands import MEASUREMENTS, NOT_MESHPILOT_KINDS  # noqa: E402
from harness import metadata, write_json  # noqa: E402


def recorded(case):
    """A measured config as `meshpilot calibrate` reads a run: its job, plan, median step time and NVML peak."""
    from meshpilot.orchestrator.sim.calibration import RecordedRun
    measured = dict(step_time_s=case.step_s if case.has_step else None, phases_s=None,
                    device_peak_gib=case.peak_gib if case.has_peak else None, host_node_peak_gib=None)
    return RecordedRun(run_id=case.name, run_dir=Path(case.source), date="2026-11-27", job=case.job, plan=case.plan,
                       measured=measured)


def mape(pairs: list[tuple[float, float]]) -> float | None:
    return 100.0 * sum(abs(p - m) / m for m, p in pairs) / len(pairs) if pairs else None


def scores(rows: list[dict]) -> dict[str, float | None]:
    """Step and peak MAPE of ``rows`` with the defaults and with the refitted calibration."""
    steps = [r for r in rows if r["measured_step_s"]]
    peaks = [r for r in rows if r["measured_gib"]]
    return dict(step_mape_default=mape([(r["measured_step_s"], r["default_step_s"]) for r in steps]),
                step_mape_calibrated=mape([(r["measured_step_s"], r["calibrated_step_s"]) for r in steps]),
                peak_mape_default=mape([(r["measured_gib"], r["default_gib"]) for r in peaks]),
                peak_mape_calibrated=mape([(r["measured_gib"], r["calibrated_gib"]) for r in peaks]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    from meshpilot.orchestrator.sim.calibration import calibrate, with_calibration
    from meshpilot.orchestrator.sim.simulator import simulate

    cases, _ = load_cases([str(HERE / p) for p in MEASUREMENTS if (HERE / p).exists()])
    # not the rows of a configuration meshpilot does not run (error_bands.NOT_MESHPILOT_KINDS), in either half; the
    # split alternates within each kind, so the other rows' halves stay the same
    cases = [c for c in cases if c.kind not in NOT_MESHPILOT_KINDS]
    cal_half, hold = split(cases)
    out = {}

    def host(c) -> str:                  # the machine a set ran on: its results folder (2026-11-27-h200x4, -h200x2)
        return Path(c.source).parent.name

    for shape in sorted({host(c) for c in cases}):
        fit = [recorded(c) for c in cal_half if host(c) == shape and c.status == "ok"]
        held = [c for c in hold if host(c) == shape and c.status == "ok"]
        if not fit or not held:
            continue
        res = calibrate(fit, fit[0].job.cluster, holdout_every=0)
        cal = res.cluster.calibration
        rows = []
        for c in held:
            d = simulate(c.job, c.plan)
            f = simulate(with_calibration(c.job, cal), c.plan)
            rows.append(dict(name=c.name, measured_step_s=c.step_s if c.has_step else None, default_step_s=d.step_time_s,
                             calibrated_step_s=f.step_time_s, measured_gib=c.peak_gib,
                             default_gib=d.peak_memory_gib, calibrated_gib=f.peak_memory_gib))
        fitted = [dataclasses.asdict(q) for q in res.quantities if q.fitted]
        print(f"\n{shape}: calibrated on {len(fit)} runs of the calibration half, {len(held)} held out")
        for q in res.quantities:
            if q.fitted:
                print(f"  fitted {q.name}: {q.old} -> {q.new:.4g} ({q.runs} runs)")
        print(f"  {'run':34s} {'step meas':>9s} {'default':>8s} {'calib.':>8s} {'GiB meas':>8s} {'default':>8s} "
              f"{'calib.':>8s}")
        for r in rows:
            ms = r["measured_step_s"]
            print(f"  {r['name']:34s} {ms if ms is not None else float('nan'):9.3f} {r['default_step_s']:8.3f} "
                  f"{r['calibrated_step_s']:8.3f} {r['measured_gib']:8.2f} {r['default_gib']:8.2f} "
                  f"{r['calibrated_gib']:8.2f}")
        summary = scores(rows)
        print("  held-out MAPE: step {step_mape_default:.1f}% default, {step_mape_calibrated:.1f}% calibrated; "
              "peak {peak_mape_default:.1f}% default, {peak_mape_calibrated:.1f}% calibrated".format(**summary))
        out[str(shape)] = dict(fit_runs=[r.run_id for r in fit], fitted=fitted, rows=rows, summary=summary)
    every = [r for v in out.values() for r in v["rows"]]
    total = dict(runs=len(every), **scores(every))
    print("\nheld-out half, every shape: {runs} runs; step MAPE {step_mape_default:.1f}% with the defaults, "
          "{step_mape_calibrated:.1f}% calibrated from the calibration half; peak MAPE {peak_mape_default:.1f}% and "
          "{peak_mape_calibrated:.1f}%".format(**total))
    if a.json_out:
        write_json(a.json_out, dict(metadata(), command=" ".join([sys.executable, *sys.argv]), shapes=out, total=total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
