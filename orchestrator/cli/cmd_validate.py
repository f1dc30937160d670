"""``meshpilot validate JOB [overrides]``: the resolved configuration and the rank layout."""
from __future__ import annotations

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from meshpilot.orchestrator.config.loader import dump_job, load_job
from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.plan.plan import resolve_plan


def add_parser(sub) -> None:
    from meshpilot.orchestrator.cli.main import add_job_arguments
    p = sub.add_parser("validate", help="check a job file and print the resolved configuration and rank layout")
    add_job_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    console = Console()
    job = load_job(args.job, args.overrides)
    plan = None if job.plan.auto else resolve_plan(job)
    console.print(Syntax(dump_job(job), "yaml", theme="ansi_dark", background_color="default"))
    pc = param_counts(job.model)
    console.print(f"model {job.model.name}: {pc.total:,} parameters ({pc.active:,} active per token)")
    if job.plan.auto:
        console.print("plan: auto (the planner chooses the layout: `meshpilot plan` prints it)")
        return 0
    c = job.cluster
    layout = plan.layout(c.gpus_per_node)
    console.print(f"plan: {plan.describe()}  world size {plan.world_size} of {c.nodes * c.gpus_per_node} GPUs "
                  f"on {layout.nodes_used} node(s); layout {layout.fingerprint()}")
    t = Table(title="rank layout")
    cols = ["rank", "node"] + (["zo pair", "zo dp", "sign"] if plan.zeroth_order else ["tp", "dp", "ep", "edp"])
    for col in cols:
        t.add_column(col, justify="right")
    for r in range(plan.world_size):
        g = layout.groups_of(r)
        fmt = lambda grp: ",".join(map(str, grp))  # noqa: E731
        row = [str(r), str(g.node)] + ([fmt(g.zo_pert), fmt(g.zo_dp), "+" if g.zo_sign > 0 else "-"]
                                        if plan.zeroth_order else [fmt(g.tp), fmt(g.dp), fmt(g.ep), fmt(g.edp)])
        t.add_row(*row)
    console.print(t)
    return 0
