"""``meshpilot calibrate RUN_DIR... [--probe PROBE.json ...] [--cluster PRESET_OR_YAML] [--out cluster.yaml]
[--holdout K] [--report FILE]``: refit a cluster's calibration from your own runs.

Reads every run's summary.json and job.yaml (:func:`meshpilot.orchestrator.sim.calibration.load_run`),
refits the calibratable quantities (:func:`~meshpilot.orchestrator.sim.calibration.calibrate`: the
achieved matrix rate, and one per matmul shape class when the runs cover two classes or more, the bus
bandwidths, the CPU Adam rate of an offloading rank, the device and host memory overheads per rank),
writes the cluster (``--cluster``, default the first run's) with its ``calibration:`` section updated
and the provenance as comments (which runs each class rate came from), and prints the predicted
against measured values of every run before and after, held-out runs apart, and the mean step-time
error per shape class. Refused with exit
status 2, before anything is written: a run directory without a summary (or a run that did not
succeed), runs from different cluster shapes, a ``--cluster`` of another accelerator or GPU. A
quantity that no run informs keeps its old value and the table says so.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshpilot.orchestrator.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="refit a cluster's calibration (matmul rate, per shape class too, "
                                         "bandwidths, CPU Adam, memory overheads) from recorded runs; write a "
                                         "cluster YAML")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `meshpilot run`")
    p.add_argument("--probe", action="append", default=[], metavar="PROBE.json",
                   help="a `meshpilot probe --json` file; its measured rates replace the cluster's first, its matmul "
                        "rate also as the rate of the shape class it was measured at (repeatable)")
    p.add_argument("--cluster", default=None, metavar="PRESET_OR_YAML",
                   help="the cluster to calibrate (default: the cluster the first run ran on)")
    p.add_argument("--out", default="cluster-calibrated.yaml", help="cluster YAML to write "
                   "(default: cluster-calibrated.yaml)")
    p.add_argument("--holdout", type=int, default=4, metavar="K",
                   help="with 4 or more runs, hold out every K-th run (by run id) from the fit and report it apart "
                        "(default 4; 0: no held-out runs)")
    p.add_argument("--report", default=None, metavar="FILE", help="also write a predicted-vs-measured plot "
                   "(.png or .html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from meshpilot.orchestrator.sim import calibration as cal

    if args.holdout < 0:
        raise ConfigError("--holdout", args.holdout, reason="must be 0 (no held-out runs) or a positive K")
    out = Path(args.out)
    if not out.parent.exists():
        raise ConfigError("--out", str(out), reason="the folder does not exist")
    if args.report and Path(args.report).suffix.lower() not in (".png", ".html", ".htm"):
        raise ConfigError("--report", args.report, reason="must end in .png or .html")
    runs = [cal.load_run(d) for d in args.runs]
    cal.check_shapes(runs)
    probes = [cal.read_probe(p) for p in args.probe]
    cluster = runs[0].job.cluster if args.cluster is None else _cluster(args.cluster)
    result = cal.calibrate(runs, cluster, probes=probes, probe_names=args.probe, holdout_every=args.holdout)
    command = "meshpilot calibrate " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "calibrate" else "meshpilot calibrate " + " ".join(
            shlex.quote(a) for a in args.runs)
    text = cal.cluster_yaml_text(result, command)
    _check_loads(text, out)
    out.write_text(text)
    console = Console()
    for t in tables(result):
        console.print(t)
    if args.report:
        from meshpilot.orchestrator.sim.report import write_calibration_report
        console.print(f"wrote {escape(str(write_calibration_report(result, args.report)))}")
    console.print(f"wrote {escape(str(out))} (use it as `cluster: {escape(str(out))}`)")
    return 0


def _cluster(name: str):
    from meshpilot.orchestrator.config.clusters import cluster_preset
    from meshpilot.orchestrator.config.loader import job_from_dict
    try:
        return job_from_dict({"model": "tiny-llama", "cluster": cluster_preset(name)}).cluster
    except ConfigError as e:
        raise ConfigError("--cluster", name, reason=f"does not load as a cluster: {e}") from None


def _check_loads(text: str, out: Path) -> None:
    """The written text must load back as a cluster (raises ConfigError before writing otherwise)."""
    import yaml

    from meshpilot.orchestrator.config.loader import job_from_dict
    try:
        job_from_dict({"model": "tiny-llama", "cluster": yaml.safe_load(text)})
    except ConfigError as e:
        raise ConfigError("--out", str(out), reason=f"the calibrated cluster does not load: {e}") from None


def _fmt(v: Optional[float], f: str = "{:.4g}") -> str:
    return "-" if v is None else f.format(v)


def _err(pred: Optional[float], meas: Optional[float]) -> str:
    if pred is None or not meas:
        return "-"
    return f"{(pred - meas) / meas:+.1%}"


def tables(result) -> list[Table]:
    """The fitted quantities, every run's predicted vs measured before and after, and the mean errors (by
    split, and by shape class and split)."""
    q = Table(title="calibration")
    for col in ("quantity", "old", "new", "runs", "note"):
        q.add_column(col, justify="right" if col in ("old", "new", "runs") else "left")
    for x in result.quantities:
        q.add_row(x.name, _fmt(x.old), _fmt(x.new) if x.fitted else "[yellow]kept[/]", str(x.runs), escape(x.note))
    rows = Table(title="predicted vs measured, before -> after (error = predicted / measured - 1)")
    for col in ("run", "split", "class", "step s", "before", "after", "peak GiB", "before", "after", "host GiB/node",
                "before", "after"):
        rows.add_column(col, justify="left" if col in ("run", "split", "class") else "right")
    for r in result.rows:
        cells = [escape(r.run_id), "[cyan]held out[/]" if r.held_out else "fit", r.shape_class]
        for key in ("step_time_s", "device_peak_gib", "host_node_gib"):
            m = r.measured[key]
            cells += [_fmt(m), f"{_fmt(r.before[key])} ({_err(r.before[key], m)})",
                      f"{_fmt(r.after[key])} ({_err(r.after[key], m)})"]
        rows.add_row(*cells)
    summary = Table(title="mean |error|")
    for col in ("split", "runs", "step before", "step after", "peak before", "peak after"):
        summary.add_column(col, justify="left" if col == "split" else "right")
    for name, held in (("fit", False), ("held out", True)):
        sel = [r for r in result.rows if r.held_out == held]
        if not sel:
            continue
        summary.add_row(name, str(len(sel)), *(_mean_err(sel, key, when) for key in ("step_time_s", "device_peak_gib")
                                                for when in ("before", "after")))
    return [q, rows, summary, by_class_table(result)]


def by_class_table(result) -> Table:
    """Mean |step-time error| per matmul shape class and split, beside the class's rate after the fit."""
    by_shape = result.cluster.calibration.matmul_tflops_by_shape
    t = Table(title="mean |step error| by shape class (h: hidden per shard, t: tokens per micro-batch, rounded down "
                    "to powers of two)")
    for col in ("class", "TFLOP/s after", "split", "runs", "step before", "step after"):
        t.add_column(col, justify="left" if col in ("class", "split") else "right")
    for cls in sorted({r.shape_class for r in result.rows}):
        rate = _fmt(by_shape.get(cls)) if cls in by_shape else "matmul_tflops x shape"
        for name, held in (("fit", False), ("held out", True)):
            sel = [r for r in result.rows if r.shape_class == cls and r.held_out == held]
            if sel:
                t.add_row(cls, rate, name, str(len(sel)), _mean_err(sel, "step_time_s", "before"),
                          _mean_err(sel, "step_time_s", "after"))
    return t


def _mean_err(rows, key: str, when: str) -> str:
    errs = [abs(getattr(r, when)[key] / r.measured[key] - 1.0) for r in rows
            if r.measured[key] and getattr(r, when)[key] is not None]
    return f"{sum(errs) / len(errs):.1%}" if errs else "-"
