"""A run's state on disk, readable from any shell.

Layout of a run directory (``train.output_dir/<run id>`` unless ``--run-dir`` is given)::

    <run_dir>/state.json         the current JobState, replaced atomically (write + fsync + rename)
    <run_dir>/events.jsonl       one JSON object per line: every state transition and decision
    <run_dir>/job.yaml           the resolved job (``meshpilot run <run_dir>/job.yaml`` reruns it)
    <run_dir>/controller.log     the controller's log
    <run_dir>/logs/rank<N>.log   each worker's stdout/stderr and log records, all attempts appended
    <run_dir>/cancel             present once ``meshpilot cancel`` asked the run to stop

A runs index under ``$MESHPILOT_HOME/runs/`` (default ``~/.meshpilot/runs``) holds one small
file ``<run id>.json`` per run pointing at its directory, so ``meshpilot status``, ``logs``
and ``cancel`` accept a run id (or a unique prefix of one) as well as a directory.

Nothing here imports Ray or torch: the state is plain JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshpilot.orchestrator.atomic_io import write_atomic
from meshpilot.orchestrator.errors import ConfigError

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
STATE_FILE = "state.json"
EVENTS_FILE = "events.jsonl"
CANCEL_FILE = "cancel"


@dataclass
class JobState:
    """What ``meshpilot status`` shows. ``state`` is one of the controller's states."""
    run_id: str
    run_dir: str
    job_name: str = ""
    state: str = "pending"
    attempt: int = 0                      # 0 for the first gang, +1 per restart
    restarts: int = 0
    controller_pid: int = 0
    controller_host: str = ""
    ray_address: str = ""
    world_size: int = 0
    plan: str = ""
    step: int = 0                         # last step reported by rank 0
    total_steps: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    worker_pids: list[int] = field(default_factory=list)
    message: str = ""                     # why the last transition happened
    created: float = 0.0
    updated: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def meshpilot_home() -> Path:
    return Path(os.environ.get("MESHPILOT_HOME") or Path.home() / ".meshpilot")


def new_run_id(job_name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in (job_name or "job"))
    return f"{safe}-{stamp}-{os.urandom(2).hex()}"


class RunStore:
    """Reads and writes one run directory. Safe to use from the controller and other shells."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    # --- paths ---------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    @property
    def events_path(self) -> Path:
        return self.run_dir / EVENTS_FILE

    @property
    def cancel_path(self) -> Path:
        return self.run_dir / CANCEL_FILE

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs_dir / f"rank{rank}.log"

    @property
    def controller_log(self) -> Path:
        return self.run_dir / "controller.log"

    # --- state ---------------------------------------------------------------------------
    def create(self, state: JobState) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        state.created = state.created or time.time()
        state.controller_pid = state.controller_pid or os.getpid()
        state.controller_host = state.controller_host or socket.gethostname()
        if self.cancel_path.exists():          # a rerun into the same directory starts fresh
            self.cancel_path.unlink()
        self.write(state)
        register_run(state.run_id, self.run_dir)

    def write(self, state: JobState) -> None:
        state.updated = time.time()
        write_atomic(self.state_path, json.dumps(state.to_dict(), indent=1, default=str))

    def read(self) -> JobState:
        try:
            return JobState.from_dict(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            raise ConfigError("RUN", str(self.run_dir), reason="is not a meshpilot run directory (no state.json)",
                              fix="`meshpilot status` lists the runs") from None

    def append_event(self, kind: str, **data: Any) -> None:
        rec = {"time": time.time(), "event": kind, **data}
        with open(self.events_path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
        return out

    # --- cancellation --------------------------------------------------------------------
    def cancel_requested(self) -> bool:
        return self.cancel_path.exists()

    def request_cancel(self, reason: str = "cancelled by user") -> bool:
        """Ask the controller to stop: write the cancel file, then SIGTERM the controller if it
        runs on this host. Returns whether the controller process was signalled."""
        write_atomic(self.cancel_path, json.dumps({"time": time.time(), "reason": reason, "pid": os.getpid()}))
        st = self.read()
        if st.terminal or not st.controller_pid or st.controller_host != socket.gethostname():
            return False
        if not pid_alive(st.controller_pid):
            return False
        try:
            os.kill(st.controller_pid, signal.SIGTERM)
            return True
        except OSError:
            return False

    def controller_alive(self) -> bool:
        st = self.read()
        if st.controller_host and st.controller_host != socket.gethostname():
            return True  # cannot tell from here
        return pid_alive(st.controller_pid)


def pid_alive(pid: int, *, unknown: bool = True) -> bool:
    """Whether process ``pid`` exists and is not a zombie (``unknown`` when /proc cannot tell)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return unknown


# --- runs index --------------------------------------------------------------------------

def _index_dir() -> Path:
    return meshpilot_home() / "runs"


def register_run(run_id: str, run_dir: str | Path) -> None:
    d = _index_dir()
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / f"{run_id}.json", json.dumps({"run_id": run_id, "run_dir": str(Path(run_dir).resolve())}))


def list_runs() -> list[RunStore]:
    """Every indexed run whose directory still exists, oldest first."""
    d = _index_dir()
    stores = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rd = Path(json.loads(f.read_text())["run_dir"])
        except (OSError, ValueError, KeyError):
            continue
        if (rd / STATE_FILE).is_file():
            stores.append(RunStore(rd))
    stores.sort(key=lambda s: s.state_path.stat().st_mtime if s.state_path.exists() else 0)
    return stores


def find_run(ref: str | None) -> RunStore:
    """A run by directory, run id or unique id prefix; ``None`` means the most recent run."""
    if ref is None:
        runs = list_runs()
        if not runs:
            raise ConfigError("RUN", reason="no runs recorded yet", fix="start one with `meshpilot run JOB`")
        return max(runs, key=lambda s: s.read().created)
    p = Path(ref)
    if (p / STATE_FILE).is_file():
        return RunStore(p)
    idx = _index_dir() / f"{ref}.json"
    candidates = [idx] if idx.is_file() else sorted(_index_dir().glob(f"{ref}*.json")) if _index_dir().is_dir() else []
    if len(candidates) > 1:
        raise ConfigError("RUN", ref, reason="matches several runs",
                          allowed=[c.name[:-5] for c in candidates][:10], fix="give more of the run id")
    if not candidates:
        raise ConfigError("RUN", ref, reason="no such run directory or run id",
                          fix="`meshpilot status` lists the runs")
    rd = Path(json.loads(candidates[0].read_text())["run_dir"])
    if not (rd / STATE_FILE).is_file():
        raise ConfigError("RUN", ref, reason=f"its directory {rd} is gone")
    return RunStore(rd)
