"""Validation loss on the evaluation split, for the training loop (``train.eval_every``).

Evaluation batch ``k`` (``k < n_batches``) is eval samples ``[k B, (k+1) B)`` (B =
train.global_batch), laid out over the data-parallel ranks exactly as a training step
(:class:`~meshpilot.orchestrator.train.data.ShardedBatches`, unshuffled). For each of its
micro-batches a rank runs the model forward without gradients and gets the mean loss over the
labels that are not ignored, ``l_m``, and counts those labels on the host, ``n_m``; the rank
holds ``S_r = sum_m l_m n_m`` and ``N_r = sum_m n_m`` (float64).

Communication: one ``all_gather`` of ``[data rank, S_r, N_r]`` (3 float64 per rank) over the
world. The result is ``eval_loss = sum_d S_d / sum_d N_d`` over the data-parallel indices
``d = 0 .. dp-1`` in that order, each taken from the first rank holding it (the tensor-parallel
ranks of a replica, and both ranks of a zeroth-order perturbation pair, hold equal values): the
mean loss per evaluated label over the whole evaluation, what one process computes for the same
samples, independent of the plan up to float rounding. ``eval_perplexity = exp(eval_loss)``.
For MoE models the loss includes the router's auxiliary loss, as the training loss does.

Forward passes: a DeepSpeed engine's module in eval mode under ``torch.no_grad`` (ZeRO-3
gathers its parameters through the module's hooks as in training); a zeroth-order engine's
``trainer.evaluate`` (ZO2 streams its blocks; with sliced upload every rank takes part).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from meshpilot.orchestrator.data.tokens import IGNORE_INDEX
from meshpilot.orchestrator.train.data import ShardedBatches


@dataclass(frozen=True)
class EvalResult:
    loss: float             # mean loss per evaluated label
    perplexity: float       # exp(loss) (inf past exp's float range)
    labels: int             # labels evaluated (over all data-parallel ranks)


def micro_batch_loss(engine: Any, input_ids: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """The model's mean loss over the non-ignored labels of one micro-batch, without gradients."""
    if hasattr(engine, "evaluate"):
        return float(engine.evaluate(input_ids, labels))
    trainer = getattr(engine, "trainer", None)
    if trainer is not None:                 # ZOTrainEngine: MeZO / ZO2 evaluate the unperturbed loss
        return float(trainer.evaluate(torch.from_numpy(input_ids), torch.from_numpy(labels)))
    module = engine.engine.module            # DeepSpeedTrainEngine: the module, past DeepSpeed's forward wrapper
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            loss = module(torch.from_numpy(input_ids).to(device), torch.from_numpy(labels).to(device))
    finally:
        module.train(was_training)
    return float(loss.detach().float().item())


def evaluate(engine: Any, batches: ShardedBatches, n_batches: int, *, device: torch.device) -> EvalResult:
    """Validation loss over ``n_batches`` evaluation batches (collective; see the module docstring)."""
    total, count = 0.0, 0
    for k in range(n_batches):
        for x, y in batches.step_batches(k):
            n = int((y != IGNORE_INDEX).sum())
            loss = micro_batch_loss(engine, x, y, device)
            if n:
                total += loss * n
                count += n
    mine = torch.tensor([float(engine.data_rank), total, float(count)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
    else:
        rows = [mine]
    by_replica: dict[int, tuple[float, float]] = {}
    for r in rows:
        d, s, c = r.tolist()
        by_replica.setdefault(int(d), (s, c))
    s_all = sum(by_replica[d][0] for d in sorted(by_replica))
    n_all = sum(by_replica[d][1] for d in sorted(by_replica))
    loss = s_all / n_all if n_all else float("nan")
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return EvalResult(loss=loss, perplexity=ppl, labels=int(n_all))


def eval_batch_count(requested: int, eval_samples: int, global_batch: int) -> int:
    """``train.eval_batches``, or for 0 every whole global batch of the split (at least one)."""
    return requested if requested > 0 else max(1, eval_samples // global_batch)
