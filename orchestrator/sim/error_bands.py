"""Error bands: how far a measured peak has exceeded the simulator's prediction, per regime.

A prediction is only as good as the evidence behind it. The measured set (GPU runs committed
under ``benchmarks/results/``) is scored against the current simulator by
``benchmarks/error_bands.py``, on the held-out rows only (those never used to fit a constant),
and the result is stored beside this module as ``error_bands.json``. For each regime:

    band     = max(0, max over held-out runs of (measured peak - predicted peak) / predicted peak)
    band_gib = max(0, max over held-out runs of (measured peak - predicted peak))

the largest under-prediction of GPU memory seen in that regime, relative and in GiB (0 when every
run peaked at or below its prediction). A regime with fewer than :data:`MIN_RUNS` held-out runs has
no evidence of its own and gets the largest of each over the measured regimes.

A plan *fits* when its predicted peak is within the card (and the node's host memory); it
fits *with margin* when ``peak + min(band x peak, band_gib)`` is strictly below the card: no held-out
run of the regime exceeded its prediction by more than either. (A held-out run that ran out of memory
although predicted to fit is scored as measured at the card; it needed more, so a margin that only
reaches the card is one that run already failed.) The two differ where the error does not
grow with the peak: the ZeRO-3 runs of 2026-11-30-s3 were 2.5-5.7 GiB under at peaks from 16 to
124 GiB (before the kept parameters were modelled), 26% of the smallest, so a relative band alone
would have asked 32 GiB of a 124 GiB plan.
The simulator also asks room beside the peak for the step's largest single allocation
(:func:`meshpilot.orchestrator.sim.memory.largest_request`): a plan without it does not fit with margin either.
A plan that fits without margin is *risky*: ``plan: auto`` prefers plans that fit with margin
and says which margin it used. Host memory has one band of its own (:class:`HostBand`), from the held-out runs that
measured a node's host peak as Ray's memory monitor counts it, all regimes together (the host terms are the same
buffers whatever the GPU regime): the largest under-prediction, relative and in GiB, and the margin is the lesser of
the two, as for the GPU (the largest relative misses are of the process baseline on nodes using 3 GiB); with fewer
than :data:`MIN_RUNS` such runs the host check falls back to the plan's relative GPU band. A plan fits with margin
when its host peak plus that margin is within the node's usable memory too.

Regimes, most specific first (a plan belongs to the first that matches): zeroth order,
parameter offload, optimizer offload, ZeRO-3 with overlap_comm, ZeRO-3, expert parallel, tensor parallel, dense
(ZeRO 0-2, no offload, tp = ep = 1). ZeRO-3 with overlap_comm is a regime of its own because its evidence differs:
the side streams' pools and the step's flat copies that then find no cached block of their own leave 3-8 GiB of
reserve the memory model does not count (2026-11-29-s2 z3knobs; 2026-11-30-s9: llama-2-7b 79.5 GiB against 75.8,
transformers' 7B 72.1 against 64.5), where meshpilot's default, without it, is within a few percent.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.plan.plan import Plan

REGIMES = ("zeroth_order", "param_offload", "optimizer_offload", "zero3_overlap", "zero3", "expert_parallel",
           "tensor_parallel", "dense")
MIN_RUNS = 2
BANDS_FILE = "error_bands.json"


def regime_codes(arrays: PlanArrays, overlap_comm: np.ndarray | None = None) -> np.ndarray:
    """Index into :data:`REGIMES` of every plan of ``arrays`` (first matching regime wins). ``overlap_comm``: whether
    each plan's DeepSpeed config runs overlap_comm (sim/deepspeed_settings.py, which a ``train.deepspeed_extra`` can
    set); default the plans' own ``comm_overlap``."""
    overlap = np.asarray(arrays.comm_overlap if overlap_comm is None else overlap_comm, bool)
    zero3 = np.asarray(arrays.zero) == 3
    conds = [np.asarray(arrays.zeroth_order, bool), np.asarray(arrays.offloads_params, bool),
             np.asarray(arrays.offloads_optimizer, bool), zero3 & overlap, zero3,
             np.asarray(arrays.ep) > 1, np.asarray(arrays.tp) > 1]
    out = np.full(arrays.n, len(REGIMES) - 1, dtype=np.int64)
    for i in reversed(range(len(conds))):
        out = np.where(conds[i], i, out)
    return out


