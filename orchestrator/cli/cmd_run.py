"""``meshpilot run JOB [overrides]``: plan, check the fit, gang-schedule on Ray, train, recover.

Order (everything that can be wrong with the job is found before any resource is taken):

1. load the job; take its fixed plan or ask the planner (``plan: auto``);
2. ask the simulator whether the plan fits; refuse with its numbers and suggestions unless
   ``--force``; check that the worker function can be imported;
3. create the run directory (state.json, events.jsonl, job.yaml, logs/) and index it;
4. connect to Ray (``--address``, RAY_ADDRESS, or an embedded local Ray);
5. run the :class:`~meshpilot.orchestrator.run.controller.Controller` over a
   :class:`~meshpilot.launch.ray_backend.RayWorkerGroup`, showing a progress bar;
6. print the summary (time, tokens/s, MFU, peak memory per rank next to the prediction)
   and write it to ``<run_dir>/summary.json``.

Exit status: 0 succeeded, 1 failed, 3 cancelled, 2 a configuration error.
SIGTERM / SIGINT (and ``meshpilot cancel``) cancel the run: the gang is torn down cleanly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from meshpilot.orchestrator.run.controller import Controller, FailurePolicy, JobStatus, Outcome
from meshpilot.orchestrator.run.controller import Progress as StepProgress
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.sim.flops import mfu as mfu_of
from meshpilot.orchestrator.config.loader import dump_job, load_job
from meshpilot.orchestrator.run.store import JobState, RunStore, new_run_id
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan

log = logging.getLogger("meshpilot.run")

DEFAULT_WORKER = "meshpilot.orchestrator.train.worker:run_worker"
EXIT = {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.CANCELLED: 3}


def add_parser(sub) -> None:
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


# --- step 1-2: everything checkable without resources ---------------------------------------

def choose_plan(job) -> Plan:
    if not job.plan.auto:
        return resolve_plan(job)
    try:
        from meshpilot.orchestrator.sim.planner import choose_plan as planner_choose
    except ImportError:
        raise ConfigError("plan", "auto", reason="the planner (meshpilot.orchestrator.sim.planner) is not installed",
                          fix="give the degrees in the plan section (plan.dp=..., plan.tp=...)") from None
    return planner_choose(job)


def fit_check(job, plan: Plan, *, force: bool) -> Optional[Any]:
    """The simulator's Estimate (None without a simulator); raises ConfigError if it does not fit."""
    try:
        from meshpilot.orchestrator.sim.simulator import simulate
    except ImportError:
        log.warning("the simulator (meshpilot.orchestrator.sim.simulator) is not available: no fit check")
        return None
    est = simulate(job, plan)
    if est.fits or force:
        if not est.fits:
            log.warning("running a plan the simulator says does not fit (--force): %s", "; ".join(est.reasons))
        return est
    limit = getattr(est, "gpu_memory_gib", job.cluster.gpu.memory_gib)
    reasons = "; ".join(est.reasons) or "over the memory limit"
    raise ConfigError("plan", _describe(plan),
                      reason=f"does not fit: predicted peak {est.peak_memory_gib:.2f} GiB per device, "
                             f"{limit:.2f} GiB available ({reasons})",
                      fix=_suggestions(job, plan) + "; or pass --force to run it anyway")


def _suggestions(job, plan: Plan) -> str:
    """Suggest plans the simulator says fit (the planner's choice first, if it has one)."""
    tried: list[str] = []
    try:
        from meshpilot.orchestrator.sim.planner import choose_plan as planner_choose
        alt = planner_choose(job)
        if alt != plan:
            tried.append(f"the planner's choice {_describe(alt)} (plan: auto)")
    except Exception:
        pass
    try:
        from meshpilot.orchestrator.sim.simulator import simulate
        for kw in (dict(zero_stage=3), dict(activation_checkpointing="full"),
                   dict(zero_stage=3, activation_checkpointing="full"),
                   dict(zero_stage=3, offload_optimizer="cpu", activation_checkpointing="full")):
            alt = plan.replace(**kw)
            try:
                alt.check(job.model, job.train, job.cluster)
                if simulate(job, alt).fits:
                    tried.append(" ".join(f"plan.{k}={v}" for k, v in kw.items()))
                    break
            except ConfigError:
                continue
    except ImportError:
        pass
    return ("try " + ", or ".join(tried)) if tried else "use a larger cluster or a smaller model/batch"


