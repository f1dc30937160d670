"""A float64 sum of parameters that never holds a copy of the model.

Runs end with a parameter checksum (the sum of every element of the full model, in float64), so
that two launches of one job can be compared. Summing a bf16 tensor in float64 materialises it in
float64 (8 bytes an element: torch casts the input before reducing); :func:`tensor_sum64` casts
and sums ``chunk`` elements at a time instead, so the checksum adds at most ``8 x chunk`` bytes to
the device or host peak the run measured, not a copy of the model.
"""
from __future__ import annotations

import torch

CHUNK = 1 << 24
"""Elements cast to float64 at a time (128 MiB)."""


def tensor_sum64(t: torch.Tensor, chunk: int = CHUNK) -> float:
    """Sum of every element of ``t`` in float64, ``chunk`` elements at a time (no communication)."""
    flat = t.detach().reshape(-1)
    total = 0.0
    for part in flat.split(chunk):
        total += float(part.double().sum().item())
    return total
