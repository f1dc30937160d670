"""A run's state on disk, readable from any shell.

Layout of a run directory (``train.output_dir/<run id>`` unless ``--run-dir`` is given)::

    <run_dir>/state.json         the current JobState, replaced atomically (write + fsync + rename)
    <run_dir>/events.jsonl       one JSON object per line: every state transition and decision
    <run_dir>/job.yaml           the resolved job (``meshpilot run <run_dir>/job.yaml`` reruns it)
    <run_dir>/controller.log     the controller's log
    <run_dir>/logs/rank<N>.log   each worker's stdout/stderr and log records, all attempts appended
    <run_dir>/cancel             present once ``meshpilot cancel`` asked the run to stop
    <run_dir>/controller.lock    flock()ed by the run's controller while it runs (pid, host, start)

The run directory is made owner-only (0700) and the files meshpilot writes there are 0600: the
logs and state can hold cluster addresses and environment details.

Liveness: a run of this host whose state is not terminal while nobody holds ``controller.lock``
(or, for a directory without one, whose controller pid is gone or is another process: the
process start time and command line recorded at start differ) has lost its controller
(SIGKILL, a machine that stopped; a controller on another host is assumed alive):
:meth:`RunStore.reconcile`, called by ``status``, ``logs`` and ``cancel``, records it as
``failed`` with a "lost" message. ``cancel`` signals the controller only when
the pid still is that controller.

A runs index under ``$MESHPILOT_HOME/runs/`` (default ``~/.meshpilot/runs``) holds one small
file ``<run id>.json`` per run pointing at its directory, so ``meshpilot status``, ``logs``
and ``cancel`` accept a run id (or a unique prefix of one) as well as a directory.

Nothing here imports Ray or torch: the state is plain JSON.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshpilot.orchestrator.atomic_io import DISK_FULL, overwrite_in_place, write_atomic
from meshpilot.orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
STATE_FILE = "state.json"
EVENTS_FILE = "events.jsonl"
CANCEL_FILE = "cancel"
LOCK_FILE = "controller.lock"
PRIVATE = 0o600


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
    controller_start: int = 0             # the controller's start time (/proc/PID/stat, clock ticks since boot)
    controller_cmdline: str = ""          # and its command line: `cancel` signals only that process
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


def safe_run_id(name: str) -> str:
    """``name`` as a run id: ASCII letters, digits and ``-_.`` only, no ``..``, at most 160 characters."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in name[:160])
    safe = re.sub(r"\.{2,}", ".", safe).lstrip(".-")
    return safe or "run"


