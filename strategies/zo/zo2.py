"""ZO2: MeZO with the transformer blocks offloaded to CPU memory (one GPU holds ~3 blocks).

Placement: every block's parameters live in one flat host buffer per block (pinned when
CUDA is available); embeddings, final norm and LM head ("resident" parameters) and all
buffers stay on the device. Step ``t`` (seed ``s_t``, direction ``z_t``, ``d = eps z_t``)::

    resident:  stash theta_r on the host; +d; h+ = embed(x); switch to -d; h- = embed(x)
    block i:   upload i+1 | compute i | offload i-1           (three CUDA streams, events)
               compute i = apply step t-1's update (g_{t-1}, z_{t-1}, lr_{t-1});
                           +d; h+ = block(h+); switch to -d; h- = block(h-); restore
    resident:  theta_r <- stash; +d; L+ = head(h+); switch; L- = head(h-); restore + update
    g_t = (L+ - L-) / (2 eps)          the blocks' update is deferred to step t+1

Each block crosses PCIe once up and once down per step. The arithmetic of every
parameter element is exactly MeZO's (same fp32 directions from (seed, parameter index),
same three passes, update after restore), so losses, g and parameters are bit-identical
to :class:`~meshpilot.strategies.zo.mezo.MeZO` with the same seeds. The resident
parameters are perturbed at the embedding and again at the head (a tied embedding is used
at both ends); the host stash lets the second perturbation start from the same theta,
which keeps them bit-identical too, at the cost of one resident-sized copy each way.

The deferred update is applied by :meth:`ZO2.flush`, which :meth:`ZO2.evaluate`,
:meth:`ZO2.state_dict`, :meth:`ZO2.full_state` and :meth:`ZO2.materialize` call; a training
loop must call it (or one of those) after its last step. Between steps, block parameters
point into the host store (``model.state_dict()`` is current after a flush); with sliced
upload a rank holds only its slice, the parameters are empty, and :meth:`ZO2.full_state`
(collective) gathers them. The learning rate of the deferred update is
the one of the step that computed g (recorded with it, not re-read later).

Streams: uploads on ``up``, compute on the current stream, offloads on ``down``; the
compute stream waits for the upload's event, the offload waits for the compute's event,
an upload into a slot waits for the offload that last used the slot and for the previous
offload of the same block; nothing synchronises the host inside a step (the losses are
read once at the end). On CPU there are no streams: the same code runs with synchronous
copies between the host store and the "device" slots.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from .fused import GroupCache
from .mezo import LR, LocalExchange, LossExchange, Role, ZOParam, ZOStep, apply_passes, loss_value, lr_at, zo_parameters
from .seeds import step_seed

log = logging.getLogger(__name__)


class BlockwiseModel(Protocol):
    """The shape ZO2 needs (the built-in :class:`~meshpilot.strategies.model.Transformer` has it)."""
    blocks: nn.ModuleList

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


class Transfer(Protocol):
    """Moves one block's flat parameters between its host store and a device slot."""

    def store_numel(self, numel: int) -> int: ...

    def make_store(self, flat: torch.Tensor, pin: bool) -> torch.Tensor: ...

    def upload(self, store: torch.Tensor, slot: torch.Tensor) -> None: ...

    def write_back(self, slot: torch.Tensor, store: torch.Tensor) -> None: ...


class FullTransfer:
    """One rank per host copy: the whole block goes up and comes back down."""

    def store_numel(self, numel: int) -> int:
        return numel

    def make_store(self, flat: torch.Tensor, pin: bool) -> torch.Tensor:
        store = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=pin)
        store.copy_(flat)
        return store

    def upload(self, store: torch.Tensor, slot: torch.Tensor) -> None:
        slot[: store.numel()].copy_(store, non_blocking=True)

    def write_back(self, slot: torch.Tensor, store: torch.Tensor) -> None:
        store.copy_(slot[: store.numel()], non_blocking=True)


@dataclass
class _Entry:
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    zp: ZOParam | None          # None: a frozen parameter (moved, never perturbed)


@dataclass(frozen=True)
class _Pending:
    seed: int
    g: float
    lr: float


def _block_entries(block: nn.Module, by_id: dict[int, ZOParam]) -> list[_Entry]:
    entries, off, seen = [], 0, set()
    for p in block.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        entries.append(_Entry(p, off, p.numel(), p.shape, by_id.get(id(p))))
        off += p.numel()
    return entries


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)


