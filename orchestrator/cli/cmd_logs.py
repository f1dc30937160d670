"""``meshpilot logs RUN [--rank N] [--follow]``: a run's per-rank worker log or its controller log.

``--follow`` ends when the run reaches a terminal state, also when its controller died without
recording one (the run is then recorded as failed, "lost": :meth:`RunStore.reconcile`)."""
from __future__ import annotations

import sys
import time

from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.store import find_run


def add_parser(sub) -> None:
    p = sub.add_parser("logs", help="print a run's worker or controller log")
    p.add_argument("run", help="run directory or run id")
    p.add_argument("--rank", type=int, default=None, help="worker rank (default: the controller's log)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the run ends")
    p.add_argument("--tail", type=int, default=None, metavar="N", help="start with the last N lines only")
    p.set_defaults(func=run)


def run(args) -> int:
    store = find_run(args.run)
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