def regime_of(plan: Plan, gpus_per_node: int = 8, job: Any = None) -> str:
    """The regime of one plan (the same rule as :func:`regime_codes`); with ``job``, its DeepSpeed config's
    overlap_comm (a ``train.deepspeed_extra`` may set it) rather than the plan's own."""
    arrays = PlanArrays.from_plans([plan], gpus_per_node)
    overlap = None
    if job is not None:
        from meshpilot.orchestrator.sim.deepspeed_settings import deepspeed_settings
        overlap = deepspeed_settings(job, arrays).overlap_comm
    return REGIMES[int(regime_codes(arrays, overlap)[0])]


def margin_gib(band, band_gib, peak_gib):
    """GiB added to a predicted peak for "fits with margin": the lesser of ``band`` x peak and ``band_gib`` (module
    docstring). Scalars or arrays."""
    return np.minimum(band * peak_gib, band_gib)


@dataclass(frozen=True)
class RegimeBand:
    regime: str
    runs: int                       # held-out runs with a measured peak
    band: float                     # the largest relative under-prediction (fraction of the predicted peak)
    measured: bool                  # False: fewer than MIN_RUNS runs, the bands are the largest measured ones
    mape_pct: float | None = None   # peak-memory MAPE of those runs
    band_gib: float = 0.0           # the largest under-prediction in GiB

    def margin_gib(self, peak_gib: float) -> float:
        """GiB added to a predicted peak of ``peak_gib`` for "fits with margin" (:func:`margin_gib`)."""
        return float(margin_gib(self.band, self.band_gib, peak_gib))

    def why(self) -> str:
        both = f"+{self.band:.0%} or +{self.band_gib:.1f} GiB, whichever is less"
        if not self.measured:
            return (f"{self.regime.replace('_', ' ')}: {self.runs} held-out run(s), too few: the largest bands of "
                    f"any measured regime, {both}")
        return (f"{self.regime.replace('_', ' ')}: {both}, the largest under-predictions of GPU memory "
                f"over {self.runs} held-out runs")


@dataclass(frozen=True)
class HostBand:
    runs: int = 0                   # held-out runs with a measured host peak per node
    band: float = 0.0               # the largest relative under-prediction of those peaks
    mape_pct: float | None = None
    band_gib: float = 0.0           # the largest under-prediction in GiB

    @property
    def measured(self) -> bool:
        return self.runs >= MIN_RUNS


@dataclass(frozen=True)
class ErrorBands:
    bands: dict[str, RegimeBand]
    source: dict[str, Any] = field(default_factory=dict)
    host: HostBand = field(default_factory=HostBand)

    def of(self, regime: str) -> RegimeBand:
        return self.bands[regime]

    def host_margin_gib_of(self, codes: np.ndarray, host_gib: np.ndarray) -> np.ndarray:
        """GiB added to every plan's host peak per node for "fits with margin": min(band x host, band GiB) of the
        measured host band, else the plan's relative GPU band x host."""
        if self.host.measured:
            return margin_gib(self.host.band, self.host.band_gib, host_gib)
        return self.band_of(codes) * host_gib

    def band_of(self, codes: np.ndarray) -> np.ndarray:
        """The relative memory band of every regime code of ``codes`` (from :func:`regime_codes`)."""
        return np.array([self.bands[r].band for r in REGIMES])[codes]

    def band_gib_of(self, codes: np.ndarray) -> np.ndarray:
        """The memory band in GiB of every regime code of ``codes``."""
        return np.array([self.bands[r].band_gib for r in REGIMES])[codes]

    def margin_gib_of(self, codes: np.ndarray, peak_gib: np.ndarray) -> np.ndarray:
        """The margin in GiB of every plan, from its regime code and predicted peak (:func:`margin_gib`)."""
        return margin_gib(self.band_of(codes), self.band_gib_of(codes), peak_gib)

    def band_array(self, arrays: PlanArrays) -> np.ndarray:
        """The memory band of every plan of ``arrays``."""
        return self.band_of(regime_codes(arrays))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "regimes": {r: dict(runs=b.runs, band=b.band, band_gib=b.band_gib,
                                                           measured=b.measured, mape_pct=b.mape_pct)
                                                    for r, b in self.bands.items()},
                "host": dict(runs=self.host.runs, band=self.host.band, band_gib=self.host.band_gib,
                             mape_pct=self.host.mape_pct)}


