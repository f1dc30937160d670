"""Megatron-style tensor-parallel layers and the vocabulary-parallel cross-entropy.

Every layer is built from the FULL parameter name: it asks its
:class:`~.weights.WeightSource` for its shard of the full tensor (random: the full tensor is
drawn and sliced, so the same seed gives the same full weights for every tensor-parallel
degree; a checkpoint: only the shard is read). With ``tp_group=None`` (or one rank) the layers are plain
``nn.Linear`` / ``nn.Embedding`` modules doing no communication (which is also what
PyTorch's DTensor ``parallelize_module`` expects to find).

Shard metadata (read by :meth:`Transformer.full_state_dict` and by optimizers/ZO code):

- ``param.meshpilot_tp_dim``: the dim along which the parameter is split over the
  tensor-parallel group, or absent/None when it is replicated on every tp rank;
- ``param.meshpilot_full_size``: the full (unpadded) size along that dim;
- ``param.meshpilot_sequence_parallel``: a replicated parameter used on sequence shards
  (its gradient contributions are summed across tp inside the forward graph already);
- ``param.meshpilot_expert = True`` (set by the MoE layer): expert parameter, sharded
  over the expert-parallel group. ``param.meshpilot_ep_dim`` names the dim of expert
  stacking if experts are stacked in one tensor; otherwise the parameter names carry the
  global expert index and differ between expert-parallel ranks.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .init_utils import AssignedInit, base_device
from .weights import Part, WeightSource
from .tp_comm import (_all_reduce, copy_to_tp_region, gather_from_sequence_region, group_rank, group_size,
                      reduce_from_tp_region, reduce_scatter_to_sequence_region)


def mark_tp(p: nn.Parameter, dim: int, full_size: int) -> nn.Parameter:
    p.meshpilot_tp_dim = dim
    p.meshpilot_full_size = full_size
    return p


def pad_to_multiple(n: int, k: int) -> int:
    return k * math.ceil(n / k)


def enter_tp_region(x: torch.Tensor, tp_group: Any, sequence_parallel: bool) -> torch.Tensor:
    """Prepare the input of column-parallel layers: copy (identity / all-reduce) or, with
    sequence parallelism, all-gather the sequence shards (all-gather / reduce-scatter)."""
    if sequence_parallel:
        return gather_from_sequence_region(x, tp_group)
    return copy_to_tp_region(x, tp_group)


def leave_tp_region(x: torch.Tensor, tp_group: Any, sequence_parallel: bool) -> torch.Tensor:
    """Combine row-parallel partial sums: all-reduce (all-reduce / identity) or, with
    sequence parallelism, reduce-scatter onto sequence shards (reduce-scatter / all-gather)."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_region(x, tp_group)
    return reduce_from_tp_region(x, tp_group)


