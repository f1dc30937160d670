"""Adapting a user's own causal language model (e.g. a Hugging Face ``AutoModelForCausalLM``)
to the worker's ``forward(input_ids, labels) -> mean loss`` interface.

Data parallelism and ZeRO only (no tensor or expert parallelism: the user's layers are not
sharded). Labels from meshpilot's data are already aligned (``labels[b, i]`` is the target
of position ``i``), so the adapter calls the model WITHOUT labels (Hugging Face would shift
them a second time) and computes ``mean_{b,i} CE(logits[b, i], labels[b, i])`` over the
labels that are not ``ignore_index``.

    run_worker(job, plan, ..., model_factory=lambda job, plan, groups:
               CausalLMLoss(AutoModelForCausalLM.from_config(cfg)))
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
