"""Fused perturbation passes on CUDA: Triton kernels that draw ``z`` in registers.

The PyTorch passes of :mod:`.mezo` draw ``z`` into an fp32 temporary with ``torch.randn``
and then scale and add it: per bf16 element a "plus" pass moves ~20 bytes and launches
four kernels plus a ``torch.Generator`` per parameter. Here a pass reads theta, draws ``z``
in registers and writes theta back: 4 bytes per bf16 element (read + write), nothing else in
device memory. :func:`apply` launches once per parameter; :class:`FusedGroup` launches
once per pass over a whole list of parameters (MeZO: the model; ZO2: one block), which is
what the optimizers use. Measured on an H200, opt-1.3b (388 tensors), the three passes of a
step: 95 ms with the PyTorch ops, 58 ms launched per tensor (launch-bound), 14 ms grouped,
3.6-3.9x the memory floor (benchmarks/results/2026-11-27-s3-h200x4/zo_pass_bench.json).

Directions. ``z`` of element ``i`` of parameter ``k`` at step seed ``s`` comes from Triton's
counter-based normals ``tl.randn4x(param_seed(s, k), i // 4)`` (Philox-4x32-10 keyed by the
64-bit seed, counter ``(i // 4, 0, 0, 0)``, Box-Muller on both pairs of its four outputs, so
one Philox evaluation serves four elements). It depends only on ``(s, k, i)``, so ZO2's
block-by-block passes and every distributed rank draw the same ``z`` with no shared state, as in the PyTorch path; but it is a different stream from
``torch.randn``'s: the same seeds give other directions on a GPU with this kernel than on
the CPU (:func:`direction` returns the ones actually used). A parameter of more than
``SEGMENT`` elements is split into segments, segment ``j > 0`` keyed by
``mix(param_seed, j)``, so the int32 counter never wraps.

Arithmetic, in fp32 per element, ``d = fl32(eps * z)``, ``rnd`` = round to theta's dtype:

    plus, restore:     theta <- rnd(theta + d)
    switch:            theta <- rnd(rnd(theta - d) - d)          (two roundings, as in mezo.py)
    restore+update:    t1 = rnd(theta + d);  theta <- rnd(t1 - lr (g z + wd t1))
    update:            theta <- rnd(theta - lr (g z + wd theta))

which is the PyTorch path's sequence of operations, each rounded: the kernels are compiled
with ``enable_fp_fusion=False``, so ``x + eps * z`` is not contracted into one fused
multiply-add (measured on an H200: with contraction, fp32 "plus" differed from the PyTorch
composition). PyTorch's own CUDA ``add_(u, alpha)`` may fuse ``x + alpha u``; an updated
element can therefore differ from the PyTorch path by one fp32 ulp before the final
rounding. Every rank runs this same kernel, so ranks stay bit-identical.
Communication: none.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .seeds import splitmix64

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs use the PyTorch passes
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

SEGMENT = 1 << 30      # elements per launch: the Philox counter is the int32 element offset
BLOCK = 2048
KINDS = {"plus": 0, "restore": 0, "switch": 1, "restore+update": 2, "update": 3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV = "MESHPILOT_ZO_KERNEL"


def enabled(t: torch.Tensor) -> bool:
    """Use the fused kernel for ``t``: a contiguous CUDA tensor of fp32/bf16/fp16, Triton
    importable, and ``MESHPILOT_ZO_KERNEL`` not set to ``torch`` (for comparisons)."""
    if triton is None or not t.is_cuda or t.dtype not in DTYPES or not t.is_contiguous():
        return False
    choice = os.environ.get(ENV, "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{ENV}={choice!r}: use auto, triton or torch")
    return choice != "torch"


def _on(device: torch.device) -> Any:
    """Launch on ``device`` (Triton uses the current CUDA device's stream); on the CPU (the
    Triton interpreter, TRITON_INTERPRET=1, used by the tests) nothing to select."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def segment_seeds(seed: int, numel: int) -> list[tuple[int, int, int]]:
    """(key, start, length) of every launch of a parameter with ``numel`` elements whose
    generator seed is ``seed``."""
    out = []
    for j, start in enumerate(range(0, numel, SEGMENT)):
        key = seed if j == 0 else splitmix64(seed ^ j) >> 1
        out.append((key, start, min(SEGMENT, numel - start)))
    return out