class ColumnParallelLinear(AssignedInit, nn.Linear):
    """Y = X A^T + b with A [out, in] split by output rows: rank r holds A_r [out/t, in]
    and computes Y_r = X A_r^T + b_r, the r-th slice of the last dim of Y.

    Communication (when ``comm_input``): forward identity, backward all-reduce of dL/dX
    (:func:`copy_to_tp_region`); with sequence parallelism, forward all-gather of the
    sequence shards of X, backward reduce-scatter. Callers that feed several column-parallel
    layers with the same input (q/k/v, gate/up) pass ``comm_input=False`` and call
    :func:`enter_tp_region` once. The output stays split (no gather).
    """

    def __init__(self, in_features: int, out_features: int, *, name: str, weights: WeightSource, std: float,
                 tp_group: Any = None, bias: bool = False, sequence_parallel: bool = False,
                 comm_input: bool = True, pad_out_to: int | None = None):
        t, r = group_size(tp_group), group_rank(tp_group)
        full_out = pad_out_to or out_features
        if full_out % t:
            raise ValueError(f"{name}: output size {full_out} is not divisible by tp={t}")
        super().__init__(in_features, full_out // t, bias=bias, device=base_device())
        self.tp_group, self.sequence_parallel, self.comm_input = tp_group, sequence_parallel, comm_input
        self.full_out = out_features
        rows = Part.chunk(0, r, t, full_out)       # rows past out_features: padding (zeros)
        w = weights.normal(f"{name}.weight", (out_features, in_features), std, rows)
        self.weight = mark_tp(nn.Parameter(w), 0, out_features)
        if bias:
            self.bias = mark_tp(nn.Parameter(weights.zeros(f"{name}.bias", (out_features,), rows)), 0, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.comm_input:
            x = enter_tp_region(x, self.tp_group, self.sequence_parallel)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(AssignedInit, nn.Linear):
    """Y = X A^T + b with A [out, in] split by input columns: rank r holds A_r [out, in/t],
    receives X_r (the r-th slice of X's last dim, the output of a column-parallel layer)
    and computes the partial sum X_r A_r^T; Y = sum_r X_r A_r^T + b.

    Communication: forward all-reduce of the partial sums, backward identity
    (:func:`reduce_from_tp_region`); with sequence parallelism, forward reduce-scatter onto
    sequence shards, backward all-gather. The bias (replicated) is added after the
    reduction; on sequence shards its gradient is all-reduced over tp inside the graph.
    """

    def __init__(self, in_features: int, out_features: int, *, name: str, weights: WeightSource, std: float,
                 tp_group: Any = None, bias: bool = False, sequence_parallel: bool = False):
        t, r = group_size(tp_group), group_rank(tp_group)
        if in_features % t:
            raise ValueError(f"{name}: input size {in_features} is not divisible by tp={t}")
        super().__init__(in_features // t, out_features, bias=bias, device=base_device())
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        w = weights.normal(f"{name}.weight", (out_features, in_features), std, Part.chunk(1, r, t, in_features))
        self.weight = mark_tp(nn.Parameter(w), 1, in_features)
        if bias:
            self.bias = nn.Parameter(weights.zeros(f"{name}.bias", (out_features,)))
            self.bias.meshpilot_sequence_parallel = sequence_parallel and t > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_tp_region(F.linear(x, self.weight), self.tp_group, self.sequence_parallel)
        if self.bias is not None:
            b = copy_to_tp_region(self.bias, self.tp_group) if self.sequence_parallel else self.bias
            y = y + b
        return y


class VocabParallelEmbedding(AssignedInit, nn.Embedding):
    """Token embedding with the vocabulary rows split over tp.

    The vocabulary is padded with zero rows to ``V_pad = tp * ceil(V / tp)`` so that every
    rank holds ``V_pad / tp`` contiguous rows [r*V_pad/t, (r+1)*V_pad/t). Padding rows are
    never looked up (token ids are < V); the tied LM head masks their logits to -inf.
    Rank r looks up the ids in its range (others give zero rows) and the partial results
    are summed: forward all-reduce, backward identity (:func:`reduce_from_tp_region`), or
    with sequence parallelism reduce-scatter onto sequence shards / all-gather backward.
    """

    def __init__(self, vocab: int, hidden: int, *, name: str, weights: WeightSource, std: float,
                 tp_group: Any = None, sequence_parallel: bool = False):
        t, r = group_size(tp_group), group_rank(tp_group)
        v_pad = pad_to_multiple(vocab, t)
        super().__init__(v_pad // t, hidden, device=base_device())
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.vocab, self.vocab_padded = vocab, v_pad
        self.vocab_start = r * (v_pad // t)
        w = weights.normal(f"{name}.weight", (vocab, hidden), std, Part.chunk(0, r, t, v_pad))
        self.weight = mark_tp(nn.Parameter(w), 0, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp_region(out, self.tp_group, self.sequence_parallel)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocabulary-sharded logits, never gathering them.

    Rank r holds logits z[..., v] for v in its vocabulary slice. Forward (fp32):
    m = all-reduce-max_r(max_v z), S = all-reduce-sum_r(sum_v exp(z - m)),
    z_y = all-reduce-sum_r(z_y if y in the slice else 0), loss = log S + m - z_y.
    Backward (no communication): dL/dz_v = g * (softmax_v - [v == y]) on the local slice.
    Ignored tokens (label == ignore_index) get loss 0 and zero gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, tp_group, ignore_index):
        z = logits.float()
        v_local = z.shape[-1]
        if vocab_size < vocab_start + v_local:            # mask vocabulary padding
            pad_from = max(0, vocab_size - vocab_start)
            z = z.clone()
            z[..., pad_from:] = float("-inf")
        m = z.max(dim=-1).values
        if group_size(tp_group) > 1:
            m = m.contiguous()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
        e = torch.exp(z - m.unsqueeze(-1))
        s = _all_reduce(e.sum(dim=-1), tp_group)
        ignored = labels == ignore_index
        local = labels - vocab_start
        mine = (local >= 0) & (local < v_local) & ~ignored
        idx = local.masked_fill(~mine, 0)
        zy = torch.gather(z, -1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        zy = _all_reduce(zy, tp_group)
        loss = (torch.log(s) + m - zy).masked_fill(ignored, 0.0)
        e.div_(s.unsqueeze(-1))                            # softmax over the full vocabulary
        ctx.save_for_backward(e, idx, mine, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        p, idx, mine, ignored = ctx.saved_tensors
        grad = p
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_(g.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, tp_group: Any = None,
                                 vocab_start: int = 0, vocab_size: int | None = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token fp32 cross-entropy ``[...]`` from this rank's logit slice ``[..., V_pad/t]``
    (columns ``vocab_start`` onwards) and full labels ``[...]``; columns at or beyond
    ``vocab_size`` (padding) are excluded. See :class:`_VocabParallelCE` for the math and
    the three all-reduces of ``[...]``-sized tensors (max, sum-exp, target logit)."""
    if vocab_size is None:
        vocab_size = vocab_start + logits.shape[-1]
    return _VocabParallelCE.apply(logits, labels, vocab_start, vocab_size, tp_group, ignore_index)


def mean_over_tokens(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean of per-token losses over the tokens that are not ignored (fp32)."""
    n = (labels != ignore_index).sum().clamp(min=1)
    return per_token.sum() / n
