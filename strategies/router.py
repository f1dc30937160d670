"""Top-k token router for mixture-of-experts layers.

Math (T tokens of this rank, E experts, k experts per token, logits z = x W_r^T, W_r [E, h]):

- probabilities ``p = softmax(z)`` over experts, computed in fp32 whatever the model dtype;
- selection: the k largest ``p`` per token (``torch.topk``; ties broken by its order);
- gates: with ``normalize`` (Mixtral) the selected probabilities are renormalised to sum to
  one per token, ``g_ti = p_ti / sum_j p_tj`` over the k selected experts (the same as a
  softmax over the k selected logits); without it (Switch, k = 1) ``g_ti = p_ti``. The
  gates are renormalised over the k *selected* experts before capacity is applied, so a
  token that loses one assignment to the capacity limit keeps the other at its gate value
  (the dropped assignment contributes zero; the block's residual carries the token on);
- capacity: ``C = ceil(capacity_factor * T * k / E)`` assignments per expert **per rank**,
  T being the tokens that this rank routes (DeepSpeed's and GShard's convention: each rank
  sends at most C tokens to each expert, so an expert receives at most ``ep * C``);
- priority inside an expert's queue is slot-major (GShard): every token's first choice in
  token order, then every token's second choice, and so on; assignments at position >= C
  are dropped and counted;
- load-balancing loss (Switch Transformer, eq. 4, extended to k choices):
  ``aux = E * sum_e f_e * P_e`` with ``f_e`` the fraction of the T*k selections (before the
  capacity limit) that chose e and ``P_e`` the mean router probability of e over the T
  tokens; it is 1 for perfectly uniform routing;
- router z-loss (ST-MoE, eq. 5): ``z = mean_t (logsumexp_e z_te)^2``.

Both losses are computed over this rank's tokens only (no communication); data-parallel
averaging of the loss averages them over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``ceil(capacity_factor * tokens * top_k / num_experts)``: assignments one expert accepts from one rank."""
    return int(math.ceil(capacity_factor * tokens * top_k / num_experts))


@dataclass
class Routing:
    """Where each of this rank's assignments goes, in dispatch order (sorted by expert).

    ``token_index[i]`` is the token (row of the flattened input) of the i-th kept assignment,
    ``gate[i]`` its weight (fp32, differentiable); assignments are sorted by expert, and
    within an expert by priority. ``kept_per_expert[e]`` counts the kept assignments of
    expert e (so ``token_index`` splits into E consecutive segments of these sizes).
    """
    token_index: torch.Tensor       # [N_kept] int64
    gate: torch.Tensor              # [N_kept] fp32
    kept_per_expert: torch.Tensor   # [E] int64
    chosen_per_expert: torch.Tensor  # [E] int64, before the capacity limit
    dropped: torch.Tensor           # scalar int64: T*k - N_kept
    capacity: int
    aux_loss: torch.Tensor          # scalar fp32 (Switch load balancing, unscaled)
    z_loss: torch.Tensor            # scalar fp32 (ST-MoE, unscaled)


def route_top_k(logits: torch.Tensor, top_k: int, capacity_factor: float, *,
                normalize: bool = True) -> Routing:
    """Route T tokens given their router logits [T, E] (any dtype; computed in fp32)."""
    logits = logits.float()
    num_tokens, num_experts = logits.shape
    probs = F.softmax(logits, dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)                       # [T, k]
    gates = top_p / top_p.sum(dim=-1, keepdim=True) if normalize else top_p

    # slot-major flattening: index j*T + t is token t's (j+1)-th choice
    expert_flat = top_e.t().reshape(-1)                             # [k*T]
    gate_flat = gates.t().reshape(-1)
    token_flat = torch.arange(num_tokens, device=logits.device).repeat(top_k)

    order = torch.argsort(expert_flat, stable=True)                 # by expert, then priority
    chosen = torch.bincount(expert_flat, minlength=num_experts)
    starts = torch.cumsum(chosen, 0) - chosen
    sorted_expert = expert_flat[order]
    position = torch.arange(order.numel(), device=logits.device) - starts[sorted_expert]
    capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
    keep = position < capacity
    kept_order = order[keep]
    kept = torch.clamp(chosen, max=capacity)

    frac = chosen.float() / max(num_tokens * top_k, 1)
    mean_p = probs.mean(dim=0)
    aux = num_experts * torch.sum(frac * mean_p)
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return Routing(token_index=token_flat[kept_order], gate=gate_flat[kept_order], kept_per_expert=kept,
                   chosen_per_expert=chosen, dropped=(chosen - kept).sum(), capacity=capacity,
                   aux_loss=aux, z_loss=z)
