"""The built-in decoder-only transformer (llama/mixtral and gpt2/opt styles) with
Megatron-style tensor parallelism, optional sequence parallelism and MoE layers.

Interface used by the DeepSpeed training loop and by zeroth-order training:

- ``embed(input_ids [b, s]) -> hidden [b, s, h]`` (``[b, s/t, h]`` with sequence parallelism)
- ``blocks: nn.ModuleList``; ``block(hidden) -> hidden``
- ``head_loss(hidden, labels [b, s]) -> scalar``: final norm, LM head and the
  vocabulary-parallel cross-entropy, mean over tokens whose label is not -100, in fp32,
  plus the MoE auxiliary losses of the last forward. ``labels[b, i]`` is the target of
  position i (callers shift: ``labels[:, :-1] = input_ids[:, 1:]``, last = -100).
- ``forward(input_ids, labels=None)``: the loss, or (no labels) the full logits
  ``[b, s, V]`` gathered over tp (for tests).
- ``full_state_dict(grads=False)``: full unsharded parameters (or gradients) by name.

Parameter names (those of the FULL model; the same on every rank except expert
parameters, whose names are the MoE layer's business)::

    tok_embed.weight                    [V, h]   vocab-parallel (rows, padded to a multiple of tp)
    pos_embed.weight                    [P, h]   gpt2 (P = max_positions), opt (P = max_positions + 2)
    blocks.{i}.attn_norm.weight (.bias) [h]      RMSNorm (llama/mixtral) or LayerNorm (gpt2/opt)
    blocks.{i}.attn.{q,k,v}_proj.weight (.bias)  column-parallel (rows); biases for gpt2/opt and with
                                                 ``qkv_bias`` (qwen2)
    blocks.{i}.attn.o_proj.weight (.bias)        row-parallel (columns); bias replicated
    blocks.{i}.mlp_norm.weight (.bias)
    blocks.{i}.mlp.{gate,up}_proj.weight         llama SwiGLU, column-parallel
    blocks.{i}.mlp.up_proj.weight/.bias          gpt2/opt GELU/ReLU MLP, column-parallel
    blocks.{i}.mlp.down_proj.weight (.bias)      row-parallel
    blocks.{i}.mlp.*                             MoE layer (when is_moe_layer(cfg, i)): router.weight [E, h],
                                                 w1, w3 [E, f, h], w2 [E, h, f] stacked over experts
                                                 (the weight source names one expert's tensor
                                                 ``blocks.{i}.mlp.experts.{e}.w1``); expert params carry
                                                 ``param.meshpilot_expert = True``
    final_norm.weight (.bias)
    lm_head.weight                      [V, h]   column-parallel; absent when tied (the head
                                                 uses tok_embed.weight)

Weight decay rule (:func:`decays`): no decay on biases and norm parameters, decay on
every other parameter.

Weights come from one :class:`~.weights.WeightSource` per build, asked for each parameter by
its full name (and the part a sharded layer keeps):

- random (``cfg.path`` unset): N(0, 0.02^2) for every weight matrix and embedding,
  N(0, (0.02/sqrt(2L))^2) for the residual output projections (o_proj, down_proj), ones for
  norm weights, zeros for biases; every tensor is drawn in full by :func:`full_normal` from
  its full name and ``seed``, so it does not depend on tp or ep;
- a Hugging Face model directory (``cfg.path``, :mod:`.hf_checkpoint`): every tensor,
  norms and biases included, read from its safetensors files (a tp rank reads its rows or
  columns, an ep rank its experts; under ZeRO-3's ``zero.Init`` each layer's tensors are read
  as the layer is built and partitioned right after).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from meshpilot.orchestrator.config.schema import ModelConfig
from meshpilot.orchestrator.config.models import fill_model_defaults, is_moe_layer
from meshpilot.orchestrator.plan.plan import Plan

from .layers import Attention, GeluMLP, SwiGLUMLP, _replicated, make_norm
from .tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding, enter_tp_region, mean_over_tokens,
                              vocab_parallel_cross_entropy)
from .tp_comm import all_gather_no_grad, gather_from_tp_region, group_rank, group_size
from .weights import RandomWeights, WeightSource

log = logging.getLogger(__name__)

INIT_STD = 0.02
IGNORE_INDEX = -100


def decays(name: str) -> bool:
    """Whether parameter ``name`` gets weight decay: not biases, not norm weights."""
    return not (name.endswith(".bias") or "norm." in name)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def resolved_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy with the derived defaults filled in (kv_heads, ffn, tie_embeddings), as the job loader does."""
    return fill_model_defaults(dataclasses.replace(cfg))


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)) (pre-norm). With ``activation_checkpointing``
    the whole block is recomputed in backward (torch.utils.checkpoint, use_reentrant=False;
    the recompute repeats the block's tensor-parallel collectives)."""

    def __init__(self, cfg: ModelConfig, i: int, *, weights: WeightSource, tp_group: Any, ep_group: Any,
                 sequence_parallel: bool, dtype: torch.dtype, device: Any):
        super().__init__()
        prefix = f"blocks.{i}"
        std, out_std = INIT_STD, INIT_STD / math.sqrt(2 * cfg.layers)
        common = dict(weights=weights, tp_group=tp_group, sequence_parallel=sequence_parallel, std=std,
                      out_std=out_std)
        norm = dict(weights=weights, tp_group=tp_group, sequence_parallel=sequence_parallel)
        self.attn_norm = make_norm(cfg, name=f"{prefix}.attn_norm", **norm)
        self.attn = Attention(cfg, prefix=f"{prefix}.attn", **common)
        self.mlp_norm = make_norm(cfg, name=f"{prefix}.mlp_norm", **norm)
        self.is_moe = is_moe_layer(cfg, i)
        if self.is_moe:
            from .moe import MoEFeedForward  # lazy: the MoE layer is optional for dense models
            self.mlp = MoEFeedForward(cfg, ep_group=ep_group, tp_group=tp_group, name_prefix=f"{prefix}.mlp",
                                      weights=weights, dtype=dtype, device=device,
                                      sequence_parallel=sequence_parallel)
        elif cfg.arch in ("llama", "mixtral"):
            self.mlp = SwiGLUMLP(cfg, prefix=f"{prefix}.mlp", **common)
        else:
            self.mlp = GeluMLP(cfg, prefix=f"{prefix}.mlp", **common)
        self.activation_checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Transformer(nn.Module):
    """Decoder-only LM. See the module docstring for the interface and parameter names."""

    def __init__(self, cfg: ModelConfig, *, weights: WeightSource, tp_group: Any = None, ep_group: Any = None,
                 sequence_parallel: bool = False, dtype: torch.dtype = torch.float32, device: Any = "cpu"):
        super().__init__()
        cfg = resolved_model_config(cfg)
        self.cfg = cfg
        self.tp_group, self.ep_group = tp_group, ep_group
        sp = bool(sequence_parallel) and group_size(tp_group) > 1
        self.sequence_parallel = sp
        self.tied = bool(cfg.tie_embeddings)
        self.tok_embed = VocabParallelEmbedding(cfg.vocab, cfg.hidden, name="tok_embed", weights=weights,
                                                std=INIT_STD, tp_group=tp_group, sequence_parallel=sp)
        self.pos_offset = 2 if cfg.arch == "opt" else 0
        if cfg.arch in ("gpt2", "opt"):
            n_pos = cfg.max_positions + self.pos_offset
            self.pos_embed = nn.Embedding(n_pos, cfg.hidden,
                                          _weight=weights.normal("pos_embed.weight", (n_pos, cfg.hidden), INIT_STD))
            self.pos_embed.weight.meshpilot_sequence_parallel = sp
        else:
            self.pos_embed = None
        # each block is cast to (dtype, device) as soon as it is built: the weights are drawn in fp32, and
        # casting the whole model at the end held all of it in fp32 plus its cast at once (6 bytes a
        # parameter for bf16: 78 GB per rank of a 13B zeroth-order model, which builds on the host)
        self.blocks = nn.ModuleList(
            Block(cfg, i, weights=weights, tp_group=tp_group, ep_group=ep_group, sequence_parallel=sp, dtype=dtype,
                  device=device).to(device=device, dtype=dtype) for i in range(cfg.layers))
        self.final_norm = make_norm(cfg, name="final_norm", weights=weights, tp_group=tp_group, sequence_parallel=sp)
        if self.tied:
            self.lm_head = None
        else:
            self.lm_head = ColumnParallelLinear(cfg.hidden, cfg.vocab, name="lm_head", weights=weights, std=INIT_STD,
                                                tp_group=tp_group, comm_input=False,
                                                pad_out_to=self.tok_embed.vocab_padded)
        self.to(device=device, dtype=dtype)

    # --- the interface -------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embeddings; sequence-sharded with sequence parallelism."""
        s = input_ids.shape[1]
        t = group_size(self.tp_group)
        if self.sequence_parallel and s % t:
            raise ValueError(f"sequence parallelism: sequence length {s} is not divisible by tp={t}")
        x = self.tok_embed(input_ids)
        if self.pos_embed is not None:
            if s + self.pos_offset > self.pos_embed.num_embeddings:
                raise ValueError(f"sequence length {s} exceeds model.max_positions={self.cfg.max_positions}")
            pos = torch.arange(s, device=input_ids.device) + self.pos_offset
            if self.sequence_parallel:
                pos = pos.chunk(t)[group_rank(self.tp_group)]
            x = x + F.embedding(pos, _replicated(self.pos_embed.weight, self.tp_group, self.sequence_parallel))
        return x

    def head_weight(self) -> torch.Tensor:
        return self.tok_embed.weight if self.tied else self.lm_head.weight

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: this rank's vocabulary slice of the logits ``[b, s, V_pad/t]``."""
        h = enter_tp_region(self.final_norm(hidden), self.tp_group, self.sequence_parallel)
        return F.linear(h, self.head_weight())

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32) over non-ignored tokens + the MoE auxiliary losses.

        Without autograd (zeroth-order steps, evaluation) and without tensor parallelism the
        logits are formed and reduced ``FORWARD_ONLY_ROWS`` tokens at a time: the full fp32
        cross-entropy holds ~14 bytes per token and vocabulary entry at once (bf16 logits,
        their fp32 copy, ``z - m`` and its exp), 23 GB for 32 x 1024 tokens of a 50k
        vocabulary; a chunk holds ``FORWARD_ONLY_ROWS`` rows of that. Each token's loss is
        computed by the same operations on its own row."""
        if not torch.is_grad_enabled() and group_size(self.tp_group) == 1:
            per_token = self._forward_only_token_losses(hidden, labels)
        else:
            per_token = vocab_parallel_cross_entropy(self.local_logits(hidden), labels, tp_group=self.tp_group,
                                                     vocab_start=self.tok_embed.vocab_start,
                                                     vocab_size=self.cfg.vocab, ignore_index=IGNORE_INDEX)
        loss = mean_over_tokens(per_token, labels, IGNORE_INDEX)
        aux = self.aux_loss()
        return loss if aux is None else loss + aux.float()

    FORWARD_ONLY_ROWS = 1024

    def _forward_only_token_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token losses ``[b, s]`` computed over chunks of ``FORWARD_ONLY_ROWS`` tokens (tp = 1)."""
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        out = torch.empty(y.shape, dtype=torch.float32, device=hidden.device)
        for i in range(0, y.numel(), self.FORWARD_ONLY_ROWS):
            rows = slice(i, i + self.FORWARD_ONLY_ROWS)
            out[rows] = vocab_parallel_cross_entropy(self.local_logits(h[rows]), y[rows], vocab_size=self.cfg.vocab,
                                                     ignore_index=IGNORE_INDEX)
        return out.view(labels.shape)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' ``last_aux_loss`` from the latest forward (None for dense models)."""
        terms = [b.mlp.last_aux_loss for b in self.blocks
                 if b.is_moe and getattr(b.mlp, "last_aux_loss", None) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        if labels is not None:
            return self.head_loss(x, labels)
        return gather_from_tp_region(self.local_logits(x), self.tp_group)[..., : self.cfg.vocab]

    # --- reassembly ------------------------------------------------------------------------
    def _tp_full(self, p: nn.Parameter, t: torch.Tensor) -> torch.Tensor:
        """``t`` (``p`` or its gradient) whole along ``p``'s tensor-parallel dimension: all-gathered over the
        tp group (collective) and without the vocabulary padding; ``t`` itself for a replicated ``p``."""
        dim = getattr(p, "meshpilot_tp_dim", None)
        if dim is None:
            return t
        if group_size(self.tp_group) > 1:
            t = all_gather_no_grad(t, dim, self.tp_group)
        return t.narrow(dim, 0, p.meshpilot_full_size)

    def full_state_dict(self, *, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or its gradient; zeros where none) as the full unsharded tensor.

        Collective over the tp group (all-gather of each sharded parameter) and, for expert
        parameters, the ep group; every rank must call it. Vocabulary padding is removed.
        """
        out: dict[str, torch.Tensor] = {}
        expert_named: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            t = self._tp_full(p, p.detach() if not grads else
                              (p.grad.detach() if p.grad is not None else torch.zeros_like(p)))
            if getattr(p, "meshpilot_expert", False) and group_size(self.ep_group) > 1:
                ep_dim = getattr(p, "meshpilot_ep_dim", None)
                if ep_dim is None:
                    expert_named[name] = t.cpu()
                    continue
                t = all_gather_no_grad(t, ep_dim, self.ep_group)
            out[name] = t.clone()
        if expert_named:
            parts: list[Any] = [None] * group_size(self.ep_group)
            dist.all_gather_object(parts, expert_named, group=self.ep_group)
            device = next(self.parameters()).device
            for part in parts:
                out.update({k: v.to(device) for k, v in part.items()})
        return out


    def full_sum(self) -> float:
        """The float64 sum of every element of :meth:`full_state_dict` without building it (collective
        over the tp and ep groups, like it): each sharded parameter is all-gathered over the tp group
        one at a time and summed (vocabulary padding removed); expert parameters, which each ep rank
        holds different ones of, are summed locally and all-reduced over the ep group."""
        from .checksum import tensor_sum64
        dense = expert = 0.0
        for p in self.parameters():
            t = self._tp_full(p, p.detach())
            if getattr(p, "meshpilot_expert", False):
                expert += tensor_sum64(t)
            else:
                dense += tensor_sum64(t)
        if group_size(self.ep_group) > 1:
            e = torch.tensor([expert], dtype=torch.float64, device=next(self.parameters()).device)
            dist.all_reduce(e, group=self.ep_group)
            expert = float(e.item())
        return dense + expert


def weight_source(cfg: ModelConfig, seed: int) -> WeightSource:
    """The weights of a build: the Hugging Face directory ``cfg.path`` when set, else random from ``seed``."""
    if cfg.path:
        from .hf_checkpoint import CheckpointWeights   # lazy: random builds need no safetensors
        return CheckpointWeights(cfg.path, cfg)
    return RandomWeights(seed)


def build_model(cfg: ModelConfig, plan: Plan, groups: Any | None, *, seed: int, dtype: torch.dtype = torch.float32,
                device: Any = "cpu", weights: WeightSource | None = None) -> Transformer:
    """The model for ``plan`` on this rank. ``groups`` is the rank's
    :class:`~meshpilot.comm.groups.ProcessGroups` (None: single process, no parallelism, the
    plan's degrees are ignored). Applies activation checkpointing when the plan asks for it.
    Weights: ``weights`` when given, else :func:`weight_source` (``cfg.path``'s checkpoint, or
    random from ``seed``)."""
    if groups is None:
        tp_group = ep_group = None
        sp = False
    else:
        if groups.tp_size != plan.tp:
            raise ValueError(f"rank {_rank()}: plan.tp={plan.tp} but the tensor-parallel group has "
                             f"{groups.tp_size} ranks")
        tp_group, ep_group = groups.tp, groups.ep
        sp = plan.sequence_parallel and plan.tp > 1
    source = weights if weights is not None else weight_source(resolved_model_config(cfg), seed)
    try:
        model = Transformer(cfg, weights=source, tp_group=tp_group, ep_group=ep_group, sequence_parallel=sp,
                            dtype=dtype, device=device)
    finally:
        if weights is None:
            source.close()
    if plan.checkpoints_activations:
        apply_activation_checkpointing(model)
    n_local = sum(p.numel() for p in model.parameters())
    log.info("rank %d: built %s model (%d layers, tp=%d, sp=%s, ep=%d) from %s: %.3fM local parameters", _rank(),
             model.cfg.arch, model.cfg.layers, group_size(tp_group), sp, group_size(ep_group), source.describe(),
             n_local / 1e6)
    return model


def apply_activation_checkpointing(model: Transformer) -> Transformer:
    """Full recomputation of every block in backward (only each block's input is kept)."""
    for block in model.blocks:
        block.activation_checkpointing = True
    log.info("rank %d: applied full activation checkpointing to %d blocks", _rank(), len(model.blocks))
    return model
