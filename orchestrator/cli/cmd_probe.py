"""``meshpilot probe [--out profile.yaml] [--cluster PRESET] [--quick]``: calibrate a cluster profile.

Measures this machine (see :mod:`meshpilot.comm.probe`) and writes the base cluster
(``--cluster`` preset or file, default the detected ``local``) with its ``calibration:``
section filled. The file loads as ``cluster: profile.yaml`` in a job, and the simulator
then uses the measured rates in place of the datasheet numbers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from meshpilot.orchestrator.config.clusters import cluster_preset
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.config.loader import job_from_dict

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure collectives, matmul rate, host copies and CPU Adam; "
                                     "write a calibrated cluster profile")
    p.add_argument("--out", default="profile.yaml", help="cluster profile YAML to write (default: profile.yaml)")
    p.add_argument("--cluster", default="local",
                   help="base cluster preset or YAML whose calibration is filled (default: local, detected)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and iterations (about a minute)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: collectives,matmul,copies,cpu_adam")
    p.add_argument("--world", type=int, default=None,
                   help="processes for the collectives (default: every visible GPU, or 2 gloo workers on CPU)")
    p.add_argument("--json", dest="json_out", default=None, help="also write every raw measurement to this JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from meshpilot.comm.probe import PARTS, ProbeSettings, calibrated_profile, run_probe

    console = Console(stderr=True)
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    for s in skip:
        if s not in PARTS:
            raise ConfigError("--skip", s, reason="unknown probe part", allowed=PARTS)
    if args.world is not None and args.world < 1:
        raise ConfigError("--world", args.world, reason="must be a positive number of processes")
    base = cluster_preset(args.cluster)              # ConfigError for an unknown preset, before measuring
    _check_loads(base, f"--cluster {args.cluster}")
    _check_gpus_visible(base, args.cluster)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise ConfigError("--out", str(out), reason="the folder does not exist")

    settings = ProbeSettings.for_machine(quick=args.quick, skip=skip, world=args.world,
                                         adam_threads=_rank_threads(base))
    console.print(f"probing on {settings.device} ({settings.world} collective ranks"
                  f"{', quick' if args.quick else ''})")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        report = run_probe(settings, progress=lambda msg: bar.update(task, description=msg))

    profile = calibrated_profile(base, report)
    _check_loads(profile, "the written profile")
    out.write_text(_profile_text(profile, report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=1))
    _print_summary(Console(), report, out)
    return 0


def _check_gpus_visible(cluster: dict[str, Any], name: str) -> None:
    """A GPU cluster is calibrated only where a GPU is visible: without one every rate would be
    measured on the CPU and written under the GPU preset's name (raises ConfigError)."""
    c = job_from_dict({"model": "tiny-llama", "cluster": cluster}).cluster
    if c.accelerator.value != "gpu":
        return
    import os

    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f", CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else ""
    raise ConfigError("--cluster", name,
                      reason=f"is a GPU cluster ({c.nodes} x {c.gpus_per_node} {c.gpu.name}) but this machine has no "
                             f"visible GPU (torch.cuda.is_available() is False{hidden}); its calibration would hold "
                             "CPU measurements under the GPU cluster's name",
                      fix="run the probe on a machine with the cluster's GPUs, or calibrate this machine with "
                          "--cluster local (the default)")


def _rank_threads(cluster: dict[str, Any]) -> int | None:
    """The OpenMP threads `meshpilot run` gives one offloading rank of ``cluster`` (clusters.threads_per_rank), at
    which the probe times CPU Adam per thread; None where the mapping lacks the cores."""
    from meshpilot.orchestrator.config.clusters import threads_per_rank
    if not cluster.get("cpu_cores"):
        return None
    return threads_per_rank(int(cluster["cpu_cores"]), int(cluster.get("gpus_per_node") or 1),
                            cluster.get("cpu_threads_per_rank"))


def _check_loads(cluster: dict[str, Any], what: str) -> None:
    """The cluster mapping must load as a job's cluster section (raises ConfigError otherwise)."""
    try:
        job_from_dict({"model": "tiny-llama", "cluster": cluster})
    except ConfigError as e:
        raise ConfigError(e.key, e.value, reason=f"{what} does not load as a cluster: {e}") from None


def _profile_text(profile: dict[str, Any], report) -> str:
    lines = [f"# Cluster profile calibrated by `meshpilot probe` on {report.device_name}, {report.date}",
             "# versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items())]
    if report.collectives:
        lines.append(f"# collectives ({report.collectives[0].ranks} ranks): op, size, median time, bus bandwidth")
        for s in report.collectives:
            lines.append(f"#   {s.op:15s} {s.nbytes / 2**20:10.3f} MiB {s.median_s * 1e3:10.3f} ms "
                         f"{s.busbw_gbs:9.3f} GB/s")
    if report.matmul:
        lines.append("# bf16 matmul: name, [m x k] x [k x n], TFLOP/s")
        for m in report.matmul:
            lines.append(f"#   {m.name:15s} [{m.m}x{m.k}]x[{m.k}x{m.n}] {m.tflops:9.3f}")
    if report.cpu_adam:
        a = report.cpu_adam
        lines.append(f"# CPU Adam: {a.params} params, build/load {a.load_s:.1f} s, step {a.median_step_s * 1e3:.2f} ms")
        r = report.cpu_adam_rank or a
        if r.grad_scale_gparams_per_s and r.cast_gparams_per_s:
            lines.append(f"# its host passes, {r.threads} threads: gradient scaling {r.grad_scale_gparams_per_s:.2f}, "
                         f"fp32 -> 16-bit cast {r.cast_gparams_per_s:.2f} G params/s")
        if r.cast_copy_h2d_gparams_per_s and r.cast_copy_d2h_gparams_per_s:
            lines.append(f"# ZeRO-3's blocking cast copies of {report.settings.cast_copy_params:,} elements, same threads: "
                         f"fp32 host -> 16-bit GPU {r.cast_copy_h2d_gparams_per_s:.3f}, fp32 GPU -> 16-bit host "
                         f"{r.cast_copy_d2h_gparams_per_s:.3f} G params/s")
    for part, why in report.skipped.items():
        lines.append(f"# skipped {part}: {why}")
    return "\n".join(lines) + "\n" + yaml.safe_dump(profile, sort_keys=False)


def _print_summary(console: Console, report, out: Path) -> None:
    t = Table(title=f"calibration ({report.device_name})")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in report.calibration().items():
        t.add_row(k, "skipped" if v is None else str(v))
    console.print(t)
    if report.collectives:
        c = Table(title="collectives: bus bandwidth GB/s")
        ops = list(dict.fromkeys(s.op for s in report.collectives))
        sizes = sorted({s.nbytes for s in report.collectives})
        c.add_column("size", justify="right")
        for op in ops:
            c.add_column(op, justify="right")
        for n in sizes:
            row = [f"{n / 2**20:.2f} MiB"]
            for op in ops:
                v = [s.busbw_gbs for s in report.collectives if s.op == op and s.nbytes == n]
                row.append(f"{v[0]:.2f}" if v else "-")
            c.add_row(*row)
        console.print(c)
    if report.cpu_adam:
        console.print(f"CPU Adam extension build/load: {report.cpu_adam.load_s:.1f} s (not part of the rate)")
    for part, why in report.skipped.items():
        console.print(f"[yellow]skipped {part}[/yellow]: {why}")
    console.print(f"wrote {out} (use it as `cluster: {out}`)")
