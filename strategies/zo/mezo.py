"""MeZO: zeroth-order SGD with forward passes only (Malladi et al. 2023).

One step, with a fresh seed ``s`` and the direction ``z = z(s) ~ N(0, I)`` that is never
stored (every use regenerates it, parameter by parameter, from ``s`` and the parameter's
index in the fixed order of :func:`zo_parameters`)::

    d = eps * z                      (fp32, rounded once)
    theta <- theta + d               L+ = loss(theta + d)           pass 1: "plus"
    theta <- (theta - d) - d         L- = loss(theta - d)           pass 2: "switch"
    theta <- theta + d                                              pass 3: "restore"
    g = (L+ - L-) / (2 eps)          projected gradient, a scalar
    theta <- theta - lr * (g z + wd theta)     (wd = 0 on biases and norms)   fused into pass 3

Memory is inference memory: no gradients, no optimizer state, no saved activations.
Communication (single process): none.

Directions. ``z`` of parameter ``k`` at step seed ``s`` is drawn by its own generator
seeded with ``mix(s, k)`` on the parameter's device, in fp32, in chunks of ``CHUNK``
elements (so a pass needs a few 16 MB temporaries, not an fp32 copy of the largest
parameter). It therefore depends only on
(s, k), not on the order in which parameters are visited, so ZO2's block-by-block pass
and the distributed ranks reproduce exactly the same ``z`` without any shared stream.
A tied weight is one ``Parameter`` (or shares storage with another) and is listed, and
so perturbed, once. On CUDA the passes run as Triton kernels that draw ``z`` in registers,
one launch per pass over all parameters (:mod:`.fused`: the same arithmetic, another
normal stream keyed by the same ``mix(s, k)``, no fp32 temporaries); elsewhere, and with
``MESHPILOT_ZO_KERNEL=torch``, as the PyTorch operations below.

Numerics of perturb-and-restore. Every operation is computed in fp32 and rounded once
to the parameter's dtype. Pass 2 first undoes pass 1 (``- d``) before applying ``- d``,
and pass 3 undoes pass 2's second half (``+ d``), so each restore is the exact inverse
``fl(fl(x + d) - d) == x`` whenever ``x + d`` stays in the binade of ``x`` (or a lower
one) and is not a rounding tie; otherwise the element moves by at most one unit in the
last place of ``|x| + |d|`` per restore. Measured over 1,000 perturb/restore cycles with
N(0, 0.02^2) weights and eps = 1e-3: fp32 max drift 2e-7 (a third of the elements
untouched); bf16 max drift 3e-3, mean 1.1e-4 (the classic ``+d, -2d, +d`` order drifts
13x more in bf16: mean 1.5e-3). An exact restore needs a copy of the weights; MeZO
keeps none (ZO2 could keep one block's copy but then would not reproduce MeZO bitwise).
The same arithmetic is used by ZO2 and by every distributed rank, whatever the losses it
computes, so all of them follow bit-identical parameter trajectories.
Updates of ``lr * g * z ~ 1e-6`` are below half a bf16 ulp for typical weights: train
zeroth-order in fp32 (or fp16/bf16 only for the forward of a short run).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.nn as nn

from .fused import GroupCache
from .fused import apply as fused_apply
from .fused import direction as fused_direction
from .fused import enabled as fused_enabled
from .seeds import param_seed, step_seed

log = logging.getLogger(__name__)

NO_DECAY_KEYS = ("bias", "norm", "ln_", "layernorm")


class Role(Enum):
    """Which perturbed losses this rank computes (perturbation parallelism splits them)."""
    BOTH = 0
    PLUS = 1
    MINUS = -1

    @property
    def plus(self) -> bool:
        return self is not Role.MINUS

    @property
    def minus(self) -> bool:
        return self is not Role.PLUS


@dataclass(frozen=True)
class ZOParam:
    """A trainable parameter in the fixed perturbation order."""
    index: int
    name: str
    param: nn.Parameter
    decay: bool


def _decays(name: str, p: torch.Tensor) -> bool:
    low = name.lower()
    return p.ndim >= 2 and not any(k in low for k in NO_DECAY_KEYS)


def zo_parameters(model: nn.Module) -> list[ZOParam]:
    """The trainable parameters of ``model`` in ``named_parameters`` order, each once.

    ``named_parameters`` already drops repeated ``Parameter`` objects (tied embeddings);
    tensors that are distinct objects over the same storage are dropped too. No weight
    decay on biases, norms (by name) and any parameter with fewer than two dimensions.
    """
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    out: list[ZOParam] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.dtype)
        if p.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        out.append(ZOParam(len(out), name, p, _decays(name, p)))
    return out


CHUNK = 1 << 23      # elements per generator draw: bounds the fp32 temporaries of a pass (32 MB)


def _chunks(seed: int, zp: ZOParam, t: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(slice of t's flat view, its z) for consecutive chunks of CHUNK elements.

    z of a parameter is the concatenation of consecutive ``randn(CHUNK)`` draws from one
    generator seeded with ``param_seed(seed, index)`` on t's device, in fp32. Only one chunk
    of z exists at a time (for a 50k x 5k embedding: 32 MB instead of 1 GB)."""
    g = torch.Generator(device=t.device)
    g.manual_seed(param_seed(seed, zp.index))
    flat = t.view(-1)
    n = flat.numel()
    for i in range(0, n, CHUNK):
        k = min(CHUNK, n - i)
        yield flat[i:i + k], torch.randn(k, generator=g, dtype=torch.float32, device=t.device)


