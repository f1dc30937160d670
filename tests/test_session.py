"""The run session (meshpilot.orchestrator.run.session) against a fake worker group: plan and fit
check, run directory and state, summary with the memory peaks; and the summary table that
`meshpilot run` prints. No Ray, no worker processes."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fake_group import ScriptedGroup
from rich.console import Console

from meshpilot.orchestrator.cli.cmd_run import _print_summary
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.sim.simulator import simulate
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.controller import FailurePolicy
from meshpilot.orchestrator.run.protocol import Failure, FailureKind, GroupPoll, Progress
from meshpilot.orchestrator.run.session import (RunSession, Throughput, bytecode_hint, memory_peaks, peak_memory_of,
                                                plan_job)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def test_session_imports_neither_launch_nor_ray_nor_torch():
    tree = ast.parse((ROOT / "orchestrator" / "run" / "session.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in names if m.startswith("meshpilot.launch") or m.split(".")[0] in ("ray", "torch")], names


def _result(rank: int, peaks: dict | None) -> dict:
    r = {"rank": rank, "step": 30, "final_loss": 2.5, "param_checksum": 1.25, "first_step": 1,
         "first_step_time": 100.0, "last_step": 30, "last_step_time": 129.0}
    if peaks is not None:
        r["memory_peaks_gib"] = peaks
    return r


def test_memory_peaks_and_the_compatible_single_peak():
    full = {"nvml": 10.5, "allocated": 7.0, "reserved": 8.0, "host_rss": 3.0}
    assert memory_peaks({"memory_peaks_gib": full}) == full
    assert memory_peaks({}) == {"nvml": None, "allocated": None, "reserved": None, "host_rss": None}
    assert peak_memory_of(full) == 10.5                                           # NVML when known
    assert peak_memory_of(dict(full, nvml=None)) == 8.0                           # else torch's reserved peak
    assert peak_memory_of({"nvml": None, "allocated": None, "reserved": None, "host_rss": 0.5}) == 0.5
    assert peak_memory_of(memory_peaks({})) is None


def test_session_runs_a_fake_group_to_a_summary_with_memory_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    job = load_job(str(QUICKSTART), [])
    plan, est = plan_job(job)
    assert est.fits and plan.world_size == 2
    built: list[ScriptedGroup] = []
    polls = [[GroupPoll(failure=Failure(FailureKind.WORKER_DIED, "SIGKILL", rank=1))],
             [GroupPoll(progress=Progress(5, {"loss": 3.0})),
              GroupPoll(results=[_result(0, {"nvml": None, "allocated": None, "reserved": None, "host_rss": 0.75}),
                                 _result(1, None)])]]

    def make_group(run_dir, log_path):
        built.append(ScriptedGroup(polls, run_dir, log_path))
        return built[-1]

    seen: list[tuple[int, float | None]] = []
    session = RunSession.create(job, plan, est, job_path=str(QUICKSTART), run_dir=str(tmp_path / "run"))
    try:
        outcome = session.run(make_group, FailurePolicy(max_restarts=1, backoff_s=0.0),
                              on_progress=lambda p, tps: seen.append((p.step, tps)))
        summary = session.finish(outcome)
    finally:
        session.close()
    assert outcome.status.value == "succeeded" and outcome.restarts == 1
    assert built[0].log_path(1) == str((tmp_path / "run" / "logs" / "rank1.log").resolve())
    assert seen == [(5, None)]
    assert summary["memory_peaks_gib"][0] == {"nvml": None, "allocated": None, "reserved": None, "host_rss": 0.75}
    assert summary["memory_peaks_gib"][1] == {"nvml": None, "allocated": None, "reserved": None, "host_rss": None}
    assert summary["peak_memory_gib"] == {0: 0.75, 1: None}
    assert summary["predicted_peak_memory_gib"] == pytest.approx(est.peak_memory_gib)
    assert summary["tokens_per_s"] == pytest.approx(29 * job.train.global_batch * job.train.seq_len / 29.0)
    assert summary["failures"] == ["worker_died: rank 1: SIGKILL"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["peak_memory_gib"] == {"0": 0.75, "1": None}
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["state"] == "succeeded" and state["step"] == 30 and state["result"]["status"] == "succeeded"
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["new"] for e in events if e["event"] == "transition"] == \
        ["scheduling", "running", "restarting", "scheduling", "running", "succeeded"]
    assert events[2]["failure"] == "worker_died"
    assert (tmp_path / "run" / "job.yaml").is_file() and (tmp_path / "run" / "controller.log").is_file()


def test_summary_table_labels_every_memory_peak_per_rank():
    s = dict(status="succeeded", message="all 2 worker(s) finished", attempts=1, restarts=0, wall_s=12.0,
             time_to_first_step_s=3.0, tokens_per_s=1000.0, predicted_tokens_per_s=2000.0, mfu=None,
             final_loss=2.5, param_checksum=1.0, predicted_peak_memory_gib=11.25,
             memory_peaks_gib={0: {"nvml": 10.5, "allocated": 7.0, "reserved": 8.0, "host_rss": 3.0},
                               1: {"nvml": None, "allocated": None, "reserved": None, "host_rss": 2.0}})
    console = Console(record=True, width=200)
    _print_summary(console, s)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in console.export_text().splitlines() if line.count("│") >= 4}
    assert rows["rank 0: peak GPU memory, NVML (GiB)"] == ["10.500", "11.250"]
    assert rows["rank 0: torch allocated peak (GiB)"] == ["7.000", ""]
    assert rows["rank 0: torch reserved peak (GiB)"] == ["8.000", ""]
    assert rows["rank 0: host RSS peak (GiB)"] == ["3.000", ""]
    assert rows["rank 1: peak GPU memory, NVML (GiB)"] == ["-", "11.250"]
    assert rows["rank 1: torch reserved peak (GiB)"] == ["-", ""]
    assert rows["MFU"] == ["-", ""]


def test_a_plan_that_does_not_fit_is_refused_with_changes_that_fit():
    job = load_job(str(QUICKSTART), ["model=llama-2-7b", "cluster=dgx-h100"])
    with pytest.raises(ConfigError, match="does not fit") as e:
        plan_job(job)
    msg = str(e.value)
    assert "--force" in msg and "try " in msg
    # every change it proposes makes the plan fit, by the simulator's own verdict
    tips = msg.rsplit("try ", 1)[1].split("; or pass --force")[0].split(", or ")
    assert tips and "plan.zero_stage=2 plan.offload_optimizer=cpu" in tips
    for tip in tips:
        assert simulate(load_job(str(QUICKSTART), ["model=llama-2-7b", "cluster=dgx-h100", *tip.split()])).fits, tip
    plan, est = plan_job(job, force=True)
    assert not est.fits and plan.describe().startswith("dp=2 tp=1 zero=0")


def test_throughput_window_and_restart():
    t = Throughput(tokens_per_step=100)
    assert t.add(1, now=0.0) is None
    assert t.add(3, now=2.0) == pytest.approx(100.0)
    assert t.add(3, now=5.0) == pytest.approx(100.0)          # the same step again adds no sample
    assert t.add(2, now=6.0) is None                          # a restart resumed from an earlier step
    t.reset()
    assert t.samples == []


def test_bytecode_hint():
    assert bytecode_hint({}) is None
    assert "PYTHONPYCACHEPREFIX" in (bytecode_hint({"PYTHONDONTWRITEBYTECODE": "1"}) or "")
    assert bytecode_hint({"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "/tmp/pyc"}) is None


# --- what `meshpilot run` shows: progress, notices, start-up phases (a fake gang, no Ray) ----------

class SteppingGroup:
    """One step per poll (each poll takes ``dt`` seconds), progress for steps 1..``seen``, then every
    rank's result at step ``steps``: the last progress the controller sees is short of the end, as
    when the workers finish between two polls. Sends one console notice at start."""

    def __init__(self, steps: int, seen: int, on_notice=None, dt: float = 0.004):
        self.steps, self.seen, self.on_notice, self.dt = steps, seen, on_notice, dt
        self.step = 0

    def start(self, attempt: int) -> list[int]:
        if self.on_notice is not None:
            self.on_notice("building DeepSpeed op deepspeed_shm_comm (first use; cached afterwards): not built yet")
        return [10, 11]

    def poll(self) -> GroupPoll:
        import time
        time.sleep(self.dt)
        if self.step >= self.seen:
            times = dict(step=self.steps, last_step=self.steps, first_step_time=self.t1, last_step_time=time.time())
            return GroupPoll(results=[dict(_result(0, None), **times), dict(_result(1, None), **times)])
        self.step += 1
        if self.step == 1:
            self.t1 = time.time()
        return GroupPoll(progress=Progress(self.step, {"loss": 5.0 - self.step * 0.1}))

    def stop(self, grace_s: float) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def fake_ray(monkeypatch):
    """`meshpilot run` in this process with its Ray parts replaced: a fake connection and the
    SteppingGroup built by the command's own group factory; the controller polls every millisecond."""
    import functools

    import meshpilot.launch.group as group_mod
    import meshpilot.launch.ray_cluster as rc
    import meshpilot.orchestrator.run.session as session_mod
    from meshpilot.orchestrator.run.controller import Controller

    class Conn:
        address, embedded = "fake:0", True

        def close(self):
            pass

        def total_resources(self):
            return {"CPU": 8.0}

    built = []

    def make(job, plan, run_dir, **kw):
        built.append(SteppingGroup(job.train.steps, job.train.steps - 3, on_notice=kw.get("on_notice")))
        return built[-1]

    monkeypatch.setattr(rc, "connect_ray", lambda *a, **k: Conn())
    monkeypatch.setattr(group_mod, "RayWorkerGroup", make)
    monkeypatch.setattr(session_mod, "Controller", functools.partial(Controller, poll_interval_s=0.001))
    return built


