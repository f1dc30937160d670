"""``meshpilot run JOB [overrides]``: plan, check the fit, gang-schedule on Ray, train, recover.

The run itself is :class:`~meshpilot.orchestrator.run.session.RunSession` (plan choice, fit
check, run directory, state, controller, summary); this module adds the command line: its
arguments, SIGTERM / SIGINT handling, the Ray wiring (:func:`meshpilot.launch.ray_cluster.connect_ray`
and :class:`meshpilot.launch.group.RayWorkerGroup`), the progress bar and the printed summary
(time, tokens/s, MFU, and per rank the NVML peak beside the simulator's prediction, torch's
allocated and reserved peaks and the host RSS peak), also written to ``<run_dir>/summary.json``.

Exit status: 0 succeeded, 1 failed, 3 cancelled, 2 a configuration error.
SIGTERM / SIGINT (and ``meshpilot cancel``) cancel the run: the gang is torn down cleanly.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.controller import FailurePolicy, Outcome
from meshpilot.orchestrator.run.protocol import DEFAULT_WORKER, JobStatus
from meshpilot.orchestrator.run.protocol import Progress as StepProgress
from meshpilot.orchestrator.run.session import RunSession, bytecode_hint, check_worker, plan_job

log = logging.getLogger("meshpilot.run")

# (summary key of a rank's memory peaks, row label); the NVML row is the one the simulator predicts
MEMORY_ROWS = (("nvml", "peak GPU memory, NVML (GiB)"), ("allocated", "torch allocated peak (GiB)"),
               ("reserved", "torch reserved peak (GiB)"), ("host_rss", "host RSS peak (GiB)"))

def add_parser(sub: Any) -> None:
    from meshpilot.orchestrator.cli.main import add_job_arguments
    p = sub.add_parser("run", help="train a job on Ray: plan, gang-schedule, restart on failure")
    add_job_arguments(p)
    p.add_argument("--force", action="store_true", help="run even if the simulator says the plan does not fit")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else start an embedded local Ray)")
    p.add_argument("--run-dir", default=None, help="run directory (default: train.output_dir/<run id>); an existing one resumes from its "
                        "latest complete checkpoint")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts after worker failures (default 3)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before the first restart; doubles per restart, at most 60 (default 1)")
    p.add_argument("--placement-timeout", type=float, default=60.0,
                   help="seconds to wait for the placement group (default 60)")
    p.add_argument("--heartbeat-timeout", type=float, default=60.0,
                   help="a worker that does not answer a heartbeat for this long is failed (default 60)")
    p.add_argument("--step-timeout", type=float, default=600.0,
                   help="no new step for this long (a hung collective) restarts the gang (default 600)")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds from the gang's start to its first step (default 900)")
    p.add_argument("--worker", default=DEFAULT_WORKER, metavar="MODULE:FUNCTION",
                   help="training function run on every rank (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines every 10%% instead)")
    p.set_defaults(func=run)


def exit_code(status: JobStatus) -> int:
    """0 succeeded, 1 failed, 3 cancelled."""
    return {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.CANCELLED: 3}[status]


def run(args: argparse.Namespace) -> int:
    t_command = time.time()
    console = Console(stderr=False)
    job = load_job(args.job, args.overrides)
    plan, estimate = plan_job(job, force=args.force)
    check_worker(args.worker)
    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", args.max_restarts, reason="must be >= 0")
    from meshpilot.launch.gang import FAIL_AT_ENV, gang_spec, parse_fail_at
    fail_at = parse_fail_at(os.environ.get(FAIL_AT_ENV))
    c = job.cluster
    spec = gang_spec(plan.world_size, plan.tp, accelerator=c.accelerator, gpus_per_node=c.gpus_per_node,
                     cpu_cores=c.cpu_cores)

    session = RunSession.create(job, plan, estimate, job_path=args.job, run_dir=args.run_dir, t_command=t_command)
    try:
        console.print(f"[bold]meshpilot run[/bold] {session.run_id}: {plan.describe()} on {plan.world_size} "
                      f"{'GPU' if spec.use_gpus else 'CPU'} worker(s); run dir {session.run_dir}")
        hint = bytecode_hint(os.environ)
        if hint:
            log.warning("%s", hint)

        cancel_flag = threading.Event()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def catch_signals() -> None:
            for s in handlers:
                signal.signal(s, lambda *_: cancel_flag.set())

        catch_signals()
        connection = None
        try:
            from meshpilot.launch.group import RayWorkerGroup
            from meshpilot.launch.ray_cluster import connect_ray
            try:
                connection = session.connect(lambda: connect_ray(args.address, accelerator=c.accelerator,
                                                                 workers_per_node=c.gpus_per_node, nodes=c.nodes))
            except ConnectionError as e:
                raise ConfigError("--address", args.address or os.environ.get("RAY_ADDRESS"),
                                  reason=f"cannot connect to Ray: {e}") from None
            except (SystemExit, KeyboardInterrupt):   # ray.init replaces the SIGTERM handler while it starts
                return exit_code(JobStatus.CANCELLED)
            catch_signals()                            # ... so take SIGTERM/SIGINT back

            def make_group(run_dir: str, log_path: Callable[[int], str]) -> RayWorkerGroup:
                return RayWorkerGroup(job, plan, run_dir, spec=spec, log_path=log_path, worker_fn=args.worker,
                                      placement_timeout_s=args.placement_timeout,
                                      heartbeat_timeout_s=args.heartbeat_timeout, step_timeout_s=args.step_timeout,
                                      start_timeout_s=args.start_timeout, fail_at=fail_at)

            outcome = _drive(console, args, session, make_group, cancel_flag)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if connection is not None:
                connection.close()

        summary = session.finish(outcome)
        _print_summary(console, summary)
        return exit_code(outcome.status)
    finally:
        session.close()


def _drive(console: Console, args: argparse.Namespace, session: RunSession,
           make_group: Callable[[str, Callable[[int], str]], Any], cancel_flag: threading.Event) -> Outcome:
    """Run the session under a progress bar (or, without a terminal or with --no-progress, a
    log line every 10% of the steps)."""
    total = session.job.train.steps
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    bar = Progress(*columns, console=console, disable=args.no_progress or not console.is_terminal)
    task = bar.add_task("pending", total=total, loss="-", tps="-")
    last_logged = [-1]

    def on_progress(p: StepProgress, tps: Optional[float]) -> None:
        loss = p.metrics.get("loss")
        bar.update(task, completed=p.step, loss=f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                   tps=f"{tps:,.0f}" if tps else "-")
        if not bar.live.is_started or args.no_progress:
            every = max(1, total // 10)
            if p.step // every > last_logged[0]:
                last_logged[0] = p.step // every
                console.print(f"step {p.step}/{total} loss {loss if loss is None else round(float(loss), 4)} "
                              f"tokens/s {'-' if not tps else round(tps)}")

    def on_transition(old: JobStatus, new: JobStatus, reason: str, info: dict[str, Any]) -> None:
        bar.update(task, description=new.value)
        if new in (JobStatus.RESTARTING, JobStatus.FAILED, JobStatus.CANCELLED):
            console.print(f"[yellow]{old.value} -> {new.value}[/yellow]: {reason}")

    with bar:
        return session.run(make_group, FailurePolicy(max_restarts=args.max_restarts, backoff_s=args.backoff),
                           cancel_requested=cancel_flag.is_set, on_progress=on_progress,
                           on_transition=on_transition)


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    color = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}[s["status"]]
    console.print(f"[{color}]{s['status']}[/{color}] after {s['attempts']} attempt(s), {s['restarts']} restart(s): "
                  f"{s['message']}")
    if s["status"] != JobStatus.SUCCEEDED.value:
        return
    t = Table(title="run summary")
    t.add_column("metric")
    t.add_column("measured", justify="right")
    t.add_column("predicted", justify="right")

    def fmt(v: Optional[float], f: str = "{:.3f}") -> str:
        return "-" if v is None else f.format(v)

    t.add_row("wall time (s)", fmt(s["wall_s"], "{:.1f}"), "")
    t.add_row("command -> first step (s)", fmt(s["time_to_first_step_s"], "{:.1f}"), "")
    t.add_row("tokens/s", fmt(s["tokens_per_s"], "{:,.0f}"), fmt(s["predicted_tokens_per_s"], "{:,.0f}"))
    t.add_row("MFU", fmt(s["mfu"], "{:.2%}"), "")
    t.add_row("final loss", fmt(s["final_loss"], "{:.5f}"), "")
    t.add_row("parameter checksum", fmt(s["param_checksum"], "{:.6f}"), "")
    for r, peaks in sorted(s["memory_peaks_gib"].items()):
        for key, label in MEMORY_ROWS:
            predicted = fmt(s["predicted_peak_memory_gib"]) if key == "nvml" else ""
            t.add_row(f"rank {r}: {label}", fmt(peaks[key]), predicted)
    console.print(t)
