"""``meshpilot run JOB [overrides]``: plan, check the fit, gang-schedule on Ray, train, recover.

The run itself is :class:`~meshpilot.orchestrator.run.session.RunSession` (plan choice, fit
check, run directory, state, controller, summary); this module adds the command line: its
arguments, SIGTERM / SIGINT handling, the Ray wiring (:func:`meshpilot.launch.ray_cluster.connect_ray`
and :class:`meshpilot.launch.group.RayWorkerGroup`), the refusal of a gang the cluster can never
hold (a job needing GPUs on a machine without any: exit 2 at once, not after the placement
timeout), the progress (:class:`RunProgress`: a live bar on a terminal, plain lines otherwise;
step, loss, tokens/s, ETA; the workers' notices such as a DeepSpeed op being compiled) and the
printed summary (time, command -> first step and its phases, tokens/s, MFU, and per rank the NVML
peak beside the simulator's prediction, torch's allocated and reserved peaks and the host RSS
peak), also written to ``<run_dir>/summary.json``.

Exit status: 0 succeeded, 1 failed, 3 cancelled, 2 a configuration error, 4 out of memory.
Out of memory (CUDA OOM, Ray's memory monitor, a SIGKILL with the node's memory near its limit)
is never retried with the same plan: a fixed plan stops (exit 4) with the measured and predicted
peaks and the simulator's suggestions; ``plan: auto`` falls back to the next fitting plan with a
lower predicted peak, at most ``--max-fallbacks`` times (see :mod:`~meshpilot.orchestrator.run.session`).
SIGTERM / SIGINT (and ``meshpilot cancel``) cancel the run: the gang is torn down cleanly.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meshpilot.orchestrator.config.inputs import with_absolute_paths
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.controller import FailurePolicy
from meshpilot.orchestrator.run.protocol import DEFAULT_WORKER, JobStatus
from meshpilot.orchestrator.run.protocol import Progress as StepProgress
from meshpilot.orchestrator.run.session import RunSession, bytecode_hint, check_worker, plan_job

# piped output: a progress line at least every PLAIN_EVERY_S seconds (when a step was made) or every
# tenth of the run's steps, whichever comes first, and the last step
PLAIN_EVERY_S = 10.0

log = logging.getLogger("meshpilot.run")

# (summary key of a rank's memory peaks, row label); the NVML row is the one the simulator predicts
MEMORY_ROWS = (("nvml", "peak GPU memory, NVML (GiB)"), ("allocated", "torch allocated peak (GiB)"),
               ("reserved", "torch reserved peak (GiB)"), ("host_rss", "host RSS peak (GiB)"))

EXIT_OUT_OF_MEMORY = 4
EPILOG = """exit status:
  0  succeeded
  1  failed (after the restarts, or a failure a restart would repeat)
  2  configuration error (nothing was started)
  3  cancelled (SIGTERM/SIGINT, meshpilot cancel, a preemption signal; resumable)
  4  out of memory: a worker ran out of GPU memory (CUDA OOM) or host memory (Ray's memory monitor,
     or a SIGKILL while the node's memory was near its limit). Never retried with the same plan: a
     fixed plan stops with the measured and predicted peaks and the simulator's suggestions;
     plan: auto falls back to the next fitting plan with a lower predicted peak (at most
     --max-fallbacks times) and exits 4 only when no fallback is left."""


def add_parser(sub: Any) -> None:
    from meshpilot.orchestrator.cli.main import add_job_arguments
    p = sub.add_parser("run", help="train a job on Ray: plan, gang-schedule, restart on failure",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p)
    p.add_argument("--force", action="store_true", help="run even if the simulator says the plan does not fit")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else start an embedded local Ray)")
    p.add_argument("--run-dir", default=None, help="run directory (default: train.output_dir/<run id>); an existing one resumes from its "
                        "latest complete checkpoint")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts after worker failures (default 3)")
    p.add_argument("--max-fallbacks", type=int, default=2,
                   help="plan: auto only: smaller plans tried after out-of-memory failures (default 2)")
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
    p.add_argument("--no-progress", action="store_true",
                   help="no live progress bar: plain progress lines (step, loss, tokens/s, ETA) every 10%% of the "
                        "steps or every 10 s, as when stdout is not a terminal")
    p.set_defaults(func=run)


def exit_code(status: JobStatus, out_of_memory: bool = False) -> int:
    """0 succeeded, 1 failed, 3 cancelled, 4 failed out of memory."""
    if out_of_memory and status is JobStatus.FAILED:
        return EXIT_OUT_OF_MEMORY
    return {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.CANCELLED: 3}[status]


def run(args: argparse.Namespace) -> int:
    t_command = time.time()
    console = Console(stderr=False)
    # absolute data paths: a worker of a Ray cluster started elsewhere runs in another working folder
    job = with_absolute_paths(load_job(args.job, args.overrides))
    plan, estimate = plan_job(job, force=args.force)
    check_worker(args.worker)
    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", args.max_restarts, reason="must be >= 0")
    max_fallbacks = getattr(args, "max_fallbacks", 2)
    if max_fallbacks < 0:
        raise ConfigError("--max-fallbacks", max_fallbacks, reason="must be >= 0")
    from meshpilot.launch.gang import FAIL_AT_ENV, gang_spec, parse_fail_at
    fail_at = parse_fail_at(os.environ.get(FAIL_AT_ENV))
    c = job.cluster
    spec = gang_spec(plan.world_size, plan.tp, accelerator=c.accelerator, gpus_per_node=c.gpus_per_node,
                     cpu_cores=c.cpu_cores, cpu_threads_per_rank=c.cpu_threads_per_rank)
    from meshpilot.launch.ray_cluster import embedded_resources, embeds, local_gpu_count
    machine_warnings: list[str] = []
    if embeds(args.address):            # what an embedded Ray will have, known before starting it
        have = embedded_resources(c.accelerator, c.gpus_per_node)
        refuse_unplaceable(job, plan, spec, {"GPU": local_gpu_count() if spec.use_gpus else have["num_gpus"],
                                             "CPU": have["num_cpus"]}, "this machine")
        machine_warnings = check_this_machine(job, estimate, spec.use_gpus, args.force)

    session = RunSession.create(job, plan, estimate, job_path=args.job, run_dir=args.run_dir, t_command=t_command)
    try:
        console.print(f"[bold]meshpilot run[/bold] {session.run_id}: {plan.describe()} on {plan.world_size} "
                      f"{'GPU' if spec.use_gpus else 'CPU'} worker(s); run dir {session.run_dir}")
        hint = bytecode_hint(os.environ)
        if hint:
            log.warning("%s", hint)
        for w in machine_warnings:
            log.warning("%s", w)
            console.print(f"[yellow]warning[/yellow]: {escape(w)}")

        cancel_flag = threading.Event()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def catch_signals() -> None:
            for s in handlers:
                signal.signal(s, lambda *_: cancel_flag.set())

        reporter = RunProgress(console, total=job.train.steps, tokens_per_step=job.train.global_batch * job.train.seq_len,
                               live=console.is_terminal and not args.no_progress)
        with reporter:
            catch_signals()
            connection = None
            try:
                from meshpilot.launch.group import RayWorkerGroup
                from meshpilot.launch.ray_cluster import connect_ray
                reporter.phase("starting Ray" if embeds(args.address) else "connecting to Ray")
                try:
                    connection = session.connect(lambda: connect_ray(args.address, accelerator=c.accelerator,
                                                                     workers_per_node=c.gpus_per_node, nodes=c.nodes,
                                                                     memory_usage_threshold=c.memory_usage_threshold))
                except ConnectionError as e:
                    raise ConfigError("--address", args.address or os.environ.get("RAY_ADDRESS"),
                                      reason=f"cannot connect to Ray: {e}") from None
                except (SystemExit, KeyboardInterrupt):   # ray.init replaces the SIGTERM handler while it starts
                    return exit_code(JobStatus.CANCELLED)
                catch_signals()                            # ... so take SIGTERM/SIGINT back
                _check_cluster(console, session, job, plan, spec, connection)

                def make_group(run_dir: str, log_path: Callable[[int], str], plan: Any = plan) -> RayWorkerGroup:
                    gs = spec if plan.world_size == spec.world_size and plan.tp == spec.tp else gang_spec(
                        plan.world_size, plan.tp, accelerator=c.accelerator, gpus_per_node=c.gpus_per_node,
                        cpu_cores=c.cpu_cores, cpu_threads_per_rank=c.cpu_threads_per_rank)
                    return RayWorkerGroup(job, plan, run_dir, spec=gs, log_path=log_path, worker_fn=args.worker,
                                          placement_timeout_s=args.placement_timeout,
                                          heartbeat_timeout_s=args.heartbeat_timeout, step_timeout_s=args.step_timeout,
                                          start_timeout_s=args.start_timeout, fail_at=fail_at,
                                          on_notice=reporter.notice)

                outcome = session.run(make_group, FailurePolicy(max_restarts=args.max_restarts, backoff_s=args.backoff),
                                      cancel_requested=cancel_flag.is_set, on_progress=reporter.progress,
                                      on_transition=reporter.transition, max_fallbacks=max_fallbacks)
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
                if connection is not None:
                    connection.close()

            summary = session.finish(outcome)
            if outcome.results:               # the last frame shows where the run ended, not the last poll
                reporter.final(session.state.step, summary.get("final_loss"), summary.get("tokens_per_s"))
        _print_summary(console, summary)
        return exit_code(outcome.status, outcome.out_of_memory)
    finally:
        session.close()


def check_this_machine(job: Any, estimate: Any, use_gpus: bool, force: bool) -> list[str]:
    """An embedded run trains on this machine: its plan against this machine's host memory and GPUs
    (run/machine_check.py; ConfigError, exit 2, where it would not fit them)."""
    from meshpilot.orchestrator.config.clusters import nvml_gpus
    from meshpilot.orchestrator.config.node_limits import node_memory
    from meshpilot.orchestrator.run.machine_check import check_machine
    if estimate is None:
        return []
    mem = node_memory()
    gpus = nvml_gpus() if use_gpus else []
    return check_machine(job, estimate, host_gib=None if mem is None else mem.total_bytes / 2**30,
                         gpu_gib=min(b for _, b in gpus) / 2**30 if gpus else None, force=force)


def refuse_unplaceable(job: Any, plan: Any, spec: Any, have: Mapping[str, float], where: str) -> None:
    """ConfigError (exit 2) when ``where``, with all of its resources ``have``, can never hold the gang:
    waiting out the placement timeout would not change it."""
    from meshpilot.launch.gang import capacity_shortfall
    short = capacity_shortfall(spec, have, where)
    if short is None:
        return
    if spec.use_gpus and int(have.get("GPU", 0)) < spec.world_size:
        fix = ("for a local CPU run try cluster=local (CPU workers over gloo); or run it where the GPUs are "
               "(--address of a Ray cluster with them, or RAY_ADDRESS)")
    elif spec.use_gpus:
        fix = (f"cluster.cpu_cores={job.cluster.cpu_cores} gives each GPU rank {spec.cpus_per_worker} CPUs: set "
               "cluster.cpu_cores to the cores of the machines, or run on a larger cluster")
    else:
        fix = (f"an embedded Ray has cluster.gpus_per_node={job.cluster.gpus_per_node} CPU worker slots on one node: "
               "lower the plan's ranks, raise cluster.gpus_per_node, or connect to a Ray cluster (--address)")
    raise ConfigError("cluster", job.cluster.name, reason=f"cannot place {plan.describe()}: {short}", fix=fix)


def _check_cluster(console: Console, session: RunSession, job: Any, plan: Any, spec: Any, connection: Any) -> None:
    """The connected cluster's resources against the gang: an embedded Ray that can never hold it
    fails the run at once (exit 2); an existing cluster may still grow (an autoscaler), so there
    it is a warning and the placement timeout stands."""
    try:
        have = connection.total_resources()
    except Exception as e:         # never fail a run for want of this check
        log.warning("cannot read the Ray cluster's resources: %s", e)
        return
    try:
        refuse_unplaceable(job, plan, spec, have, "this machine's Ray" if connection.embedded else "the Ray cluster")
    except ConfigError as e:
        if connection.embedded:
            session.abandon("failed", str(e))
            raise
        log.warning("%s", e)
        console.print(f"[yellow]warning[/yellow]: {escape(str(e))}; waiting up to the placement timeout in case "
                      f"the cluster grows")


def _fmt_duration(s: Optional[float]) -> str:
    if s is None:
        return "-:--:--"
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunProgress:
    """What ``meshpilot run`` shows while it runs: rank 0's step out of the total, the loss,
    tokens/s (the session's sliding window) and the ETA (the steps left at that rate).

    ``live`` (a terminal, without --no-progress): a rich progress bar, updated with every
    progress the controller sees (it polls twice a second), its last frame set to where the run
    ended (:meth:`final`). Otherwise plain lines, one when ``every_steps`` steps (a tenth of the
    run) or ``every_s`` seconds have passed since the last line, whichever comes first, and one
    for the last step. State changes and the workers' notices (e.g. a DeepSpeed op being
    compiled) are printed in both modes."""

    def __init__(self, console: Console, *, total: int, tokens_per_step: int, live: bool,
                 every_steps: Optional[int] = None, every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.console, self.total, self.tokens_per_step, self.live = console, total, tokens_per_step, live
        self.every_steps = every_steps or max(1, total // 10)
        self.every_s, self.clock = every_s, clock
        self.t0 = clock()
        self.step, self.loss, self.tps = 0, None, None
        self._printed: Optional[tuple[int, float]] = None        # (step, time) of the last plain line
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                            console=console, disable=not live)
        self.task = self.bar.add_task("pending", total=total, loss="-", tps="-", eta=_fmt_duration(None))

    def __enter__(self) -> "RunProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def eta_s(self) -> Optional[float]:
        """Seconds to the last step at the current tokens/s; 0 at the end, None while unknown."""
        if self.step >= self.total:
            return 0.0
        if not self.tps:
            return None
        return (self.total - self.step) * self.tokens_per_step / self.tps

    def line(self) -> str:
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        tps = "-" if not self.tps else f"{self.tps:,.0f}"
        return (f"step {self.step}/{self.total}  loss {loss}  tokens/s {tps}  ETA {_fmt_duration(self.eta_s())}  "
                f"elapsed {_fmt_duration(self.clock() - self.t0)}")

    # --- what the session reports --------------------------------------------------------
    def progress(self, p: StepProgress, tps: Optional[float]) -> None:
        loss = p.metrics.get("loss")
        self._set(p.step, float(loss) if isinstance(loss, (int, float)) else None, tps)

    def final(self, step: int, loss: Optional[float], tps: Optional[float]) -> None:
        """Where the run ended (from the workers' results): the last frame / line shows it."""
        self._set(step, loss, tps, final=True)

    def transition(self, old: JobStatus, new: JobStatus, reason: str, info: dict[str, Any]) -> None:
        self.bar.update(self.task, description=new.value)
        if new in (JobStatus.RESTARTING, JobStatus.FAILED, JobStatus.CANCELLED):
            self.console.print(f"[yellow]{old.value} -> {new.value}[/yellow]: {escape(reason)}")
        elif not self.live and new is not JobStatus.SUCCEEDED:
            self.console.print(f"{new.value}: {reason}", markup=False, highlight=False)

    def notice(self, msg: str) -> None:
        self.console.print(f"[cyan]{escape(msg)}[/cyan]", soft_wrap=True)

    def phase(self, what: str) -> None:
        """A step of the start-up before the controller runs (e.g. starting Ray)."""
        self.bar.update(self.task, description=what)
        if not self.live:
            self.console.print(f"{what} ...", markup=False, highlight=False)

    # --------------------------------------------------------------------------------------
    def _set(self, step: int, loss: Optional[float], tps: Optional[float], final: bool = False) -> None:
        self.step = step
        self.loss = loss if loss is not None else self.loss
        self.tps = tps or self.tps
        self.bar.update(self.task, completed=step, loss="-" if self.loss is None else f"{self.loss:.4f}",
                        tps="-" if not self.tps else f"{self.tps:,.0f}", eta=_fmt_duration(self.eta_s()))
        if self.live:
            if final:
                self.bar.refresh()
            return
        now = self.clock()
        last = self._printed
        if last is not None and last[0] == step:
            return
        if (final or last is None or step - last[0] >= self.every_steps or now - last[1] >= self.every_s
                or step >= self.total):
            self.console.print(self.line(), markup=False, highlight=False, soft_wrap=True)
            self._printed = (step, now)


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    color = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}[s["status"]]
    console.print(f"[{color}]{s['status']}[/{color}] after {s['attempts']} attempt(s), {s['restarts']} restart(s): "
                  f"{escape(str(s['message']))}")
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
    for name, v in (s.get("startup_phases_s") or {}).items():
        t.add_row(f"  {name} (s)", fmt(v, "{:.1f}"), "")
    t.add_row("tokens/s", fmt(s["tokens_per_s"], "{:,.0f}"), fmt(s["predicted_tokens_per_s"], "{:,.0f}"))
    t.add_row("MFU", fmt(s["mfu"], "{:.2%}"), "")
    t.add_row("final loss", fmt(s["final_loss"], "{:.5f}"), "")
    t.add_row("parameter checksum", fmt(s["param_checksum"], "{:.6f}"), "")
    if s.get("eval_loss") is not None:
        t.add_row("eval loss / perplexity", f"{s['eval_loss']:.5f} / {fmt(s.get('eval_perplexity'), '{:.2f}')}", "")
    gpu_run = any(p.get("nvml") is not None for p in s["memory_peaks_gib"].values())
    for r, peaks in sorted(s["memory_peaks_gib"].items()):
        for key, label in MEMORY_ROWS:
            # a CPU run has no NVML row: its prediction is compared with the RSS in the table below
            predicted = fmt(s["predicted_peak_memory_gib"]) if key == "nvml" and gpu_run else ""
            t.add_row(f"rank {r}: {label}", fmt(peaks.get(key)), predicted)
    console.print(t)
    if s.get("predicted_vs_measured"):
        from meshpilot.orchestrator.cli.cmd_status import comparison_table
        console.print(comparison_table(s["predicted_vs_measured"]))
