"""``meshpilot presets``: the model and cluster presets.

No cell is ever cut short: a preset name is what a job file needs. On a terminal wide enough
for the tables they are printed as rich tables; on a narrower terminal, and whenever stdout is
not a terminal (a pipe, a file), as plain space-aligned columns of any width, one row per line
(``meshpilot presets | grep llama`` prints whole rows).
"""
from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from meshpilot.orchestrator.config.clusters import cluster_preset, cluster_preset_names
from meshpilot.orchestrator.config.loader import job_from_dict

MODEL_COLUMNS = ("name", "arch", "layers", "hidden", "heads/kv", "ffn", "vocab", "experts", "params", "active")
CLUSTER_COLUMNS = ("name", "nodes", "gpus/node", "gpu", "memory GiB", "bf16 TFLOP/s", "intra GB/s", "inter GB/s")
LEFT = ("name", "arch", "gpu")


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the model and cluster presets")
    p.set_defaults(func=run)


def model_rows() -> list[list[str]]:
    from meshpilot.orchestrator.config.models import model_preset_names, param_counts
    rows = []
    for name in model_preset_names():
        m = job_from_dict({"model": name, "cluster": "h100-sxm-4", "train": {"seq_len": 1}}).model
        pc = param_counts(m)
        rows.append([name, m.arch, str(m.layers), str(m.hidden), f"{m.heads}/{m.kv_heads}", str(m.ffn), str(m.vocab),
                     f"{m.num_experts}x top{m.top_k}" if m.num_experts else "-", _fmt(pc.total), _fmt(pc.active)])
    return rows


def cluster_rows() -> list[list[str]]:
    rows = []
    for name in cluster_preset_names():
        d = cluster_preset(name)
        g = d.get("gpu", {})
        rows.append([name, str(d.get("nodes")), str(d.get("gpus_per_node")), str(g.get("name")),
                     str(g.get("memory_gib")), str(g.get("bf16_tflops")), str(d.get("intra_node_bandwidth_gbs")),
                     str(d.get("inter_node_bandwidth_gbs"))])
    return rows


def run(args) -> int:
    console = Console()
    print_table(console, "models", MODEL_COLUMNS, model_rows())
    print_table(console, "clusters", CLUSTER_COLUMNS, cluster_rows())
    return 0


def print_table(console: Console, title: str, columns: Sequence[str], rows: list[list[str]]) -> None:
    """A rich table where it fits the terminal whole, else plain columns; never a truncated cell."""
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in LEFT else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    if console.is_terminal:
        natural = Measurement.get(console, console.options.update(max_width=10**4), t).maximum
        if natural <= console.width:
            console.print(t)
            return
    console.print(plain_table(title, columns, rows), markup=False, highlight=False, soft_wrap=True)


def plain_table(title: str, columns: Sequence[str], rows: list[list[str]]) -> str:
    """``title`` over space-aligned columns of their full width (text left-aligned, numbers right)."""
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if col in LEFT else c.rjust(w)
                         for c, w, col in zip(cells, widths, columns)).rstrip()

    return "\n".join([title, line(columns), *(line(r) for r in rows)]) + "\n"


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
