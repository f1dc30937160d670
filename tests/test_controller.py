"""The controller's state machine and failure policy, stepped against a FAKE worker group.

The fake is deliberate (these are pure state-machine tests, no processes): it replays a
script of poll results per attempt and records every call, and a fake clock makes the
backoff deterministic. The real Ray gang is tested end to end in test_ray_run.py.
"""
from __future__ import annotations

import json

import pytest

from fake_group import ScriptedGroup

from meshpilot.orchestrator.run.controller import (ALLOWED_TRANSITIONS, Controller, FailDecision, FailurePolicy,
                                                   IllegalTransition, RestartDecision)
from meshpilot.orchestrator.run.protocol import (Failure, FailureKind, GangError, GroupPoll, JobStatus, Progress,
                                                 WorkerGroup)
from meshpilot.orchestrator.run.store import JobState, RunStore, find_run, list_runs

S = JobStatus


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def _ok(n: int = 2) -> GroupPoll:
    return GroupPoll(results=[{"rank": r, "final_loss": 1.0} for r in range(n)])


def _died(rank: int = 1) -> GroupPoll:
    return GroupPoll(failure=Failure("worker_died", "SIGKILL", rank=rank))


def _ctl(group: WorkerGroup, policy=FailurePolicy(max_restarts=2, backoff_s=1.0), **kw):
    clock = FakeClock()
    seen: list[tuple[str, str]] = []
    ctl = Controller(group, policy, clock=clock, sleep=clock.sleep, poll_interval_s=0.5,
                     on_transition=lambda o, n, r, i: seen.append((o.value, n.value)), **kw)
    return ctl, clock, seen


def test_happy_path_walks_pending_scheduling_running_succeeded():
    g = ScriptedGroup([[GroupPoll(progress=Progress(1, {"loss": 2.0})), GroupPoll(), _ok()]])
    progress: list[Progress] = []
    ctl, clock, seen = _ctl(g, on_progress=progress.append)
    assert ctl.status is S.PENDING
    assert ctl.step() and ctl.status is S.SCHEDULING
    assert ctl.step() and ctl.status is S.RUNNING
    out = ctl.run()
    assert out.status is S.SUCCEEDED and out.restarts == 0 and out.attempts == 1
    assert seen == [("pending", "scheduling"), ("scheduling", "running"), ("running", "succeeded")]
    assert [p.step for p in progress] == [1]
    assert out.results[1]["rank"] == 1
    assert g.calls[-1] == ("shutdown",) and not g.alive
    assert clock.sleeps == [0.5, 0.5]          # slept only on the two polls that had no news


def test_worker_death_tears_down_and_restarts_with_exponential_backoff():
    g = ScriptedGroup([[_died(1)], [_died(0)], [GroupPoll(), _ok()]])
    ctl, clock, seen = _ctl(g, FailurePolicy(max_restarts=3, backoff_s=1.0, backoff_factor=2.0))
    out = ctl.run()
    assert out.status is S.SUCCEEDED
    assert out.restarts == 2 and out.attempts == 3
    assert [f.rank for f in out.failures] == [1, 0]
    starts = [c for c in g.calls if c[0] == "start"]
    assert starts == [("start", 0), ("start", 1), ("start", 2)]
    # every failure is followed by a shutdown of the whole gang before the next start
    for i, c in enumerate(g.calls):
        if c[0] == "start" and c[1] > 0:
            assert ("shutdown",) in g.calls[:i][-3:]
    # backoff 1 s then 2 s, slept in poll-interval slices: 0.5*2 + 0.5*4
    restart_sleeps = sum(clock.sleeps) - 0.5  # minus the one empty poll of attempt 2
    assert restart_sleeps == pytest.approx(1.0 + 2.0)
    assert seen.count(("running", "restarting")) == 2 and seen.count(("restarting", "scheduling")) == 2


def test_gives_up_after_max_restarts():
    g = ScriptedGroup([[_died()], [_died()], [_died()]])
    ctl, _, seen = _ctl(g, FailurePolicy(max_restarts=2, backoff_s=0.0))
    out = ctl.run()
    assert out.status is S.FAILED and out.restarts == 2 and len(out.failures) == 3
    assert "gave up after 2 restart(s)" in out.message
    assert seen[-1] == ("running", "failed")
    assert not g.alive


def test_unplaceable_gang_fails_without_restart():
    msg = "needs 8 CPUs in bundles of 1 on at most 1 node; the cluster has 4 CPUs"
    g = ScriptedGroup([GangError(Failure("placement", msg, retryable=False))])
    ctl, _, seen = _ctl(g)
    out = ctl.run()
    assert out.status is S.FAILED and msg in out.message and out.restarts == 0
    assert seen == [("pending", "scheduling"), ("scheduling", "failed")]
    assert ("shutdown",) in g.calls


