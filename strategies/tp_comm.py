"""Tensor-parallel communication as small autograd functions (Megatron-LM style).

Every function takes the tensor-parallel process group explicitly. ``group=None`` or a
group of one rank means no parallelism: the function is the identity and communicates
nothing. Tensors are ``[batch, seq, hidden]``; "last dim" is the hidden/feature dim and
the sequence dim is dim 1.

| function                      | forward                         | backward                        |
|-------------------------------|---------------------------------|---------------------------------|
| copy_to_tp_region             | identity                        | all-reduce (sum)                |
| reduce_from_tp_region         | all-reduce (sum)                | identity                        |
| scatter_to_tp_region          | keep own chunk of last dim      | all-gather along last dim       |
| gather_from_tp_region         | all-gather along last dim       | keep own chunk of last dim      |
| gather_from_sequence_region   | all-gather along sequence dim   | reduce-scatter along sequence   |
| reduce_scatter_to_sequence    | reduce-scatter along sequence   | all-gather along sequence       |
| scatter_to_sequence_region    | keep own chunk of sequence dim  | all-gather along sequence       |

Each pair is the transpose of the other: a replicated value consumed by rank-local
partial computations (copy) receives the *sum* of their gradients, and a sum of partial
results (reduce) hands the same gradient to every contributor.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# torch >= 2.13 names the single-tensor collectives *_single; older releases (the GPU
# image's 2.11) only have the *_tensor spellings. Both take (output, input, group=...).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Any) -> int:
    """Number of ranks in ``group`` (1 for ``None``: no parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Any) -> int:
    return 0 if group is None else dist.get_rank(group)


# --- raw collectives (no autograd) ----------------------------------------------------------

def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    # gather along dim 0 into one buffer, then move the rank axis next to ``dim``
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * moved.shape[0],) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's chunk along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: dimension {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // n,) + tuple(moved.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (no communication)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: dimension {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# --- autograd functions -----------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) of the gradient over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather along the last dim. Backward: keep this rank's chunk of the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather along the sequence dim (1). Backward: reduce-scatter along it.

    Used where a sequence-sharded activation enters a column-parallel layer: every rank
    needs the whole sequence, and each rank's gradient for it is a partial sum over the
    tensor-parallel shards of that layer."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, 1, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: reduce-scatter (sum) along the sequence dim (1). Backward: all-gather along it.

    Used where a row-parallel layer's partial sums leave for the sequence-parallel region
    (replaces the all-reduce of plain tensor parallelism)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's chunk of the sequence dim (1). Backward: all-gather along it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Identity forward, all-reduce backward (input of a column-parallel layer; a replicated
    parameter used on sequence shards)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce forward, identity backward (output of a row-parallel layer)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Split the last dim forward, all-gather it backward."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-gather the last dim forward, split it backward."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-gather the sequence dim forward, reduce-scatter it backward."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Reduce-scatter the sequence dim forward, all-gather it backward."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Split the sequence dim forward, all-gather it backward."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` outside autograd (state-dict reassembly)."""
    with torch.no_grad():
        return _all_gather(x.detach(), dim, group)
