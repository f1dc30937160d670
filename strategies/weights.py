"""Where the built-in model's weights come from: one :class:`WeightSource` per model build.

Every layer asks the source for a tensor by its FULL parameter name (the names listed in
:mod:`.model`) and the full shape, saying how a fresh model would fill it
(:meth:`~WeightSource.normal` with its standard deviation, :meth:`~WeightSource.ones` for norm
weights, :meth:`~WeightSource.zeros` for biases) and, for a sharded layer, which part it keeps
(:class:`Part`: rows ``[start, stop)`` of one dimension; rows at or beyond the full size are
zeros, which is how the vocabulary padding of tensor parallelism is filled).

- :class:`RandomWeights` (``seed``): draws the full tensor with
  :func:`.init_utils.full_normal` (a generator per full name) and keeps the part, so the same
  seed gives the same full weights for every tp/ep layout; ones and zeros as they are.
- :class:`~meshpilot.strategies.hf_checkpoint.CheckpointWeights`: the tensor of that name in
  a Hugging Face model directory, only the part read from the safetensors file.

Sources return fp32 tensors on :func:`.init_utils.init_device` (``normal``) or the default
device (``ones``, ``zeros``: as ``torch.ones`` would); the layer casts them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import init_utils


@dataclass(frozen=True)
class Part:
    """Rows ``[start, stop)`` of dimension ``dim`` of a full tensor; rows >= the full size are zeros."""
    dim: int
    start: int
    stop: int

    @staticmethod
    def chunk(dim: int, rank: int, world: int, padded_size: int) -> "Part":
        """The ``rank``-th of ``world`` equal contiguous chunks of a dimension padded to ``padded_size``."""
        if padded_size % world:
            raise ValueError(f"dimension {dim} of size {padded_size} is not divisible by {world}")
        n = padded_size // world
        return Part(dim, rank * n, (rank + 1) * n)

    def clipped(self, size: int) -> tuple[int, int, int]:
        """(start, stop) within a dimension of ``size`` and the number of zero rows after them."""
        lo, hi = min(self.start, size), min(self.stop, size)
        return lo, hi, (self.stop - self.start) - (hi - lo)


def take(full: torch.Tensor, part: Part | None) -> torch.Tensor:
    """``part`` of ``full`` as a new contiguous tensor (zero rows where the part passes the end)."""
    if part is None:
        return full
    lo, hi, pad = part.clipped(full.shape[part.dim])
    t = full.narrow(part.dim, lo, hi - lo)
    if pad:
        shape = list(t.shape)
        shape[part.dim] = pad
        t = torch.cat([t, t.new_zeros(shape)], dim=part.dim)
    return t.contiguous().clone()


def part_shape(shape: tuple[int, ...], part: Part | None) -> tuple[int, ...]:
    if part is None:
        return tuple(shape)
    out = list(shape)
    out[part.dim] = part.stop - part.start
    return tuple(out)


class WeightSource:
    """Gives each full parameter (or its part) of the model being built. See the module docstring."""

    def normal(self, name: str, shape: tuple[int, ...], std: float, part: Part | None = None) -> torch.Tensor:
        raise NotImplementedError

    def ones(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        raise NotImplementedError

    def zeros(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files once the model is built."""

    def describe(self) -> str:
        return type(self).__name__


class RandomWeights(WeightSource):
    """N(0, std^2) per full name from ``seed`` (:func:`.init_utils.full_normal`), ones, zeros."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def normal(self, name: str, shape: tuple[int, ...], std: float, part: Part | None = None) -> torch.Tensor:
        return take(init_utils.full_normal(name, tuple(shape), std, self.seed), part)

    def ones(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        return torch.ones(part_shape(shape, part))

    def zeros(self, name: str, shape: tuple[int, ...], part: Part | None = None) -> torch.Tensor:
        return torch.zeros(part_shape(shape, part))

    def describe(self) -> str:
        return f"random weights (seed {self.seed})"
