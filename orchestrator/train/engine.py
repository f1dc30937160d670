"""What the training loop (:mod:`.loop`) drives: one rank's run settings and the engine interface.

An engine owns the model, its optimizer and the plan's process groups; the loop owns the
step sequence, data, metrics, stop requests and the checkpoint cadence. Two engines implement
:class:`TrainEngine`: :mod:`.engine_deepspeed` (backpropagation through a DeepSpeed engine)
and :mod:`.engine_zo` (zeroth-order training, MeZO / ZO2, no gradients).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.train.checkpoint import CheckpointManager, CheckpointMeta

ModelFactory = Callable[[JobConfig, Plan, Any], nn.Module]
StepHook = Callable[[dict[str, Any]], None]
MicroBatches = Iterable[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RunContext:
    """One rank's run: the job and plan, where it runs, and what the loop reports to."""
    job: JobConfig
    plan: Plan
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    resume_from: tuple[Path, str] | None = None     # checkpoint (root, tag) to continue from
    on_step: StepHook | None = None                 # called with every step's record, on every rank
    log_every: int = 1
    tensorboard: bool = True
    save_final: bool = True                         # checkpoint after the last step (train.checkpoint_final)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step as every rank agrees on it."""
    loss: float          # the step's loss, mean over the data-parallel replicas
    lr: float            # the learning rate the step applied
    stop: bool           # some rank was asked to stop (agreed: equal on every rank)


class TrainEngine(Protocol):
    """One rank's model and optimizer for the loop. Every method may be collective: all ranks
    call them in the same order."""

    data_rank: int       # which shard of each step's batch this rank reads (its data-parallel index)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step (the schedule's value for that step)."""

    def sync(self) -> None:
        """Wait for the device's queued work (brackets the step's wall time)."""

    def step(self, micro_batches: MicroBatches, stop_local: bool) -> StepOutcome:
        """One optimizer step over this rank's micro-batches; agrees on the stop flags."""

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm (before clipping), None if there is none."""

    def save(self, ckpt: CheckpointManager, *, step: int, consumed_samples: int) -> Path:
        """Write a complete checkpoint (collective); its directory."""

    def load(self, ckpt: CheckpointManager, root: Path, tag: str) -> CheckpointMeta:
        """Restore the model, optimizer and RNG states from ``root/tag`` (collective)."""

    def param_checksum(self) -> float:
        """Sum of every element of the full model's parameters in float64 (collective)."""

    def results(self) -> dict[str, Any]:
        """Engine-specific entries of the rank's result dict."""


class StartupPhases:
    """Wall time of consecutive start-up phases (seconds, in order), for the log and the result."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


def train_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
