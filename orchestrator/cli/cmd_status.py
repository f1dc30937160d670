"""``meshpilot status [RUN]``: a table of every recorded run and submission, or one run's state and events.

RUN is a run directory, a run id or a unique prefix of one (see :mod:`meshpilot.orchestrator.run.store`),
or a submitted job (``meshpilot submit``): its handle (``slurm:1234``, ``k8s:NS/KIND/NAME``,
``mpi:RUN_ID``, ``ray:ID``), run id or run directory. A submission's state comes from its scheduler
(:mod:`meshpilot.launch.submissions`), in one vocabulary for every backend (out_of_memory,
preempted, timeout, failed and cancelled kept apart).
A run whose controller process is gone while its state is not terminal (SIGKILL, a stopped
machine) is recorded as ``failed`` with a "lost" message first (:meth:`RunStore.reconcile`).
User-given text (run ids, messages, plans) is printed escaped, never as Rich markup.
A finished run also shows its measured peaks, median step time and phases beside the simulator's
predictions (``predicted_vs_measured`` in ``--json``; computed from summary.json and job.yaml for
a run whose summary predates them).
"""
from __future__ import annotations

import json
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshpilot.launch import submissions as subs
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.store import find_run, list_runs


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="show the state of runs (`meshpilot run`) and submitted jobs (`meshpilot submit`)")
    p.add_argument("run", nargs="?", default=None,
                   help="run directory, run id or submission handle such as slurm:1234 (default: list everything)")
    p.add_argument("--json", action="store_true", help="print state.json instead of a table")
    p.add_argument("--events", type=int, default=10, metavar="N", help="show the last N events of one run")
    p.set_defaults(func=run)


def _shown_state(st) -> str:
    return f"{st.state} (lost)" if st.state == "failed" and st.message.startswith("lost:") else st.state


def resolve(ref: str | None) -> tuple[str, object]:
    """``("run", RunStore)`` or ``("submission", record)`` for what a user named: a submission's handle
    or a directory holding a submission record is a submission; otherwise a run of ``meshpilot run``
    (unless it runs inside a submission: a Ray job), then a submission by run id (or unique prefix)."""
    if ref is not None and (subs.is_handle(ref) or subs.record_in(ref) is not None):
        return "submission", subs.find_record(ref)
    try:
        store = find_run(ref)
    except ConfigError as run_error:
        if ref is None:
            raise
        try:
            return "submission", subs.find_record(ref)
        except ConfigError:
            raise run_error from None
    rec = subs.record_in(str(store.run_dir)) if ref is not None else None
    # the `meshpilot run` of a Ray job submission: its scheduler (Ray's job API) is the controller to ask
    return ("submission", rec) if rec is not None else ("run", store)


def print_submission(rec: dict, *, as_json: bool = False) -> int:
    st = subs.status_of(rec)
    if as_json:
        print(json.dumps(st, indent=1, default=str))
    else:
        print(subs.line(st))
    return 0


def predicted_vs_measured_of(run_dir, st) -> dict | None:
    """A finished run's measured peaks, median step time and phases beside the simulator's predictions:
    its summary's ``predicted_vs_measured``, or computed now from summary.json and job.yaml for a
    summary written before these rows existed; None for a run without a successful summary."""
    recorded = (st.result or {}).get("predicted_vs_measured") if isinstance(st.result, dict) else None
    if recorded:
        return recorded
    if st.state != "succeeded":
        return None
    from meshpilot.orchestrator.sim.calibration import load_run
    try:
        return load_run(run_dir).comparison()
    except (ConfigError, OSError, ValueError, KeyError, TypeError):
        return None


