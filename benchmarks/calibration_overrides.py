"""Print the ``cluster.calibration`` of a profile written by `meshpilot probe` as command-line overrides.

A benchmark that predicts its cases with a fixed cluster (``benchmarks/configs/*.yaml``) takes a probe's measured
rates this way, e.g. CPU Adam measured on the machine before the cases run:

    meshpilot probe --cluster local --skip collectives,matmul,copies --out $R/probe/profile.yaml
    python benchmarks/regime_runs.py ... --extra $(python benchmarks/calibration_overrides.py $R/probe/profile.yaml \
        cpu_adam_gparams_per_thread cpu_adam_gparams_per_s)
"""
from __future__ import annotations

import argparse
import sys

import yaml


def overrides(profile: dict, keys: list[str]) -> list[str]:
    """``cluster.calibration.KEY=VALUE`` for each of ``keys`` the profile's calibration holds (all when empty)."""
    cal = profile.get("calibration") or {}
    missing = [k for k in keys if k not in cal]
    if missing:
        raise SystemExit(f"the profile's calibration lacks {missing}; it has {sorted(cal)}")
    return [f"cluster.calibration.{k}={cal[k]}" for k in (keys or sorted(cal)) if k != "measured_on"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("keys", nargs="*", help="calibration keys (default: every measured one)")
    a = ap.parse_args()
    with open(a.profile) as f:
        print(" ".join(overrides(yaml.safe_load(f), a.keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
