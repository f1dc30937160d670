"""Learning-rate schedule: linear warmup, then cosine decay.

For step s (0-based, the step about to be taken), peak rate ``lr``, ``W`` warmup steps and
``T`` total steps::

    lr(s) = lr * (s + 1) / W                                   for s < W
    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,    p = (s - W) / max(1, T - W)

so the first step already trains (lr/W, not 0), the rate peaks at step W and reaches
``min_lr = lr * min_ratio`` after the last step. The schedule is a pure function of the
step, so a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * min_ratio
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
