"""Training metrics: loss, throughput, MFU and peak memory, to stdout, JSONL and TensorBoard.

MFU follows :mod:`meshpilot.orchestrator.sim.flops`, the rule the simulator predicts with
(3 forward-equivalents per token with backpropagation, 2 for a zeroth-order step).

Peak memory per rank: torch's ``max_memory_allocated`` / ``max_memory_reserved`` on CUDA,
NVML's device ``used`` bytes where pynvml works (not a peak: read at each log; the run's sampled
NVML peak is in the worker's result, see :mod:`.memory_peaks`), and the process's peak resident
set (``ru_maxrss``) everywhere.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from meshpilot.orchestrator.train.memory_peaks import host_rss_peak_bytes, nvml_used_bytes, torch_peak_bytes

log = logging.getLogger(__name__)


@dataclass
class MemoryStats:
    """Bytes; None where the source is unavailable."""
    rank: int
    torch_allocated_peak: int | None = None
    torch_reserved_peak: int | None = None
    nvml_used: int | None = None
    host_rss_peak: int | None = None

    def gib(self) -> dict[str, float | None]:
        return {k: (None if v is None else round(v / 2**30, 3)) for k, v in asdict(self).items() if k != "rank"}


def memory_stats(rank: int, device: torch.device | None = None) -> MemoryStats:
    st = MemoryStats(rank=rank, host_rss_peak=host_rss_peak_bytes())
    if device is not None and device.type == "cuda":
        st.torch_allocated_peak, st.torch_reserved_peak = torch_peak_bytes(device)
        st.nvml_used = nvml_used_bytes(device)
    return st


@dataclass
class StepRecord:
    step: int                  # 1-based: the number of optimizer steps done after this one
    loss: float
    lr: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    grad_norm: float | None = None
    memory: list[dict[str, Any]] = field(default_factory=list)   # one entry per rank (on log steps)
    eval_loss: float | None = None          # validation loss after this step (evaluation steps only)
    eval_perplexity: float | None = None    # exp(eval_loss)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing (they contribute via gathers)."""

    def __init__(self, run_dir: str | Path, *, rank: int, tensorboard: bool = True, log_every: int = 1):
        self.rank, self.log_every = rank, max(1, log_every)
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
                except Exception as e:                  # tensorboard not installed: JSONL and stdout only
                    log.warning("rank 0: TensorBoard disabled (%s)", e)

    def write(self, rec: StepRecord) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(rec)) + "\n")
        if self._tb is not None:
            for k in ("loss", "lr", "step_time_s", "tokens_per_s", "mfu", "grad_norm"):
                v = getattr(rec, k)
                if v is not None:
                    self._tb.add_scalar(f"train/{k}", v, rec.step)
            for k in ("loss", "perplexity"):
                v = getattr(rec, f"eval_{k}")
                if v is not None:
                    self._tb.add_scalar(f"eval/{k}", v, rec.step)
            for m in rec.memory:
                for k, v in m.items():
                    if k != "rank" and v is not None:
                        self._tb.add_scalar(f"memory_gib/{k}/rank{m['rank']}", v / 2**30, rec.step)
        if rec.step % self.log_every == 0 or rec.memory:
            mem = ""
            if rec.memory:
                peaks = [m.get("torch_allocated_peak") or m.get("host_rss_peak") or 0 for m in rec.memory]
                mem = f" peak_mem_gib(max rank)={max(peaks) / 2**30:.2f}"
            log.info("rank 0: step %d loss %.4f lr %.3g %.3fs/step %.0f tok/s mfu %.1f%%%s", rec.step, rec.loss,
                     rec.lr, rec.step_time_s, rec.tokens_per_s, 100 * rec.mfu, mem)
        if rec.eval_loss is not None:
            log.info("rank 0: step %d eval_loss %.4f perplexity %.4g", rec.step, rec.eval_loss, rec.eval_perplexity)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


# --- step phases (for the run summary's predicted-vs-measured rows) ---------------------------

PHASES = ("forward", "backward", "optimizer")
"""The phases of a DeepSpeed step as :class:`PhaseTimer` measures them: ``engine(...)``,
``engine.backward(loss)`` (at stages 0-2 this includes the gradient reductions DeepSpeed issues in
backward) and ``engine.step()`` (the optimizer: GPU Adam, or the offloaded gradients' copies and
CPU Adam; at stage 2 the parameter all-gather)."""


class PhaseTimer:
    """Times the forward, backward and optimizer calls of a DeepSpeed engine, per optimizer step.

    ``attach(engine)`` wraps the engine object's ``forward``, ``backward`` and ``step`` (instance
    attributes; the class is untouched). On CUDA each call is bracketed by two CUDA events on the
    current stream (no synchronisation added: the events are read once, at :meth:`medians`); on
    the CPU by ``time.perf_counter``. Each optimizer step is ``grad_accum`` calls of each phase;
    :meth:`medians` is the median over steps of each phase's per-step sum, the first step left
    out when there are more than two (its time includes one-off work: allocator growth,
    communicator set-up). Only the first ``max_steps`` steps are kept. Communication: none."""

    def __init__(self, grad_accum: int, device: torch.device, *, max_steps: int = 1000):
        self.grad_accum, self.device, self.max_steps = max(1, int(grad_accum)), device, max_steps
        self._calls: dict[str, list[Any]] = {p: [] for p in PHASES}

    def attach(self, engine: Any) -> "PhaseTimer":
        for phase, name in (("forward", "forward"), ("backward", "backward"), ("optimizer", "step")):
            setattr(engine, name, self._wrap(phase, getattr(engine, name)))
        return self

    def _wrap(self, phase: str, fn: Any) -> Any:
        calls, limit = self._calls[phase], self.max_steps * self.grad_accum
        cuda = self.device.type == "cuda"

        def timed(*args: Any, **kwargs: Any) -> Any:
            if len(calls) >= limit:
                return fn(*args, **kwargs)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                calls.append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                calls.append(time.perf_counter() - t0)
            return out
        return timed

    def _seconds(self, phase: str) -> list[float]:
        out = []
        for c in self._calls[phase]:
            if isinstance(c, tuple):
                c[1].synchronize()
                out.append(c[0].elapsed_time(c[1]) / 1e3)
            else:
                out.append(float(c))
        return out

    def medians(self) -> dict[str, float] | None:
        """Median seconds per optimizer step of each phase; None before a whole step was timed."""
        out: dict[str, float] = {}
        for phase in PHASES:
            s = self._seconds(phase)
            steps = [sum(s[i:i + self.grad_accum]) for i in range(0, len(s) - self.grad_accum + 1, self.grad_accum)]
            if not steps:
                return None
            steps = steps[1:] if len(steps) > 2 else steps
            out[phase] = float(statistics.median(steps))
        return out
