"""``meshpilot status [RUN]``: a table of every recorded run, or one run's state and events.

RUN is a run directory, a run id or a unique prefix of one (see :mod:`meshpilot.orchestrator.run.store`).
A run whose controller process is gone while its state is not terminal is shown as ``lost``.
"""
from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from meshpilot.orchestrator.run.store import find_run, list_runs


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show the state of runs started with `meshpilot run`")
    p.add_argument("run", nargs="?", default=None, help="run directory or run id (default: list every run)")
    p.add_argument("--json", action="store_true", help="print state.json instead of a table")
    p.add_argument("--events", type=int, default=10, metavar="N", help="show the last N events of one run")
    p.set_defaults(func=run)


def _shown_state(store) -> str:
    st = store.read()
    if not st.terminal and not store.controller_alive():
        return f"{st.state} (lost: controller pid {st.controller_pid} is gone)"
    return st.state


def run(args) -> int:
    console = Console()
    if args.run is None:
        runs = list_runs()
        if args.json:
            console.print_json(json.dumps([s.read().to_dict() for s in runs], default=str))
            return 0
        t = Table(title="meshpilot runs")
        for col in ("run", "state", "step", "loss", "attempt", "workers", "plan", "updated"):
            t.add_column(col, no_wrap=col != "plan")
        for s in runs:
            st = s.read()
            t.add_row(st.run_id, _shown_state(s), f"{st.step}/{st.total_steps}",
                      "-" if st.loss is None else f"{st.loss:.4f}", str(st.attempt), str(st.world_size), st.plan,
                      time.strftime("%H:%M:%S", time.localtime(st.updated)))
        console.print(t if runs else "no runs recorded")
        return 0
    store = find_run(args.run)
    st = store.read()
    if args.json:
        console.print_json(json.dumps(st.to_dict(), default=str))
        return 0
    console.print(f"[bold]{st.run_id}[/bold]  {_shown_state(store)}  ({st.message})")
    console.print(f"run dir {st.run_dir}; plan {st.plan}; {st.world_size} worker(s); attempt {st.attempt}, "
                  f"{st.restarts} restart(s); step {st.step}/{st.total_steps}"
                  + ("" if st.loss is None else f", loss {st.loss:.4f}")
                  + ("" if not st.tokens_per_s else f", {st.tokens_per_s:,.0f} tokens/s"))
    console.print(f"controller pid {st.controller_pid} on {st.controller_host}; ray {st.ray_address or '-'}; "
                  f"worker pids {st.worker_pids}")
    if args.events:
        t = Table(title=f"last {args.events} events")
        for col in ("time", "event", "detail"):
            t.add_column(col)
        for e in store.events()[-args.events:]:
            detail = (f"{e.get('old')} -> {e.get('new')}: {e.get('reason')}" if e["event"] == "transition"
                      else json.dumps({k: v for k, v in e.items() if k not in ("time", "event", "results")},
                                      default=str)[:200])
            t.add_row(time.strftime("%H:%M:%S", time.localtime(e["time"])), e["event"], detail)
        console.print(t)
    return 0
