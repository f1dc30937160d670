"""`meshpilot run` end to end: real local Ray, real CPU worker processes over gloo, the real
training worker (meshpilot.orchestrator.train.worker.run_worker with DeepSpeed), driven through the
CLI in subprocesses, as a user would.

One Ray cluster (6 CPU slots) is started for the module by a holder process and runs connect
to it with --address; the README's quickstart runs with its own embedded Ray. The reference
for the recovered runs is an uninterrupted run of the same job (same data, same seed):
final loss and parameter checksum must be equal.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_cluster import held_ray_cluster, subprocess_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
# small and quick: 60 short steps (long enough to kill a worker mid-run), checkpoints every 10,
# fp32 so tensor parallelism can be compared with dp
STEPS, EVERY = 60, 10
COMMON = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.seq_len=32", "train.precision=fp32"]

def _env(home: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(home, **extra)


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    with held_ray_cluster(tmp_path_factory.mktemp("holder")) as addr:
        yield addr


def _start(args: list[str], home: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(home, **env))


def _finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from the worker's metrics.jsonl (first occurrence: a restart repeats steps)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(int(rec["step"]), float(rec["loss"]))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_address):
    """Side by side: the quickstart (2 workers, embedded Ray), the same job with one worker
    SIGKILLed at a random step, and the tp=2 x dp=2 job (both on the shared cluster)."""
    base = tmp_path_factory.mktemp("runs")
    home = base / "home"
    ref_dir, kill_dir, tp_dir = base / "reference", base / "killed", base / "tp2dp2"
    ref = _start([str(QUICKSTART), *COMMON, "--run-dir", str(ref_dir), "--no-progress"], home)
    killed = _start([str(QUICKSTART), *COMMON, "--run-dir", str(kill_dir), "--address", ray_address,
                     "--backoff", "0.5", "--no-progress"], home)
    # tp = 2 x dp = 2 on 4 workers; rank 3 kills itself after step 16 (MESHPILOT_FAIL_AT_STEP hook)
    tp = _start([str(QUICKSTART), *COMMON, "cluster.gpus_per_node=4", "plan.tp=2", "plan.dp=2",
                 "--run-dir", str(tp_dir), "--address", ray_address, "--backoff", "0.5", "--no-progress"],
                home, MESHPILOT_FAIL_AT_STEP="3:16")
    # after the first checkpoint and early: state.json can trail the workers by more than ten steps of this
    # tiny model, and the kill must land while they still train
    kill_step = random.Random().randint(EVERY + 1, 2 * EVERY - 1)
    st = _wait_for(lambda: (s := _state(kill_dir)).get("step", 0) >= kill_step and s.get("attempt") == 0 and s,
                   420, f"step {kill_step}", killed)
    victim_rank = random.Random().randint(0, 1)
    victim = st["worker_pids"][victim_rank]
    os.kill(victim, signal.SIGKILL)
    # the newest complete checkpoint when the kill landed: a later one needs the dead rank's files
    latest = kill_dir / "checkpoints" / "latest"
    killed_at = int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else 0
    rc_k, out_k = _finish(killed)
    rc_r, out_r = _finish(ref)
    rc_t, out_t = _finish(tp)
    return dict(home=home, ref=(rc_r, out_r, ref_dir), killed=(rc_k, out_k, kill_dir, victim, victim_rank, killed_at),
                tp=(rc_t, out_t, tp_dir))


def test_two_worker_quickstart_runs_end_to_end(runs):
    rc, out, d = runs["ref"]
    assert rc == 0, out
    s = _summary(d)
    assert s["status"] == "succeeded" and s["restarts"] == 0 and s["world_size"] == 2
    assert len(s["results"]) == 2 and {r["rank"] for r in s["results"]} == {0, 1}
    # both dp ranks hold the same parameters and agree on the loss
    assert s["results"][0]["param_checksum"] == s["results"][1]["param_checksum"]
    assert s["results"][0]["final_loss"] == pytest.approx(s["results"][1]["final_loss"], rel=1e-9)
    assert s["tokens_per_s"] and s["tokens_per_s"] > 0 and s["time_to_first_step_s"] > 0
    assert all(v and v > 0 for v in s["peak_memory_gib"].values())
    # CPU workers: no device memory (NVML and torch's CUDA peaks unknown), the host RSS peak is the kept peak
    for r, peaks in s["memory_peaks_gib"].items():
        assert set(peaks) == {"nvml", "allocated", "reserved", "host_rss"}
        assert peaks["nvml"] is None and peaks["reserved"] is None and peaks["host_rss"] > 0
        assert s["peak_memory_gib"][r] == peaks["host_rss"]
    text = " ".join(out.split())
    assert "rank 1: host RSS peak (GiB)" in text and "rank 0: peak GPU memory, NVML (GiB)" in text
    # the printed progress (plain lines: --no-progress) ends at the final step, with its ETA
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert progress and progress[-1].startswith(f"step {STEPS}/{STEPS}  loss ") and "ETA 0:00:00" in progress[-1], out
    assert all(" tokens/s " in line and " ETA " in line for line in progress)
    # command -> first step in phases that add up, in summary.json and in the printed summary
    phases = s["startup_phases_s"]
    assert {"Ray start / connect", "placement group", "worker: imports (torch)"} <= set(phases), phases
    assert sum(phases.values()) == pytest.approx(s["time_to_first_step_s"], abs=0.05)
    assert "Ray start / connect (s)" in text
    st = _state(d)
    assert st["state"] == "succeeded" and st["step"] == STEPS
    assert [e["new"] for e in map(json.loads, (d / "events.jsonl").read_text().splitlines())
            if e["event"] == "transition"] == ["scheduling", "running", "succeeded"]
    for r in (0, 1):
        assert "===== attempt 0 rank %d" % r in (d / "logs" / f"rank{r}.log").read_text()
    assert "run summary" in out


def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted_run(runs):
    rc, out, d, victim, victim_rank, killed_at = runs["killed"]
    assert rc == 0, out
    s, ref = _summary(d), _summary(runs["ref"][2])
    assert s["status"] == "succeeded" and s["restarts"] == 1 and s["attempts"] == 2, s["failures"]
    assert s["failures"] and s["failures"][0].split(":")[0] in ("worker_died", "worker_error")
    assert not _alive(victim)
    # resumed from the latest complete checkpoint, not from 0. `killed_at` is the step that `latest` named
    # right after the kill; the checkpoint after it can still complete when the victim had already written
    # its part of it before the signal landed (rank 0 then renames it), never a later one
    start = s["results"][0]["start_step"]
    assert start % EVERY == 0 and EVERY <= start and start in (killed_at, killed_at + EVERY), (start, killed_at)
    assert s["final_loss"] == ref["final_loss"]
    assert s["param_checksum"] == ref["param_checksum"]
    assert "===== attempt 1 rank" in (d / "logs" / f"rank{victim_rank}.log").read_text()
    events = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
    assert [e["new"] for e in events if e["event"] == "transition"] == \
        ["scheduling", "running", "restarting", "scheduling", "running", "succeeded"]


def test_tp2_dp2_four_workers_with_injected_failure(runs):
    rc, out, d = runs["tp"]
    assert rc == 0, out
    s, ref = _summary(d), _summary(runs["ref"][2])
    assert s["status"] == "succeeded" and s["world_size"] == 4 and s["plan"].startswith("dp=2 tp=2")
    assert s["restarts"] == 1 and "rank 3" in s["failures"][0]
    assert s["results"][0]["start_step"] == 10
    # tensor parallelism computes the same function as the dp=2 reference (same data, seed, batch
    # and initial weights): the first steps agree to fp32 reduction order; Adam then lets the
    # rounding differences grow slowly, so the end of the run agrees more loosely
    tp_loss, ref_loss = _losses(d), _losses(runs["ref"][2])
    for step in (1, 2, 3):
        assert tp_loss[step] == pytest.approx(ref_loss[step], rel=1e-4), step
    assert s["final_loss"] == pytest.approx(ref["final_loss"], rel=2e-2)
    assert s["param_checksum"] == pytest.approx(ref["param_checksum"], rel=2e-2)
    logs = (d / "logs" / "rank3.log").read_text()
    assert "failure injection: SIGKILL after step 16" in logs and "===== attempt 1 rank 3" in logs
    # the injection hits the first attempt only: ranks 0..2 were not killed
    assert "failure injection" not in (d / "logs" / "rank0.log").read_text()


def test_frozen_worker_is_detected_by_its_heartbeat(runs, tmp_path, ray_address):
    """Rank 1 SIGSTOPs itself after step 12 (failure injection ``stop``: at a fixed step, where a
    SIGSTOP sent from here could arrive after the 60 short steps had ended): its process lives
    but answers nothing; the controller must notice the stale heartbeat, tear the gang down
    (SIGKILL reaches a stopped process) and recover."""
    run_dir = tmp_path / "frozen"
    p = _start([str(QUICKSTART), *COMMON, "--run-dir", str(run_dir), "--address", ray_address,
                "--heartbeat-timeout", "15", "--backoff", "0.5", "--no-progress"], runs["home"],
               MESHPILOT_FAIL_AT_STEP=f"1:{EVERY + 2}:stop")
    st = _wait_for(lambda: (s := _state(run_dir)).get("worker_pids") and s.get("attempt") == 0 and s,
                   420, "the first gang's workers", p)
    frozen = st["worker_pids"][1]
    rc, out = _finish(p)
    assert rc == 0, out
    s, ref = _summary(run_dir), _summary(runs["ref"][2])
    assert s["restarts"] == 1 and s["failures"][0].startswith("heartbeat_stale: rank 1"), s["failures"]
    assert s["final_loss"] == ref["final_loss"] and s["param_checksum"] == ref["param_checksum"]
    assert not _alive(frozen)


def test_hung_collective_is_detected_by_the_step_timeout(runs, tmp_path, ray_address):
    """Rank 1 stops training after step 12 while its actor keeps answering heartbeats, so rank 0
    waits in the next step's all-reduce: a hang that only the step timeout can see. The gang
    is torn down and restarted from the step-10 checkpoint, and ends where an uninterrupted run
    ends."""
    run_dir = tmp_path / "hung"
    p = _start([str(QUICKSTART), *COMMON, "--run-dir", str(run_dir), "--address", ray_address,
                "--step-timeout", "15", "--backoff", "0.5", "--no-progress"], runs["home"],
               MESHPILOT_FAIL_AT_STEP=f"1:{EVERY + 2}:hang")
    rc, out = _finish(p)
    assert rc == 0, out
    s, ref = _summary(run_dir), _summary(runs["ref"][2])
    assert s["restarts"] == 1 and s["failures"][0].startswith("step_timeout"), s["failures"]
    assert s["final_loss"] == ref["final_loss"] and s["param_checksum"] == ref["param_checksum"]
    logs = (run_dir / "logs" / "rank1.log").read_text()
    assert f"failure injection: hanging after step {EVERY + 2}" in logs and "===== attempt 1 rank 1" in logs


def test_status_and_logs_from_another_shell(runs):
    d = runs["ref"][2]
    env = _env(runs["home"])
    st = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "status"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and d.name in st.stdout and "succeeded" in st.stdout
    one = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "status", d.name, "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert json.loads(one.stdout)["state"] == "succeeded"
    lg = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "logs", d.name, "--rank", "1"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert lg.returncode == 0 and "===== attempt 0 rank 1" in lg.stdout


def test_cancel_from_a_second_process(tmp_path, ray_address):
    run_dir = tmp_path / "cancelled"
    p = _start([str(QUICKSTART), "train.steps=100000", "train.seq_len=32", "train.precision=fp32",
                "--run-dir", str(run_dir), "--address", ray_address, "--no-progress"], tmp_path / "home")
    st = _wait_for(lambda: (s := _state(run_dir)).get("step", 0) >= 2 and s, 420, "step 2", p)
    c = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "cancel", run_dir.name, "--wait", "120"],
                       env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=180)
    rc, out = _finish(p, timeout=120)
    assert c.returncode == 0, c.stdout + c.stderr
    assert rc == 3, out
    final = _state(run_dir)
    assert final["state"] == "cancelled" and final["step"] < 100000
    assert not any(_alive(pid) for pid in st["worker_pids"])
    assert (run_dir / "cancel").exists()


def test_unplaceable_job_fails_with_what_is_missing(tmp_path, ray_address):
    p = _start([str(QUICKSTART), "cluster.nodes=2", "cluster.gpus_per_node=4", "plan.dp=8", "train.global_batch=8",
                "--run-dir", str(tmp_path / "big"), "--address", ray_address, "--placement-timeout", "5"],
               tmp_path / "home")
    rc, out = _finish(p, timeout=180)
    assert rc == 1, out
    assert "needs 8 CPUs in bundles of 1 on at most 2 nodes; the cluster has 6 CPUs" in " ".join(out.split())
    assert _state(tmp_path / "big")["state"] == "failed"


def test_a_cluster_describing_more_host_memory_than_this_machine_is_refused_before_ray_starts(tmp_path):
    """The job says each node has 100,000 GiB of host memory (and CPU workers of 100,000 GiB), so the simulator calls
    llama-2-13b on two CPU workers a fit; this machine has far less, and an embedded run trains here: refused with
    exit 2 naming the key and this machine's memory (orchestrator/run/machine_check.py), before Ray starts."""
    from meshpilot.orchestrator.config.node_limits import node_memory
    host = node_memory().total_bytes / 2**30
    t0 = time.time()
    p = _start([str(QUICKSTART), "model=llama-2-13b", "cluster.cpu_memory_gib=100000", "cluster.gpu.memory_gib=100000",
                "--run-dir", str(tmp_path / "big")], tmp_path / "home")
    rc, out = _finish(p, timeout=120)
    flat = " ".join(out.split())
    assert rc == 2, out
    assert "cluster.cpu_memory_gib=100000 but this machine has" in flat and f"{host:.1f} GiB" in flat
    assert "starting Ray" not in out and not (tmp_path / "big").exists()
    assert time.time() - t0 < 60


@pytest.mark.parametrize("override,needle", [
    ("plan.tp=3", "plan.tp=3"),                       # tp must divide the heads
    ("model=llama-2-7b", "does not fit"),             # the simulator refuses it (7B on CPU workers)
])
def test_bad_config_is_refused_before_ray_starts(tmp_path, override, needle):
    t0 = time.time()
    p = _start([str(QUICKSTART), override, "--run-dir", str(tmp_path / "bad")], tmp_path / "home")
    rc, out = _finish(p, timeout=120)
    assert rc == 2, out
    assert needle in out and "meshpilot: error:" in out
    # nothing was started or created (the error may name Ray's memory threshold, so look for what starting it prints)
    assert "starting Ray" not in out and "Started a local Ray" not in out and not (tmp_path / "bad").exists()
    assert time.time() - t0 < 60
