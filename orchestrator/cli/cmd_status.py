"""``meshpilot status [RUN]``: a table of every recorded run, or one run's state and events.

RUN is a run directory, a run id or a unique prefix of one (see :mod:`meshpilot.orchestrator.run.store`).
A run whose controller process is gone while its state is not terminal (SIGKILL, a stopped
machine) is recorded as ``failed`` with a "lost" message first (:meth:`RunStore.reconcile`).
User-given text (run ids, messages, plans) is printed escaped, never as Rich markup.
"""
from __future__ import annotations

import json
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshpilot.orchestrator.run.store import find_run, list_runs


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show the state of runs started with `meshpilot run`")
    p.add_argument("run", nargs="?", default=None, help="run directory or run id (default: list every run)")
    p.add_argument("--json", action="store_true", help="print state.json instead of a table")
    p.add_argument("--events", type=int, default=10, metavar="N", help="show the last N events of one run")
    p.set_defaults(func=run)


def _shown_state(st) -> str:
    return f"{st.state} (lost)" if st.state == "failed" and st.message.startswith("lost:") else st.state


def run(args) -> int:
    console = Console()
    if args.run is None:
        runs = list_runs()
        states = [s.reconcile() for s in runs]
        if args.json:
            print(json.dumps([st.to_dict() for st in states], default=str, indent=2))
            return 0
        t = Table(title="meshpilot runs")
        for col in ("run", "state", "step", "loss", "attempt", "workers", "plan", "updated"):
            t.add_column(col, no_wrap=col != "plan")
        for st in states:
            t.add_row(escape(st.run_id), _shown_state(st), f"{st.step}/{st.total_steps}",
                      "-" if st.loss is None else f"{st.loss:.4f}", str(st.attempt), str(st.world_size), escape(st.plan),
                      time.strftime("%H:%M:%S", time.localtime(st.updated)))
        console.print(t if runs else "no runs recorded")
        return 0
    store = find_run(args.run)
    st = store.reconcile()
    if args.json:
        print(json.dumps(st.to_dict(), default=str, indent=2))
        return 0
    console.print(f"[bold]{escape(st.run_id)}[/bold]  {_shown_state(st)}  ({escape(st.message)})")
    console.print(escape(f"run dir {st.run_dir}; plan {st.plan}; {st.world_size} worker(s); attempt {st.attempt}, "
                         f"{st.restarts} restart(s); step {st.step}/{st.total_steps}"
                         + ("" if st.loss is None else f", loss {st.loss:.4f}")
                         + ("" if not st.tokens_per_s else f", {st.tokens_per_s:,.0f} tokens/s")))
    console.print(escape(f"controller pid {st.controller_pid} on {st.controller_host}; ray {st.ray_address or '-'}; "
                         f"worker pids {st.worker_pids}"))
    if args.events:
        t = Table(title=f"last {args.events} events")
        for col in ("time", "event", "detail"):
            t.add_column(col)
        for e in store.events()[-args.events:]:
            detail = (f"{e.get('old')} -> {e.get('new')}: {e.get('reason')}" if e.get("event") == "transition"
                      else json.dumps({k: v for k, v in e.items() if k not in ("time", "event", "results")},
                                      default=str)[:200])
            t.add_row(time.strftime("%H:%M:%S", time.localtime(e.get("time", 0))), escape(str(e.get("event"))),
                      escape(detail))
        console.print(t)
    return 0
