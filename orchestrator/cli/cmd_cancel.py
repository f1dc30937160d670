"""``meshpilot cancel RUN``: ask a running job to stop; its controller tears the gang down
and ends in ``cancelled``. Works from any shell: it writes ``<run_dir>/cancel`` (polled by
the controller) and signals the controller process when it runs on this host and its pid still
is that controller (start time and command line as recorded at start: a reused pid is never
signalled). A run whose controller is already gone is recorded as failed ("lost") and the
command returns at once.

RUN may also be a submitted job (handle such as ``slurm:1234``, run id or run dir): the cancel goes
to its scheduler (scancel, SIGTERM to mpirun's process group, deleting the Kubernetes resources,
Ray's job stop). Idempotent: a job that already ended, or is gone, is reported and left alone."""
from __future__ import annotations

import sys
import time

from meshpilot.launch import submissions as subs
from meshpilot.orchestrator.cli.cmd_status import resolve


def add_parser(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a run (`meshpilot run`) or a submitted job (`meshpilot submit`)")
    p.add_argument("run", help="run directory, run id or submission handle (slurm:1234, k8s:NS/KIND/NAME, ...)")
    p.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the run to reach 'cancelled' (0: do not wait; default 60)")
    p.set_defaults(func=run)


def cancel_submission(rec: dict) -> int:
    # the backends' cancel is idempotent (and on Kubernetes also removes a finished job's resources)
    if subs.cancel(rec):
        print(f"{rec['handle']}: cancel requested")
    else:
        print(f"{rec['handle']}: nothing to cancel (already ended: {subs.safe_status_of(rec)['state']})")
    return 0


def run(args) -> int:
    what, found = resolve(args.run)
    if what == "submission":
        return cancel_submission(found)
    store = found
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
