"""Mixture-of-experts feed-forward layer with expert parallelism (and optional expert tensor parallelism).

``y = sum_{i in topk(x)} g_i(x) * Expert_i(x)`` per token, with the router of
:mod:`.router` (top-k of a softmax, capacity per expert per rank, dropped assignments
contribute zero). Experts follow the architecture: SwiGLU ``w2(silu(w1 x) * w3 x)``
(llama, mixtral; no biases) or ``fc2(act(fc1 x + b1)) + b2`` with act = GELU (tanh
approximation) for gpt2 and ReLU for opt, as in the dense MLPs of :mod:`.layers`.

Parallelism
- Expert parallelism over ``ep_group`` (n ranks): rank r holds experts
  [r*E/n, (r+1)*E/n). Forward per layer: one all-gather of n*(E+1) counts (split sizes and
  statistics, the only host sync), dispatch all-to-all of the kept assignments (~T*k rows of
  h per rank), the local experts, combine all-to-all back; backward: the two reverse
  all-to-alls. ``ep_group=None`` or a group of one rank runs the same code without
  communication.
- Expert tensor parallelism over ``tp_group`` (t ranks): every local expert's hidden
  units f are split t ways (w1/w3/fc1 by rows, w2/fc2 by columns). Routing is replicated
  on the tp ranks (same tokens, same router); around the expert computation the received
  rows pass through copy-to-tp (forward identity, backward all-reduce) and the expert
  outputs through reduce-from-tp (forward all-reduce of ~T*k*h, backward identity), so
  gate weighting, combine and router see full, identical values on every tp rank.
- Sequence parallelism (``sequence_parallel=True``, tp > 1): the input is this rank's
  sequence shard [b, s/t, h]; the layer all-gathers the full sequence (backward: keep
  own shard), runs as above, and returns its own shard (backward: all-gather).
- Expert-data-parallel replicas (ranks of the layout's edp group hold the same experts)
  need their expert gradients reduced over the edp group, and the router's over the
  data-parallel group: that is the job of the data-parallel wrapper (ZeRO), which can tell
  the expert parameters by ``param.meshpilot_expert``.

Weights come from the :class:`~.weights.WeightSource` under their full-model names: the router
``{name_prefix}.router.weight`` [E, h] and each expert's ``{name_prefix}.experts.{e}.w1`` [f, h],
``w3`` [f, h], ``w2`` [h, f] (``fc1``/``fc1_bias``/``fc2``/``fc2_bias`` for gpt2/opt experts). A rank
asks only for its local experts and, under expert tensor parallelism, only its slice of f; a
random source draws each full expert tensor and slices it, so ep=1 and ep=4 (and any tp) hold
the same experts, and a checkpoint source reads just those rows. The parameters stack the local
experts: ``w1`` [E/ep, f/tp, h] etc.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meshpilot.orchestrator.config.schema import ModelConfig
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.config.models import llama_ffn

from .expert_parallel import all_to_all, exchange_counts, gather_sequence_replicated
from .tp_comm import copy_to_tp_region, group_rank, group_size, reduce_from_tp_region, scatter_to_sequence_region
from .init_utils import AssignedInit, base_device
from .router import Routing, route_top_k
from .weights import Part, WeightSource

log = logging.getLogger(__name__)

SWIGLU_ARCHS = ("llama", "mixtral")
GELU_ARCHS = ("gpt2", "opt")
EXPERT_COMPUTE = ("auto", "loop", "grouped")
GROUP_ALIGN = 16          # rows; grouped-GEMM segment alignment


class _Router(AssignedInit, nn.Linear):
    """The router's linear layer (weights assigned by :class:`MoEFeedForward`)."""


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``torch._grouped_mm`` needs it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:
        return dy.contiguous()


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of segment l of x times ``w[l]^T`` (w: [experts, out, in]); offs: int32 segment ends."""
    return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))


class MoEFeedForward(nn.Module):
    """The MoE FFN of one layer: x [b, s, h] -> y [b, s, h].

    After each forward, ``last_aux_loss`` is ``aux_loss_coef * aux + z_loss_coef * z``
    (Switch load balancing and ST-MoE z-loss over this rank's tokens; add it to the loss)
    and ``last_stats`` holds ``tokens_per_expert`` (kept assignments per expert, summed
    over the expert-parallel group, int64 [E]), ``dropped`` (assignments over capacity,
    summed over the group, int64 scalar), ``capacity`` (per expert per rank),
    ``local_tokens``, and the unscaled ``aux_loss`` and ``z_loss`` (detached).
    """

    def __init__(self, model_cfg: ModelConfig, *, ep_group: Any, tp_group: Any = None, name_prefix: str,
                 weights: WeightSource, dtype: torch.dtype = torch.float32, device: Any = "cpu",
                 sequence_parallel: bool = False, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001,
                 capacity_factor: float | None = None, normalize_top_k: bool | None = None,
                 init_std: float = 0.02, out_init_std: float | None = None, expert_compute: str = "auto"):
        super().__init__()
        m = model_cfg
        E, k = m.num_experts, m.top_k
        ep, tp = group_size(ep_group), group_size(tp_group)
        f = m.ffn or (4 * m.hidden if m.arch in GELU_ARCHS else llama_ffn(m.hidden))
        if m.arch not in SWIGLU_ARCHS + GELU_ARCHS:
            raise ConfigError("model.arch", m.arch, allowed=SWIGLU_ARCHS + GELU_ARCHS)
        if E <= 0:
            raise ConfigError("model.num_experts", E, reason="an MoE layer needs at least one expert")
        if not 1 <= k <= E:
            raise ConfigError("model.top_k", k, reason=f"must be between 1 and model.num_experts={E}")
        if E % ep:
            raise ConfigError("plan.ep", ep, reason=f"must divide model.num_experts={E}")
        if f % tp:
            raise ConfigError("plan.tp", tp, reason=f"must divide model.ffn={f} (experts are split over tp)")
        cf = m.capacity_factor if capacity_factor is None else capacity_factor
        if not cf > 0:
            raise ConfigError("model.capacity_factor", cf, reason="must be positive")
        if expert_compute not in EXPERT_COMPUTE:
            raise ConfigError("expert_compute", expert_compute, allowed=EXPERT_COMPUTE)
        if sequence_parallel and tp == 1:
            sequence_parallel = False   # nothing to shard over

        self.hidden, self.ffn, self.num_experts, self.top_k = m.hidden, f, E, k
        self.capacity_factor = float(cf)
        self.normalize_top_k = (k > 1) if normalize_top_k is None else bool(normalize_top_k)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.ep_group, self.tp_group = ep_group, tp_group
        self.ep_size, self.ep_rank = ep, group_rank(ep_group)
        self.tp_size, self.tp_rank = tp, group_rank(tp_group)
        self.sequence_parallel = sequence_parallel
        self.num_local_experts = E // ep
        self.expert_offset = self.ep_rank * self.num_local_experts
        self.gated = m.arch in SWIGLU_ARCHS
        self.arch = m.arch
        self.name_prefix = name_prefix
        self.expert_compute = expert_compute
        out_std = init_std / math.sqrt(2 * max(int(m.layers), 1)) if out_init_std is None else out_init_std

        def param(t: torch.Tensor, expert: bool) -> nn.Parameter:
            p = nn.Parameter(t.to(device=device, dtype=dtype))
            if expert:
                p.meshpilot_expert = True
            return p

        h = m.hidden
        self.router = _Router(h, E, bias=False, device=base_device())
        self.router.weight = param(weights.normal(f"{name_prefix}.router.weight", (E, h), init_std), False)

        local = range(self.expert_offset, self.expert_offset + self.num_local_experts)

        def stacked(name: str, shape: tuple[int, ...], std: float, dim: int | None) -> nn.Parameter:
            """Local experts' slices of ``name`` stacked on dim 0; ``dim`` (of the full weight) split over tp."""
            parts = []
            part = None if dim is None else Part.chunk(dim, self.tp_rank, tp, shape[dim])
            for e in local:
                full_name = f"{name_prefix}.experts.{e}.{name}"
                parts.append(weights.normal(full_name, shape, std, part) if std > 0
                             else weights.zeros(full_name, shape, part))
            p = param(torch.stack(parts), True)
            p.meshpilot_ep_dim = 0                       # stacking dim (global expert = offset + index)
            if dim is not None:
                p.meshpilot_tp_dim = dim + 1
                p.meshpilot_full_size = shape[dim]
            return p

        if self.gated:
            self.w1 = stacked("w1", (f, h), init_std, 0)         # [El, f/tp, h]
            self.w3 = stacked("w3", (f, h), init_std, 0)
            self.w2 = stacked("w2", (h, f), out_std, 1)          # [El, h, f/tp]
        else:
            self.fc1 = stacked("fc1", (f, h), init_std, 0)
            self.fc1_bias = stacked("fc1_bias", (f,), 0.0, 0)   # [El, f/tp]
            self.fc2 = stacked("fc2", (h, f), out_std, 1)
            self.fc2_bias = stacked("fc2_bias", (h,), 0.0, None)  # [El, h], replicated over tp

        self.last_aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, Any] = {}
        log.info("rank %s: MoE %s: %d experts (local %d..%d), top-%d, capacity factor %.2f, ep=%d tp=%d%s",
                 _global_rank(), name_prefix, E, self.expert_offset, self.expert_offset + self.num_local_experts - 1,
                 k, self.capacity_factor, ep, tp, " sp" if sequence_parallel else "")

    # ------------------------------------------------------------------------------------
    def _use_grouped(self, x: torch.Tensor) -> bool:
        """``grouped`` runs all local experts in one ``torch._grouped_mm`` per weight, ``loop`` one GEMM per
        expert. ``auto`` picks grouped on CUDA (1.02-1.48x DeepSpeed's MoE layer on 4xH200 where the loop
        reached 0.83-1.00x: benchmarks/results/2026-11-27-h200x4/moe_vs_deepspeed.json) and the loop on CPU.
        Both paths are checked against the per-token reference in tests/test_moe.py (on CPU)."""
        if self.expert_compute == "auto":
            return x.is_cuda
        return self.expert_compute == "grouped"

    def _experts(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Local experts on rows grouped by local expert (segment l has counts[l] rows); output partial over tp."""
        if self._use_grouped(x):
            return self._experts_grouped(x, counts)
        outs, start = [], 0
        for e, n in enumerate(counts):      # empty segments still run, so every expert gets a gradient
            seg = x[start:start + n]
            start += n
            if self.gated:
                a = F.silu(F.linear(seg, self.w1[e])) * F.linear(seg, self.w3[e])
                outs.append(F.linear(a, self.w2[e]))
            else:
                a = self.act(F.linear(seg, self.fc1[e], self.fc1_bias[e]))
                outs.append(F.linear(a, self.fc2[e]))
        return torch.cat(outs)

    def _experts_grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One grouped GEMM per weight. Each expert's segment is padded with zero rows to a multiple of
        GROUP_ALIGN rows (the CUDA kernel's weight-gradient pass needs aligned group boundaries)."""
        padded = [GROUP_ALIGN * math.ceil(n / GROUP_ALIGN) for n in counts]
        starts = [sum(padded[:e]) for e in range(len(padded))]
        rows = torch.cat([torch.arange(s0, s0 + n) for s0, n in zip(starts, counts)]).to(x.device, non_blocking=True)
        xp = x.new_zeros(sum(padded), x.shape[1]).index_copy(0, rows, x)
        offs = torch.tensor(padded, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device, non_blocking=True)
        if self.gated:
            a = F.silu(_grouped_linear(xp, self.w1, offs)) * _grouped_linear(xp, self.w3, offs)
            out = _grouped_linear(a, self.w2, offs)
        else:
            a = self.act(_grouped_linear(xp, self.fc1, offs) + self.fc1_bias[self._row_expert(padded, x.device)])
            out = _grouped_linear(a, self.fc2, offs)
        return out[rows]

    def act(self, u: torch.Tensor) -> torch.Tensor:
        """The non-gated experts' activation: ReLU for opt, GELU (tanh approximation) for gpt2."""
        return F.relu(u) if self.arch == "opt" else F.gelu(u, approximate="tanh")

    def _row_expert(self, counts: list[int], device: Any) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                       torch.tensor(counts, device=device))

    def route(self, flat: torch.Tensor) -> Routing:
        logits = F.linear(flat.float(), self.router.weight.float())
        return route_top_k(logits, self.top_k, self.capacity_factor, normalize=self.normalize_top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_sequence_replicated(x, self.tp_group)
        shape = x.shape
        flat = x.reshape(-1, self.hidden)
        r = self.route(flat)
        splits, tokens_per_expert, dropped = exchange_counts(r.kept_per_expert, r.dropped, self.ep_group)

        # dispatch: rows sorted by expert are grouped by destination rank
        recv = all_to_all(flat[r.token_index], splits.send, splits.recv, self.ep_group)
        # received rows are [peer][local expert]; regroup them as [local expert][peer]
        counts = [sum(c[e] for c in splits.recv_per_expert) for e in range(self.num_local_experts)]
        perm = None
        if self.ep_size > 1 and self.num_local_experts > 1:
            perm = _expert_major(splits.recv_per_expert).to(x.device, non_blocking=True)
            recv = recv[perm]
        out = reduce_from_tp_region(self._experts(copy_to_tp_region(recv, self.tp_group), counts), self.tp_group)
        if not self.gated:
            out = out + self.fc2_bias[self._row_expert(counts, x.device)]
        if perm is not None:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            out = out[inv]
        back = all_to_all(out, splits.recv, splits.send, self.ep_group)

        # combine: weight by the gates and add each token's assignments (accumulated in fp32)
        y = flat.new_zeros(flat.shape, dtype=torch.float32).index_add(0, r.token_index,
                                                                       back.float() * r.gate.unsqueeze(-1))
        y = y.to(flat.dtype).view(shape)
        if self.sequence_parallel:
            y = scatter_to_sequence_region(y, self.tp_group)

        self.last_aux_loss = self.aux_loss_coef * r.aux_loss + self.z_loss_coef * r.z_loss
        self.last_stats = {"tokens_per_expert": tokens_per_expert, "dropped": dropped, "capacity": r.capacity,
                           "local_tokens": flat.shape[0], "aux_loss": r.aux_loss.detach(),
                           "z_loss": r.z_loss.detach()}
        return y

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} local={self.num_local_experts} top_k={self.top_k} "
                f"capacity_factor={self.capacity_factor} ep={self.ep_size} tp={self.tp_size}")


def _expert_major(per_peer: list[list[int]]) -> torch.Tensor:
    """Row permutation from [peer][expert] blocks to [expert][peer] blocks (CPU int64)."""
    peers, experts = len(per_peer), len(per_peer[0])
    start, offs = 0, [[0] * experts for _ in range(peers)]
    for p in range(peers):
        for e in range(experts):
            offs[p][e] = start
            start += per_peer[p][e]
    pieces = [torch.arange(offs[p][e], offs[p][e] + per_peer[p][e]) for e in range(experts) for p in range(peers)]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


def _global_rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
