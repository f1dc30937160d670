"""What the run controller and a worker group say to each other.

The controller (:mod:`.controller`) drives any object that has the :class:`WorkerGroup`
methods: the Ray gang of :mod:`meshpilot.launch.group`, or a fake one in tests. Both sides
import only this module, so a worker group never depends on the controller's state machine.

A group reports with :class:`GroupPoll` (the latest :class:`Progress`, a :class:`Failure`, or
every rank's result) and refuses to form with :class:`GangError`. Each rank runs a
:class:`WorkerFunction` (``DEFAULT_WORKER`` unless the user names another); its result dict
may carry ``memory_peaks_gib`` with the keys of ``MEMORY_PEAK_KEYS``.

Nothing here imports Ray or torch.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

DEFAULT_WORKER = "meshpilot.orchestrator.train.worker:run_worker"

# the peaks of one rank, GiB, each None where its source is unavailable: NVML's device-level peak
# (what the simulator predicts), torch's allocated and reserved peaks, the process's peak RSS
MEMORY_PEAK_KEYS = ("nvml", "allocated", "reserved", "host_rss")


class JobStatus(str, enum.Enum):
    """The controller's states (see :mod:`.controller` for the transitions)."""
    PENDING = "pending"
    SCHEDULING = "scheduling"
    RUNNING = "running"
    RESTARTING = "restarting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class FailureKind(str, enum.Enum):
    """Why a gang stopped working."""
    WORKER_DIED = "worker_died"            # a worker process is gone (killed, out of memory, crashed)
    HEARTBEAT_STALE = "heartbeat_stale"    # a worker stopped answering progress probes
    STEP_TIMEOUT = "step_timeout"          # no new step for too long (a hung collective)
    WORKER_ERROR = "worker_error"          # the worker function raised
    PLACEMENT = "placement"                # the resources could not be reserved or laid out
    RENDEZVOUS = "rendezvous"              # the workers started but could not be joined into a gang
    GPU_OOM = "gpu_oom"                    # a worker ran out of GPU memory (CUDA out of memory)
    HOST_OOM = "host_oom"                  # a worker ran out of host memory (Ray's memory monitor, the OOM killer)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Failure:
    """Why a gang stopped working. ``retryable=False`` fails the job without a restart
    (a placement that cannot be satisfied, a configuration error inside a worker).
    ``kind`` may be given as its string value; it is stored as a :class:`FailureKind`."""
    kind: FailureKind
    message: str
    rank: Optional[int] = None
    retryable: bool = True
    memory_peak_gib: Optional[float] = None     # the failed rank's measured peak (GiB), when it reported one

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FailureKind(self.kind))

    def __str__(self) -> str:
        who = f"rank {self.rank}: " if self.rank is not None else ""
        return f"{self.kind.value}: {who}{self.message}"


# worker errors (the exception class name leads the message of a WORKER_ERROR failure) that a
# restart from the last checkpoint would only repeat: the run fails at once
DETERMINISTIC_ERRORS = ("NonFiniteLoss", "ConfigError")


def deterministic_failure(failure: "Failure") -> bool:
    """Whether ``failure`` is a worker error that would recur on a restart (a NaN loss, a config error)."""
    if failure.kind is not FailureKind.WORKER_ERROR:
        return False
    msg = failure.message
    return any(msg.startswith(name + ":") or f" {name}:" in msg[:200] for name in DETERMINISTIC_ERRORS)


# Out of memory: a restart of the same plan would run out of memory again, so an OOM failure is
# never retried with the same plan (the controller stops, or falls back to a smaller plan).
# Texts are matched case-insensitively in a worker's exception (its class and message, DeepSpeed's
# wrapping keeps the original message) or Ray's error.
GPU_OOM_TEXTS = ("cuda out of memory", "torch.outofmemoryerror", "torch.cuda.outofmemoryerror",
                 "outofmemoryerror: cuda", "hip out of memory", "cublas_status_alloc_failed",
                 "cudaerrormemoryallocation", "cuda error: out of memory")
HOST_OOM_TEXTS = ("ray.exceptions.outofmemoryerror", "memory monitor", "running low on memory",
                  "defaultcpuallocator: can't allocate memory", "std::bad_alloc")


def classify_oom_text(text: str) -> Optional[FailureKind]:
    """GPU_OOM or HOST_OOM when ``text`` (an exception's class and message) says a worker ran out of
    memory, else None. GPU texts win (a CUDA OOM message may mention host memory too)."""
    t = (text or "").lower()
    if any(k in t for k in GPU_OOM_TEXTS):
        return FailureKind.GPU_OOM
    if any(k in t for k in HOST_OOM_TEXTS) or t.startswith("memoryerror") or " memoryerror" in t:
        return FailureKind.HOST_OOM             # (Python's MemoryError: a host allocation failed)
    return None


def oom_failure(failure: "Failure") -> bool:
    """Whether ``failure`` is an out-of-memory failure (never retried with the same plan)."""
    return failure.kind in (FailureKind.GPU_OOM, FailureKind.HOST_OOM)


class GangError(RuntimeError):
    """Raised by :meth:`WorkerGroup.start` when the gang cannot be formed."""

    def __init__(self, failure: Failure):
        super().__init__(str(failure))
        self.failure = failure


@dataclass(frozen=True)
class Progress:
    """Rank 0's latest step (``metrics`` is whatever the worker's on_step reported)."""
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupPoll:
    """One look at the gang: ``results`` (one dict per rank) once every worker returned,
    ``failure`` if one failed, else still running."""
    progress: Optional[Progress] = None
    failure: Optional[Failure] = None
    results: Optional[list[dict[str, Any]]] = None


class WorkerGroup(Protocol):
    """One gang of workers, one per rank, started and torn down as a whole."""

    def start(self, attempt: int) -> list[int]:
        """Reserve resources, start one worker per rank, rendezvous; return worker pids.
        Raises GangError."""

    def poll(self) -> GroupPoll:
        """Non-blocking check of the workers."""

    def stop(self, grace_s: float) -> None:
        """Ask the workers to stop at the next step (cancel); wait at most grace_s."""

    def shutdown(self) -> None:
        """Kill every worker and release the reservation. Idempotent."""


class WorkerFunction(Protocol):
    """The training function every rank runs (``MODULE:FUNCTION`` on the command line).

    ``on_step`` takes the step's record dict (``record["step"]`` is 1-based) or ``(step, metrics)``;
    ``stop_event`` is set when the run is cancelled. Returns the rank's result dict; its
    ``status`` is "completed", or "stopped" when the worker checkpointed and stopped early on a
    request (the controller then ends the run as cancelled, resumable, not succeeded)."""

    def __call__(self, job: Any, plan: Any, *, rank: int, world_size: int, local_rank: int, master_addr: str,
                 master_port: int, run_dir: str, on_step: Callable[..., None],
                 stop_event: threading.Event) -> dict[str, Any]: ...
