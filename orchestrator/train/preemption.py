"""Stop requests: SIGUSR2 / SIGTERM (Slurm preemption, Kubernetes eviction) or a controller's event.

A signal reaches one process at a time, and not necessarily every rank, so every step agrees
on the local flags once, right after the step's compute: the DeepSpeed engine sums them in the
step's loss all-reduce, the zeroth-order engine with :func:`agree_stop` (an all-reduce MAX).
Every rank then takes the same decision (checkpoint, then stop). A request that arrives after
that point (e.g. from a step hook) is seen by the next step.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    def __init__(self, rank: int, stop_event: threading.Event | None = None):
        self.rank, self.stop_event = rank, stop_event
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> "StopRequest":
        """Catch the signals (only possible in the main thread). Under Ray the worker runs in one of
        the actor's threads: the actor catches SIGTERM/SIGUSR2 in the process's main thread and sets
        ``stop_event`` (:class:`meshpilot.launch.actor.GangWorker`), as the controller does through the
        actor's ``stop`` when it is itself signalled or cancelled."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        log.warning("rank %d: received %s: will checkpoint and stop after this step", self.rank,
                    signal.Signals(signum).name)

    @property
    def local(self) -> bool:
        return self.signal is not None or (self.stop_event is not None and self.stop_event.is_set())


def agree_stop(local: bool, device: torch.device) -> bool:
    """True on every rank if ``local`` is True on any rank: one all-reduce (MAX) of one element."""
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
