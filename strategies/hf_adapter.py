"""Adapting a user's own causal language model (e.g. a Hugging Face ``AutoModelForCausalLM``)
to the worker's ``forward(input_ids, labels) -> mean loss`` interface.

Data parallelism and ZeRO only (no tensor or expert parallelism: the user's layers are not
sharded). Labels from meshpilot's data are already aligned (``labels[b, i]`` is the target
of position ``i``), so the adapter calls the model WITHOUT labels (Hugging Face would shift
them a second time) and computes ``mean_{b,i} CE(logits[b, i], labels[b, i])`` over the
labels that are not ``ignore_index``.

    run_worker(job, plan, ..., model_factory=lambda job, plan, groups:
               CausalLMLoss(AutoModelForCausalLM.from_config(cfg)))

``model.implementation: hf`` makes the worker do this itself (:func:`hf_model_factory`): transformers'
model class for the job's model, with the weights of ``model.path`` when it is set.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMLoss(nn.Module):
    def __init__(self, model: nn.Module, *, ignore_index: int = -100):
        super().__init__()
        self.model, self.ignore_index = model, ignore_index

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        out = self.model(input_ids)
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=self.ignore_index)


def hf_model_factory(job: Any, plan: Any, groups: Any, *, dtype: Any = None) -> nn.Module:
    """transformers' ``AutoModelForCausalLM`` for ``job.model`` (``model.implementation: hf``), wrapped in
    :class:`CausalLMLoss`, built in ``dtype`` (default fp32; a checkpoint loaded without ZeRO-3 always in
    fp32, which the engine casts). The worker passes orchestrator/train/engine_deepspeed.build_dtype: the
    training dtype under ZeRO-3, where DeepSpeed keeps the dtype its parameters were built in, else fp32.

    Without ZeRO-3: ``from_pretrained(model.path)`` (transformers' own loading), or ``from_config``
    of the job's shape when there is no path. Under ZeRO-3 the engine's construction context is
    ``deepspeed.zero.Init``, which partitions each parameter as ``from_config`` creates it; the
    checkpoint's tensors are then read one at a time from the safetensors files (by the in-memory
    name, or that name without its base-model prefix as hub checkpoints of gpt2 store it) and
    copied into the gathered parameter, so no rank materialises the whole model.

    ``plan.activation_checkpointing: full`` recomputes every decoder layer in the backward (transformers'
    activation checkpointing, non-reentrant ``torch.utils.checkpoint``): each layer keeps only its input."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from meshpilot.strategies.hf_checkpoint import hf_config_dict
    cfg = job.model
    if cfg.path and plan.zero_stage != 3:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
    else:
        config = AutoConfig.for_model(**hf_config_dict(cfg))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        if cfg.path:
            _load_partitioned(model, cfg.path)
    if plan.checkpoints_activations:
        enable_activation_checkpointing(model)
    return CausalLMLoss(model)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Full recomputation of every decoder layer of a transformers model (non-reentrant ``torch.utils.checkpoint``,
    as the built-in model's blocks). transformers 5 names it ``activation_checkpointing_enable``, older releases
    ``gradient_checkpointing_enable``; a model with neither cannot honour the plan, which is an error, not a
    silent run without it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} has no activation checkpointing; set "
                         "plan.activation_checkpointing=none")
    if hasattr(model, "config"):
        model.config.use_cache = False          # a KV cache is of no use in training and checkpointing refuses it


def _load_partitioned(model: nn.Module, directory: str) -> None:
    """Copy every parameter of ``model`` (ZeRO-3 partitioned) from the safetensors files of ``directory``."""
    import json
    from pathlib import Path

    import deepspeed
    import torch
    from safetensors import safe_open

    d = Path(directory)
    index = d / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else {k: "model.safetensors" for k in _keys(d / "model.safetensors")})
    tied = _tied_names(model)
    handles: dict[str, Any] = {}
    try:
        for name, p in model.named_parameters():
            key = name if name in where else name.split(".", 1)[-1]
            if key not in where:
                if name in tied:
                    continue
                raise ValueError(f"{d}: no tensor for {name!r} (transformers' {type(model).__name__})")
            f = handles.setdefault(where[key], safe_open(str(d / where[key]), framework="pt"))
            tensor = f.get_tensor(key)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                with torch.no_grad():
                    p.copy_(tensor.to(device=p.device, dtype=p.dtype))
    finally:
        handles.clear()


def _keys(file: Any) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that are the same tensor as an earlier one (a tied LM head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied
