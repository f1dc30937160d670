"""The run controller: an explicit state machine over a gang of workers.

States and the transitions allowed between them::

    pending ──> scheduling ──> running ──> succeeded
                  │  ^            │
                  │  └─ restarting <┘      (a worker died, its heartbeat stopped, a step hung)
                  └───────────┴────────> failed | cancelled   (from any non-terminal state)

The controller owns no resources itself: it drives a
:class:`~meshpilot.orchestrator.run.protocol.WorkerGroup` (the Ray gang of
``meshpilot.launch.group``, a fake one in tests) through ``start`` / ``poll`` / ``stop`` /
``shutdown``; the types both sides share live in :mod:`.protocol`. Every failure tears the
*whole* gang down (a collective cannot continue with a missing member) and asks the
:class:`FailurePolicy` what to do; the policy returns a decision dataclass:
:class:`RestartDecision` (after an exponential backoff
``delay = min(backoff_max_s, backoff_s * factor**restarts)``) or :class:`FailDecision`.
Restarted workers resume from the run directory's latest complete checkpoint, so only the
steps after that checkpoint are repeated. A worker error that a restart would only repeat (a
non-finite loss, a configuration error: :func:`~.protocol.deterministic_failure`) fails the job
at once. An out-of-memory failure (:func:`~.protocol.oom_failure`: CUDA or host OOM) is never
retried with the same plan: without an ``on_oom`` handler the job fails at once
(``Outcome.out_of_memory``); with one (``plan: auto``, see :mod:`.session`) the handler either
returns a :class:`PlanSwitch` (a new worker group for a smaller plan: the controller restarts
with it, without backoff) or a reason to stop. Workers that stopped early on a signal (their results say ``status: stopped``, with
the stop checkpoint) end the job ``cancelled``, resumable, not ``succeeded``; a cancel records
its terminal state before the (time-bounded) teardown.

:meth:`Controller.step` performs one action and returns; :meth:`Controller.run` loops it.
Time and sleeping are injected, so tests step the machine deterministically. Every
transition is passed to ``on_transition`` (the run session, :mod:`.session`, persists it
to state.json and events.jsonl) and logged.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from meshpilot.orchestrator.run.protocol import (Failure, GangError, JobStatus, Progress, WorkerGroup,
                                                 deterministic_failure, oom_failure)

log = logging.getLogger(__name__)

S = JobStatus
ALLOWED_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = MappingProxyType({
    S.PENDING: frozenset({S.SCHEDULING, S.FAILED, S.CANCELLED}),
    S.SCHEDULING: frozenset({S.RUNNING, S.RESTARTING, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.RESTARTING, S.FAILED, S.CANCELLED}),
    S.RESTARTING: frozenset({S.SCHEDULING, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
})


class IllegalTransition(RuntimeError):
    pass


# --- the failure policy -------------------------------------------------------------------

@dataclass(frozen=True)
class RestartDecision:
    delay_s: float
    restart_number: int        # 1 for the first restart
    reason: str


@dataclass(frozen=True)
class FailDecision:
    reason: str


Decision = Union[RestartDecision, FailDecision]


@dataclass(frozen=True)
class PlanSwitch:
    """What an out-of-memory handler returns to go on with another plan: the group to start next."""
    group: WorkerGroup
    reason: str
    info: Mapping[str, Any] = field(default_factory=dict)    # recorded with the transition (plan, peaks, resume)


# (the OOM failure, fallbacks so far) -> a PlanSwitch, or the reason to stop (the job fails)
OomHandler = Callable[[Failure, int], Union[PlanSwitch, str]]


@dataclass(frozen=True)
class FailurePolicy:
    """Restart up to ``max_restarts`` times, waiting ``min(backoff_max_s, backoff_s * factor**k)``
    before restart k+1 (k = restarts so far). Non-retryable failures fail at once."""
    max_restarts: int = 3
    backoff_s: float = 1.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.backoff_s < 0 or self.backoff_factor < 1 or self.backoff_max_s < 0:
            raise ValueError(f"invalid failure policy {self}")

    def backoff(self, restarts_so_far: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * self.backoff_factor ** restarts_so_far)

    def decide(self, failure: Failure, restarts_so_far: int) -> Decision:
        if not failure.retryable:
            return FailDecision(f"{failure} (not retryable)")
        if deterministic_failure(failure):
            return FailDecision(f"{failure} (not retried: a restart from the last checkpoint would repeat it)")
        if restarts_so_far >= self.max_restarts:
            return FailDecision(f"{failure}; gave up after {restarts_so_far} restart(s) (max_restarts="
                                f"{self.max_restarts})")
        return RestartDecision(delay_s=self.backoff(restarts_so_far), restart_number=restarts_so_far + 1,
                               reason=str(failure))


# --- the controller -----------------------------------------------------------------------

@dataclass
class Outcome:
    status: JobStatus
    message: str
    attempts: int
    restarts: int
    failures: list[Failure]
    results: Optional[list[dict[str, Any]]]
    out_of_memory: bool = False      # failed because a worker ran out of memory (not retried)
    fallbacks: int = 0               # plan changes after out-of-memory failures


TransitionHook = Callable[[JobStatus, JobStatus, str, dict], None]
# polled before every action: False/None to go on, True (or a reason string) to cancel
CancelCheck = Callable[[], Union[bool, str, None]]


class Controller:
    """Drives one job through the state machine. Not thread-safe; call from one thread."""

    def __init__(self, group: WorkerGroup, policy: FailurePolicy = FailurePolicy(), *,
                 on_transition: Optional[TransitionHook] = None,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 cancel_requested: CancelCheck = lambda: False,
                 on_oom: Optional[OomHandler] = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 poll_interval_s: float = 0.5, cancel_grace_s: float = 10.0, teardown_limit_s: float = 15.0):
        self.group, self.policy = group, policy
        self._on_transition, self._on_progress = on_transition, on_progress
        self._on_oom = on_oom
        self._switched = False          # the next start is a fallback plan's
        self.fallbacks = 0
        self.out_of_memory = False
        self._cancel_requested, self._clock, self._sleep = cancel_requested, clock, sleep
        self.poll_interval_s, self.cancel_grace_s = poll_interval_s, cancel_grace_s
        self.teardown_limit_s = teardown_limit_s
        self.status = JobStatus.PENDING
        self.attempt = 0            # index of the current (or next) gang
        self.restarts = 0
        self.failures: list[Failure] = []
        self.results: Optional[list[dict[str, Any]]] = None
        self.message = ""
        self._restart_at = 0.0
        self._gang_up = False

    # --- transitions ----------------------------------------------------------------------
    def _to(self, new: JobStatus, reason: str, **info: Any) -> None:
        old = self.status
        if new not in ALLOWED_TRANSITIONS[old]:
            raise IllegalTransition(f"{old.value} -> {new.value} is not allowed ({reason})")
        self.status, self.message = new, reason
        log.info("controller: %s -> %s (attempt %d): %s", old.value, new.value, self.attempt, reason)
        if self._on_transition is not None:
            self._on_transition(old, new, reason, dict(info, attempt=self.attempt, restarts=self.restarts))

    def _teardown(self) -> None:
        try:
            self.group.shutdown()
        finally:
            self._gang_up = False

    def _handle_failure(self, failure: Failure) -> None:
        self.failures.append(failure)
        log.warning("controller: attempt %d failed: %s; tearing the gang down", self.attempt, failure)
        self._teardown()
        if oom_failure(failure):
            self._handle_oom(failure)
            return
        decision = self.policy.decide(failure, self.restarts)
        if isinstance(decision, FailDecision):
            self._to(S.FAILED, decision.reason, failure=failure.kind.value, rank=failure.rank)
            return
        self.restarts = decision.restart_number
        self._restart_at = self._clock() + decision.delay_s
        self._to(S.RESTARTING, f"{decision.reason}; restart {decision.restart_number}/{self.policy.max_restarts} "
                 f"in {decision.delay_s:.1f}s", failure=failure.kind.value, rank=failure.rank, delay_s=decision.delay_s)

    def _handle_oom(self, failure: Failure) -> None:
        """Out of memory: never the same plan again. Fail (no handler, or the handler says stop),
        or restart at once with the handler's group."""
        info = dict(failure=failure.kind.value, rank=failure.rank, out_of_memory=True,
                    measured_peak_gib=failure.memory_peak_gib)
        if self._on_oom is None:
            self.out_of_memory = True
            self._to(S.FAILED, f"{failure} (out of memory: not retried with the same plan)", **info)
            return
        try:
            switch = self._on_oom(failure, self.fallbacks)
        except Exception as e:      # choosing a fallback must never leave the run non-terminal
            log.exception("controller: choosing a fallback plan failed")
            switch = f"{failure} (out of memory); choosing a fallback plan failed: {type(e).__name__}: {e}"
        if isinstance(switch, str):
            self.out_of_memory = True
            self._to(S.FAILED, switch, **info)
            return
        self.group = switch.group
        self.fallbacks += 1
        self._switched = True
        self._restart_at = self._clock()
        self._to(S.RESTARTING, switch.reason, **info, fallback=self.fallbacks, **dict(switch.info))

    def _cancel(self, reason: str = "cancel requested") -> None:
        """Ask the workers to checkpoint and stop (at most ``cancel_grace_s``), record CANCELLED,
        then tear the gang down. The state is recorded before the teardown, and the teardown is
        bounded by ``teardown_limit_s``: when every process got SIGTERM (an eviction), the
        cluster is going down with the gang and its calls can block until the process is killed."""
        if self._gang_up:
            try:
                self.group.stop(self.cancel_grace_s)
                poll = self.group.poll()          # the workers' results, when all of them stopped in time
                if poll.results is not None:
                    self.results = poll.results
                    done = [r for r in poll.results if r.get("checkpoint")]
                    if done:
                        reason += f" (the workers stopped at step {done[0].get('step')}, checkpoint {done[0]['checkpoint']})"
            except Exception as e:  # the gang may already be half dead; shutdown below still runs
                log.warning("controller: stopping the workers failed: %s", e)
        self._to(S.CANCELLED, reason)
        self._bounded_teardown()

    def _bounded_teardown(self) -> None:
        done = threading.Event()
        error: list[BaseException] = []

        def work() -> None:
            try:
                self._teardown()
            except BaseException as e:  # noqa: BLE001 - reported below
                error.append(e)
            finally:
                done.set()

        threading.Thread(target=work, name="meshpilot-teardown", daemon=True).start()
        if not done.wait(self.teardown_limit_s):
            log.error("controller: tearing the gang down did not finish within %.0fs (is the cluster going down?); "
                      "leaving it", self.teardown_limit_s)
            self._gang_up = False
        elif error:
            log.warning("controller: tearing the gang down failed: %s", error[0])

    # --- one action -----------------------------------------------------------------------
    def step(self) -> bool:
        """Do one action; return False once the job is in a terminal state."""
        st = self.status
        if st.terminal:
            return False
        req = self._cancel_requested()
        if req:
            self._cancel(req if isinstance(req, str) else "cancel requested")
            return False
        if st is S.PENDING:
            self._to(S.SCHEDULING, "reserving resources for the gang")
        elif st is S.SCHEDULING:
            try:
                self._gang_up = True
                pids = self.group.start(self.attempt)
            except GangError as e:
                self._handle_failure(e.failure)
            else:
                self._to(S.RUNNING, f"{len(pids)} worker(s) started", pids=list(pids))
        elif st is S.RUNNING:
            poll = self.group.poll()
            if poll.progress is not None and self._on_progress is not None:
                self._on_progress(poll.progress)
            if poll.failure is not None:
                self._handle_failure(poll.failure)
            elif poll.results is not None:
                self.results = poll.results
                self._teardown()
                stopped = [r for r in poll.results if r.get("status") == "stopped"]
                if stopped:           # the workers were signalled (preemption, eviction): resumable, not done
                    r = stopped[0]
                    why = next((x["stop_signal"] for x in poll.results if x.get("stop_signal")), "a stop request")
                    self._to(S.CANCELLED, f"the workers stopped at step {r.get('step')} on {why}, checkpoint "
                             f"{r.get('checkpoint')}; rerun with the same run directory to resume")
                else:
                    self._to(S.SUCCEEDED, f"all {len(poll.results)} worker(s) finished")
            else:
                self._sleep(self.poll_interval_s)
        elif st is S.RESTARTING:
            wait = self._restart_at - self._clock()
            if wait > 0:
                self._sleep(min(wait, self.poll_interval_s))
            else:
                self.attempt += 1
                self._to(S.SCHEDULING, f"restarting the gang (attempt {self.attempt})" +
                         (" with the fallback plan" if self._switched else " from the latest checkpoint"))
                self._switched = False
        return not self.status.terminal

    def run(self) -> Outcome:
        try:
            while self.step():
                pass
        except BaseException:
            # an exception in the controller itself (or Ctrl-C): never leave workers behind
            self._teardown()
            raise
        return Outcome(self.status, self.message, self.attempt + 1, self.restarts, list(self.failures), self.results,
                       out_of_memory=self.out_of_memory and self.status is S.FAILED, fallbacks=self.fallbacks)
