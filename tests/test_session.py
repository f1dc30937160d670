"""The run session (meshpilot.orchestrator.run.session) against a fake worker group: plan and fit
check, run directory and state, summary with the memory peaks; and the summary table that
`meshpilot run` prints. No Ray, no worker processes."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from rich.console import Console

from meshpilot.orchestrator.cli.cmd_run import _print_summary
from meshpilot.orchestrator.config.loader import load_job
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


class ScriptedGroup:
    """Attempt k replays polls[k]; records the run directory and log paths it was built with."""

    def __init__(self, run_dir: str, log_path, polls: list[list[GroupPoll]]):
        self.run_dir, self.log_path, self.polls = run_dir, log_path, polls
        self._left: list[GroupPoll] = []

    def start(self, attempt: int) -> list[int]:
        self._left = list(self.polls[attempt])
        return [10, 11]

    def poll(self) -> GroupPoll:
        return self._left.pop(0) if self._left else GroupPoll()

    def stop(self, grace_s: float) -> None:
        pass

    def shutdown(self) -> None:
        pass


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
        built.append(ScriptedGroup(run_dir, log_path, polls))
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
    assert "try plan.zero_stage=2 plan.offload_optimizer=cpu" in str(e.value)
    assert "--force" in str(e.value)
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