def bytecode_hint(environ) -> Optional[str]:
    """A warning when the workers will compile their imports from source at every start.

    With PYTHONDONTWRITEBYTECODE set and no PYTHONPYCACHEPREFIX, a Python install that shipped
    without .pyc files (some container images) compiles torch, DeepSpeed and Ray from source in
    every worker process: 5.3 s of rank 0's 12 s start-up on 4 x H200, and command to first step
    28.5-31.2 s instead of 13.6-15.0 s (benchmarks/results/2026-11-27-s5-h200x4)."""
    if environ.get("PYTHONDONTWRITEBYTECODE") and not environ.get("PYTHONPYCACHEPREFIX"):
        return ("PYTHONDONTWRITEBYTECODE is set: where torch/DeepSpeed were installed without .pyc files, every "
                "worker compiles them from source at start-up (seconds per worker); unset it, or set "
                "PYTHONPYCACHEPREFIX to a writable folder")
    return None


def _describe(plan: Plan) -> str:
    return plan.describe()


def check_worker(ref: str) -> None:
    """The worker function ``MODULE:FUNCTION`` exists. meshpilot's own worker is only located
    (``find_spec``): importing it would import torch and DeepSpeed into the driver, which
    never uses them (seconds of start-up); a user's module is imported and its function
    checked."""
    import importlib
    import importlib.util
    mod, _, name = ref.partition(":")
    if ref == DEFAULT_WORKER:
        if importlib.util.find_spec(mod) is None:
            raise ConfigError("--worker", ref, reason=f"cannot find {mod}", fix="reinstall meshpilot")
        return
    try:
        m = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError("--worker", ref, reason=f"cannot import {mod}: {e}",
                          fix="the training worker module must be installed on the driver and every node") from None
    if not callable(getattr(m, name or "run_worker", None)):
        raise ConfigError("--worker", ref, reason=f"{mod} has no function {name or 'run_worker'}")


# --- the run -------------------------------------------------------------------------------

class _StatePersister:
    """Controller hooks -> state.json / events.jsonl (progress throttled to twice a second)."""

    def __init__(self, store: RunStore, state: JobState, group: Any):
        self.store, self.state, self.group = store, state, group
        self._last_write = 0.0

    def transition(self, old: JobStatus, new: JobStatus, reason: str, info: dict) -> None:
        s = self.state
        s.state, s.message = new.value, reason
        s.attempt, s.restarts = info.get("attempt", s.attempt), info.get("restarts", s.restarts)
        if "pids" in info:
            s.worker_pids = list(info["pids"])
        self.store.append_event("transition", old=old.value, new=new.value, reason=reason, **info)
        self.store.write(s)

    def progress(self, p: StepProgress, tokens_per_s: Optional[float]) -> None:
        s = self.state
        s.step = p.step
        loss = p.metrics.get("loss")
        s.loss = float(loss) if loss is not None else s.loss
        s.tokens_per_s = tokens_per_s
        now = time.time()
        if now - self._last_write >= 0.5:
            self._last_write = now
            self.store.write(s)


