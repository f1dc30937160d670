"""Layout-independent initialisation.

Every parameter of the full (unsharded) model is drawn from its own generator, seeded by
the job seed and a CRC of the parameter's full name. A sharded layer draws the full
tensor and keeps its slice, so the same seed gives the same full weights for every tp/ep.
Layers ask for weights through a :class:`~.weights.WeightSource`; its random kind,
:class:`~.weights.RandomWeights`, calls :func:`full_normal` (a checkpoint is the other kind).
(Drawing the full tensor on each rank costs start-up time only; for models larger than
host memory, stage-3 construction under ``deepspeed.zero.Init`` is used instead.)

Where the draw happens: on the default device (``torch.get_default_device()``) when that is
a GPU, otherwise on the CPU. The worker builds the model under ``with torch.device(gpu)``
for ZeRO stages 0-2: on an H200 the 1B model's build (including CUDA start-up) took 6 s
instead of 15 s of serial CPU sampling (benchmarks/results/2026-11-27-h200x2, torchrun logs).
A CUDA generator gives other numbers than the CPU one (and may differ between GPU models,
whose kernels split the Philox stream by SM count), so the same seed
gives the same weights for every tp/ep layout on one kind of device, not across devices.
"""
from __future__ import annotations

import zlib

import torch


def init_device() -> torch.device:
    """The device :func:`full_normal` draws on: the default device if it is a GPU; inside
    ``deepspeed.zero.Init`` on a GPU rank (ZeRO-3), that rank's current GPU; else the CPU.
    ZeRO-3 used to draw on the CPU: 61 s of the 7B model's 77 s to its first step on 2 x H200
    against 0.2 s for the same draw on the GPU under tp=2
    (benchmarks/results/2026-11-29-s2-h200x2/hf7b); drawing on the GPU also gives ZeRO-3 the
    weights that stages 0-2 draw for the same seed on the same kind of GPU."""
    dev = torch.get_default_device()
    if dev.type == "cuda":
        return dev
    if zero_init_active() and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def zero_init_active() -> bool:
    """Whether a ``deepspeed.zero.Init`` context is open (read from DeepSpeed's module, if imported)."""
    import sys
    zp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return zp is not None and getattr(zp, "zero_init_context", 0) > 0


def full_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """N(0, std^2) tensor for the full parameter ``name`` (fp32, on :func:`init_device`),
    identical on every rank."""
    dev = init_device()
    g = torch.Generator(device=dev).manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    # device given explicitly: under deepspeed.zero.Init the tensor constructors default to the GPU,
    # which a CPU generator cannot fill
    return torch.randn(shape, generator=g, dtype=torch.float32, device=dev).mul_(std)


class AssignedInit:
    """Mixin for ``nn.Linear``/``nn.Embedding`` subclasses whose constructor assigns the
    weights itself (from :func:`full_normal`): the base class's ``reset_parameters`` is
    skipped. The base constructor runs on the meta device, where PyTorch's default
    initialisation goes through its Python reference kernels and imports ``torch._dynamo``:
    on an H200 the 1B model's build took 4.6 s with it and 0.1 s without
    (benchmarks/results/2026-11-27-s3-h200x2, rank-0 logs of calls 1 and 3). A DeepSpeed
    engine imports torch._dynamo later anyway (its set-up grew by the same 4 s), so this
    shortens the start of zeroth-order workers, which build no engine, not of ZeRO ones."""

    def reset_parameters(self) -> None:
        pass


def base_device() -> str | None:
    """The device for an :class:`AssignedInit` layer's base constructor: "meta" (nothing
    allocated, the weights are assigned right after), except inside ``deepspeed.zero.Init``.
    Init takes a ``device="meta"`` constructor for ``torch.nn.utils.skip_init`` and wraps every
    module class's ``_apply`` until a ``to_empty`` that never comes here: one wrapper per
    layer, and a 32-layer model's ``.to()`` then exceeded Python's recursion limit
    (DeepSpeed 0.19.8). There the base weights are allocated; Init partitions each layer
    once its constructor returns."""
    return None if zero_init_active() else "meta"

