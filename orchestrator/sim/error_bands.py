"""Error bands: how far a measured peak has exceeded the simulator's prediction, per regime.

A prediction is only as good as the evidence behind it. The measured set (GPU runs committed
under ``benchmarks/results/``) is scored against the current simulator by
``benchmarks/error_bands.py``, on the held-out rows only (those never used to fit a constant),
and the result is stored beside this module as ``error_bands.json``. For each regime:

    band = max(0, max over held-out runs of (measured peak - predicted peak) / predicted peak)

the largest relative under-prediction of GPU memory seen in that regime (0 when every run
peaked at or below its prediction). A regime with fewer than :data:`MIN_RUNS` held-out runs has
no evidence of its own and gets the largest band of any measured regime.

A plan *fits* when its predicted peak is within the card (and the node's host memory); it
fits *with margin* when ``peak x (1 + band)`` is too. A plan that fits without margin is
*risky*: ``plan: auto`` prefers plans that fit with margin and says which margin it used.
The host-memory check applies the same band (host peaks have no measured set of their own yet).

Regimes, most specific first (a plan belongs to the first that matches): zeroth order,
parameter offload, optimizer offload, ZeRO-3, expert parallel, tensor parallel, dense (ZeRO 0-2,
no offload, tp = ep = 1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.plan.plan import Plan

REGIMES = ("zeroth_order", "param_offload", "optimizer_offload", "zero3", "expert_parallel", "tensor_parallel",
           "dense")
MIN_RUNS = 2
BANDS_FILE = "error_bands.json"


def regime_codes(arrays: PlanArrays) -> np.ndarray:
    """Index into :data:`REGIMES` of every plan of ``arrays`` (first matching regime wins)."""
    conds = [np.asarray(arrays.zeroth_order, bool), np.asarray(arrays.offloads_params, bool),
             np.asarray(arrays.offloads_optimizer, bool), np.asarray(arrays.zero) == 3,
             np.asarray(arrays.ep) > 1, np.asarray(arrays.tp) > 1]
    out = np.full(arrays.n, len(REGIMES) - 1, dtype=np.int64)
    for i in reversed(range(len(conds))):
        out = np.where(conds[i], i, out)
    return out


def regime_of(plan: Plan, gpus_per_node: int = 8) -> str:
    """The regime of one plan (the same rule as :func:`regime_codes`)."""
    return REGIMES[int(regime_codes(PlanArrays.from_plans([plan], gpus_per_node))[0])]


@dataclass(frozen=True)
class RegimeBand:
    regime: str
    runs: int                       # held-out runs with a measured peak
    band: float                     # fraction added to a predicted peak for "fits with margin"
    measured: bool                  # False: fewer than MIN_RUNS runs, the band is the largest measured one
    mape_pct: float | None = None   # peak-memory MAPE of those runs

    def why(self) -> str:
        if not self.measured:
            return (f"{self.regime.replace('_', ' ')}: {self.runs} held-out run(s), too few: the largest band of "
                    f"any measured regime, +{self.band:.0%}")
        return (f"{self.regime.replace('_', ' ')}: +{self.band:.0%}, the largest under-prediction of GPU memory "
                f"over {self.runs} held-out runs")


@dataclass(frozen=True)
class ErrorBands:
    bands: dict[str, RegimeBand]
    source: dict[str, Any] = field(default_factory=dict)

    def of(self, regime: str) -> RegimeBand:
        return self.bands[regime]

    def band_of(self, codes: np.ndarray) -> np.ndarray:
        """The memory band of every regime code of ``codes`` (from :func:`regime_codes`)."""
        return np.array([self.bands[r].band for r in REGIMES])[codes]

    def band_array(self, arrays: PlanArrays) -> np.ndarray:
        """The memory band of every plan of ``arrays``."""
        return self.band_of(regime_codes(arrays))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "regimes": {r: dict(runs=b.runs, band=b.band, measured=b.measured,
                                                           mape_pct=b.mape_pct) for r, b in self.bands.items()}}


def bands_from_rows(rows: list[tuple[str, float, float]], source: dict[str, Any] | None = None) -> ErrorBands:
    """Bands from held-out rows ``(regime, measured_peak_gib, predicted_peak_gib)`` (see the module docstring)."""
    by: dict[str, list[float]] = {r: [] for r in REGIMES}
    for regime, measured, predicted in rows:
        if regime not in by:
            raise ValueError(f"unknown regime {regime!r}; one of {REGIMES}")
        by[regime].append((measured - predicted) / predicted)
    measured_bands = {r: max(0.0, max(errs)) for r, errs in by.items() if len(errs) >= MIN_RUNS}
    fallback = max(measured_bands.values(), default=0.0)
    bands = {}
    for r, errs in by.items():
        mape = 100.0 * float(np.mean(np.abs(errs) / (1.0 + np.asarray(errs)))) if errs else None
        ok = r in measured_bands
        bands[r] = RegimeBand(r, len(errs), measured_bands[r] if ok else fallback, ok, mape)
    return ErrorBands(bands, dict(source or {}))


def load_error_bands(data: dict[str, Any] | None = None) -> ErrorBands:
    """The bands stored beside this module (or from ``data``, the same JSON structure)."""
    if data is None:
        data = json.loads(resources.files(__package__).joinpath(BANDS_FILE).read_text(encoding="utf-8"))
    regimes = data["regimes"]
    bands = {r: RegimeBand(r, int(v["runs"]), float(v["band"]), bool(v["measured"]), v.get("mape_pct"))
             for r, v in regimes.items()}
    missing = [r for r in REGIMES if r not in bands]
    if missing:
        raise ValueError(f"{BANDS_FILE} lacks regimes {missing}")
    return ErrorBands(bands, data.get("source", {}))
