"""Out of memory is classified and never retried with the same plan.

The controller and the session are driven with a fake worker group injecting each failure kind
(a CUDA OOM, Ray's memory monitor, a SIGKILL): a fixed plan stops with exit status 4, ``plan:
auto`` falls back to a smaller plan and succeeds, the fallback limit ends the run cleanly, and the
final state is terminal in every case. Ray's errors are classified by launch.group's functions
(built by hand, no cluster). One slow test runs `meshpilot run` on real Ray with a worker that
raises torch's OutOfMemoryError (on CPU, by hand).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_group import ScriptedGroup

from meshpilot.orchestrator.cli.cmd_run import EXIT_OUT_OF_MEMORY, exit_code
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.run.controller import Controller, FailurePolicy
from meshpilot.orchestrator.run.protocol import (Failure, FailureKind, GroupPoll, JobStatus, classify_oom_text,
                                                 oom_failure)
from meshpilot.orchestrator.run.session import RunSession, plan_job
from meshpilot.orchestrator.sim.simulator import simulate

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

CUDA_OOM = Failure(FailureKind.GPU_OOM, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", rank=1,
                   retryable=False, memory_peak_gib=79.5)
RAY_OOM = Failure(FailureKind.HOST_OOM, "Ray's memory monitor killed the worker: Task was killed due to the node "
                  "running low on memory.", rank=0, retryable=False)
SIGKILL_NEAR_LIMIT = Failure(FailureKind.HOST_OOM, "worker died (SIGKILL, probably the kernel's OOM killer) with "
                             "the node's memory 98% used", rank=1, retryable=False)
OOMS = [CUDA_OOM, RAY_OOM, SIGKILL_NEAR_LIMIT]


def _ok(n: int = 2) -> GroupPoll:
    return GroupPoll(results=[{"rank": r, "step": 30, "final_loss": 1.0} for r in range(n)])


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def _run(tmp_path, overrides: list[str], scripts: list[list[GroupPoll]], **kw):
    """Run a session whose k-th built group replays scripts[k] (one start each)."""
    job = load_job(str(QUICKSTART), overrides)
    plan, est = plan_job(job)
    built: list[ScriptedGroup] = []

    def make_group(run_dir, log_path, plan=plan):
        built.append(ScriptedGroup([scripts[len(built)]], run_dir, plan=plan))
        return built[-1]

    session = RunSession.create(job, plan, est, job_path=str(QUICKSTART), run_dir=str(tmp_path / "run"))
    try:
        outcome = session.run(make_group, FailurePolicy(max_restarts=3, backoff_s=0.0), **kw)
        summary = session.finish(outcome)
    finally:
        session.close()
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    return job, plan, est, outcome, summary, state, built


# --- classification -------------------------------------------------------------------------

def test_oom_texts_are_classified():
    assert classify_oom_text("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB") is FailureKind.GPU_OOM
    # DeepSpeed's wrapping keeps the original message
    assert classify_oom_text("RuntimeError: [deepspeed] allocation failed: CUDA out of memory.") is FailureKind.GPU_OOM
    assert classify_oom_text("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on "
                             "memory.") is FailureKind.HOST_OOM
    assert classify_oom_text("MemoryError: ") is FailureKind.HOST_OOM
    assert classify_oom_text("ValueError: bad shape") is None
    # Ray's generic death message lists the OOM killer only as a possible cause: not an OOM by itself
    assert classify_oom_text("Some common causes include: (1) the process was killed by the OOM killer due to high "
                             "memory usage") is None
    assert all(oom_failure(f) for f in OOMS)
    assert not oom_failure(Failure(FailureKind.WORKER_DIED, "SIGKILL"))


def test_ray_errors_and_exit_signals_are_classified(monkeypatch):
    torch = pytest.importorskip("torch")
    import meshpilot.launch.group as g
    from ray.exceptions import ActorDiedError, OutOfMemoryError, RayTaskError

    assert g.classify_failure(RuntimeError("x"), torch.OutOfMemoryError("boom")) is FailureKind.GPU_OOM
    task_err = RayTaskError("run", "Traceback ...\nRuntimeError: CUDA out of memory.", RuntimeError("wrapped"))
    assert g.classify_failure(task_err, RuntimeError("DeepSpeed: CUDA out of memory.")) is FailureKind.GPU_OOM
    assert g.classify_failure(OutOfMemoryError("Task was killed due to the node running low on memory.")) \
        is FailureKind.HOST_OOM
    assert g.classify_failure(RuntimeError("x"), MemoryError()) is FailureKind.HOST_OOM
    assert g.classify_failure(RuntimeError("x"), ValueError("nan")) is None

    grp = g.RayWorkerGroup.__new__(g.RayWorkerGroup)
    grp._pids, grp._nodes = [100, 101], ["10.0.0.1", "10.0.0.1"]
    monkeypatch.setattr(g, "_node_ip", lambda: "10.0.0.1")
    monitor = ActorDiedError()
    monitor.error_msg = ("The actor died unexpectedly before finishing this task.\nTask was killed due to the node "
                         "running low on memory.\nMemory on the node (IP: 10.0.0.1) was 60GB used / 62GB limit")
    monkeypatch.setattr(type(monitor), "__str__", lambda self: self.error_msg)
    f = grp._death(1, monitor)
    assert f.kind is FailureKind.HOST_OOM and not f.retryable and "running low on memory" in f.message

    sigkill = ActorDiedError()
    sigkill.error_msg = ("A worker died or was killed while executing a task by an unexpected system error. Some "
                         "common causes include: (1) the process was killed by the OOM killer due to high memory usage")
    monkeypatch.setattr(g, "host_memory_fraction", lambda: 0.99)     # the node's memory near its limit
    assert grp._death(0, sigkill).kind is FailureKind.HOST_OOM
    monkeypatch.setattr(g, "host_memory_fraction", lambda: 0.40)     # a kill -9 cannot be told from the OOM killer
    f = grp._death(0, sigkill)
    assert f.kind is FailureKind.WORKER_DIED and f.retryable


def test_a_memory_monitor_kill_inside_a_progress_probe_is_left_to_the_run_future(monkeypatch):
    """Ray's memory monitor may kill a worker while it answers a progress probe; ``ray.get`` of that probe then raises
    ``ray.exceptions.OutOfMemoryError`` (seen on 1 x H200, benchmarks/results/2026-12-01-s10-h200x1 call 1: an
    unhandled traceback before this). The poll must go on, so that the run future's failure is classified host_oom.
    The kill itself cannot be timed here: ``ray.wait``/``ray.get`` answer for the probe as Ray did there."""
    pytest.importorskip("torch")
    import meshpilot.launch.group as g
    from ray.exceptions import OutOfMemoryError

    class Probe:
        def remote(self):
            return "next-probe"

    class Actor:
        progress = Probe()

    grp = g.RayWorkerGroup.__new__(g.RayWorkerGroup)
    grp._actors, grp._probes, grp._last_step = [Actor()], {0: ("killed-probe", 0.0)}, -1

    def get(ref, timeout=None):
        assert ref == "killed-probe"
        raise OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.")
    monkeypatch.setattr(g.ray, "wait", lambda refs, timeout=None: (list(refs), []))
    monkeypatch.setattr(g.ray, "get", get)
    assert grp._check_progress() is None
    assert 0 not in grp._probes                       # a dead worker is not probed again; its run future reports it

    def get_other(ref, timeout=None):
        raise ValueError("a bug in the probe itself")
    grp._probes = {0: ("killed-probe", 0.0)}
    monkeypatch.setattr(g.ray, "get", get_other)
    with pytest.raises(ValueError):                   # anything else is not swallowed
        grp._check_progress()


# --- the controller -------------------------------------------------------------------------

@pytest.mark.parametrize("failure", OOMS, ids=["cuda", "ray_monitor", "sigkill_near_limit"])
def test_controller_never_retries_an_oom_without_a_handler(failure):
    group = ScriptedGroup([[GroupPoll(failure=failure)], [_ok()]])
    seen = []
    ctl = Controller(group, FailurePolicy(max_restarts=3, backoff_s=0.0), sleep=lambda s: None,
                     on_transition=lambda o, n, r, i: seen.append((n.value, i)))
    out = ctl.run()
    assert out.status is JobStatus.FAILED and out.out_of_memory and out.restarts == 0
    assert group.starts == [0]
    assert seen[-1][1]["failure"] == failure.kind.value and seen[-1][1]["out_of_memory"]
    assert exit_code(out.status, out.out_of_memory) == EXIT_OUT_OF_MEMORY == 4


def test_a_sigkill_without_memory_pressure_is_still_restarted():
    group = ScriptedGroup([[GroupPoll(failure=Failure(FailureKind.WORKER_DIED, "SIGKILL", rank=1))], [_ok()]])
    out = Controller(group, FailurePolicy(max_restarts=3, backoff_s=0.0), sleep=lambda s: None).run()
    assert out.status is JobStatus.SUCCEEDED and out.restarts == 1 and not out.out_of_memory


# --- the session: a fixed plan stops --------------------------------------------------------

@pytest.mark.parametrize("failure", OOMS, ids=["cuda", "ray_monitor", "sigkill_near_limit"])
def test_fixed_plan_stops_on_oom_with_peaks_and_suggestions(tmp_path, monkeypatch, failure):
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    job, plan, est, out, summary, state, built = _run(tmp_path, [], [[GroupPoll(failure=failure)], [_ok()]])
    assert not job.plan.auto
    assert len(built) == 1 and built[0].starts == [0]                       # no retry of the same plan
    assert out.status is JobStatus.FAILED and out.out_of_memory and out.restarts == 0 and out.fallbacks == 0
    assert exit_code(out.status, out.out_of_memory) == 4
    assert state["state"] == "failed" and summary["out_of_memory"]
    msg = state["message"]
    assert f"out of memory ({failure.kind.value})" in msg and "Suggestions:" in msg
    assert f"{est.peak_memory_gib:.2f} GiB per GPU" in msg
    assert ("measured peak 79.50 GiB" if failure.memory_peak_gib else "measured peak -") in msg
    ev = _events(tmp_path / "run")
    oom = [e for e in ev if e["event"] == "oom"]
    assert len(oom) == 1 and oom[0]["decision"] == "stop" and oom[0]["failure"] == failure.kind.value
    assert oom[0]["predicted_peak_gib"] == pytest.approx(est.peak_memory_gib)
    assert [e["new"] for e in ev if e["event"] == "transition"] == ["scheduling", "running", "failed"]


# --- the session: plan auto falls back ------------------------------------------------------

@pytest.mark.parametrize("failure", OOMS, ids=["cuda", "ray_monitor", "sigkill_near_limit"])
def test_auto_plan_falls_back_to_a_plan_with_a_lower_peak_and_succeeds(tmp_path, monkeypatch, failure):
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    job, plan, est, out, summary, state, built = _run(tmp_path, ["plan=auto"], [[GroupPoll(failure=failure)],
                                                                                 [_ok()]])
    assert job.plan.auto and len(built) == 2
    first, second = built[0].plan, built[1].plan
    assert first == plan and second != plan                                  # never the failed plan again
    new_est = simulate(job, second)
    if failure.kind is FailureKind.GPU_OOM:
        assert new_est.peak_memory_gib < est.peak_memory_gib
    else:
        assert new_est.cpu_memory_gib_per_node < est.cpu_memory_gib_per_node
    assert out.status is JobStatus.SUCCEEDED and out.fallbacks == 1 and not out.out_of_memory
    assert state["state"] == "succeeded" and state["plan"] == second.describe() and summary["plan"] == second.describe()
    # a different plan cannot load the old checkpoints: a fresh folder
    assert Path(built[1].run_dir).name.startswith("fallback-1-") and Path(built[1].run_dir).is_dir()
    ev = _events(tmp_path / "run")
    oom = [e for e in ev if e["event"] == "oom"]
    assert len(oom) == 1 and oom[0]["decision"] == "fallback" and oom[0]["new_plan"] == second.describe()
    assert oom[0]["resume"] is False
    assert [e["new"] for e in ev if e["event"] == "transition"] == \
        ["scheduling", "running", "restarting", "scheduling", "running", "succeeded"]


def test_fallback_limit_ends_the_run_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    job, plan, est, out, summary, state, built = _run(
        tmp_path, ["plan=auto"], [[GroupPoll(failure=CUDA_OOM)]] * 4, max_fallbacks=2)
    assert len(built) == 3                                                   # the plan and two fallbacks
    assert len({b.plan.describe() for b in built}) == 3
    peaks = [simulate(job, b.plan).peak_memory_gib for b in built]
    assert peaks[0] > peaks[1] > peaks[2]
    assert out.status is JobStatus.FAILED and out.out_of_memory and out.fallbacks == 2
    assert exit_code(out.status, out.out_of_memory) == 4
    assert state["state"] == "failed" and "--max-fallbacks=2" in state["message"]
    decisions = [e["decision"] for e in _events(tmp_path / "run") if e["event"] == "oom"]
    assert decisions == ["fallback", "fallback", "stop"]


def test_zero_fallbacks_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    *_, out, summary, state, built = _run(tmp_path, ["plan=auto"], [[GroupPoll(failure=RAY_OOM)], [_ok()]],
                                          max_fallbacks=0)
    assert len(built) == 1 and out.status is JobStatus.FAILED and out.out_of_memory
    assert state["state"] == "failed"


def test_run_help_documents_the_oom_exit_status():
    import argparse

    from meshpilot.orchestrator.cli import cmd_run
    p = argparse.ArgumentParser()
    cmd_run.add_parser(p.add_subparsers())
    sub = p._subparsers._group_actions[0].choices["run"]
    text = sub.format_help()
    assert "4  out of memory" in text and "--max-fallbacks" in text


# --- real Ray --------------------------------------------------------------------------------

def oom_worker(job, plan, *, rank, world_size, local_rank, master_addr, master_port, run_dir, on_step, stop_event):
    """A worker function that runs out of GPU memory at its first step (torch's error, raised by hand on CPU)."""
    import torch
    on_step(1, {"loss": 1.0})
    if rank == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")
    stop_event.wait(60)
    return {"rank": rank, "status": "stopped", "step": 1}


@pytest.mark.slow
def test_meshpilot_run_stops_on_a_worker_cuda_oom_with_exit_4(tmp_path):
    pytest.importorskip("torch")
    from ray_cluster import subprocess_env
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", str(QUICKSTART), "train.steps=5",
                        "--run-dir", str(run_dir), "--no-progress", "--worker", "test_oom_fallback:oom_worker",
                        "--backoff", "0"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 4, out
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "failed" and state["attempt"] == 0 and state["restarts"] == 0
    assert "out of memory (gpu_oom)" in state["message"]
    assert "Traceback" not in p.stdout
    oom = [e for e in _events(run_dir) if e["event"] == "oom"]
    assert len(oom) == 1 and oom[0]["decision"] == "stop" and oom[0]["failure"] == "gpu_oom"


def test_fallback_needs_the_error_the_failure_showed_in_the_failed_plans_regime():
    """A GPU OOM at predicted peak P on a card of C GiB shows an error of at least C/P - 1
    (by hand below). Plans of the failed plan's regime must then fit with that error; plans of
    other regimes keep their own measured bands. With an error no plan of the regime can carry,
    the fallback leaves the regime."""
    from meshpilot.orchestrator.run.session import fallback_plan, observed_error
    from meshpilot.orchestrator.sim.error_bands import regime_of
    job = load_job(None, ["model=llama-2-13b", "cluster=h100-sxm-4", "cluster.gpus_per_node=2", "plan=auto",
                          "train.global_batch=8", "train.seq_len=2048"])
    res_plan = plan_job(job)[0]
    est = simulate(job, res_plan, headroom=0.05)
    err = observed_error(job, FailureKind.GPU_OOM, est.peak_memory_gib, None)
    assert err == pytest.approx(job.cluster.gpu.memory_gib / est.peak_memory_gib - 1)
    assert observed_error(job, FailureKind.GPU_OOM, 50.0, 100.0) == pytest.approx(1.0)     # measured above the card
    cap = job.cluster.gpu.memory_gib * 0.95
    new, new_est = fallback_plan(job, [res_plan], FailureKind.GPU_OOM, est.peak_memory_gib, regime=est.regime, error=err)
    assert new_est.peak_memory_gib < est.peak_memory_gib
    if regime_of(new, 2) == est.regime:
        assert new_est.peak_memory_gib * (1 + err) <= cap
    out = fallback_plan(job, [res_plan], FailureKind.GPU_OOM, est.peak_memory_gib, regime=est.regime, error=100.0)
    assert out is None or regime_of(out[0], 2) != est.regime