def comparison_table(pvm: dict) -> Table:
    """One row per compared quantity: measured, predicted and the error (predicted / measured - 1)."""
    sim = pvm.get("simulator") or {}
    t = Table(title=f"predicted vs measured (simulator {sim.get('version', '?')}, constants "
                    f"{sim.get('constants_fingerprint', '?')})")
    for col in ("quantity", "measured", "predicted", "error"):
        t.add_column(col, justify="left" if col == "quantity" else "right")

    def row(name: str, pair: dict | None) -> None:
        if not pair:
            return
        m, p, e = pair.get("measured"), pair.get("predicted"), pair.get("error")
        t.add_row(escape(name), "-" if m is None else f"{m:.4g}", "-" if p is None else f"{p:.4g}",
                  "-" if e is None else f"{e:+.1%}")
    row("step time (s, median)", pvm.get("step_time_s"))
    for name, pair in (pvm.get("phases_s") or {}).items():
        row(f"  {name} (s)", pair)
    for rank, peaks in (pvm.get("per_rank") or {}).items():
        for key, pair in peaks.items():
            cpu = pvm.get("accelerator") == "cpu"
            label = ("host RSS (CPU worker: its device)" if cpu else "host RSS (per-rank share of the host "
                     "prediction)") if key == "host_rss" else key
            if key == "host":
                label = "host RssAnon + RssShmem (per-rank share of the host prediction)"
            row(f"rank {rank}: {label} (GiB)", pair)
    for node, v in (pvm.get("per_node") or {}).items():
        src = v.get("source") or ""
        how = "used by the node's processes" if src.startswith("the node's MemTotal") else "sum of workers' RSS"
        row(f"node {node}: host memory (GiB, {how})", v.get("host_peak_gib"))
    return t


def run(args) -> int:
    console = Console()
    if args.run is None:
        runs = list_runs()
        states = [s.reconcile() for s in runs]
        submitted = [subs.safe_status_of(rec) for rec in subs.records()]
        if args.json:
            print(json.dumps([st.to_dict() for st in states] + submitted, default=str, indent=2))
            return 0
        if submitted:
            st_table = Table(title="submitted jobs")
            for col, width in (("handle", 12), ("backend", 7), ("state", 13), ("step", None), ("loss", None),
                               ("plan", None), ("native", None)):
                st_table.add_column(col, min_width=width, overflow="fold")
            for s in submitted:
                st_table.add_row(escape(str(s.get("handle"))), escape(str(s.get("backend"))), escape(str(s["state"])),
                                 f"{s.get('step', '-')}/{s.get('total_steps', '?')}",
                                 f"{s['loss']:.4f}" if isinstance(s.get("loss"), (int, float)) else "-",
                                 escape(str(s.get("plan") or "-")),
                                 escape(" ".join(str(x) for x in (s.get("native_state"), s.get("reason")) if x)))
        if not runs and submitted:
            console.print(st_table)
            return 0
        t = Table(title="meshpilot runs")
        for col in ("run", "state", "step", "loss", "attempt", "workers", "plan", "updated"):
            t.add_column(col, no_wrap=col != "plan")
        for st in states:
            t.add_row(escape(st.run_id), _shown_state(st), f"{st.step}/{st.total_steps}",
                      "-" if st.loss is None else f"{st.loss:.4f}", str(st.attempt), str(st.world_size), escape(st.plan),
                      time.strftime("%H:%M:%S", time.localtime(st.updated)))
        console.print(t if runs else "no runs recorded")
        if submitted:
            console.print(st_table)
        return 0
    what, found = resolve(args.run)
    if what == "submission":
        return print_submission(found, as_json=args.json)
    store = found
    st = store.reconcile()
    pvm = predicted_vs_measured_of(store.run_dir, st)
    if args.json:
        out = st.to_dict()
        out["predicted_vs_measured"] = pvm
        print(json.dumps(out, default=str, indent=2))
        return 0
    console.print(f"[bold]{escape(st.run_id)}[/bold]  {_shown_state(st)}  ({escape(st.message)})")
    console.print(escape(f"run dir {st.run_dir}; plan {st.plan}; {st.world_size} worker(s); attempt {st.attempt}, "
                         f"{st.restarts} restart(s); step {st.step}/{st.total_steps}"
                         + ("" if st.loss is None else f", loss {st.loss:.4f}")
                         + ("" if not st.tokens_per_s else f", {st.tokens_per_s:,.0f} tokens/s")))
    console.print(escape(f"controller pid {st.controller_pid} on {st.controller_host}; ray {st.ray_address or '-'}; "
                         f"worker pids {st.worker_pids}"))
    if pvm:
        console.print(comparison_table(pvm))
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