def test_cancel_while_running_stops_then_shuts_down():
    cancel = {"now": False}
    g = ScriptedGroup([[GroupPoll()] * 100])
    ctl, _, seen = _ctl(g, cancel_requested=lambda: cancel["now"])
    for _ in range(4):
        ctl.step()
    assert ctl.status is S.RUNNING
    cancel["now"] = True
    assert ctl.step() is False
    assert ctl.status is S.CANCELLED
    names = [c[0] for c in g.calls]
    assert names[-1] == "shutdown" and "stop" in names[-3:] and names.index("stop", len(names) - 3) < len(names) - 1
    assert seen[-1] == ("running", "cancelled")


def test_cancel_during_backoff_does_not_start_a_new_gang():
    cancel = {"now": False}
    g = ScriptedGroup([[_died()], [_ok()]])
    ctl, clock, _ = _ctl(g, FailurePolicy(max_restarts=3, backoff_s=10.0), cancel_requested=lambda: cancel["now"])
    while ctl.status is not S.RESTARTING:
        ctl.step()
    ctl.step()
    cancel["now"] = True
    ctl.run()
    assert ctl.status is S.CANCELLED
    assert [c for c in g.calls if c[0] == "start"] == [("start", 0)]
    assert ("stop", 10.0) not in g.calls        # no gang was up to stop


def test_policy_decisions_are_dataclasses_with_capped_backoff():
    p = FailurePolicy(max_restarts=5, backoff_s=2.0, backoff_factor=3.0, backoff_max_s=20.0)
    f = Failure("heartbeat_stale", "no answer for 61s", rank=3)
    delays = [p.decide(f, k) for k in range(5)]
    assert all(isinstance(d, RestartDecision) for d in delays)
    assert [d.delay_s for d in delays] == [2.0, 6.0, 18.0, 20.0, 20.0]
    assert [d.restart_number for d in delays] == [1, 2, 3, 4, 5]
    assert isinstance(p.decide(f, 5), FailDecision)
    assert isinstance(p.decide(Failure("worker_error", "ConfigError", retryable=False), 0), FailDecision)
    with pytest.raises(ValueError):
        FailurePolicy(max_restarts=-1)


def test_illegal_transitions_are_refused():
    ctl, _, _ = _ctl(ScriptedGroup([[_ok()]]))
    with pytest.raises(IllegalTransition):
        ctl._to(S.SUCCEEDED, "skipping ahead")
    for terminal in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert ALLOWED_TRANSITIONS[terminal] == frozenset()
    # every non-terminal state can reach failed and cancelled
    for st in (S.PENDING, S.SCHEDULING, S.RUNNING, S.RESTARTING):
        assert {S.FAILED, S.CANCELLED} <= ALLOWED_TRANSITIONS[st]


def test_failure_kinds_are_an_enum_recorded_as_their_value():
    f = Failure("worker_died", "SIGKILL", rank=1)
    assert f.kind is FailureKind.WORKER_DIED
    assert str(f) == "worker_died: rank 1: SIGKILL"
    assert str(GangError(Failure(FailureKind.PLACEMENT, "no GPUs", retryable=False))) == "placement: no GPUs"
    with pytest.raises(ValueError):
        Failure("exploded", "not a kind of failure")
    infos: list[dict] = []
    ctl = Controller(ScriptedGroup([[_died(1)]]), FailurePolicy(max_restarts=0), sleep=lambda s: None,
                     on_transition=lambda o, n, r, i: infos.append(i))
    assert ctl.run().status is S.FAILED
    assert infos[-1]["failure"] == "worker_died" and type(infos[-1]["failure"]) is str and infos[-1]["rank"] == 1


def test_controller_exception_never_leaves_workers_behind():
    class Boom(ScriptedGroup):
        def poll(self):
            raise RuntimeError("controller bug")
    g = Boom([[_ok()]])
    ctl, _, _ = _ctl(g)
    with pytest.raises(RuntimeError):
        ctl.run()
    assert g.calls[-1] == ("shutdown",)


# --- job state on disk ----------------------------------------------------------------------

def test_run_store_roundtrip_index_and_cancel(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPILOT_HOME", str(tmp_path / "home"))
    store = RunStore(tmp_path / "runs" / "tiny-20260101-000000-abcd")
    st = JobState(run_id="tiny-20260101-000000-abcd", run_dir=str(store.run_dir), world_size=2, total_steps=10)
    store.create(st)
    st.state, st.step = "running", 4
    store.write(st)
    store.append_event("transition", old="scheduling", new="running")
    back = store.read()
    assert back.state == "running" and back.step == 4 and back.controller_pid > 0
    assert json.loads(store.state_path.read_text())["run_id"] == st.run_id
    assert not list(store.run_dir.glob(".*.tmp"))   # atomic writes leave no temporaries
    assert [e["new"] for e in store.events()] == ["running"]
    assert find_run("tiny-2026").run_dir == store.run_dir         # by unique prefix
    assert find_run(str(store.run_dir)).run_dir == store.run_dir  # by directory
    assert [s.run_dir for s in list_runs()] == [store.run_dir]
    # cancel from 'another shell': the controller pid here is this test process, so do not signal it
    st.controller_pid = 0
    store.write(st)
    assert store.request_cancel() is False and store.cancel_requested()
