"""Zeroth-order fine-tuning: MeZO, ZO2 (CPU-offloaded blocks) and DistZO2 parallelism.

The trainer a training loop uses::

    trainer = build_zo_trainer(model, plan, groups, lr=..., eps=..., weight_decay=..., seed=...)
    for input_ids, labels in batches:       # this rank's batch: the shard of zo dp rank
        r = trainer.step(input_ids, labels)   # ZOStep(loss, loss_plus, loss_minus, g, seed, lr)
    trainer.flush()                         # before evaluation, checkpoint, end (ZO2 defers)
    state = trainer.state_dict()            # step and seed; load_state_dict to resume
    weights = trainer.full_state()          # every parameter by name, on the host (ZO2: flushes and
                                            # gathers the offloaded blocks; collective with sliced upload)
    trainer.load_full_state(weights)        # restore them (ZO2: into the host stores)

``plan.zo_mode`` selects :class:`MeZO` (whole model on the device) or :class:`ZO2`;
``plan.zo_pertp`` / ``plan.zo_dp`` (through ``groups``) select the distributed exchange.
Both ranks of a perturbation pair must get the same batch; zo dp ranks get different shards.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .distributed import DistExchange, SlicedTransfer, check_identical
from .mezo import LR, MeZO, Role, ZOParam, ZOStep, direction, param_checksum, zo_parameters
from .seeds import step_seed
from .zo2 import ZO2, FullTransfer

__all__ = ["MeZO", "ZO2", "ZOStep", "Role", "ZOParam", "DistExchange", "SlicedTransfer", "FullTransfer",
           "MeZOTrainer", "build_zo_trainer", "check_identical", "param_checksum", "zo_parameters", "direction",
           "step_seed"]


class MeZOTrainer:
    """:class:`MeZO` with the ``step(input_ids, labels)`` interface of :class:`ZO2`."""

    def __init__(self, model: nn.Module, mezo: MeZO):
        self.model, self.opt = model, mezo
        self.device = next(model.parameters()).device

    @property
    def params(self) -> list[ZOParam]:
        return self.opt.params

    @property
    def step_count(self) -> int:
        return self.opt.step_count

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> ZOStep:
        ids, lab = input_ids.to(self.device), labels.to(self.device)
        return self.opt.step(lambda: self.model(ids, lab))

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        from .mezo import loss_value
        return loss_value(self.model(input_ids.to(self.device), labels.to(self.device)))

    def flush(self) -> None:
        self.opt.flush()

    def full_sum(self) -> float:
        """The float64 sum of every parameter element, one tensor at a time (same as :meth:`ZO2.full_sum`)."""
        from meshpilot.strategies.checksum import tensor_sum64
        self.flush()
        return float(sum(tensor_sum64(p) for p in self.model.parameters()))

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter by name on the host (same interface as :meth:`ZO2.full_state`)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self.model.named_parameters():
            p.data.copy_(state[n].to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


def build_zo_trainer(model: nn.Module, plan: Any, groups: Any | None, *, lr: LR, eps: float = 1e-3,
                     weight_decay: float = 0.0, seed: int = 0, device: torch.device | str | None = None,
                     sliced_upload: bool = False) -> MeZOTrainer | ZO2:
    """The zeroth-order trainer for ``plan`` on this rank.

    ``model``: for MeZO already on its device; for ZO2 on the host (ZO2 moves the resident
    parts to ``device``). ``groups``: the rank's ProcessGroups (None: one process).
    ``sliced_upload`` (ZO2 with several ranks): each rank uploads 1/world of every block and
    the slices are all-gathered over ``groups.world``; the caller decides, the training worker
    with ``plan.zo2_upload_slices(gpus_per_node) > 1``. With slicing a rank's block parameters
    are empty between steps, so checkpoints and checksums must use ``trainer.full_state()``
    (collective) instead of ``model.state_dict()``.
    """
    if not plan.zeroth_order:
        raise ValueError(f"build_zo_trainer needs plan.zo_mode mezo or zo2, got {plan.zo_mode!r}")
    distributed = groups is not None and plan.world_size > 1
    exchange = DistExchange(groups) if distributed else None
    if not plan.zo2:
        return MeZOTrainer(model, MeZO(model, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed,
                                       exchange=exchange))
    transfer = SlicedTransfer(groups.world) if distributed and sliced_upload else None
    return ZO2(model, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, device=device, exchange=exchange,
               transfer=transfer)
