"""Presenting estimates and searches: rich tables for the terminal, a matplotlib report file.

The report shows (1) the memory breakdown of the top plans as stacked horizontal bars, each
labelled with its plan, against the GPU's memory and (2) step time against peak memory for every scored plan, with the GPU memory line,
the fitting plans, the rejected ones and the chosen plan marked. ``.png`` writes the figure;
``.html`` writes a page that embeds it (base64) with the top-plan table. A calibration
(``meshpilot calibrate --report``) has its own panel: predicted against measured step time and
peak memory of every run, before and after, with the y = x line (:func:`write_calibration_report`).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from rich.table import Table

from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.sim.estimate import MEMORY_KEYS, TIME_KEYS, Estimate


def estimate_tables(est: Estimate, title: str | None = None) -> list[Table]:
    """A summary table and the two breakdown tables of one estimate."""
    head = Table(title=title or f"plan {est.plan}", show_header=False)
    head.add_column("", style="bold")
    head.add_column("", justify="right")
    fits = ("[green]yes[/]" if est.fits_with_margin else "[yellow]yes, risky: not with the error band[/]") \
        if est.fits else "[red]no[/]"
    head.add_row("fits", fits)
    head.add_row("peak memory per GPU", f"{est.peak_memory_gib:.2f} GiB of {est.gpu_memory_gib:.1f}")
    if est.regime:
        head.add_row("measured error band", f"+{est.memory_margin_gib:.2f} GiB ({est.regime.replace('_', ' ')}): up to "
                                            f"{est.peak_memory_gib + est.memory_margin_gib:.2f} GiB")
    head.add_row("host memory per node",
                 f"{est.cpu_memory_gib_per_node:.1f} GiB of {est.cpu_memory_available_gib:.1f} usable")
    head.add_row("step time", f"{est.step_time_s:.4g} s")
    head.add_row("tokens/s", f"{est.tokens_per_s:,.0f}")
    head.add_row("MFU", f"{est.mfu:.1%}")
    head.add_row("world size", str(est.world_size))
    mem = Table(title="memory per GPU (GiB)")
    mem.add_column("term")
    mem.add_column("GiB", justify="right")
    for k in MEMORY_KEYS:
        mem.add_row(k, f"{est.memory_breakdown_gib[k]:.3f}")
    mem.add_row("[bold]peak (NVML)[/]", f"[bold]{est.peak_memory_gib:.3f}[/]")
    mem.add_row("cpu_offload (host, per node)", f"{est.memory_breakdown_gib['cpu_offload']:.3f}")
    tim = Table(title="time per step (s)")
    tim.add_column("term")
    tim.add_column("s", justify="right")
    for k in TIME_KEYS:
        tim.add_row(k, f"{est.time_breakdown_s[k]:.4g}")
    tim.add_row("[bold]step[/]", f"[bold]{est.step_time_s:.4g}[/]")
    return [head, mem, tim]


def top_table(result) -> Table:
    t = Table(title=f"top plans by {result.objective} ({len(result.ranked)} of {result.scored} scored plans fit, "
                    f"{result.elapsed_s:.2f} s)")
    for col, just in (("#", "right"), ("plan", "left"), ("GPUs", "right"), ("peak GiB", "right"),
                      ("host GiB/node", "right"), ("step s", "right"), ("tokens/s", "right"), ("MFU", "right"), ("margin", "left")):
        t.add_column(col, justify=just)
    for i, e in enumerate(result.top, 1):
        t.add_row(str(i), e.plan, str(e.world_size), f"{e.peak_memory_gib:.1f}", f"{e.cpu_memory_gib_per_node:.1f}",
                  f"{e.step_time_s:.3g}",
                  f"{e.tokens_per_s:,.0f}", f"{e.mfu:.1%}",
                  f"+{e.memory_margin_gib:.1f} GiB" if e.fits_with_margin
                  else f"[yellow]risky (+{e.memory_margin_gib:.1f} GiB)[/]")
    return t


def _figure(result):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tops = result.top
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, max(6.0, 2.5 + 0.45 * len(tops))),
                                   gridspec_kw={"width_ratios": [1.15, 1]})
    mem_gib = result.job.cluster.gpu.memory_gib
    # horizontal bars, best plan on top, each labelled with its rank and its plan
    y = np.arange(len(tops))
    left = np.zeros(len(tops))
    for k in MEMORY_KEYS:
        vals = np.array([e.memory_breakdown_gib[k] for e in tops])
        ax1.barh(y, vals, left=left, label=k)
        left += vals
    ax1.axvline(mem_gib, color="k", ls="--", lw=1, label=f"GPU memory {mem_gib:.1f} GiB")
    ax1.set_yticks(y, [f"#{i + 1}  {e.plan}" for i, e in enumerate(tops)], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("GiB per GPU")
    ax1.set_title("memory breakdown of the top plans")
    # legends below the axes: they never cover a bar or a point
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    s = result.scores
    fits = s.fits
    ax2.scatter(s.peak_gib[~fits], s.step_time_s[~fits], s=6, c="tab:red", alpha=0.4, label="does not fit")
    ax2.scatter(s.peak_gib[fits], s.step_time_s[fits], s=6, c="tab:blue", alpha=0.5, label="fits")
    ax2.axvline(mem_gib, color="k", ls="--", lw=1, label="GPU memory")
    ax2.axvline(result.limit_gib, color="gray", ls=":", lw=1, label=f"limit with {result.headroom:.0%} headroom")
    if len(result.ranked):
        b = int(result.ranked[0])
        ax2.scatter([s.peak_gib[b]], [s.step_time_s[b]], marker="*", s=250, c="gold", edgecolors="k",
                    label=f"chosen: {tops[0].plan}", zorder=5)
    if result.fixed is not None:
        ax2.scatter([result.fixed.peak_memory_gib], [result.fixed.step_time_s], marker="X", s=120, c="k",
                    label=f"job's plan: {result.fixed.plan}", zorder=5)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("peak memory per GPU (GiB)")
    ax2.set_ylabel("step time (s)")
    ax2.set_title(f"all {result.scored} scored plans")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.suptitle(f"{result.job.model.name} on {result.job.cluster.name} "
                 f"({result.job.cluster.nodes} x {result.job.cluster.gpus_per_node} GPUs)")
    fig.tight_layout()
    return fig


def _report_path(path: str | Path) -> Path:
    """``path`` as a Path, or a ConfigError naming ``--report`` unless it ends in .png or .html."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".html", ".htm"):
        raise ConfigError("--report", str(path), reason="must end in .png or .html")
    return path


