"""``meshpilot submit --to slurm --slurm-mode ray`` (Ray on Slurm) on a REAL Slurm: munged, slurmctld and
two slurmd (node1, node2) on this machine, started by scripts/start-slurm.sh as in
tests/test_submit_slurm.py (skipped, with the script's reason, only where that is impossible).

* a 2-node CPU training job: the Ray head on node1 and a Ray worker on node2 (each ``ray start
  --block`` through srun), ``meshpilot run`` as the driver in the batch shell. Its two ranks run
  in the two Slurm steps (one per node: a rank's process descends from that step's slurmstepd).
  A preemption notice (``scancel --signal=USR2 --batch``) mid-training goes to the driver: the
  controller has the workers checkpoint and stop, the script stops Ray and requeues the job, the
  requeued job starts a new Ray cluster and resumes; it ends ``succeeded`` with the same final
  loss and parameter checksum as ``meshpilot run`` of the same job, every step trained exactly
  once. Ray's token is an owner-only file of the run directory that no script, log or Slurm
  command line contains; Ray stopped within the script's wait both times;
* ``meshpilot cancel`` of a running ray-mode job maps to ``cancelled``, idempotently.

Both jobs together take about 1.5 minutes on a 2-core machine (Slurm holds a requeued job for
its credential's lifetime, 15 s on the test cluster).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_submit_helpers import (QUICKSTART, STEPS, TRAIN, TWO_NODES, cancel_running, last_metrics,  # noqa: E402
                                 meshpilot, status, submit_handle, wait_for, reference_run)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RAY = ["--slurm-mode", "ray"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-ray-home")


def _job_id(handle: str) -> str:
    assert handle.startswith("slurm:")
    return handle.split(":", 1)[1]


def _step_of(pid: int) -> str:
    """The Slurm step (``JOB.STEP``) whose slurmstepd the process ``pid`` descends from."""
    p = pid
    while p > 1:
        cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        m = re.match(r"slurmstepd: \[(\d+\.\w+)\]", cmd)
        if m:
            return m.group(1)
        p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError(f"pid {pid} descends from no slurmstepd")


def _training_pids(run_dir: Path, min_step: int, deadline: float) -> list[int]:
    """The worker pids of the run once rank 0 reported ``min_step`` (state.json of the controller)."""
    while True:
        assert time.monotonic() < deadline, "training did not start"
        try:
            st = json.loads((run_dir / "state.json").read_text())
            if st.get("state") == "running" and st.get("step", 0) >= min_step and len(st.get("worker_pids") or []) == 2:
                return st["worker_pids"]
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


@pytest.fixture
def cancel_on_failure():
    """Jobs registered here are cancelled when the test fails (a failed test leaves no job running)."""
    jobs: list[str] = []
    yield jobs
    for job_id in jobs:
        subprocess.run(["scancel", job_id], capture_output=True)


@pytest.mark.timeout(400)
def test_ray_mode_job_preempted_requeued_matches_meshpilot_run(slurm_cluster, home, tmp_path, tmp_path_factory,
                                                               cancel_on_failure):
    # meshpilot run of the same job (once per session), beside the Slurm job: the preemption below must not
    # wait for it
    reference = ThreadPoolExecutor(1).submit(reference_run, tmp_path_factory)
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", *RAY, *TRAIN, *TWO_NODES, f"train.output_dir={tmp_path}"],
                  home)
    handle = submit_handle(r)
    cancel_on_failure.append(_job_id(handle))
    assert "a file system every node shares" in r.stdout
    run_dir = Path(status(handle, home)["run_dir"])
    # the two ranks run under the two Slurm steps of Ray (head on node1, worker on node2), both of this job
    deadline = time.monotonic() + 240
    pids = _training_pids(run_dir, 0, deadline)
    try:
        steps = sorted(_step_of(p) for p in pids)
    except FileNotFoundError:                        # a rank ended between the read and the walk
        pytest.fail(f"a worker ended before its placement was read; state {run_dir / 'state.json'}")
    assert steps == [f"{_job_id(handle)}.0", f"{_job_id(handle)}.1"], steps
    step = 0
    while step < 20:                                 # preempt once training is under way
        assert time.monotonic() < deadline, "training did not start"
        try:
            step = last_metrics(run_dir)["step"]
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.05)
    # what a scheduler's preemption notice looks like: USR2 to the batch script
    subprocess.run(["scancel", "--signal=USR2", "--batch", _job_id(handle)], check=True)
    assert step < STEPS - 20, f"training ran too fast to preempt in the middle (step {step})"
    st = wait_for(handle, home, lambda s: s["state"] != "running", timeout=120, every=0.5)
    assert st["state"] == "requeued" and st["restarts"] == 1, st
    st = wait_for(handle, home, lambda s: s["state"] not in ("pending", "requeued", "running"), timeout=300)
    batch_log = next((run_dir / "logs").glob("slurm-*.out")).read_text()
    assert st["state"] == "succeeded" and st["restarts"] == 1, (st, batch_log[-3000:])
    # the first attempt: the controller stopped the workers with a checkpoint (driver exit 3), Ray was stopped,
    # the job requeued; the second attempt resumed from that checkpoint on a new Ray cluster
    assert "asking the controller to checkpoint and stop, then requeueing" in batch_log
    stopped = re.findall(r"stopped at checkpoint step_(\d+); requeueing", batch_log)
    assert len(stopped) == 1 and 20 <= int(stopped[0]) < STEPS, batch_log[-3000:]
    assert re.findall(r"the job step ended with status (\d+)", batch_log) == ["3", "0"], batch_log[-3000:]
    assert batch_log.count("meshpilot: Ray stopped") == 2 and "still stopping" not in batch_log
    assert "attempt 2" in batch_log and batch_log.count("has 2 node(s)") == 2
    steps_trained = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_trained == list(range(1, STEPS + 1))
    # the same training as `meshpilot run`: final loss and parameter checksum
    ref = reference.result(timeout=600)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["world_size"] == 2
    assert last_metrics(run_dir)["loss"] == pytest.approx(ref["final_loss"], rel=1e-6, abs=1e-7)
    assert summary["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6, abs=1e-7)
    assert summary["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-9)
    logs = run_dir / "logs"
    assert {"rank0.log", "rank1.log", "ray-head.log", "ray-worker0.log"} <= {p.name for p in logs.iterdir()}
    assert "succeeded" in (run_dir / "controller.log").read_text()
    # Ray's token: owner-only, in the run dir; in no script, log or Slurm command line
    token_file = run_dir / "ray_auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64
    for p in [run_dir / "sbatch.sh", run_dir / "controller.log", *logs.iterdir()]:
        assert token not in p.read_text(errors="replace"), p
    job_info = subprocess.run(["scontrol", "show", "job", _job_id(handle)], capture_output=True, text=True).stdout
    assert job_info and token not in job_info
    # Ray's files were this job's own (--temp-dir), removed at the end; the default /tmp/ray/ray_current_cluster,
    # which a plain ray.init() on the node would join, does not name this job's cluster
    assert not (Path(os.environ.get("TMPDIR") or "/tmp") / f"ray-{_job_id(handle)}").exists()
    port = 20000 + int(_job_id(handle)) % 20000
    recorded = Path("/tmp/ray/ray_current_cluster")
    assert not (recorded.exists() and recorded.read_text().strip().endswith(f":{port}"))
    # `meshpilot logs` shows the batch log: the driver's output
    out = meshpilot(["logs", handle], home).stdout
    assert "slurm-" in out and "succeeded after 1 attempt(s)" in out, out[-2000:]
    cancel_on_failure.clear()


@pytest.mark.timeout(300)
def test_ray_mode_cancel_maps_to_cancelled(slurm_cluster, home, tmp_path, cancel_on_failure):
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", *RAY, "train.steps=10000000", *TWO_NODES,
                   f"train.output_dir={tmp_path}"], home)
    handle = submit_handle(r)
    cancel_on_failure.append(_job_id(handle))
    run_dir = Path(status(handle, home)["run_dir"])
    _training_pids(run_dir, 0, time.monotonic() + 240)
    cancel_running(handle, home)
    batch_log = next((run_dir / "logs").glob("slurm-*.out")).read_text()
    assert "meshpilot: SIGTERM" in batch_log, batch_log[-2000:]
    cancel_on_failure.clear()
    # a job Slurm ends (here: cancelled) leaves its Ray temp dir behind, as Ray's own sessions stay in /tmp/ray
    shutil.rmtree(Path(os.environ.get("TMPDIR") or "/tmp") / f"ray-{_job_id(handle)}", ignore_errors=True)
