"""Helpers of the ``meshpilot submit`` tests (no tests here): the tiny job they all submit, running the
command line in a subprocess, and the reference final loss of that job under ``meshpilot run``,
computed once per test session and cached in pytest's session temp folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
STEPS = 300
# quickstart (tiny llama, dp=2 CPU workers over gloo, demo corpus) with more steps: long enough
# (~6 s of training on 2 cores) for a preemption signal to land in the middle
TRAIN = [f"train.steps={STEPS}", "train.checkpoint_every=100"]
ONE_NODE = ["cluster.nodes=1", "cluster.gpus_per_node=2", "cluster.cpu_cores=2"]
TWO_NODES = ["cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.cpu_cores=1"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, MESHPILOT_HOME=str(home), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    for k in ("RAY_ADDRESS", "MESHPILOT_FAIL_AT_STEP", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
              "LOCAL_RANK"):
        env.pop(k, None)
    env.update(extra)
    return env


def meshpilot(args: list[str], home: Path, *, timeout: float = 300, cwd: Path | None = None,
              **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=cli_env(home, **env), cwd=cwd or home)


def submit_handle(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("submitted: ")]
    assert lines, r.stdout
    return lines[0].split(": ", 1)[1].strip()


def status(handle: str, home: Path) -> dict[str, Any]:
    r = meshpilot(["submit", "--status", handle, "--json"], home, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def wait_for(handle: str, home: Path, done: Callable[[dict[str, Any]], bool], timeout: float,
             every: float = 1.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st = status(handle, home)
    while not done(st):
        assert time.monotonic() < deadline, f"{handle} still {st} after {timeout} s"
        time.sleep(every)
        st = status(handle, home)
    return st


def reference_run(tmp_path_factory) -> dict[str, Any]:
    """summary.json of the job under ``meshpilot run`` (one node, 2 CPU workers), once per session."""
    base = tmp_path_factory.getbasetemp()
    cache = base / "submit-reference-summary.json"
    if cache.exists():
        return json.loads(cache.read_text())
    home = base / "submit-reference"
    home.mkdir(exist_ok=True)
    run_dir = home / "run"
    r = meshpilot(["run", QUICKSTART, *TRAIN, *ONE_NODE, "--run-dir", run_dir, "--no-progress"], home, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    cache.write_text(json.dumps(summary, default=str))
    return summary


def last_metrics(run_dir: Path) -> dict[str, Any]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def cancel_running(handle: str, home: Path) -> dict[str, Any]:
    """`meshpilot status` of a running submitted job says running; `cancel` ends it as cancelled
    (the scheduler's CANCELLED) and a second `cancel` is a no-op. Returns the final status."""
    r = meshpilot(["status", handle, "--json"], home)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "running", r.stdout + r.stderr
    r = meshpilot(["cancel", handle], home)
    assert r.returncode == 0 and "cancel requested" in r.stdout, r.stdout + r.stderr
    st = wait_for(handle, home, lambda s: s["state"] != "running", timeout=120, every=0.5)
    assert st["state"] == "cancelled" and st["native_state"] == "CANCELLED", st
    r = meshpilot(["cancel", handle], home)                       # idempotent
    assert r.returncode == 0 and "nothing to cancel" in r.stdout, r.stdout + r.stderr
    return st