def test_piped_run_prints_periodic_progress_with_eta_notices_and_the_final_step(tmp_path, monkeypatch, capsys,
                                                                                 fake_ray):
    """stdout is not a terminal: plain lines with step, loss, tokens/s and ETA every tenth of the run
    (here every 3 of 30 steps), the workers' notice, and a line for the final step although the
    last progress polled was step 27."""
    from meshpilot.orchestrator.cli.main import main
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    assert main(["run", str(QUICKSTART), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    assert steps[0] == 1 and steps[-1] == 30, out
    assert all(b - a == 3 for a, b in zip(steps[:-1], steps[1:-1])) and len(steps) >= 9, steps
    assert all(" ETA " in line and " tokens/s " in line and " loss " in line for line in lines)
    assert all("ETA -:--:--" not in line for line in lines[1:])         # known once two steps were seen
    assert lines[-1].startswith("step 30/30  loss 2.5000") and "ETA 0:00:00" in lines[-1]
    assert "building DeepSpeed op deepspeed_shm_comm (first use; cached afterwards)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["startup_phases_s"])[:2] == ["driver: plan, run directory", "Ray start / connect"]
    assert "Ray start / connect (s)" in " ".join(out.split())          # the printed summary lists the phases


def test_terminal_progress_is_live_and_its_last_frame_shows_the_last_step():
    import io
    from meshpilot.orchestrator.cli.cmd_run import RunProgress
    from meshpilot.orchestrator.run.protocol import JobStatus
    console = Console(file=io.StringIO(), force_terminal=True, width=150, color_system=None)
    with RunProgress(console, total=30, tokens_per_step=512, live=True) as rp:
        assert rp.bar.live.is_started
        rp.transition(JobStatus.SCHEDULING, JobStatus.RUNNING, "2 worker(s) started", {})
        rp.progress(Progress(12, {"loss": 3.5}), 5120.0)
        assert rp.bar.tasks[0].completed == 12 and rp.bar.tasks[0].fields["eta"] == "0:00:02"   # 18 steps x 0.1 s
        rp.final(30, 2.95, 5000.0)
    text = console.file.getvalue()
    last = text[text.rindex("running"):]
    assert "step 30/30" in last and "loss 2.9500" in last and "5,000 tok/s" in last and "ETA 0:00:00" in last


def test_plain_progress_prints_every_ten_seconds_when_steps_are_slow():
    import io
    from meshpilot.orchestrator.cli.cmd_run import RunProgress
    now = [0.0]
    console = Console(file=io.StringIO(), width=200)
    rp = RunProgress(console, total=1000, tokens_per_step=100, live=False, clock=lambda: now[0])
    for step in range(1, 41):                   # one step a second: every 10 s, long before 100 steps
        now[0] = float(step)
        rp.progress(Progress(step, {"loss": 1.0}), 100.0)
    printed = [int(line.split()[1].split("/")[0]) for line in console.file.getvalue().splitlines()]
    assert printed == [1, 11, 21, 31]
    assert "ETA 0:16:09" in console.file.getvalue().splitlines()[-1]     # 969 steps left at 1 step/s


def test_startup_phases_add_up_to_the_first_step():
    from meshpilot.orchestrator.run.session import startup_phases
    r0 = {"first_step_time": 120.0, "startup_phases_s": {"deepspeed import + process groups": 2.0,
                                                         "DeepSpeed engine": 3.0},
          "launch_times": {"gang_start": 108.5, "placed": 109.0, "actors_ready": 110.0, "run_called": 110.5,
                           "worker_imported": 113.0}}
    ph = startup_phases(100.0, (101.0, 108.0), r0)
    assert ph == {"driver: plan, run directory": 1.0, "Ray start / connect": 7.0, "placement group": 1.0,
                  "actor processes": 1.0, "rendezvous": 0.5, "worker: imports (torch)": 2.5,
                  "worker: deepspeed import + process groups": 2.0, "worker: DeepSpeed engine": 3.0,
                  "worker: process group, first step": 2.0}
    assert sum(ph.values()) == pytest.approx(120.0 - 100.0)
    assert startup_phases(100.0, (101.0, 108.0), {}) == {"driver: plan, run directory": 1.0,
                                                         "Ray start / connect": 7.0}


def test_an_embedded_ray_too_small_for_the_gang_fails_the_run_at_once(tmp_path, monkeypatch):
    from meshpilot.launch.gang import gang_spec
    from meshpilot.orchestrator.cli.cmd_run import _check_cluster
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    job = load_job(str(QUICKSTART), ["cluster=h100-sxm-4"])
    plan, est = plan_job(job)
    spec = gang_spec(plan.world_size, plan.tp, accelerator="gpu", gpus_per_node=4, cpu_cores=64)

    class Conn:
        def __init__(self, embedded):
            self.embedded = embedded

        def total_resources(self):
            return {"CPU": 2.0}

    session = RunSession.create(job, plan, est, job_path=str(QUICKSTART), run_dir=str(tmp_path / "run"))
    try:
        import io
        console = Console(file=io.StringIO(), width=300)
        _check_cluster(console, session, job, plan, spec, Conn(embedded=False))     # may grow: a warning
        assert "the plan needs 2 GPUs (one per rank), the Ray cluster has 0" in console.file.getvalue()
        with pytest.raises(ConfigError, match="needs 2 GPUs .* this machine's Ray has 0.*cluster=local"):
            _check_cluster(console, session, job, plan, spec, Conn(embedded=True))
    finally:
        session.close()
    assert json.loads((tmp_path / "run" / "state.json").read_text())["state"] == "failed"


@pytest.mark.parametrize("overrides, refused", [
    (["plan.zero_stage=3", "plan.activation_checkpointing=full"], True),
    (["plan.zero_stage=3"], False),
    (["plan.zero_stage=1", "plan.activation_checkpointing=full"], False),
    (["model=tiny-mixtral", "plan.zero_stage=1", "plan.activation_checkpointing=full"], True),
])
def test_memory_history_is_refused_where_recording_crashed_every_run(tmp_path, monkeypatch, capsys, overrides,
                                                                     refused):
    """``train.memory_history`` with activation checkpointing under ZeRO-3 or on an expert model crashed every such
    GPU run in its first backward (run/session.py check_recording): `meshpilot run` exits 2 before any resource is
    taken (no run directory), naming the key and the fix; the other plans pass the check."""
    from meshpilot.orchestrator.cli.main import main
    from meshpilot.orchestrator.run.session import check_recording
    from meshpilot.orchestrator.plan.plan import resolve_plan
    base = ["cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan.dp=2", "train.seq_len=512", "train.global_batch=4",
            "plan.micro_batch=2", "train.memory_history=true"]
    job = load_job(str(QUICKSTART), [*base, *overrides])
    if not refused:
        check_recording(job, resolve_plan(job))
        return
    with pytest.raises(ConfigError, match="plan.activation_checkpointing=none"):
        check_recording(job, resolve_plan(job))
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    assert main(["run", str(QUICKSTART), "--run-dir", str(run_dir), *base, *overrides]) == 2
    err = capsys.readouterr().err
    assert "train.memory_history" in err and "train.memory_history=false" in err
    assert not run_dir.exists()
    # a CPU cluster records nothing: no refusal
    check_recording(load_job(str(QUICKSTART), [*base, *overrides, "cluster.accelerator=cpu"]),
                    resolve_plan(load_job(str(QUICKSTART), [*base, *overrides, "cluster.accelerator=cpu"])))


def test_auto_and_the_oom_fallback_pass_over_plans_whose_recording_crashed():
    """With ``train.memory_history`` and checkpointing fixed, ``plan: auto`` would pick ZeRO-3 (whose recording crashed
    every run with checkpointing: check_recording); it takes the best-ranked plan that can record instead, and the
    out-of-memory fallback skips the refused plans too. Without recording both keep the ZeRO-3 plans."""
    from meshpilot.orchestrator.run.protocol import FailureKind
    from meshpilot.orchestrator.run.session import fallback_plan, plan_job, records_safely
    from meshpilot.orchestrator.sim.planner import search
    base = ["model=llama-3-8b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan=auto", "train.global_batch=16",
            "train.seq_len=8192", "plan.activation_checkpointing=full"]
    plain = load_job(str(QUICKSTART), base)
    chosen, _ = plan_job(plain)
    assert chosen.zero_stage == 3 and chosen.checkpoints_activations             # what auto takes without recording
    job = load_job(str(QUICKSTART), [*base, "train.memory_history=true"])
    assert not records_safely(job, chosen)
    plan, est = plan_job(job)
    ranked = [search(job, top=1).arrays.plan(int(i)) for i in search(job, top=1).ranked]
    assert plan == next(p for p in ranked if p.zero_stage < 3) and est.fits
    fb, _ = fallback_plan(job, [plan], FailureKind.GPU_OOM, 1e9)
    assert records_safely(job, fb) and fb != plan
    assert fallback_plan(plain, [plan], FailureKind.GPU_OOM, 1e9)[0].zero_stage == 3
