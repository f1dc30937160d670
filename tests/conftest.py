"""Shared pytest configuration: `gpu` tests are skipped when no CUDA device is visible; the real Slurm
the `slurm` tests share."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm on this machine (slurmctld + two slurmd), started once per session by
    scripts/start-slurm.sh; the `slurm` tests are skipped when it cannot be installed."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["bash", str(root / "scripts" / "start-slurm.sh")], capture_output=True, text=True, timeout=900)
    if r.returncode == 3:
        pytest.skip(f"no Slurm can be set up here: {r.stderr.strip()}")
    assert r.returncode == 0, f"scripts/start-slurm.sh failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout
