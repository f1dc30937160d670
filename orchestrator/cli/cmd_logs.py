"""``meshpilot logs RUN [--rank N] [--follow]``: a run's per-rank worker log or its controller log.

RUN may also be a submitted job (handle such as ``slurm:1234``, run id or run dir): without
``--rank`` its launcher/batch log and every per-node log (Slurm ``node<N>.log``, one log per
Kubernetes pod, Ray's ``rank<N>.log``), with ``--rank N`` the log holding rank N (mpirun writes
one log for all ranks); ``--follow`` re-reads them (Kubernetes and Ray through their API) until
the scheduler reports a final state.

``--follow`` ends when the run reaches a terminal state, also when its controller died without
recording one (the run is then recorded as failed, "lost": :meth:`RunStore.reconcile`)."""
from __future__ import annotations

import sys
import time

from meshpilot.launch import submissions as subs
from meshpilot.orchestrator.cli.cmd_status import resolve
from meshpilot.orchestrator.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("logs", help="print a run's worker or controller log")
    p.add_argument("run", help="run directory, run id or submission handle (slurm:1234, k8s:NS/KIND/NAME, ...)")
    p.add_argument("--rank", type=int, default=None, help="worker rank (default: the controller's log)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the run ends")
    p.add_argument("--tail", type=int, default=None, metavar="N", help="start with the last N lines only")
    p.set_defaults(func=run)


def print_submission_logs(rec: dict, *, rank: int | None = None, tail: int | None = None, follow: bool = False,
                          every: float = 1.0) -> int:
    """Print a submission's logs (``==> path <==`` before each); with ``follow`` keep printing what is
    appended until the scheduler reports a terminal state (one more read after it)."""
    out = sys.stdout
    pos: dict = {}
    shown = None
    first, ended = True, False
    while True:
        paths = subs.log_paths(rec, rank)
        new = False
        for p in paths:
            if not p.exists():
                continue
            size = p.stat().st_size
            if size <= pos.get(p, 0) and not (first and size == 0):
                continue
            with open(p, "rb") as f:
                f.seek(pos.get(p, 0))
                text = f.read().decode(errors="replace")
                pos[p] = f.tell()
            if first and tail is not None:
                text = "\n".join(text.splitlines()[-tail:]) + "\n"
            if shown != p:
                out.write(f"==> {p} <==\n")
                shown = p
            out.write(text)
            new = True
        out.flush()
        if first and not pos:
            print(f"meshpilot: no logs yet for {rec['handle']}", file=sys.stderr)
        first = False
        if not follow or (ended and not new):
            return 0
        if not new and subs.safe_status_of(rec)["state"] in subs.TERMINAL:
            ended = True                       # one more read: the last lines written before the end
            continue
        time.sleep(every)


def run(args) -> int:
    what, found = resolve(args.run)
    if what == "submission":
        return print_submission_logs(found, rank=args.rank, tail=args.tail, follow=args.follow)
    store = found
    st = store.reconcile()
    if args.rank is None:
        path = store.controller_log
    else:
        if not 0 <= args.rank < max(1, st.world_size):
            raise ConfigError("--rank", args.rank, reason=f"run {st.run_id} has ranks 0..{st.world_size - 1}")
        path = store.rank_log(args.rank)
    out = sys.stdout
    pos = 0
    if path.exists():
        text = path.read_text(errors="replace")
        if args.tail is not None:
            text = "\n".join(text.splitlines()[-args.tail:]) + "\n"
        out.write(text)
        out.flush()
        pos = path.stat().st_size
    elif not args.follow:
        print(f"meshpilot: no log yet at {path}", file=sys.stderr)
        return 0
    ended = False
    while args.follow:
        if path.exists() and path.stat().st_size > pos:
            with open(path, "rb") as f:
                f.seek(pos)
                out.write(f.read().decode(errors="replace"))
                pos = f.tell()
            out.flush()
        elif ended:
            return 0
        elif store.reconcile().terminal:      # one more read: the last lines written before the end
            ended = True
        else:
            time.sleep(0.5)
    return 0