class _Throughput:
    """tokens/s over a sliding window of (time, step) samples of the current attempt."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.samples: list[tuple[float, int]] = []

    def add(self, step: int) -> Optional[float]:
        now = time.monotonic()
        if self.samples and step < self.samples[-1][1]:
            self.samples = []  # a restart resumed from an earlier step
        if not self.samples or step != self.samples[-1][1]:
            self.samples.append((now, step))
        self.samples = self.samples[-20:]
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) * self.tokens_per_step / (t1 - t0) if t1 > t0 and s1 > s0 else None


def run(args: argparse.Namespace) -> int:
    t_command = time.time()
    console = Console(stderr=False)
    job = load_job(args.job, args.overrides)
    plan = choose_plan(job)
    estimate = fit_check(job, plan, force=args.force)
    check_worker(args.worker)
    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", args.max_restarts, reason="must be >= 0")
    from meshpilot.launch.ray_backend import FAIL_AT_ENV, gang_spec, parse_fail_at
    fail_at = parse_fail_at(os.environ.get(FAIL_AT_ENV))
    c = job.cluster
    spec = gang_spec(plan.world_size, plan.tp, accelerator=c.accelerator, gpus_per_node=c.gpus_per_node,
                     cpu_cores=c.cpu_cores)

    # --- run directory ------------------------------------------------------------------
    job_name = job.model.name if job.model.name != "custom" else Path(args.job).stem
    run_id = new_run_id(job_name) if args.run_dir is None else Path(args.run_dir).name
    run_dir = Path(args.run_dir) if args.run_dir else Path(job.train.output_dir) / run_id
    store = RunStore(run_dir)
    state = JobState(run_id=run_id, run_dir=str(run_dir.resolve()), job_name=job_name, world_size=plan.world_size,
                     plan=_describe(plan), total_steps=job.train.steps)
    store.create(state)
    (run_dir / "job.yaml").write_text(dump_job(job))
    handler = _controller_logging(store.controller_log)
    log.info("run %s: %s, %d worker(s), run dir %s", run_id, _describe(plan), plan.world_size, run_dir)
    console.print(f"[bold]meshpilot run[/bold] {run_id}: {_describe(plan)} on {plan.world_size} "
                  f"{'GPU' if spec.use_gpus else 'CPU'} worker(s); run dir {run_dir}")
    hint = bytecode_hint(os.environ)
    if hint:
        log.warning("%s", hint)

    cancel_flag = threading.Event()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def catch_signals() -> None:
        for s in handlers:
            signal.signal(s, lambda *_: cancel_flag.set())

    catch_signals()
    session = None
    try:
        from meshpilot.launch.ray_backend import RayWorkerGroup, connect_ray
        try:
            session = connect_ray(args.address, accelerator=c.accelerator, workers_per_node=c.gpus_per_node,
                                  nodes=c.nodes)
        except ConnectionError as e:
            _abandon(store, state, "failed", f"cannot connect to Ray: {e}")
            raise ConfigError("--address", args.address or os.environ.get("RAY_ADDRESS"),
                              reason=f"cannot connect to Ray: {e}") from None
        except (SystemExit, KeyboardInterrupt):   # ray.init replaces the SIGTERM handler while it starts
            _abandon(store, state, "cancelled", "cancelled while Ray was starting")
            return EXIT[JobStatus.CANCELLED]
        catch_signals()                            # ... so take SIGTERM/SIGINT back
        state.ray_address = session.address
        store.write(state)
        group = RayWorkerGroup(job, plan, str(run_dir.resolve()), spec=spec,
                               log_path=lambda r: str(store.rank_log(r).resolve()),
                               worker_fn=args.worker, placement_timeout_s=args.placement_timeout,
                               heartbeat_timeout_s=args.heartbeat_timeout, step_timeout_s=args.step_timeout,
                               start_timeout_s=args.start_timeout, fail_at=fail_at)
        persist = _StatePersister(store, state, group)
        tput = _Throughput(job.train.global_batch * job.train.seq_len)
        try:
            outcome, first_seen = _drive(console, args, job, group, persist, tput, store, cancel_flag)
        except BaseException as e:                 # a controller bug: the gang is already torn down
            _abandon(store, state, "failed", f"controller error: {type(e).__name__}: {e}")
            raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if session is not None:
            session.close()

    summary = _summary(job, plan, estimate, outcome, t_command, first_seen)
    if outcome.results:                # the last progress write is throttled: record where it ended
        state.step = max(int(r.get("step", state.step) or 0) for r in outcome.results)
        state.loss = summary["final_loss"] if summary["final_loss"] is not None else state.loss
    state.result = summary
    store.write(state)
    store.append_event("summary", **summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _print_summary(console, summary, outcome)
    logging.getLogger().removeHandler(handler)
    return EXIT[outcome.status]


def _drive(console, args, job, group, persist, tput, store, cancel_flag) -> tuple[Outcome, Optional[float]]:
    total = job.train.steps
    first_seen: list[float] = []
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    bar = Progress(*columns, console=console, disable=args.no_progress or not console.is_terminal)
    task = bar.add_task("pending", total=total, loss="-", tps="-")
    last_logged = [-1]

    def on_progress(p: StepProgress) -> None:
        if not first_seen:
            first_seen.append(time.time())
        tps = tput.add(p.step)
        persist.progress(p, tps)
        loss = p.metrics.get("loss")
        bar.update(task, completed=p.step, loss=f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                   tps=f"{tps:,.0f}" if tps else "-")
        if not bar.live.is_started or args.no_progress:
            every = max(1, total // 10)
            if p.step // every > last_logged[0]:
                last_logged[0] = p.step // every
                console.print(f"step {p.step}/{total} loss {loss if loss is None else round(float(loss), 4)} "
                              f"tokens/s {'-' if not tps else round(tps)}")

    def on_transition(old, new, reason, info) -> None:
        persist.transition(old, new, reason, info)
        if new is JobStatus.RUNNING:
            tput.samples = []          # a new gang: do not count the restart gap as training time
        bar.update(task, description=new.value)
        if new in (JobStatus.RESTARTING, JobStatus.FAILED, JobStatus.CANCELLED):
            console.print(f"[yellow]{old.value} -> {new.value}[/yellow]: {reason}")

    ctl = Controller(group, FailurePolicy(max_restarts=args.max_restarts, backoff_s=args.backoff),
                     on_transition=on_transition, on_progress=on_progress,
                     cancel_requested=lambda: cancel_flag.is_set() or store.cancel_requested())
    with bar:
        outcome = ctl.run()
    return outcome, (first_seen[0] if first_seen else None)


def _abandon(store: RunStore, state: JobState, status: str, reason: str) -> None:
    """Record a terminal state reached outside the controller (Ray never came up, a crash)."""
    if state.state not in ("succeeded", "failed", "cancelled"):
        store.append_event("transition", old=state.state, new=status, reason=reason)
        state.state, state.message = status, reason
        store.write(state)
    log.error("run %s: %s: %s", state.run_id, status, reason)


def _controller_logging(path: Path) -> logging.Handler:
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s [controller] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for name in ("meshpilot", "ray"):
        logging.getLogger(name).propagate = True
    return h


# --- summary -------------------------------------------------------------------------------

def _summary(job, plan: Plan, estimate, outcome: Outcome, t_command: float, first_seen: Optional[float]) -> dict:
    results = outcome.results or []
    r0 = next((r for r in results if r.get("rank") == 0), results[0] if results else {})
    tokens_per_step = job.train.global_batch * job.train.seq_len
    tps = None
    if r0.get("first_step_time") and r0.get("last_step_time") and r0.get("last_step", 0) > r0.get("first_step", 0):
        tps = (r0["last_step"] - r0["first_step"]) * tokens_per_step / (r0["last_step_time"] - r0["first_step_time"])
    mfu = None
    if tps:
        mfu = mfu_of(job, tps, plan.world_size, zeroth_order=plan.zeroth_order)
    first_step = r0.get("first_step_time") if outcome.restarts == 0 and r0.get("first_step_time") else first_seen
    return dict(
        status=outcome.status.value, message=outcome.message, attempts=outcome.attempts, restarts=outcome.restarts,
        failures=[str(f) for f in outcome.failures], plan=_describe(plan), world_size=plan.world_size,
        wall_s=round(time.time() - t_command, 3),
        time_to_first_step_s=round(first_step - t_command, 3) if first_step else None,
        tokens_per_s=tps, mfu=mfu,
        final_loss=r0.get("final_loss"), param_checksum=r0.get("param_checksum"),
        peak_memory_gib={int(r.get("rank", i)): r.get("peak_memory_gib") for i, r in enumerate(results)},
        predicted_peak_memory_gib=getattr(estimate, "peak_memory_gib", None),
        predicted_tokens_per_s=getattr(estimate, "tokens_per_s", None),
        results=results)


def _print_summary(console: Console, s: dict, outcome: Outcome) -> None:
    color = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}[s["status"]]
    console.print(f"[{color}]{s['status']}[/{color}] after {s['attempts']} attempt(s), {s['restarts']} restart(s): "
                  f"{s['message']}")
    if outcome.status is not JobStatus.SUCCEEDED:
        return
    t = Table(title="run summary")
    t.add_column("metric")
    t.add_column("measured", justify="right")
    t.add_column("predicted", justify="right")
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    t.add_row("wall time (s)", fmt(s["wall_s"], "{:.1f}"), "")
    t.add_row("command -> first step (s)", fmt(s["time_to_first_step_s"], "{:.1f}"), "")
    t.add_row("tokens/s", fmt(s["tokens_per_s"], "{:,.0f}"), fmt(s["predicted_tokens_per_s"], "{:,.0f}"))
    t.add_row("MFU", fmt(s["mfu"], "{:.2%}"), "")
    t.add_row("final loss", fmt(s["final_loss"], "{:.5f}"), "")
    t.add_row("parameter checksum", fmt(s["param_checksum"], "{:.6f}"), "")
    for r, gib in sorted(s["peak_memory_gib"].items()):
        t.add_row(f"peak memory rank {r} (GiB)", fmt(gib), fmt(s["predicted_peak_memory_gib"]))
    console.print(t)
