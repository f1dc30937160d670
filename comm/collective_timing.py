"""Timing collectives with torch.distributed (the measurement behind ``meshpilot probe``).

:func:`time_collective` runs inside a process of an initialised ``torch.distributed``
group (gloo on CPU, NCCL on GPU): it times ``iters`` back-to-back collectives after
``warmup`` untimed ones, takes the slowest rank's time (one MAX all-reduce of a scalar)
and checks the result of one call against the closed form, so a broken collective fails
instead of reporting a bandwidth. Sizes follow nccl-tests' convention and bus bandwidths
come from :func:`meshpilot.comm.cost_model.bus_bandwidth_gbs` (the formulas live there).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from .cost_model import bus_bandwidth_gbs


@dataclass(frozen=True)
class CollectiveSample:
    """One (collective, size) measurement: median and min over the timed iterations."""
    op: str
    ranks: int
    nbytes: int
    median_s: float
    min_s: float
    busbw_gbs: float           # from median_s
    algbw_gbs: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _buffers(op: str, nbytes: int, n: int, rank: int, device: torch.device,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input, output) tensors for ``op`` with the nccl-tests size convention.

    Inputs hold rank + 1 so the result can be checked: all-reduce gives n(n+1)/2 everywhere,
    all-gather chunk j holds j + 1, reduce-scatter gives n(n+1)/2, all-to-all chunk j
    holds j + 1.
    """
    esize = torch.tensor([], dtype=dtype).element_size()
    numel = max(n, nbytes // esize // n * n)            # divisible by n for the chunked ops
    val = float(rank + 1)
    if op == "all_reduce":
        return torch.full((numel,), val, dtype=dtype, device=device), None
    if op == "all_gather":
        return (torch.full((numel // n,), val, dtype=dtype, device=device),
                torch.empty(numel, dtype=dtype, device=device))
    if op == "reduce_scatter":
        return (torch.full((numel,), val, dtype=dtype, device=device),
                torch.empty(numel // n, dtype=dtype, device=device))
    return (torch.full((numel,), val, dtype=dtype, device=device),
            torch.empty(numel, dtype=dtype, device=device))


def _run_once(op: str, inp: torch.Tensor, out: torch.Tensor | None, group: Any) -> None:
    if op == "all_reduce":
        dist.all_reduce(inp, group=group)
    elif op == "all_gather":
        dist.all_gather_into_tensor(out, inp, group=group)
    elif op == "reduce_scatter":
        dist.reduce_scatter_tensor(out, inp, group=group)
    else:
        dist.all_to_all_single(out, inp, group=group)


def _check(op: str, inp: torch.Tensor, out: torch.Tensor | None, n: int, rank: int) -> None:
    """Verify one collective's result against the closed form of :func:`_buffers`' inputs."""
    total = n * (n + 1) / 2
    if op == "all_reduce":
        got, want = inp.float(), torch.full_like(inp, total, dtype=torch.float32)
    elif op == "reduce_scatter":
        got, want = out.float(), torch.full_like(out, total, dtype=torch.float32)
    else:  # all_gather, all_to_all: chunk j comes from rank j, which sent j + 1
        got = out.float().view(n, -1)
        want = torch.arange(1, n + 1, dtype=torch.float32, device=out.device).view(n, 1).expand_as(got)
    if not torch.equal(got, want):
        raise RuntimeError(f"rank {rank}: {op} over {n} ranks returned a wrong result "
                           f"(first values {got.flatten()[:4].tolist()}, expected {want.flatten()[:4].tolist()})")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_collective(op: str, nbytes: int, *, group: Any = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, warmup: int = 2, iters: int = 5) -> CollectiveSample:
    """Time ``op`` of ``nbytes`` on ``group`` (collective: every rank of the group calls it).

    Each timed iteration is a barrier, then one collective timed from the start of the call
    to the device's completion; the slowest rank's time of each iteration is taken (a MAX
    all-reduce of the per-rank times), then the median over ``iters``.
    """
    device = torch.device(device)
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    inp, out = _buffers(op, nbytes, n, rank, device, dtype)
    _run_once(op, inp, out, group)
    _sync(device)
    _check(op, inp, out, n, rank)               # all-reduce works in place: only the first call is checkable
    for _ in range(max(0, warmup - 1)):
        _run_once(op, inp, out, group)
    _sync(device)
    times = []
    for _ in range(iters):
        dist.barrier(group=group)
        _sync(device)
        t0 = time.perf_counter()
        _run_once(op, inp, out, group)
        _sync(device)
        times.append(time.perf_counter() - t0)
    tt = torch.tensor(times, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tt, op=dist.ReduceOp.MAX, group=group)
    slowest = tt.cpu().tolist()
    med = statistics.median(slowest)
    real_bytes = inp.numel() * inp.element_size() * (n if op == "all_gather" else 1)
    return CollectiveSample(op=op, ranks=n, nbytes=real_bytes, median_s=med, min_s=min(slowest),
                            busbw_gbs=bus_bandwidth_gbs(op, n, real_bytes, med),
                            algbw_gbs=real_bytes / med / 1e9)