def _html_page(path: Path, title: str, body: str, png: bytes, alt: str) -> Path:
    """Write ``body`` as a UTF-8 HTML page titled ``title``, the PNG embedded after it."""
    img = base64.b64encode(png).decode()
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
                    f"{body}<img alt='{alt}' src='data:image/png;base64,{img}'/></body></html>")
    return path


def _png(fig, path: Path) -> bytes | None:
    """Render ``fig`` as PNG bytes and close it; a ``.png`` path is written and None returned, for
    an HTML path the bytes are returned to embed."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        path.write_bytes(buf.getvalue())
        return None
    return buf.getvalue()


def write_report(result, path: str | Path) -> Path:
    """Write the search report as ``.png`` or ``.html`` (the PNG embedded)."""
    path = _report_path(path)
    png = _png(_figure(result), path)
    if png is None:
        return path
    rows = "".join(f"<tr><td>{i}</td><td>{html.escape(e.plan)}</td><td>{e.world_size}</td>"
                   f"<td>{e.peak_memory_gib:.1f}</td><td>{e.cpu_memory_gib_per_node:.1f}</td><td>{e.step_time_s:.3g}</td><td>{e.tokens_per_s:,.0f}</td>"
                   f"<td>{e.mfu:.1%}</td></tr>" for i, e in enumerate(result.top, 1))
    rej = "".join(f"<li>{html.escape(line)}</li>" for line in result.rejected_lines())
    return _html_page(
        path, "meshpilot plan",
        f"<h1>meshpilot plan: {html.escape(result.job.model.name)} on {html.escape(result.job.cluster.name)}</h1>"
        f"<p>objective {result.objective}, headroom {result.headroom:.0%}, {result.scored} plans scored, "
        f"{len(result.ranked)} fit.</p><table border='1' cellpadding='3'><tr><th>#</th><th>plan</th><th>GPUs</th>"
        f"<th>peak GiB</th><th>host GiB/node</th><th>step s</th><th>tokens/s</th><th>MFU</th></tr>{rows}</table>"
        f"<h2>rejected</h2><ul>{rej}</ul>", png, "report")


def _calibration_figure(result):
    """Predicted against measured step time and peak memory of every run, before and after the
    calibration, on log axes with the y = x line; held-out runs drawn hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, key, label in ((axes[0], "step_time_s", "step time (s)"), (axes[1], "device_peak_gib", "peak memory (GiB)")):
        vals = []
        for when, color in (("before", "tab:gray"), ("after", "tab:blue")):
            for held in (False, True):
                pts = [(r.measured[key], getattr(r, when)[key]) for r in result.rows
                       if r.held_out == held and r.measured[key] and getattr(r, when)[key]]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                vals += list(xs) + list(ys)
                ax.scatter(xs, ys, s=40, label=f"{when}{' (held out)' if held else ''}",
                           facecolors="none" if held else color, edgecolors=color)
        if vals:
            lo, hi = min(vals) / 1.3, max(vals) * 1.3
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(f"{label}: predicted vs measured")
        ax.legend(fontsize=8)
    fig.suptitle(f"calibration of {result.cluster.name} from {len(result.rows)} run(s)")
    fig.tight_layout()
    return fig


def write_calibration_report(result, path: str | Path) -> Path:
    """Write the predicted-vs-measured panel of a calibration (``meshpilot calibrate --report``) as
    ``.png`` or ``.html`` (the PNG embedded, with the runs' rows)."""
    path = _report_path(path)
    png = _png(_calibration_figure(result), path)
    if png is None:
        return path

    def f(v):
        return "-" if v is None else f"{v:.4g}"
    rows = "".join(
        f"<tr><td>{html.escape(r.run_id)}</td><td>{'held out' if r.held_out else 'fit'}</td>"
        + "".join(f"<td>{f(r.measured[k])}</td><td>{f(r.before[k])}</td><td>{f(r.after[k])}</td>"
                  for k in ("step_time_s", "device_peak_gib", "host_node_gib")) + "</tr>" for r in result.rows)
    return _html_page(
        path, "meshpilot calibrate",
        f"<h1>meshpilot calibrate: {html.escape(result.cluster.name)}</h1><table border='1' cellpadding='3'>"
        "<tr><th>run</th><th>split</th><th>step s</th><th>before</th><th>after</th><th>peak GiB</th><th>before</th>"
        f"<th>after</th><th>host GiB/node</th><th>before</th><th>after</th></tr>{rows}</table>",
        png, "predicted vs measured")