def new_run_id(job_name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{safe_run_id(job_name or 'job')}-{stamp}-{os.urandom(2).hex()}"


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

    @property
    def lock_path(self) -> Path:
        return self.run_dir / LOCK_FILE

    # --- state ---------------------------------------------------------------------------
    def create(self, state: JobState, lock: "RunLock | None" = None) -> None:
        """Make the run directory (owner-only), record this process as the controller and write
        the first state. ``lock`` (held by the caller) is taken here when not given."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.run_dir, 0o700)
            self.logs_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise ConfigError("--run-dir", str(self.run_dir), reason=f"cannot be created: {e.strerror or e}",
                              fix="choose a writable train.output_dir or --run-dir") from None
        if lock is None:
            RunLock(self.lock_path).acquire()
        state.created = state.created or time.time()
        state.controller_pid = state.controller_pid or os.getpid()
        state.controller_host = state.controller_host or socket.gethostname()
        if state.controller_pid == os.getpid():
            state.controller_start, state.controller_cmdline = process_identity(os.getpid())
        if self.cancel_path.exists():          # a rerun into the same directory starts fresh
            self.cancel_path.unlink()
        self.write(state)
        register_run(state.run_id, self.run_dir)

    def write(self, state: JobState) -> None:
        """Replace state.json atomically. On a full disk (ENOSPC), the state is rewritten in place
        in its compact form (without ``result`` if needed) when it fits the old file's blocks."""
        state.updated = time.time()
        try:
            write_atomic(self.state_path, json.dumps(state.to_dict(), indent=1, default=str), mode=PRIVATE)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            d = state.to_dict()
            for attempt in (d, dict(d, result={}, message=d["message"][:500])):
                if overwrite_in_place(self.state_path, json.dumps(attempt, separators=(",", ":"), default=str)):
                    log.warning("disk full: state %s recorded in place in %s", state.state, self.state_path)
                    return
            raise

    def read(self) -> JobState:
        try:
            return JobState.from_dict(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            raise ConfigError("RUN", str(self.run_dir), reason="is not a meshpilot run directory (no state.json)",
                              fix="`meshpilot status` lists the runs") from None
        except (ValueError, TypeError) as e:
            raise ConfigError("RUN", str(self.run_dir), reason=f"its state.json is unreadable: {str(e)[:200]}") from None

    def append_event(self, kind: str, **data: Any) -> None:
        """Append one event; a failed write (a full disk) is logged, not raised: the events are a
        record, the state file is what must be right."""
        rec = {"time": time.time(), "event": kind, **data}
        try:
            fd = os.open(self.events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE)
            with open(fd, "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        except OSError as e:
            log.warning("could not append the %s event to %s: %s", kind, self.events_path, e)

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text(errors="replace").splitlines():
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
        runs on this host and its pid still is that controller (same start time and command
        line as recorded at start). Returns whether the controller process was signalled."""
        write_atomic(self.cancel_path, json.dumps({"time": time.time(), "reason": reason, "pid": os.getpid()}),
                     mode=PRIVATE)
        st = self.read()
        if st.terminal or controller_identity(st) != "verified":
            return False
        try:
            os.kill(st.controller_pid, signal.SIGTERM)
            return True
        except OSError:
            return False

    # --- liveness ------------------------------------------------------------------------
    def controller_alive(self) -> bool:
        """Whether the run's controller still runs: it holds ``controller.lock``; for a directory
        without one, its pid is alive and is that controller. A controller on another host
        whose lock is not seen held is assumed alive (flock may not reach across hosts)."""
        held = RunLock(self.lock_path).held()
        if held:
            return True
        ident = controller_identity(self.read())
        if held is False:        # a free lock: gone, unless on another host (flock may not span hosts there)
            return ident == "other host"
        return ident in ("verified", "unverifiable", "other host")

    def reconcile(self) -> JobState:
        """The run's state; a non-terminal state whose controller is gone is first recorded as
        ``failed`` ("lost: ...", with an event), so that no run stays running forever."""
        st = self.read()
        if st.terminal or self.controller_alive():
            return st
        lock = RunLock(self.lock_path)
        if lock.path.exists() and not lock.try_acquire(record=False):
            return st                          # a controller took the directory just now
        try:
            st = self.read()
            if st.terminal:
                return st
            reason = (f"lost: the controller (pid {st.controller_pid} on {st.controller_host or '?'}) ended without "
                      f"recording a final state (killed, or its machine stopped) while {st.state} at step {st.step}; "
                      f"`meshpilot run <job> --run-dir {self.run_dir}` resumes from the latest checkpoint")
            self.append_event("transition", old=st.state, new="failed", reason=reason, lost=True)
            st.state, st.message = "failed", reason
            try:
                self.write(st)
            except OSError as e:               # e.g. another user's read-only run directory
                log.warning("could not record the lost run in %s: %s", self.state_path, e)
            return st
        finally:
            lock.release()


class RunLock:
    """``flock`` on ``RUN_DIR/controller.lock``: the controller holds it while it runs, so a
    second ``meshpilot run`` on the same directory is refused, and a free lock means that no
    controller is alive (the kernel releases it when the process dies, also on SIGKILL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self, *, record: bool = True) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        if record:
            start, cmdline = process_identity(os.getpid())
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": start,
                               "cmdline": cmdline, "time": time.time()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        return True

    def acquire(self, wait_s: float = 2.0, key: str = "--run-dir") -> "RunLock":
        """Take the lock (retrying for ``wait_s``: a `status` may hold it for a moment);
        ConfigError naming the holder if another controller has it."""
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                h = self.holder()
                who = (f"meshpilot run pid {h.get('pid')} on {h.get('host')} (since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h.get('time', 0)))})") if h else "another process"
                raise ConfigError(key, str(self.path.parent), reason=f"is in use by {who}",
                                  fix="wait for that run to end (`meshpilot cancel` stops it), or use another --run-dir")
            time.sleep(0.1)
        return self

    def holder(self) -> dict[str, Any]:
        try:
            d = json.loads(self.path.read_bytes().decode() or "{}")
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def held(self) -> bool | None:
        """True if some process holds the lock, False if not, None without a lock file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            return None
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def process_identity(pid: int) -> tuple[int, str]:
    """(start time in clock ticks since boot, command line) of a live process from /proc;
    (0, "") when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        return start, cmdline
    except (OSError, ValueError, IndexError):
        return 0, ""


def controller_identity(st: JobState) -> str:
    """Whether ``st.controller_pid`` is the run's controller: "verified" (alive, same start time and
    command line as recorded), "gone" (dead, a zombie, or another process now has the pid),
    "unverifiable" (alive but nothing recorded to compare, an older state file), or "other host"."""
    if st.controller_host and st.controller_host != socket.gethostname():
        return "other host"
    if not st.controller_pid or not pid_alive(st.controller_pid, unknown=False):
        return "gone"
    if not st.controller_start:
        return "unverifiable"
    start, cmdline = process_identity(st.controller_pid)
    if start != st.controller_start or (st.controller_cmdline and cmdline != st.controller_cmdline):
        return "gone"
    return "verified"


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


RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def check_run_id(ref: str, key: str = "RUN") -> str:
    """A run id (or prefix) is a plain name: letters, digits, ``_.-``, no path separator, no
    ``..``, no glob characters; it is only ever looked up inside the runs index."""
    if not RUN_ID.fullmatch(ref) or ".." in ref:
        raise ConfigError(key, ref, reason="is neither a run directory nor a valid run id (a run id is a plain name: "
                          "letters, digits, '_', '.', '-'; no '/' or '..')", fix="`meshpilot status` lists the runs")
    return ref


def register_run(run_id: str, run_dir: str | Path) -> None:
    check_run_id(run_id, key="run id")
    d = _index_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(d / f"{run_id}.json", json.dumps({"run_id": run_id, "run_dir": str(Path(run_dir).resolve())}),
                 mode=PRIVATE)


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
    try:
        if (p / STATE_FILE).is_file():
            return RunStore(p)
    except OSError:                  # a name too long for the OS: not a directory
        pass
    check_run_id(ref)
    idx = _index_dir() / f"{ref}.json"
    candidates = [idx] if idx.is_file() else sorted(_index_dir().glob(f"{ref}*.json")) if _index_dir().is_dir() else []
    if len(candidates) > 1:
        raise ConfigError("RUN", ref, reason="matches several runs",
                          allowed=[c.name[:-5] for c in candidates][:10], fix="give more of the run id")
    if not candidates:
        raise ConfigError("RUN", ref, reason="no such run directory or run id",
                          fix="`meshpilot status` lists the runs")
    try:
        rd = Path(json.loads(candidates[0].read_text())["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError("RUN", ref, reason=f"its index entry {candidates[0]} is unreadable") from None
    if not (rd / STATE_FILE).is_file():
        raise ConfigError("RUN", ref, reason=f"its directory {rd} is gone")
    return RunStore(rd)
