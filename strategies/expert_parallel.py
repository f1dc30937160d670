"""Communication of expert parallelism: all-to-all with variable split sizes, as autograd functions.

An expert-parallel group of n ranks holds E experts, E/n per rank (rank r holds experts
[r*E/n, (r+1)*E/n)). Each rank routes its own tokens; the assignments, sorted by expert,
are therefore already grouped by destination rank.

1. :func:`exchange_counts` all-gathers every rank's kept-assignment counts per expert
   (plus its dropped count) over the group: one collective of n*(E+1) integers, from which
   each rank derives how many rows it sends to and receives from every peer, and the global
   statistics. This is the only host synchronisation (the split sizes are Python ints).
2. :func:`all_to_all` (dispatch): forward ``all_to_all_single`` with ``input_split_sizes``
   = rows for each peer and ``output_split_sizes`` = rows from each peer; backward the
   reverse all-to-all of the gradient (the splits swapped). The combine step is the same
   function with the splits swapped. A group of one rank (or ``None``) moves nothing.

With sequence parallelism, :func:`gather_sequence_replicated` gives the MoE layer the full
sequence (forward all-gather along dim 1; backward keeps this rank's shard, which is valid
because everything computed from it is replicated over the tensor-parallel group, with
identical, complete gradients on every rank). The tensor-parallel pair around the experts
(copy / reduce) comes from :mod:`.tp_comm`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .tp_comm import group_rank, group_size

# torch >= 2.13 spells it all_gather_single; the GPU image's 2.11 only has all_gather_into_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Splits:
    """Row counts of one dispatch, from this rank's point of view (all Python ints)."""
    send: list[int]                 # rows to each peer (by group rank)
    recv: list[int]                 # rows from each peer
    recv_per_expert: list[list[int]]  # [peer][local expert]: rows from that peer for that expert


def exchange_counts(kept_per_expert: torch.Tensor, dropped: torch.Tensor, group: Any
                    ) -> tuple[Splits, torch.Tensor, torch.Tensor]:
    """All-gather ``[kept_per_expert..., dropped]`` over the expert-parallel group.

    Returns this rank's :class:`Splits`, the global kept count per expert (sum over the
    group, int64 [E]) and the global dropped count (int64 scalar).
    """
    n = group_size(group)
    num_experts = kept_per_expert.numel()
    local = torch.cat([kept_per_expert.reshape(-1), dropped.reshape(1)]).to(torch.int64)
    if n == 1:
        table = local.unsqueeze(0)
    else:
        table = torch.empty(n * (num_experts + 1), dtype=torch.int64, device=local.device)
        _all_gather_single(table, local, group=group)
        table = table.view(n, num_experts + 1)
    rows = table.tolist()                                        # the one host sync
    me, per = group_rank(group), num_experts // n
    send = [sum(rows[me][p * per:(p + 1) * per]) for p in range(n)]
    recv_per_expert = [rows[p][me * per:(me + 1) * per] for p in range(n)]
    recv = [sum(r) for r in recv_per_expert]
    return Splits(send, recv, recv_per_expert), table[:, :num_experts].sum(0), table[:, num_experts].sum()


class _AllToAll(torch.autograd.Function):
    """y = all_to_all(x): rows ``x[send[p] block]`` go to peer p; y holds ``recv[p]`` rows from each p.

    Backward: the reverse all-to-all of dy (send and recv swapped).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        return _all_to_all(dy, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    """Differentiable variable-split all-to-all along dim 0 (identity for a group of one)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, send, recv, group)


class _GatherSequence(torch.autograd.Function):
    """Forward all-gather of sequence shards along ``dim``; backward keep this rank's shard.

    Only valid when everything computed from the gathered tensor is replicated over the
    group (identical gradients on every rank), as in :class:`MoEFeedForward`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        return dy.chunk(group_size(ctx.group), dim=ctx.dim)[group_rank(ctx.group)].contiguous(), None, None


def gather_sequence_replicated(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-gather sequence shards (dim 1); backward keeps this rank's shard of the (replicated) gradient."""
    return x if group_size(group) == 1 else _GatherSequence.apply(x, 1, group)
