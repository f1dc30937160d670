"""``meshpilot validate JOB [overrides]``: the resolved configuration and the rank layout.

Also checks what ``meshpilot run`` checks before Ray starts: the output folder is writable and
the data named by ``train.data`` match the model's vocabulary and hold enough samples (a dataset
is prepared first when its cache is missing; a warning when the steps read the data more than
once). Worlds of more than :data:`FULL_LAYOUT_RANKS` ranks show the first and last ranks of the
layout only."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from meshpilot.orchestrator.config.inputs import check_inputs
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
    notes = check_inputs(job)           # a dataset is prepared (tokenized) here when its cache is missing
    console.print(Syntax(dump_job(job), "yaml", theme="ansi_dark", background_color="default"))
    pc = param_counts(job.model)
    console.print(f"model {escape(job.model.name)}: {pc.total:,} parameters ({pc.active:,} active per token)")
    for note in notes:
        console.print(f"[yellow]warning[/yellow]: {escape(note)}", soft_wrap=True)
    if job.plan.auto:
        console.print("plan: auto (the planner chooses the layout: `meshpilot plan` prints it)")
        return 0
    c = job.cluster
    layout = plan.layout(c.gpus_per_node)
    console.print(f"plan: {plan.describe()}  world size {plan.world_size} of {c.nodes * c.gpus_per_node} GPUs "
                  f"on {layout.nodes_used} node(s); layout {layout.fingerprint()}")
    t = Table(title="rank layout" if plan.world_size <= FULL_LAYOUT_RANKS else
              f"rank layout: ranks 0-{SHOWN_RANKS - 1} and the last {SHOWN_RANKS} of {plan.world_size}")
    cols = ["rank", "node"] + (["zo pair", "zo dp", "sign"] if plan.zeroth_order else ["tp", "dp", "ep", "edp"])
    for col in cols:
        t.add_column(col, justify="right")
    n = plan.world_size
    ranks = list(range(n)) if n <= FULL_LAYOUT_RANKS else list(range(SHOWN_RANKS)) + list(range(n - SHOWN_RANKS, n))
    for i, r in enumerate(ranks):
        if i and r != ranks[i - 1] + 1:
            t.add_row(*(["..."] * len(cols)))
        g = layout.groups_of(r)
        row = [str(r), str(g.node)] + ([group_text(g.zo_pert), group_text(g.zo_dp), "+" if g.zo_sign > 0 else "-"]
                                        if plan.zeroth_order else [group_text(g.tp), group_text(g.dp), group_text(g.ep),
                                                                   group_text(g.edp)])
        t.add_row(*row)
    console.print(t)
    return 0


FULL_LAYOUT_RANKS = 64         # larger worlds: the first and last SHOWN_RANKS ranks
SHOWN_RANKS = 8
GROUP_SHOWN = 8                # a group of more ranks shows its first ones and its size


def group_text(group: tuple[int, ...]) -> str:
    """The ranks of a group, "0,1,2,3"; a large one as "0,8,16,...,1016 (128 ranks)"."""
    if len(group) <= GROUP_SHOWN:
        return ",".join(map(str, group))
    return ",".join(map(str, group[:GROUP_SHOWN - 1])) + f",...,{group[-1]} ({len(group)} ranks)"
