"""The collective-cost formulas: bus factor, bus bandwidth, alpha-beta fit and time, per group span.

Conventions are nccl-tests' (so numbers compare with published ones; :mod:`.collective_timing`
measures them): ``nbytes`` S is the whole tensor of the collective (the all-reduce buffer, the
all-gather output, the reduce-scatter input, one rank's all-to-all buffer). With t the time of
one collective over n ranks,

    algorithm bandwidth  B_alg = S / t
    bus bandwidth        B_bus = f(op, n) * B_alg,   f(all_reduce) = 2(n-1)/n,  f(others) = (n-1)/n

so B_bus is the per-link rate a ring would need and does not depend on n (:func:`bus_factor`,
:func:`bus_bandwidth_gbs`). The inverse, with a latency alpha, is the alpha-beta time

    t = alpha + f(op, n) * S / B_bus                                       (:func:`alpha_beta_time`)

and alpha and B_bus are fitted to measured (S, t) points by least squares
(:func:`fit_latency_bandwidth`). ``f(op, n) * S`` is also the number of bytes each rank sends
(:func:`bytes_sent_per_rank`).

Span. A group is a tuple of global ranks; node = rank // gpus_per_node. With n ranks on m
nodes and g ranks per node:
- m == 1 (intra-node): B_bus = the intra-node bus bandwidth (NVLink/NVSwitch), latency
  ``intra_node_latency_us``;
- g == 1 (inter-node, one rank per node): B_bus = the per-GPU NIC share
  ``inter_node_bandwidth_gbs``, latency ``inter_node_latency_us``;
- otherwise hierarchical: a reduce-scatter inside each node, the inter-node collective on
  S/g bytes carried by each of the g GPUs' NICs in parallel, then an all-gather inside the
  node. For all-gather and reduce-scatter the two phases are an intra-node (g ranks) and an
  inter-node (m ranks) collective on S/m and S/g; for all-to-all the fraction (n-g)/n of the
  buffer that leaves the node goes over the NIC and the rest over NVLink.

Calibration (``cluster.calibration``, written by ``meshpilot probe`` on one host) replaces the
intra-node bus bandwidth of each collective and the intra-node latency; inter-node numbers
always come from the cluster profile.

Every function below is written with numpy operations so that it evaluates one plan
(python floats) or a whole array of plans at once (the planner) with the same code.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@dataclass(frozen=True)
class GroupSpan:
    """Where a group's ranks live: ``n`` ranks on ``nodes`` nodes, at most ``per_node`` per node."""
    n: int
    nodes: int
    per_node: int

    @property
    def kind(self) -> str:
        if self.n <= 1:
            return "single"
        if self.nodes == 1:
            return "intra"
        return "inter" if self.per_node == 1 else "hierarchical"