if triton is not None:
    @triton.jit
    def _normals(seed, pid, BLOCK: tl.constexpr):
        """z of elements ``pid * BLOCK + [0, BLOCK)``: one Philox call per 4 elements
        (counter ``e // 4``), two Box-Muller pairs; element ``4c + 2a + b`` gets output
        ``a + 2b`` of counter ``c``."""
        c = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        n0, n1, n2, n3 = tl.randn4x(seed, c)
        return tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), [BLOCK])

    @triton.jit
    def _passed(raw, z, eps, g, lr, wd, KIND: tl.constexpr):
        """The new values of the loaded elements ``raw`` (their dtype) after pass ``KIND``
        along ``z`` (the arithmetic of the module docstring, shared by both kernels)."""
        x = raw.to(tl.float32)
        d = eps * z
        if KIND == 0:
            y = x + d
        elif KIND == 1:
            y = (x - d).to(raw.dtype).to(tl.float32) - d
        elif KIND == 2:
            x1 = (x + d).to(raw.dtype).to(tl.float32)
            y = x1 - lr * (g * z + wd * x1)
        else:
            y = x - lr * (g * z + wd * x)
        return y.to(raw.dtype)

    @triton.jit(do_not_specialize=["seed", "eps", "g", "lr", "wd"])
    def _pass_kernel(x_ptr, n, seed, eps, g, lr, wd, KIND: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        raw = tl.load(x_ptr + offs, mask=mask)
        tl.store(x_ptr + offs, _passed(raw, _normals(seed, pid, BLOCK), eps, g, lr, wd, KIND), mask=mask)

    @triton.jit
    def _splitmix(x):
        """splitmix64 on uint64 (as :func:`.seeds.splitmix64`)."""
        x = x + 0x9E3779B97F4A7C15
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit(do_not_specialize=["step_seed", "eps", "g", "lr", "wd"])
    def _group_kernel(addr_ptr, numel_ptr, mix_ptr, seg_ptr, decay_ptr, first_ptr, prog_ptr, step_seed, eps, g, lr,
                      wd, KIND: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        """One pass over many tensors: program -> segment (``prog_ptr``), segment -> address,
        length, ``splitmix64(index + 1)``, segment number, decay flag, first program. The
        generator key is computed here exactly as ``param_seed`` / :func:`segment_seeds` do."""
        pid = tl.program_id(0)
        sid = tl.load(prog_ptr + pid)
        base = tl.load(addr_ptr + sid).to(tl.pointer_type(DTYPE))
        n = tl.load(numel_ptr + sid)
        j = tl.load(seg_ptr + sid).to(tl.uint64)
        key = _splitmix(step_seed.to(tl.uint64) ^ tl.load(mix_ptr + sid).to(tl.uint64, bitcast=True)) >> 1
        if j > 0:
            key = _splitmix(key ^ j) >> 1
        local = pid - tl.load(first_ptr + sid)
        offs = local * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        raw = tl.load(base + offs, mask=mask)
        wdl = wd * tl.load(decay_ptr + sid)
        tl.store(base + offs, _passed(raw, _normals(key, local, BLOCK), eps, g, lr, wdl, KIND), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _direction_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, _normals(seed, pid, BLOCK), mask=offs < n)


def apply(kind: str, t: torch.Tensor, seed: int, eps: float, *, g: float = 0.0, lr: float = 0.0,
          wd: float = 0.0) -> None:
    """One pass of ``kind`` over the contiguous CUDA tensor ``t`` whose generator seed is
    ``seed`` (``param_seed(step seed, index)``), in place."""
    flat = t.view(-1)
    code = KINDS[kind]
    with _on(t.device):
        for key, start, k in segment_seeds(seed, flat.numel()):
            part = flat[start:start + k]
            _pass_kernel[(triton.cdiv(k, BLOCK),)](part, k, key, float(eps), float(g), float(lr), float(wd),
                                                   KIND=code, BLOCK=BLOCK, enable_fp_fusion=False)


def direction(seed: int, shape: Any, device: torch.device) -> torch.Tensor:
    """The fp32 ``z`` that :func:`apply` uses for a parameter of ``shape`` on ``device``."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    flat = out.view(-1)
    with _on(out.device):
        for key, start, k in segment_seeds(seed, flat.numel()):
            _direction_kernel[(triton.cdiv(k, BLOCK),)](flat[start:start + k], k, key, BLOCK=BLOCK,
                                                        enable_fp_fusion=False)
    return out


def _tl_dtype(dtype: torch.dtype) -> Any:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class FusedGroup:
    """One launch per pass over a fixed list of same-dtype contiguous CUDA tensors (a
    parameter list: a whole model for MeZO, one block for ZO2), instead of one launch per
    tensor: with ~400 tensors the per-launch cost (~50 us) was 15x the memory time of a
    1.3B-parameter pass (benchmarks/zo_pass_bench.py). The tables (segment addresses,
    lengths, ``splitmix64(index + 1)``, decay flags, program -> segment) are built once and
    stay valid while the tensors stay where they are (:meth:`key_of`); z is the same as
    :func:`apply`'s for every element."""

    def __init__(self, tensors: list[torch.Tensor], indices: list[int], decays: list[bool]):
        dev, dtype = tensors[0].device, tensors[0].dtype
        rows = []                      # (address, length, mix, segment, decay, programs)
        for t, k, dec in zip(tensors, indices, decays):
            for j, start in enumerate(range(0, t.numel(), SEGMENT)):
                n = min(SEGMENT, t.numel() - start)
                mix = splitmix64(int(k) + 1)
                rows.append((t.data_ptr() + start * t.element_size(), n, mix - (1 << 64) if mix >= 1 << 63 else mix,
                             j, 1.0 if dec else 0.0, triton.cdiv(n, BLOCK)))
        progs = torch.tensor([r[5] for r in rows], dtype=torch.int64)
        first = torch.cumsum(progs, 0) - progs
        self.programs = int(progs.sum())
        self.dtype = _tl_dtype(dtype)
        self.device = dev
        self.addr = torch.tensor([r[0] for r in rows], dtype=torch.int64, device=dev)
        self.numel = torch.tensor([r[1] for r in rows], dtype=torch.int32, device=dev)
        self.mix = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=dev)
        self.seg = torch.tensor([r[3] for r in rows], dtype=torch.int32, device=dev)
        self.decay = torch.tensor([r[4] for r in rows], dtype=torch.float32, device=dev)
        self.first = first.to(torch.int32).to(dev)
        self.prog = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), progs).to(dev)

    @staticmethod
    def key_of(tensors: list[torch.Tensor], indices: list[int]) -> tuple:
        return tuple((t.data_ptr(), t.numel(), t.dtype, int(k)) for t, k in zip(tensors, indices))

    def apply(self, kind: str, step_seed: int, eps: float, *, g: float = 0.0, lr: float = 0.0,
              wd: float = 0.0) -> None:
        with _on(self.device):
            _group_kernel[(self.programs,)](self.addr, self.numel, self.mix, self.seg, self.decay, self.first,
                                           self.prog, int(step_seed), float(eps), float(g), float(lr), float(wd),
                                           KIND=KINDS[kind], DTYPE=self.dtype, BLOCK=BLOCK, enable_fp_fusion=False)


class GroupCache:
    """The :class:`FusedGroup` of each parameter list an optimizer passes over (owned by the
    optimizer instance; rebuilt when a tensor moved)."""

    def __init__(self, limit: int = 8) -> None:
        """``limit``: the number of lists kept (MeZO passes over one list; ZO2 over one per
        block and device slot, plus the resident parameters); beyond it the cache starts over."""
        self._groups: dict[tuple, FusedGroup] = {}
        self.limit = limit

    def get(self, tensors: list[torch.Tensor], indices: list[int], decays: list[bool]) -> FusedGroup | None:
        """The group for these tensors, or None when the fused path does not apply to all of
        them or they do not share one dtype and device."""
        if not tensors or not all(enabled(t) for t in tensors):
            return None
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            return None
        key = FusedGroup.key_of(tensors, indices)
        grp = self._groups.get(key)
        if grp is None:
            if len(self._groups) >= self.limit:
                self._groups.clear()
            grp = self._groups[key] = FusedGroup(tensors, indices, decays)
        return grp
