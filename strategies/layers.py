"""Transformer building blocks with tensor parallelism: norms, rotary embeddings,
attention (grouped-query heads split over tp) and the SwiGLU / GELU MLPs.

Activations are ``[batch, seq, hidden]``. With sequence parallelism, the input and output
of attention and MLP are sequence shards ``[batch, seq/t, hidden]``; the norms run on the
shards. A replicated parameter used on a shard (norm weights, row-parallel biases) enters
the graph through :func:`copy_to_tp_region` (identity forward, all-reduce backward), so its
gradient is the sum over the shards and is equal on every tp rank without any extra
synchronisation in the optimizer.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from meshpilot.orchestrator.config.schema import ModelConfig

from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, enter_tp_region
from .tp_comm import copy_to_tp_region, group_size
from .weights import WeightSource


def _replicated(p: torch.Tensor, tp_group: Any, sequence_parallel: bool) -> torch.Tensor:
    """A replicated parameter as used on this rank: with sequence parallelism its gradient
    is all-reduced over tp in backward (the shards' contributions are summed)."""
    return copy_to_tp_region(p, tp_group) if sequence_parallel else p


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 and cast back (LLaMA)."""

    def __init__(self, hidden: int, eps: float, *, name: str, weights: WeightSource, tp_group: Any = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.weight = nn.Parameter(weights.ones(f"{name}.weight", (hidden,)))
        self.weight.meshpilot_sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * _replicated(self.weight, self.tp_group, self.sequence_parallel)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * w + b (GPT-2 / OPT)."""

    def __init__(self, hidden: int, eps: float, *, name: str, weights: WeightSource, tp_group: Any = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.weight = nn.Parameter(weights.ones(f"{name}.weight", (hidden,)))
        self.bias = nn.Parameter(weights.zeros(f"{name}.bias", (hidden,)))
        for p in (self.weight, self.bias):
            p.meshpilot_sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sp, g = self.sequence_parallel, self.tp_group
        return F.layer_norm(x, (x.shape[-1],), _replicated(self.weight, g, sp), _replicated(self.bias, g, sp),
                            self.eps)


def make_norm(cfg: ModelConfig, *, name: str, weights: WeightSource, tp_group: Any, sequence_parallel: bool
              ) -> nn.Module:
    """The architecture's norm over ``hidden``, parameters ``{name}.weight`` (and ``.bias``)."""
    cls = RMSNorm if cfg.arch in ("llama", "mixtral") else LayerNorm
    return cls(cfg.hidden, cfg.norm_eps, name=name, weights=weights, tp_group=tp_group,
               sequence_parallel=sequence_parallel)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, *, device: Any, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[seq, head_dim]`` for positions 0..seq-1: angle(p, i) = p * theta^(-2i/d),
    duplicated over the two halves (the Hugging Face LLaMA convention)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[b, heads, s, d]``: x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1).

    The halves convention of Hugging Face's llama (its checkpoints' q/k rows are ordered for it;
    Meta's original interleaved-pairs weights were permuted by the conversion script), so
    Hugging Face checkpoints load without permuting q_proj/k_proj (tests/test_hf_checkpoint.py
    compares the logits)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention, heads split over tp (Megatron).

    q_proj [a*d, h], k_proj/v_proj [k*d, h] are column-parallel: rank r holds a/t query
    heads and k/t key/value heads (grouped-query attention: query head j uses kv head
    j // (a/k), and the split keeps groups whole because t divides k). o_proj [h, a*d] is
    row-parallel. Communication per forward: one enter (identity, or all-gather of the
    sequence shards with SP) and one leave (all-reduce, or reduce-scatter with SP); the
    backward mirrors them. Scores use torch's fused scaled_dot_product_attention
    (is_causal=True); positions are rotary (llama) or added at the embedding (gpt2/opt).
    Biases: q, k, v and o for gpt2/opt; q, k, v only with ``cfg.qkv_bias`` (qwen2), split
    with their rows.
    """

    def __init__(self, cfg: ModelConfig, *, prefix: str, weights: WeightSource, tp_group: Any,
                 sequence_parallel: bool, std: float, out_std: float):
        super().__init__()
        h, a, k = cfg.hidden, cfg.heads, cfg.kv_heads or cfg.heads
        self.head_dim = h // a
        self.rotary = cfg.arch in ("llama", "mixtral")
        self.rope_theta = cfg.rope_theta
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        bias = cfg.arch in ("gpt2", "opt")
        col = dict(weights=weights, std=std, tp_group=tp_group, bias=bias or bool(cfg.qkv_bias),
                   sequence_parallel=sequence_parallel, comm_input=False)
        d = self.head_dim
        self.q_proj = ColumnParallelLinear(h, a * d, name=f"{prefix}.q_proj", **col)
        self.k_proj = ColumnParallelLinear(h, k * d, name=f"{prefix}.k_proj", **col)
        self.v_proj = ColumnParallelLinear(h, k * d, name=f"{prefix}.v_proj", **col)
        self.o_proj = RowParallelLinear(a * d, h, name=f"{prefix}.o_proj", weights=weights, std=out_std,
                                        tp_group=tp_group, bias=bias, sequence_parallel=sequence_parallel)
        # rotary tables by (seq, device, dtype): constants, not parameters or buffers
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rotary(self, s: int, device: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (s, str(device), dtype)
        if key not in self._rope:
            if len(self._rope) > 8:
                self._rope.clear()
            self._rope[key] = rotary_cos_sin(s, self.head_dim, self.rope_theta, device=device, dtype=dtype)
        return self._rope[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.tp_group, self.sequence_parallel)
        b, s, _ = x.shape
        d = self.head_dim
        # -1 heads: the local count (a/t, k/t), also under DTensor's parallelize_module
        q = self.q_proj(x).view(b, s, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, d).transpose(1, 2)
        if self.rotary:
            cos, sin = self._rotary(s, x.device, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


class SwiGLUMLP(nn.Module):
    """y = down(silu(gate(x)) * up(x)); gate/up [f, h] column-parallel, down [h, f]
    row-parallel: one enter and one leave per forward (as in :class:`Attention`)."""

    def __init__(self, cfg: ModelConfig, *, prefix: str, weights: WeightSource, tp_group: Any,
                 sequence_parallel: bool, std: float, out_std: float):
        super().__init__()
        h, f = cfg.hidden, cfg.ffn
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        col = dict(weights=weights, std=std, tp_group=tp_group, sequence_parallel=sequence_parallel,
                   comm_input=False)
        self.gate_proj = ColumnParallelLinear(h, f, name=f"{prefix}.gate_proj", **col)
        self.up_proj = ColumnParallelLinear(h, f, name=f"{prefix}.up_proj", **col)
        self.down_proj = RowParallelLinear(f, h, name=f"{prefix}.down_proj", weights=weights, std=out_std,
                                           tp_group=tp_group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.tp_group, self.sequence_parallel)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """y = down(act(up(x))) with biases; act = GELU (tanh approximation, GPT-2) or ReLU (OPT).
    up [f, h] column-parallel, down [h, f] row-parallel."""

    def __init__(self, cfg: ModelConfig, *, prefix: str, weights: WeightSource, tp_group: Any,
                 sequence_parallel: bool, std: float, out_std: float):
        super().__init__()
        h, f = cfg.hidden, cfg.ffn
        self.relu = cfg.arch == "opt"
        self.up_proj = ColumnParallelLinear(h, f, name=f"{prefix}.up_proj", weights=weights, std=std,
                                            tp_group=tp_group, bias=True, sequence_parallel=sequence_parallel)
        self.down_proj = RowParallelLinear(f, h, name=f"{prefix}.down_proj", weights=weights, std=out_std,
                                           tp_group=tp_group, bias=True, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up_proj(x)
        return self.down_proj(F.relu(u) if self.relu else F.gelu(u, approximate="tanh"))
