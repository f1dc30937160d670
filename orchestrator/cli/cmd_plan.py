"""``meshpilot plan JOB [overrides]``: search every plan, print the best, explain and export."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.config.loader import dump_job, job_from_dict, job_to_dict, load_job
from meshpilot.orchestrator.sim.report import estimate_tables, top_table, write_report


def add_parser(sub) -> None:
    from meshpilot.orchestrator.cli.main import add_job_arguments
    p = sub.add_parser("plan", help="search all parallel layouts and rank those that fit")
    add_job_arguments(p)
    p.add_argument("--objective", default="throughput", help="throughput | memory | cost (default throughput)")
    p.add_argument("--headroom", type=float, default=0.05, help="fraction of GPU memory kept free (default 0.05)")
    p.add_argument("--top", type=int, default=10, help="plans to print (default 10)")
    p.add_argument("--explain", metavar="PLAN", help='print only the full breakdown of one plan, given as overrides: '
                   '"plan.dp=4 plan.zero_stage=3 plan.micro_batch=2"')
    p.add_argument("--export-yaml", metavar="FILE", help="write the job with the chosen plan filled in")
    p.add_argument("--export-deepspeed", metavar="FILE", help="write the chosen plan's DeepSpeed config JSON")
    p.add_argument("--report", metavar="FILE", help="write a report (.png or .html)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _job_with_plan(job, plan):
    raw = job_to_dict(job)
    raw["plan"] = dict(plan.to_config(), auto=False)
    return job_from_dict(raw)


def run(args) -> int:
    from meshpilot.orchestrator.plan import text
    from meshpilot.orchestrator.sim.planner import search
    from meshpilot.orchestrator.sim.simulator import simulate

    job = load_job(args.job, args.overrides)
    res = search(job, objective=args.objective, headroom=args.headroom, top=args.top)
    console = Console()
    best = res.best
    out = {"objective": res.objective, "headroom": res.headroom, "enumerated": res.enumerated,
           "invalid": res.invalid, "scored": res.scored, "fitting": int(len(res.ranked)),
           "elapsed_s": res.elapsed_s, "top": [e.to_dict() for e in res.top], "rejected": res.rejected_lines(),
           "fixed": res.fixed.to_dict() if res.fixed else None, "risky": res.risky, "margin": res.margin_note}
    explained = None
    if args.explain:
        base = job_to_dict(job)
        base["plan"] = {"auto": False}
        ej = job_from_dict(base, text.parse(args.explain))
        explained = simulate(ej, headroom=args.headroom)
        out["explain"] = explained.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
    elif explained is not None:
        # --explain asks about one plan: its breakdown only, not the search's tables again
        for t in estimate_tables(explained, title=f"explain: {explained.plan}"):
            console.print(t)
        for r in explained.reasons:
            console.print(f"[red]does not fit:[/] {escape(r)}")
    else:
        console.print(f"{escape(str(job.model.name))} on {escape(str(job.cluster.name))} ({job.cluster.nodes} x {job.cluster.gpus_per_node} "
                      f"GPUs): {res.enumerated} plans enumerated, {res.invalid} invalid, {res.scored} scored, "
                      f"{len(res.ranked)} fit ({res.elapsed_s:.2f} s)")
        if res.margin_note:
            console.print(escape(res.margin_note))
        if res.top:
            console.print(top_table(res))
        for line in res.rejected_lines():
            console.print(f"rejected: {escape(line)}")
        if res.fixed is not None:
            f = res.fixed
            console.print(f"\nthe job's own plan: {f.plan}: peak {f.peak_memory_gib:.1f} GiB, step "
                          f"{f.step_time_s:.3g} s" + (f" ({f.step_time_s / res.top[0].step_time_s:.2f}x the best)"
                                                     if res.top else "") + ("" if f.fits else " - does not fit"))
            for t in estimate_tables(f, title=f"the job's plan: {f.plan}"):
                console.print(t)
        if best is not None and res.fixed is None:
            for t in estimate_tables(res.top[0], title=f"chosen: {res.top[0].plan}"):
                console.print(t)
    if best is None and (args.export_yaml or args.export_deepspeed):
        raise ConfigError("plan", "auto", reason="no plan fits, nothing to export: " + "; ".join(res.rejected_lines()))
    if args.export_yaml:
        Path(args.export_yaml).write_text(dump_job(_job_with_plan(job, best)))
        if not args.json:
            console.print(f"wrote {args.export_yaml}")
    if args.export_deepspeed:
        from meshpilot.strategies.deepspeed_config import deepspeed_config
        if best.zeroth_order:
            raise ConfigError("--export-deepspeed", args.export_deepspeed,
                              reason="the chosen plan is zeroth-order: it runs without a DeepSpeed engine")
        Path(args.export_deepspeed).write_text(json.dumps(deepspeed_config(job, best, on_cpu=False), indent=2))
        if not args.json:
            console.print(f"wrote {args.export_deepspeed}")
    if args.report:
        p = write_report(res, args.report)
        if not args.json:
            console.print(f"wrote {p}")
    return 0
