"""``meshpilot submit --to slurm`` on a REAL Slurm: munged, slurmctld and two slurmd (node1, node2) on
this machine, started by scripts/start-slurm.sh (it installs Debian's slurmctld/slurmd/slurm-client/
munge with apt when they are absent; the tests skip, with the script's reason, only when that is
impossible: not root, no apt, apt failing, or a slurm.conf of another cluster).

* a 2-node CPU training job (one torchrun per node, c10d rendezvous at the first node) ends with the
  same final loss and parameter checksum as the same job under ``meshpilot run``; its run directory
  and model name contain spaces, quotes, ``$(...)`` and backticks, which must reach Slurm and the
  workers as data, never run;
* a preemption notice (``scancel --signal=USR2 --batch``) mid-training: the workers checkpoint, the
  batch script requeues the job, the requeued job resumes at the next step and ends at the last step
  with the same final loss, every step trained exactly once;
* ``meshpilot submit --cancel`` (scancel) maps to ``cancelled``; a 1-minute time limit maps to
  ``timeout``, and Slurm's SIGTERM at the limit still made the workers checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_submit_helpers import (QUICKSTART, STEPS, TRAIN, TWO_NODES, cancel_running, last_metrics,  # noqa: E402
                                 meshpilot, reference_run, status, submit_handle, wait_for)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

WEIRD = "runs with space 'single' \"double\" $(touch PWNED) `touch PWNED2` ;x"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-home")


@pytest.fixture(scope="module")
def timeout_job(slurm_cluster, home, tmp_path_factory):
    """Submitted by the first test and checked by the last: a job whose 1-minute limit runs out while
    the others run (one CPU worker; no requeue budget, so the USR2 before the limit is only logged)."""
    out = tmp_path_factory.mktemp("timeout")
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", "train.steps=10000000", "train.checkpoint_every=0",
                   "plan.dp=1", "cluster.nodes=1", "cluster.gpus_per_node=1", "cluster.cpu_cores=1",
                   f"train.output_dir={out}", "--time", "1", "--signal-lead", "30", "--max-requeues", "0"], home)
    return submit_handle(r), out


def _job_id(handle: str) -> str:
    assert handle.startswith("slurm:")
    return handle.split(":", 1)[1]


@pytest.mark.timeout(600)
def test_two_node_job_matches_meshpilot_run(slurm_cluster, timeout_job, home, tmp_path, tmp_path_factory):
    out = tmp_path / WEIRD
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", *TRAIN, *TWO_NODES, f"train.output_dir={out}",
                   "model.name=tiny $(touch PWNED3) 'q'"], home, cwd=tmp_path)
    handle = submit_handle(r)
    ref = reference_run(tmp_path_factory)            # meshpilot run of the same job, while Slurm runs this one
    st = wait_for(handle, home, lambda s: s["state"] not in ("pending", "running"), timeout=300)
    run_dir = Path(st["run_dir"])
    logs = meshpilot(["submit", "--logs", handle, "--tail", "30"], home).stdout
    assert st["state"] == "succeeded", (st, logs)
    assert run_dir.parent == out and run_dir.is_dir()
    assert st["step"] == STEPS
    m = last_metrics(run_dir)
    assert m["step"] == STEPS
    assert m["loss"] == pytest.approx(ref["final_loss"], rel=1e-6, abs=1e-7), (m["loss"], ref["final_loss"])
    node_logs = "".join(p.read_text() for p in (run_dir / "logs").glob("node*.log"))
    result = json.loads([ln for ln in node_logs.splitlines() if ln.startswith('{"status"')][-1])
    assert result["param_checksum"] == pytest.approx(ref["param_checksum"], rel=1e-9)
    # two nodes, one launcher each: both node logs exist, and the batch log names the rendezvous
    assert sorted(p.name for p in (run_dir / "logs").glob("node*.log")) == ["node0.log", "node1.log"]
    batch_log = next((run_dir / "logs").glob("slurm-*.out")).read_text()
    assert "node[1-2]" in batch_log and "rendezvous node1:" in batch_log
    # spaces, quotes, $(...) and backticks were data: nothing was executed anywhere
    for d in (tmp_path, out, run_dir, home, Path.cwd()):
        assert not list(d.glob("PWNED*")), d
    # the job name is the run id made of the model name: only letters, digits and '-' reach Slurm
    sc = subprocess.run(["scontrol", "show", "job", "-o", _job_id(handle)], capture_output=True, text=True)
    assert re.search(r"JobName=tiny-+touch-pwned3-+q-[0-9a-f]{8} ", sc.stdout), sc.stdout


@pytest.mark.timeout(600)
def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, home, tmp_path, tmp_path_factory):
    ref = reference_run(tmp_path_factory)
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", *TRAIN, *TWO_NODES, f"train.output_dir={tmp_path}"], home)
    handle = submit_handle(r)
    run_dir = Path(status(handle, home)["run_dir"])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    step = 0
    while step < 20:                                 # preempt once training is under way
        assert time.monotonic() < deadline, "training did not start"
        try:
            step = json.loads(metrics.read_text().splitlines()[-1])["step"]
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.1)
    assert step < STEPS - 20, f"training ran too fast to preempt in the middle (step {step})"
    # what a scheduler's preemption notice looks like: USR2 to the batch script
    subprocess.run(["scancel", "--signal=USR2", "--batch", _job_id(handle)], check=True)
    st = wait_for(handle, home, lambda s: s["state"] != "running", timeout=120, every=0.5)
    assert st["state"] == "requeued" and st["restarts"] == 1, st
    # Slurm holds a requeued batch job until its old credential expires (BeginTime; cred_expire,
    # 120 s by default, 15 s on the test cluster), then starts it again
    st = wait_for(handle, home, lambda s: s["state"] not in ("pending", "requeued", "running"), timeout=300)
    batch_log = next((run_dir / "logs").glob("slurm-*.out")).read_text()
    assert st["state"] == "succeeded" and st["restarts"] == 1, (st, batch_log)
    stopped = [ln for ln in batch_log.splitlines() if "stopped at checkpoint step_" in ln]
    assert len(stopped) == 1, batch_log
    stop_step = int(stopped[0].split("step_")[1].split(";")[0])
    assert 20 <= stop_step < STEPS
    assert "attempt 2" in batch_log
    # every step trained exactly once: 1..stop_step in the first attempt, stop_step+1..STEPS after the requeue
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert last_metrics(run_dir)["loss"] == pytest.approx(ref["final_loss"], rel=1e-6, abs=1e-7)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


@pytest.mark.timeout(300)
def test_cancel_maps_to_cancelled(slurm_cluster, home, tmp_path):
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", "train.steps=10000000", *TWO_NODES,
                   f"train.output_dir={tmp_path}"], home)
    handle = submit_handle(r)
    wait_for(handle, home, lambda s: s["state"] == "running", timeout=120, every=0.5)
    # `meshpilot status/logs/cancel` take the handle (`meshpilot submit --status/--logs/--cancel` are aliases)
    cancel_running(handle, home)
    assert meshpilot(["submit", "--cancel", handle], home).returncode == 0
    r = meshpilot(["logs", handle, "--rank", "1"], home)          # rank 1 runs on the second node
    assert r.returncode == 0 and "node1.log <==" in r.stdout and r.stdout.count("==> ") == 1, r.stdout + r.stderr
    r = meshpilot(["logs", handle, "--follow"], home)             # ended: the batch log and both nodes' logs
    assert r.returncode == 0 and "slurm-" in r.stdout and "node0.log" in r.stdout, r.stdout + r.stderr
    listed = meshpilot(["submit", "--list", "--json"], home)
    assert handle in [s["handle"] for s in json.loads(listed.stdout)]
    listed = meshpilot(["status", "--json"], home)
    assert (handle, "slurm", "cancelled") in [(s.get("handle"), s.get("backend"), s["state"]) for s in json.loads(listed.stdout)]


@pytest.mark.timeout(300)
def test_time_limit_maps_to_timeout(slurm_cluster, timeout_job, home):
    handle, out = timeout_job
    st = wait_for(handle, home, lambda s: s["state"] in ("succeeded", "failed", "cancelled", "timeout", "node_fail"),
                  timeout=240, every=2)
    assert st["state"] == "timeout" and st["native_state"] == "TIMEOUT", st
    run_dir = Path(st["run_dir"])
    batch_log = next((run_dir / "logs").glob("slurm-*.out")).read_text()
    assert "requeue(s) are used; not requeueing" in batch_log, batch_log
    # Slurm's SIGTERM at the limit reached the worker, which checkpointed before KillWait ran out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_") and int(latest[5:]) > 0
