"""``meshpilot cancel RUN``: ask a running job to stop; its controller tears the gang down
and ends in ``cancelled``. Works from any shell: it writes ``<run_dir>/cancel`` (polled by
the controller) and signals the controller process when it runs on this host and its pid still
is that controller (start time and command line as recorded at start: a reused pid is never
signalled). A run whose controller is already gone is recorded as failed ("lost") and the
command returns at once."""
from __future__ import annotations

import sys
import time

from meshpilot.orchestrator.run.store import find_run


def add_parser(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a run started with `meshpilot run`")
    p.add_argument("run", help="run directory or run id")
    p.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the run to reach 'cancelled' (0: do not wait; default 60)")
    p.set_defaults(func=run)


def run(args) -> int:
    store = find_run(args.run)
    st = store.reconcile()
    if st.terminal:
        print(f"run {st.run_id} already ended: {st.state}" + (f" ({st.message[:300]})" if st.message else ""))
        return 0
    signalled = store.request_cancel()
    print(f"cancel requested for {st.run_id}" + (f" (signalled controller pid {st.controller_pid})"
                                                 if signalled else " (cancel file written)"))
    deadline = time.time() + args.wait
    while time.time() < deadline:
        st = store.read()
        if st.terminal:
            print(f"run {st.run_id}: {st.state}")
            return 0 if st.state == "cancelled" else 1
        if not store.controller_alive():
            st = store.reconcile()
            if st.terminal:
                print(f"run {st.run_id}: {st.state}")
                return 0 if st.state == "cancelled" else 1
            print(f"meshpilot: the controller of {st.run_id} is gone; state {st.state}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    if args.wait:
        print(f"meshpilot: run {st.run_id} is still {st.state} after {args.wait:.0f}s", file=sys.stderr)
        return 1
    return 0
