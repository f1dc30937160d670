"""``meshpilot simulate JOB [overrides] [--json]``: predicted memory and step time of the job's plan.

The DeepSpeed settings simulated are those of the config the worker would run for the plan
(``train.deepspeed_extra`` merged in): to simulate other bucket sizes or overlap, set them there,
e.g. ``train.deepspeed_extra.zero_optimization.reduce_bucket_size=100000000``."""
from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.sim.report import estimate_tables


def add_parser(sub) -> None:
    from meshpilot.orchestrator.cli.main import add_job_arguments
    p = sub.add_parser("simulate", help="predict peak GPU memory, host memory and step time of the job's plan")
    add_job_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--headroom", type=float, default=0.0, help="fraction of GPU memory kept free (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from meshpilot.orchestrator.sim.planner import choose_plan
    from meshpilot.orchestrator.sim.simulator import simulate

    job = load_job(args.job, args.overrides)
    plan = choose_plan(job) if job.plan.auto else None
    est = simulate(job, plan, headroom=args.headroom)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    console = Console()
    if job.plan.auto:
        console.print("plan: auto -> the planner's choice")
    for t in estimate_tables(est, title=escape(f"{job.model.name} on {job.cluster.name}: {est.plan}")):
        console.print(t)
    for r in est.reasons:
        console.print(f"[red]does not fit:[/] {escape(r)}")
    for n in est.notes:
        console.print(f"[yellow]{escape(n)}[/]" if n.startswith("risky") else escape(n))
    return 0
