"""Layout-independent initialisation.

Every parameter of the full (unsharded) model is drawn from its own generator, seeded by
the job seed and a CRC of the parameter's full name. A sharded layer draws the full
tensor and keeps its slice, so the same seed gives the same full weights for every tp/ep.
(Drawing the full tensor on each rank costs host time at start-up only; for models larger
than host memory, stage-3 construction under ``deepspeed.zero.Init`` is used instead.)
"""
from __future__ import annotations

import zlib

import torch


def full_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """N(0, std^2) tensor for the full parameter ``name`` (fp32, CPU), identical on every rank."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    # device given explicitly: under deepspeed.zero.Init the tensor constructors default to the GPU,
    # which a CPU generator cannot fill
    return torch.randn(shape, generator=g, dtype=torch.float32, device="cpu") * std


def shard(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """The ``rank``-th of ``world`` equal contiguous chunks of ``t`` along ``dim`` (a copy)."""
    if t.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by {world}")
    return t.chunk(world, dim=dim)[rank].contiguous().clone()