def span_of(group: Sequence[int], gpus_per_node: int) -> GroupSpan:
    """The span of one group of global ranks (a tuple from :class:`RankLayout`)."""
    nodes: dict[int, int] = {}
    for r in group:
        nodes[r // gpus_per_node] = nodes.get(r // gpus_per_node, 0) + 1
    return GroupSpan(n=len(group), nodes=len(nodes), per_node=max(nodes.values()) if nodes else 0)


@dataclass(frozen=True)
class LinkRates:
    """Bus bandwidths (GB/s) and latencies (s) the cost model uses."""
    intra_busbw_gbs: dict[str, float]
    inter_busbw_gbs: float
    intra_latency_s: float
    inter_latency_s: float

    @classmethod
    def from_cluster(cls, cluster) -> "LinkRates":
        cal = cluster.calibration
        intra = float(cluster.intra_node_bandwidth_gbs)
        measured = {"all_reduce": cal.allreduce_busbw_gbs, "all_gather": cal.allgather_busbw_gbs,
                    "reduce_scatter": cal.reducescatter_busbw_gbs, "all_to_all": cal.alltoall_busbw_gbs}
        lat = cal.collective_latency_us if cal.collective_latency_us is not None else cluster.intra_node_latency_us
        return cls(intra_busbw_gbs={op: float(v) if v else intra for op, v in measured.items()},
                   inter_busbw_gbs=float(cluster.inter_node_bandwidth_gbs),
                   intra_latency_s=float(lat) * 1e-6, inter_latency_s=float(cluster.inter_node_latency_us) * 1e-6)


def bus_factor(op: str, n):
    """f(op, n): nccl-tests' ratio of bus to algorithm bandwidth, 2(n-1)/n for all-reduce and (n-1)/n
    for the others (0 for one rank; n < 1 counts as 1). Scalars or arrays."""
    if op not in COLLECTIVES:
        raise ValueError(f"unknown collective {op!r}; one of {COLLECTIVES}")
    n = np.maximum(np.asarray(n, dtype=float), 1.0)
    f = (2.0 if op == "all_reduce" else 1.0) * (n - 1.0) / n
    return f if f.ndim else float(f)


def bus_bandwidth_gbs(op: str, n: int, nbytes: float, seconds: float) -> float:
    """B_bus = f(op, n) * S / t in GB/s (1e9 B/s) of one ``op`` of ``nbytes`` that took ``seconds``."""
    return bus_factor(op, n) * nbytes / seconds / 1e9


def bytes_sent_per_rank(op: str, nbytes, n):
    """Bytes each rank puts on the wire for one collective of ``nbytes`` (ring algorithms): f(op, n) * S."""
    return bus_factor(op, n) * np.asarray(nbytes, dtype=float)


def alpha_beta_time(op: str, nbytes, n, busbw_gbs, latency_s):
    """alpha + f(op, n) * S / B_bus seconds for one ``op`` over ``n`` ranks (0 for one rank). Scalars or arrays."""
    t = np.where(np.asarray(n) > 1, latency_s + bus_factor(op, n) * np.asarray(nbytes, dtype=float)
                 / (busbw_gbs * 1e9), 0.0)
    return t if t.ndim else float(t)


def fit_latency_bandwidth(sizes: Sequence[float], seconds: Sequence[float], factor: float) -> tuple[float, float]:
    """Least-squares fit of ``t = alpha + factor * S / B`` to measured (S, t) points.

    Returns ``(alpha_us, B_gbs)``; alpha is clipped at 0 (a negative intercept means the
    small sizes are already bandwidth bound). Needs two distinct sizes.
    """
    xs = [factor * s for s in sizes]
    if len(set(xs)) < 2:
        raise ValueError("need at least two distinct message sizes to fit latency and bandwidth")
    mx, my = statistics.fmean(xs), statistics.fmean(seconds)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, seconds))
    slope = sxy / sxx                      # seconds per byte = 1 / B
    alpha = max(0.0, my - slope * mx)
    if slope <= 0:
        raise ValueError("time does not grow with size: cannot fit a bandwidth")
    return alpha * 1e6, 1.0 / slope / 1e9


def collective_time(op: str, nbytes, n, nodes, per_node, rates: LinkRates):
    """Seconds for one collective of ``nbytes`` over a group of ``n`` ranks spread over
    ``nodes`` nodes with ``per_node`` ranks each (scalars or numpy arrays): :func:`alpha_beta_time`
    on the span's link, or the hierarchical composition of the module docstring."""
    n = np.asarray(n, dtype=float)
    nodes = np.asarray(nodes, dtype=float)
    g = np.asarray(per_node, dtype=float)
    S = np.asarray(nbytes, dtype=float)
    bi, be = rates.intra_busbw_gbs[op], rates.inter_busbw_gbs
    li, le = rates.intra_latency_s, rates.inter_latency_s
    intra = alpha_beta_time(op, S, n, bi, li)
    inter = alpha_beta_time(op, S, n, be, le)
    if op == "all_reduce":
        # reduce-scatter (g) + all-reduce across nodes of S/g on each GPU's NIC + all-gather (g)
        hier = (alpha_beta_time("reduce_scatter", S, g, bi, li)
                + alpha_beta_time("all_reduce", S / np.maximum(g, 1), nodes, be, le)
                + alpha_beta_time("all_gather", S, g, bi, li))
    elif op in ("all_gather", "reduce_scatter"):
        hier = (alpha_beta_time(op, S / np.maximum(nodes, 1), g, bi, li)
                + alpha_beta_time(op, S / np.maximum(g, 1), nodes, be, le))
    else:  # all_to_all: the part leaving the node over the NIC, the rest over NVLink, concurrently
        n1 = np.maximum(n, 1.0)
        off = (n1 - g) / n1 * S
        on = (g - 1.0) / n1 * S
        hier = le + np.maximum(off / (be * 1e9), on / (bi * 1e9))
    out = np.where(n <= 1, 0.0, np.where(nodes <= 1, intra, np.where(g <= 1, inter, hier)))
    return out if out.ndim else float(out)


def group_collective_time(op: str, nbytes: float, group: Sequence[int], gpus_per_node: int,
                          rates: LinkRates) -> float:
    """:func:`collective_time` for a group given as its rank list (from a RankLayout)."""
    s = span_of(group, gpus_per_node)
    return float(collective_time(op, nbytes, s.n, s.nodes, s.per_node, rates))
