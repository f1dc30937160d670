"""Seeds of the zeroth-order directions: pure integer functions shared by the PyTorch passes
(:mod:`.mezo`) and the fused kernels (:mod:`.fused`).

``splitmix64`` is the SplitMix64 finaliser on 64-bit integers::

    x <- x + 0x9E3779B97F4A7C15
    x <- (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x <- (x ^ (x >> 27)) * 0x94D049BB133111EB
    x <- x ^ (x >> 31)                              (all mod 2^64)

Step ``t`` of a run with base seed ``b`` has seed ``splitmix64(splitmix64(b) ^ t) >> 1``;
parameter ``k`` at step seed ``s`` draws its direction from the generator seeded with
``splitmix64(s ^ splitmix64(k + 1)) >> 1`` (63-bit values: valid ``torch.Generator`` seeds).
Communication: none.
"""
from __future__ import annotations

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def step_seed(base_seed: int, step: int) -> int:
    """The seed of step ``step`` (a 63-bit integer), a pure function of (base seed, step)."""
    return splitmix64(splitmix64(int(base_seed) & MASK64) ^ int(step)) >> 1


def param_seed(seed: int, index: int) -> int:
    """The generator seed of parameter ``index`` at step seed ``seed``."""
    return splitmix64(int(seed) ^ splitmix64(int(index) + 1)) >> 1
