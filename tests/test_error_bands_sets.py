"""The scored sets of benchmarks/error_bands.py name runs that exist: every case a SUPERSEDED, HOST_SUPERSEDED or
STEP_SUPERSEDED key names is a case of a results file of REGIME_RUNS (a key that names nothing would leave the run it
meant scored)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _error_bands():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("error_bands_under_test", BENCH / "error_bands.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_every_superseded_key_names_a_regime_run():
    eb = _error_bands()
    known = set()
    for rel in eb.REGIME_RUNS:
        f = eb.HERE / rel
        assert f.exists(), rel
        known |= {eb.case_key(f, r["case"]) for r in json.loads(f.read_text())["rows"]}
    for key in [*eb.SUPERSEDED, *eb.HOST_SUPERSEDED, *eb.STEP_SUPERSEDED]:
        assert key in known, key
    # a run is left out whole, or for its host or its step only
    assert not set(eb.SUPERSEDED) & (set(eb.HOST_SUPERSEDED) | set(eb.STEP_SUPERSEDED))
