"""``meshpilot presets``: the model and cluster presets."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from meshpilot.orchestrator.config.clusters import cluster_preset, cluster_preset_names
from meshpilot.orchestrator.config.loader import job_from_dict


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the model and cluster presets")
    p.set_defaults(func=run)


def run(args) -> int:
    from meshpilot.orchestrator.config.models import model_preset_names, param_counts
    console = Console()
    t = Table(title="models")
    for col in ("name", "arch", "layers", "hidden", "heads/kv", "ffn", "vocab", "experts", "params", "active"):
        t.add_column(col, justify="left" if col in ("name", "arch") else "right")
    for name in model_preset_names():
        m = job_from_dict({"model": name, "cluster": "h100-sxm-4", "train": {"seq_len": 1}}).model
        pc = param_counts(m)
        t.add_row(name, m.arch, str(m.layers), str(m.hidden), f"{m.heads}/{m.kv_heads}", str(m.ffn), str(m.vocab),
                  f"{m.num_experts}x top{m.top_k}" if m.num_experts else "-", _fmt(pc.total), _fmt(pc.active))
    console.print(t)
    c = Table(title="clusters")
    for col in ("name", "nodes", "gpus/node", "gpu", "memory GiB", "bf16 TFLOP/s", "intra GB/s", "inter GB/s"):
        c.add_column(col, justify="left" if col in ("name", "gpu") else "right")
    for name in cluster_preset_names():
        d = cluster_preset(name)
        g = d.get("gpu", {})
        c.add_row(name, str(d.get("nodes")), str(d.get("gpus_per_node")), str(g.get("name")),
                  str(g.get("memory_gib")), str(g.get("bf16_tflops")), str(d.get("intra_node_bandwidth_gbs")),
                  str(d.get("inter_node_bandwidth_gbs")))
    console.print(c)
    return 0


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