class ZO2:
    """MeZO with CPU-offloaded blocks; see the module docstring.

    ``model`` is built on the host (CPU); ``device`` is where compute runs (default: the
    current CUDA device, else CPU). ``exchange`` and ``transfer`` make it distributed
    (perturbation / data parallelism, sliced upload; see ``distributed.py``).
    """

    def __init__(self, model: nn.Module, *, lr: LR, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str | None = None, exchange: LossExchange | None = None,
                 transfer: Transfer | None = None, slots: int = 3):
        if not all(hasattr(model, a) for a in ("embed", "blocks", "head_loss")):
            raise TypeError("ZO2 needs a model with embed(input_ids), blocks and head_loss(hidden, labels)")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.model = model
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        self.cuda = self.device.type == "cuda"
        self.lr, self.eps, self.weight_decay, self.base_seed = lr, float(eps), float(weight_decay), int(seed)
        self.exchange: LossExchange = exchange or LocalExchange()
        self.transfer: Transfer = transfer or FullTransfer()
        self.step_count = 0
        self._pending: _Pending | None = None

        self.params = zo_parameters(model)
        by_id = {id(zp.param): zp for zp in self.params}
        self.entries = [_block_entries(b, by_id) for b in model.blocks]
        in_blocks = {id(e.param) for es in self.entries for e in es}
        self.resident = [zp for zp in self.params if id(zp.param) not in in_blocks]
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in in_blocks:
                    p.data = p.data.to(self.device)
            _move_buffers(model, self.device)
            self.stores: list[torch.Tensor] = []
            dtype = None
            for i, es in enumerate(self.entries):
                dtypes = {e.param.dtype for e in es}
                if len(dtypes) != 1:
                    raise ValueError(f"ZO2: block {i} mixes parameter dtypes {sorted(map(str, dtypes))}")
                dtype = dtypes.pop()
                flat = torch.cat([e.param.detach().reshape(-1).cpu() for e in es])
                self.stores.append(self.transfer.make_store(flat, pin=self.cuda))
            # the host copy is the truth between passes: the parameters point into it (full
            # transfer) or are empty (sliced: this rank holds only a slice; use full_state())
            self._host_views = isinstance(self.transfer, FullTransfer)
            for i in range(len(self.entries)):
                self._bind(i, None)
            self.block_numel = [sum(e.numel for e in es) for es in self.entries]
            slot_numel = max(self.transfer.store_numel(n) for n in self.block_numel) * self._slot_factor()
            self.slots = [torch.empty(slot_numel, dtype=dtype, device=self.device) for _ in range(slots)]
            resident_numel = sum(zp.param.numel() for zp in self.resident)
            self.stash = [torch.empty(zp.param.shape, dtype=zp.param.dtype, pin_memory=self.cuda)
                          for zp in self.resident]
        self.up = torch.cuda.Stream(self.device) if self.cuda else None
        self.down = torch.cuda.Stream(self.device) if self.cuda else None
        self._offloaded: list[Any] = [None] * len(self.entries)
        self._slot_free: list[Any] = [None] * len(self.slots)
        # fused passes: one launch table per block (block i is always bound to slot i % slots)
        # and one for the resident parameters
        self._groups = GroupCache(limit=len(self.entries) + 1)
        log.info("ZO2: %d blocks offloaded (%.1fM parameters each, %d device slots, %s), %.1fM resident on %s",
                 len(self.entries), max(self.block_numel) / 1e6, len(self.slots), type(self.transfer).__name__,
                 resident_numel / 1e6, self.device)

    def _slot_factor(self) -> int:
        return int(getattr(self.transfer, "slot_factor", 1))

    @property
    def role(self) -> Role:
        return self.exchange.role

    # --- the block pipeline ------------------------------------------------------------------
    def _bind(self, i: int, slot: torch.Tensor | None) -> None:
        """Point block i's parameters at a device slot, or back at the host store."""
        if slot is None and self._host_views:
            slot = self.stores[i]
        for e in self.entries[i]:
            e.param.data = (slot[e.offset: e.offset + e.numel].view(e.shape) if slot is not None
                            else torch.empty(0, dtype=e.param.dtype))

    def _upload(self, i: int) -> Any:
        s = i % len(self.slots)
        if not self.cuda:
            self.transfer.upload(self.stores[i], self.slots[s])
            return None
        with torch.cuda.stream(self.up):
            for ev in (self._slot_free[s], self._offloaded[i]):
                if ev is not None:
                    self.up.wait_event(ev)
            self.transfer.upload(self.stores[i], self.slots[s])
            return torch.cuda.current_stream(self.device).record_event()

    def _offload(self, i: int, write_back: bool) -> None:
        s = i % len(self.slots)
        if not self.cuda:
            if write_back:
                self.transfer.write_back(self.slots[s], self.stores[i])
            return
        done = torch.cuda.current_stream(self.device).record_event()
        if not write_back:
            self._slot_free[s] = done
            return
        with torch.cuda.stream(self.down):
            self.down.wait_event(done)
            self.transfer.write_back(self.slots[s], self.stores[i])
            ev = self.down.record_event()
        self._offloaded[i] = ev
        self._slot_free[s] = ev

    def _run_blocks(self, work: Callable[[int], None], *, write_back: bool) -> None:
        """Call ``work(i)`` for every block while it is on the device (prefetching the next)."""
        n = len(self.entries)
        if n == 0:
            return
        ready = [None] * n
        ready[0] = self._upload(0)
        for i in range(n):
            if i + 1 < n:
                ready[i + 1] = self._upload(i + 1)
            if ready[i] is not None:
                torch.cuda.current_stream(self.device).wait_event(ready[i])
            self._bind(i, self.slots[i % len(self.slots)])
            work(i)
            self._offload(i, write_back)
            self._bind(i, None)

    def _apply_pending(self, i: int) -> None:
        p = self._pending
        if p is None:
            return
        self._block_pass(i, "update", p.seed, g=p.g, lr=p.lr)

    def _block_pass(self, i: int, kind: str, seed: int, *, g: float = 0.0, lr: float = 0.0) -> None:
        """One pass over block ``i``'s trainable parameters (bound to a device slot)."""
        mine = [e for e in self.entries[i] if e.zp is not None]
        apply_passes(kind, [e.zp for e in mine], [e.param.data for e in mine], seed, self.eps, g=g, lr=lr,
                     weight_decay=self.weight_decay, groups=self._groups)

    # --- resident parameters -------------------------------------------------------------------
    def _resident_pass(self, seed: int, kind: str, *, g: float = 0.0, lr: float = 0.0) -> None:
        apply_passes(kind, self.resident, [zp.param.data for zp in self.resident], seed, self.eps, g=g, lr=lr,
                     weight_decay=self.weight_decay, groups=self._groups)

    # --- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> ZOStep:
        """One zeroth-order step on this rank's batch (see the module docstring)."""
        seed = self.exchange.agree_seed(step_seed(self.base_seed, self.step_count))
        role, model = self.role, self.model
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        for zp, st in zip(self.resident, self.stash):
            st.copy_(zp.param.data, non_blocking=True)
        self._resident_pass(seed, "plus")
        hp = model.embed(input_ids) if role.plus else None
        self._resident_pass(seed, "switch")
        hm = model.embed(input_ids) if role.minus else None
        aux: dict[str, list[Any]] = {"+": [], "-": []}

        def work(i: int) -> None:
            nonlocal hp, hm
            block = model.blocks[i]
            self._apply_pending(i)
            self._block_pass(i, "plus", seed)
            if hp is not None:
                hp = block(hp)
                aux["+"].append(_aux_of(block))
            self._block_pass(i, "switch", seed)
            if hm is not None:
                hm = block(hm)
                aux["-"].append(_aux_of(block))
            self._block_pass(i, "restore", seed)

        self._run_blocks(work, write_back=True)
        for zp, st in zip(self.resident, self.stash):
            zp.param.data.copy_(st, non_blocking=True)
        self._resident_pass(seed, "plus")
        lp_t = None
        if hp is not None:
            _set_aux(model, aux["+"])
            lp_t = model.head_loss(hp, labels)
        self._resident_pass(seed, "switch")
        lm_t = None
        if hm is not None:
            _set_aux(model, aux["-"])
            lm_t = model.head_loss(hm, labels)
        lp = loss_value(lp_t) if lp_t is not None else None
        lm = loss_value(lm_t) if lm_t is not None else None
        loss_plus, loss_minus = self.exchange.combine(lp, lm)
        g = (loss_plus - loss_minus) / (2.0 * self.eps)
        lr = lr_at(self.lr, self.step_count)
        self._resident_pass(seed, "restore+update", g=g, lr=lr)
        self._pending = _Pending(seed, g, lr)
        out = ZOStep(self.step_count, seed, loss_plus, loss_minus, g, lr)
        self.step_count += 1
        return out

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the deferred update of the last step to every block (one pass up and down)."""
        if self._pending is None:
            return
        self._run_blocks(self._apply_pending, write_back=True)
        self._pending = None
        if self.cuda:       # the host stores are read by the caller next (state_dict, checksum)
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        """The unperturbed loss (after flushing the deferred update), block by block."""
        self.flush()
        h = self.model.embed(input_ids.to(self.device))

        def work(i: int) -> None:
            nonlocal h
            h = self.model.blocks[i](h)

        self._run_blocks(work, write_back=False)
        return loss_value(self.model.head_loss(h, labels.to(self.device)))

    @torch.no_grad()
    def block_flats(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Flush, then a full flat copy of every block's parameters on ``device`` (collective
        with sliced upload: every rank must call it)."""
        self.flush()
        full: list[torch.Tensor] = []

        def work(i: int) -> None:
            full.append(self.slots[i % len(self.slots)][: self.block_numel[i]].to(device, copy=True))

        self._run_blocks(work, write_back=False)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return full

    def full_sum(self) -> float:
        """The float64 sum of every parameter element after a flush, without a copy of the model:
        resident parameters in place, each block's parameters while the block is in its device slot
        (collective with sliced upload, like :meth:`block_flats`)."""
        from meshpilot.strategies.checksum import tensor_sum64
        self.flush()
        in_blocks = {id(e.param) for es in self.entries for e in es}
        total = sum(tensor_sum64(p) for p in self.model.parameters() if id(p) not in in_blocks)
        sums: list[float] = []

        def work(i: int) -> None:
            flat = self.slots[i % len(self.slots)]
            sums.append(sum(tensor_sum64(flat[e.offset: e.offset + e.numel]) for e in self.entries[i]))

        self._run_blocks(work, write_back=False)
        return float(total + sum(sums))

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter by name (resident ones and blocks', on the host), current after a flush."""
        in_blocks = {id(e.param) for es in self.entries for e in es}
        out = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if id(p) not in in_blocks}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for i, flat in enumerate(self.block_flats()):
            for e in self.entries[i]:
                out[names[id(e.param)]] = flat[e.offset: e.offset + e.numel].view(e.shape).clone()
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load every parameter by name (e.g. from :meth:`full_state` of a checkpoint) into the
        resident parameters and the host stores (this rank's slice with sliced upload); the
        deferred update, if any, is dropped."""
        self._pending = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        names = {id(p): n for n, p in self.model.named_parameters()}
        in_blocks = {id(e.param) for es in self.entries for e in es}
        for n, p in self.model.named_parameters():
            if id(p) not in in_blocks:
                p.data.copy_(state[n].to(p.device, p.dtype))
        for i, es in enumerate(self.entries):
            flat = torch.cat([state[names[id(e.param)]].reshape(-1).to(self.stores[i].dtype) for e in es])
            self.stores[i].copy_(self.transfer.make_store(flat, pin=False))

    @torch.no_grad()
    def materialize(self, device: torch.device | str = "cpu") -> None:
        """Flush, then give every block parameter a full copy on ``device`` (e.g. to save or
        to compare with another run). ZO2 must not step after this."""
        for i, flat in enumerate(self.block_flats(device)):
            for e in self.entries[i]:
                e.param.data = flat[e.offset: e.offset + e.numel].view(e.shape)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer-side state; flushes first so that the model's weights are current."""
        self.flush()
        return {"kind": "zo2", "step": self.step_count, "seed": self.base_seed, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.base_seed = int(state["step"]), int(state["seed"])
        self._pending = None


def _aux_of(block: nn.Module) -> Any:
    mlp = getattr(block, "mlp", None)
    return getattr(mlp, "last_aux_loss", None)


def _set_aux(model: Any, values: Sequence[Any]) -> None:
    """Put back the MoE auxiliary losses of one perturbed pass before ``head_loss`` reads them."""
    for block, v in zip(model.blocks, values):
        mlp = getattr(block, "mlp", None)
        if mlp is not None and hasattr(mlp, "last_aux_loss"):
            mlp.last_aux_loss = v