def host_band_from_rows(rows: list[tuple[float, float]]) -> HostBand:
    """The host band from held-out ``(measured_node_gib, predicted_node_gib)`` rows (module docstring)."""
    errs = [(m - p) / p for m, p in rows]
    if not errs:
        return HostBand()
    mape = 100.0 * float(np.mean([abs(m - p) / m for m, p in rows]))
    return HostBand(len(errs), max(0.0, max(errs)), mape, max(0.0, max(m - p for m, p in rows)))


def bands_from_rows(rows: list[tuple[str, float, float]], source: dict[str, Any] | None = None,
                    host_rows: list[tuple[float, float]] = ()) -> ErrorBands:
    """Bands from held-out rows ``(regime, measured_peak_gib, predicted_peak_gib)`` and host rows ``(measured,
    predicted)`` per node (see the module docstring)."""
    by: dict[str, list[float]] = {r: [] for r in REGIMES}
    by_gib: dict[str, list[float]] = {r: [] for r in REGIMES}
    for regime, measured, predicted in rows:
        if regime not in by:
            raise ValueError(f"unknown regime {regime!r}; one of {REGIMES}")
        by[regime].append((measured - predicted) / predicted)
        by_gib[regime].append(measured - predicted)
    measured_bands = {r: max(0.0, max(errs)) for r, errs in by.items() if len(errs) >= MIN_RUNS}
    measured_gib = {r: max(0.0, max(by_gib[r])) for r in measured_bands}
    fallback, fallback_gib = max(measured_bands.values(), default=0.0), max(measured_gib.values(), default=0.0)
    bands = {}
    for r, errs in by.items():
        mape = 100.0 * float(np.mean(np.abs(errs) / (1.0 + np.asarray(errs)))) if errs else None
        ok = r in measured_bands
        bands[r] = RegimeBand(r, len(errs), measured_bands[r] if ok else fallback, ok, mape,
                              measured_gib[r] if ok else fallback_gib)
    return ErrorBands(bands, dict(source or {}), host_band_from_rows(list(host_rows)))


def load_error_bands(data: dict[str, Any] | None = None) -> ErrorBands:
    """The bands stored beside this module (or from ``data``, the same JSON structure)."""
    if data is None:
        data = json.loads(resources.files(__package__).joinpath(BANDS_FILE).read_text(encoding="utf-8"))
    regimes = data["regimes"]
    bands = {r: RegimeBand(r, int(v["runs"]), float(v["band"]), bool(v["measured"]), v.get("mape_pct"),
                           float(v["band_gib"])) for r, v in regimes.items()}
    missing = [r for r in REGIMES if r not in bands]
    if missing:
        raise ValueError(f"{BANDS_FILE} lacks regimes {missing}")
    h = data.get("host") or {}
    host = HostBand(int(h.get("runs", 0)), float(h.get("band", 0.0)), h.get("mape_pct"), float(h.get("band_gib", 0.0)))
    return ErrorBands(bands, data.get("source", {}), host)
