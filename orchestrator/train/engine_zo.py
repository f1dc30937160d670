"""The zeroth-order engine: MeZO / ZO2 / DistZO2 through :func:`meshpilot.strategies.zo.build_zo_trainer`.

One step: this rank's micro-batches are concatenated into one batch (x, y) of its zeroth-order
data-parallel shard (both ranks of a perturbation pair read the same rows), then
``trainer.step(x, y)`` evaluates L(theta + eps z) and L(theta - eps z) (split over the pair
when pertp = 2), combines the projected gradient g = (L+ - L-) / (2 eps) over the zo dp ranks
(all-reduce of the losses) and applies theta <- theta - lr (g z + wd theta). Then one
all-reduce (MAX, 1 element) agrees on the stop flags. No DeepSpeed engine, no gradients.

Checkpoints use the loop's atomic protocol (``TAG.partial`` -> ``TAG`` -> ``latest``); rank 0
writes the full model and the trainer state to ``zo_state.pt`` (every rank holds the same
parameters in a zeroth-order plan; ZO2's are gathered from the ranks' slices with sliced upload),
tensors and plain numbers only, loaded with ``weights_only=True``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meshpilot.comm.groups import ProcessGroups
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.train.checkpoint import CheckpointManager, CheckpointMeta, safe_load
from meshpilot.orchestrator.train.engine import (MicroBatches, ModelFactory, RunContext, StartupPhases, StepOutcome,
                                                 train_dtype)
from meshpilot.orchestrator.train.preemption import agree_stop
from meshpilot.orchestrator.train.schedule import lr_at

log = logging.getLogger(__name__)

STATE_FILE = "zo_state.pt"


class ZOTrainEngine:
    """:class:`~meshpilot.orchestrator.train.engine.TrainEngine` over a zeroth-order trainer
    (``MeZOTrainer`` or ``ZO2``), which applies the learning-rate schedule itself."""

    def __init__(self, trainer: Any, model: nn.Module, groups: ProcessGroups, *, rank: int, device: torch.device):
        self.trainer, self.model, self.groups = trainer, model, groups
        self.rank, self.device = rank, device
        self.data_rank = groups.zo_dp_rank

    def set_lr(self, lr: float) -> None:
        """Nothing to do: the trainer evaluates the same schedule at its own step count."""

    def sync(self) -> None:
        """Nothing to do: the step ends with the losses read on the host."""

    def step(self, micro_batches: MicroBatches, stop_local: bool) -> StepOutcome:
        parts = list(micro_batches)
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        r = self.trainer.step(x, y)
        return StepOutcome(loss=float(r.loss), lr=float(r.lr), stop=agree_stop(stop_local, self.device))

    def grad_norm(self) -> float | None:
        return None

    def save(self, ckpt: CheckpointManager, *, step: int, consumed_samples: int) -> Path:
        self.trainer.flush()
        return ckpt.save_with(self._write, step=step, consumed_samples=consumed_samples)

    def _write(self, d: Path) -> None:
        """Rank 0 writes every weight and the trainer state. The weights are gathered on every rank
        (collective: ZO2's block weights live in its host stores, a slice per rank with sliced upload)."""
        weights = self.trainer.full_state()
        if self.rank == 0:
            torch.save({"model": weights, "trainer": self.trainer.state_dict()}, d / STATE_FILE)

    def load(self, ckpt: CheckpointManager, root: Path, tag: str) -> CheckpointMeta:
        return ckpt.load_with(self._read, root, tag)

    def _read(self, d: Path) -> None:
        """Tensors and plain numbers only (``weights_only=True``): a pickled object in a run
        directory is refused, not executed."""
        st = safe_load(d / STATE_FILE, where=d, what="zeroth-order state")
        if not isinstance(st, dict) or not isinstance(st.get("model"), dict) or "trainer" not in st:
            raise ConfigError("resume", str(d), reason=f"{STATE_FILE} is not a meshpilot zeroth-order state")
        self.trainer.load_full_state(st["model"])
        self.trainer.load_state_dict(st["trainer"])

    def full_weights(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """Every parameter in fp32 on rank 0 (None elsewhere; collective: ZO2 gathers its host
        stores). Zeroth-order plans keep no fp32 copy: the weights are in train.precision, cast exactly."""
        self.trainer.flush()
        weights = self.trainer.full_state()
        dtype = str(next(iter(weights.values())).dtype).replace("torch.", "") if weights else "float32"
        out = {n: t.float() for n, t in weights.items()} if self.rank == 0 else None
        return out, f"the zeroth-order {dtype} weights"

    def param_checksum(self) -> float:
        """The float64 sum of every parameter element, one tensor at a time (no copy of the model)."""
        return self.trainer.full_sum()

    def results(self) -> dict[str, Any]:
        return {"zo_transfer": type(getattr(self.trainer, "transfer", None)).__name__,
                "param_dtype": str(next(self.model.parameters()).dtype)}


def build_zo_engine(ctx: RunContext, model_factory: ModelFactory | None, phases: StartupPhases) -> ZOTrainEngine:
    """Process groups, the model and the zeroth-order trainer for ``ctx.plan`` (collective)."""
    from meshpilot.comm.groups import build_process_groups
    from meshpilot.strategies.zo import build_zo_trainer

    job, plan, device, t = ctx.job, ctx.plan, ctx.device, ctx.job.train
    gpus_per_node = job.cluster.gpus_per_node
    groups = build_process_groups(plan.layout(gpus_per_node))
    phases.mark("process groups")
    torch.manual_seed(t.seed)
    if model_factory is not None:
        model = model_factory(job, plan, groups)
    else:
        from meshpilot.strategies.model import build_model
        # ZO plans replicate the whole model, kept in train.precision (no optimizer copy in fp32): MeZO's
        # and ZO2's weights, perturbations and transfers are in that dtype
        model = build_model(job.model, plan, None, seed=t.seed, dtype=train_dtype(t.precision))
    if not plan.zo2:
        model = model.to(device)
    # ZO2 with every rank on one node: sliced upload (each rank moves 1/n of a block over its PCIe link
    # and the slices are all-gathered); measured on 4 x H200, opt-6.7b zo dp=4: 0.177 instead of 0.565 s/step
    # (benchmarks/results/2026-11-27-s4-h200x4/zo_bench_sliced_call3.json)
    trainer = build_zo_trainer(model, plan, groups, eps=t.zo_eps, weight_decay=t.weight_decay, seed=t.seed,
                               device=device, lr=lambda s: lr_at(s, lr=t.lr, warmup=t.warmup_steps, total=t.steps),
                               sliced_upload=plan.zo2_upload_slices(gpus_per_node) > 1)
    phases.mark("model + zeroth-order trainer")
    return ZOTrainEngine(trainer, model, groups, rank=ctx.rank, device=device)