def direction(seed: int, zp: ZOParam, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """z ~ N(0, I) of parameter ``zp`` at step seed ``seed``: fp32, on ``tensor``'s device
    (default: the parameter's), regenerated identically on every call (for tests and tools;
    the passes draw it chunk by chunk with :func:`apply_pass`). On CUDA with the fused
    kernel (:mod:`.fused`) it is that kernel's direction."""
    t = zp.param if tensor is None else tensor
    if fused_enabled(t):
        return fused_direction(param_seed(seed, zp.index), t.shape, t.device)
    parts = [z for _, z in _chunks(seed, zp, torch.empty(t.shape, dtype=torch.float32, device=t.device))]
    return torch.cat(parts).view(t.shape) if parts else torch.empty(t.shape, device=t.device)


def _add_(t: torch.Tensor, d: torch.Tensor, alpha: float = 1.0) -> None:
    """t <- fl(t + alpha d): computed in fp32 (fp64 for fp64 t), rounded once to t's dtype.

    For a bf16/fp16 ``t`` and an fp32 ``d`` this is one in-place mixed-dtype ``add_``:
    PyTorch computes it in the promoted dtype (fp32) and rounds once on the store, so no
    fp32 copy of ``t`` is made (3x less memory traffic per pass than copy-add-copy back,
    checked equal bit for bit in tests/test_zo_mezo.py)."""
    t.add_(d, alpha=alpha)


def perturb_plus(t: torch.Tensor, d: torch.Tensor) -> None:
    """Pass 1: theta -> theta + d."""
    _add_(t, d)


def perturb_switch(t: torch.Tensor, d: torch.Tensor) -> None:
    """Pass 2: theta + d -> theta -> theta - d (two roundings, see the module notes)."""
    _add_(t, d, -1.0)
    _add_(t, d, -1.0)


def perturb_restore(t: torch.Tensor, d: torch.Tensor) -> None:
    """Pass 3: theta - d -> theta."""
    _add_(t, d)


def sgd_update(t: torch.Tensor, z: torch.Tensor, *, g: float, lr: float, weight_decay: float) -> None:
    """theta <- theta - lr (g z + wd theta), in fp32, rounded once to theta's dtype.
    ``z`` is consumed (scaled in place)."""
    upd = z.to(torch.float64).mul_(g) if t.dtype == torch.float64 else z.mul_(g)
    if weight_decay:
        upd.add_(t, alpha=weight_decay)
    _add_(t, upd, -lr)


def apply_pass(kind: str, zp: ZOParam, t: torch.Tensor, seed: int, eps: float, *, g: float = 0.0,
               lr: float = 0.0, weight_decay: float = 0.0) -> None:
    """One pass over parameter ``zp`` (data ``t``) along z(seed): ``kind`` is "plus",
    "switch", "restore" (no update), "restore+update" or "update" (``theta -= lr (g z + wd
    theta)``, with ``wd`` applied only when ``zp.decay``).

    Per chunk of CHUNK elements: one ``randn`` into fp32, ``d = eps z`` (in place unless z is
    needed again for the update), and one in-place add per term; memory traffic per
    element of a bf16 parameter is ~20 bytes for "plus"/"restore", ~28 for "switch" and
    ~36 for "restore+update"."""
    if kind not in ("plus", "switch", "restore", "restore+update", "update"):
        raise ValueError(f"unknown pass {kind!r}")
    wd = weight_decay if zp.decay else 0.0
    if fused_enabled(t):
        fused_apply(kind, t, param_seed(seed, zp.index), eps, g=g, lr=lr, wd=wd)
        return
    work = t if t.is_contiguous() else t.contiguous()
    for tc, z in _chunks(seed, zp, work):
        if kind == "plus":
            perturb_plus(tc, z.mul_(eps))
        elif kind == "switch":
            perturb_switch(tc, z.mul_(eps))
        elif kind == "restore":
            perturb_restore(tc, z.mul_(eps))
        elif kind == "restore+update":
            perturb_restore(tc, z * eps)
            sgd_update(tc, z, g=g, lr=lr, weight_decay=wd)
        else:
            sgd_update(tc, z, g=g, lr=lr, weight_decay=wd)
    if work is not t:
        t.copy_(work.view(t.shape))


def apply_passes(kind: str, zps: Sequence[ZOParam], tensors: Sequence[torch.Tensor], seed: int, eps: float, *,
                 g: float = 0.0, lr: float = 0.0, weight_decay: float = 0.0,
                 groups: GroupCache | None = None) -> None:
    """:func:`apply_pass` over parameters ``zps`` (data ``tensors``): with ``groups`` and every
    tensor on the fused path, one grouped launch (:class:`.fused.FusedGroup`), the same
    arithmetic and directions element for element; otherwise one pass per parameter."""
    grp = groups.get(list(tensors), [zp.index for zp in zps], [zp.decay for zp in zps]) if groups else None
    if grp is not None:
        grp.apply(kind, seed, eps, g=g, lr=lr, wd=weight_decay)
        return
    for zp, t in zip(zps, tensors):
        apply_pass(kind, zp, t, seed, eps, g=g, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class ZOStep:
    """What one zeroth-order step measured (losses are global: averaged over zo dp ranks)."""
    step: int
    seed: int
    loss_plus: float
    loss_minus: float
    g: float
    lr: float

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)


class LossExchange(Protocol):
    """How a rank agrees on the step seed and on (L+, L-) with the others (see distributed.py)."""
    role: Role

    def agree_seed(self, seed: int) -> int: ...

    def combine(self, loss_plus: float | None, loss_minus: float | None) -> tuple[float, float]: ...


class LocalExchange:
    """A single process: computes both losses, no communication."""
    role = Role.BOTH

    def agree_seed(self, seed: int) -> int:
        return seed

    def combine(self, loss_plus: float | None, loss_minus: float | None) -> tuple[float, float]:
        assert loss_plus is not None and loss_minus is not None
        return loss_plus, loss_minus


def loss_value(out: Any) -> float:
    """A Python float from what a model returned: a scalar tensor, an object with ``.loss``
    (Hugging Face ``CausalLMOutput``) or a mapping with ``"loss"``."""
    if isinstance(out, torch.Tensor):
        return float(out.detach().item())
    if isinstance(out, dict) and "loss" in out:
        return loss_value(out["loss"])
    if getattr(out, "loss", None) is not None:
        return loss_value(out.loss)
    if isinstance(out, (float, int)):
        return float(out)
    raise TypeError(f"cannot read a loss from {type(out).__name__}: return a scalar tensor or an object with .loss")


LR = float | Callable[[int], float]


def lr_at(lr: LR, step: int) -> float:
    return float(lr(step)) if callable(lr) else float(lr)


class MeZO:
    """Zeroth-order SGD on a whole model held on one device (see the module docstring).

    ``lr`` is a float or a function of the step number. ``exchange`` (default: one
    process) decides the seed and combines the losses; with perturbation parallelism a
    rank computes only the loss of its role but still runs all three parameter passes,
    so its parameters stay bit-identical to its partner's and to a single-process run.
    State for checkpoints: the step counter and the base seed (the seed stream is a pure
    function of both).
    """

    def __init__(self, model: nn.Module | Sequence[ZOParam], *, lr: LR, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, exchange: LossExchange | None = None):
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.params: list[ZOParam] = zo_parameters(model) if isinstance(model, nn.Module) else list(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.lr, self.eps, self.weight_decay, self.base_seed = lr, float(eps), float(weight_decay), int(seed)
        self.exchange: LossExchange = exchange or LocalExchange()
        self.step_count = 0
        self._groups = GroupCache(limit=2)       # the model's parameter list

    @property
    def role(self) -> Role:
        return self.exchange.role

    def _pass(self, seed: int, kind: str, *, g: float = 0.0, lr: float = 0.0) -> None:
        apply_passes(kind, self.params, [zp.param.data for zp in self.params], seed, self.eps, g=g, lr=lr,
                     weight_decay=self.weight_decay, groups=self._groups)

    @torch.no_grad()
    def step(self, loss_fn: Callable[[], Any]) -> ZOStep:
        """One step; ``loss_fn()`` evaluates the loss of the current batch with the current
        parameters (called once on a single process, once per rank with pertp = 2)."""
        seed = self.exchange.agree_seed(step_seed(self.base_seed, self.step_count))
        role = self.role
        self._pass(seed, "plus")
        lp = loss_value(loss_fn()) if role.plus else None
        self._pass(seed, "switch")
        lm = loss_value(loss_fn()) if role.minus else None
        loss_plus, loss_minus = self.exchange.combine(lp, lm)
        g = (loss_plus - loss_minus) / (2.0 * self.eps)
        lr = lr_at(self.lr, self.step_count)
        self._pass(seed, "restore+update", g=g, lr=lr)
        out = ZOStep(self.step_count, seed, loss_plus, loss_minus, g, lr)
        self.step_count += 1
        return out

    def flush(self) -> None:
        """Nothing is deferred in plain MeZO (kept for the trainer interface)."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "mezo", "step": self.step_count, "seed": self.base_seed, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.base_seed = int(state["step"]), int(state["seed"])


def param_checksum(params: Iterable[ZOParam | torch.Tensor]) -> str:
    """SHA-1 of every parameter's bytes in order: equal iff the parameters are bit-identical."""
    h = hashlib.sha1()
    for p in params:
        t = p.param if isinstance(p, ZOParam) else p
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
