"""Count what one training step does: collectives (op, elements, group size), ZeRO-3 fetches, host syncs.

    counter = StepCounter().install()     # patches torch.distributed, torch.Tensor.item/.cpu/.tolist/__float__
    ... counter.mark() after every step ...  # closes the current step's record
    counter.uninstall()
    counter.steps                          # [Counter({("all_reduce", numel, group_size): n, ...}), ...]

Counts are deterministic (no timing), so two training loops on the same tiny job can be
compared exactly. ``sites=True`` also records the caller (first frame outside torch and
deepspeed) of every event, to find where an extra event comes from.
"""
from __future__ import annotations

import collections
import functools
import traceback
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
               "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list", "gather", "scatter",
               "send", "recv", "isend", "irecv", "all_gather_coalesced", "all_reduce_coalesced")
HOST_SYNCS = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__")


def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(y) for y in x)
    return 0


def _group_size(kw: dict[str, Any]) -> int:
    g = kw.get("group")
    try:
        return dist.get_world_size(g) if g is not None else dist.get_world_size()
    except Exception:
        return -1


def _site() -> str:
    for fr in reversed(traceback.extract_stack()[:-3]):
        f = fr.filename
        if "/torch/" not in f and "step_counter" not in f and "/deepspeed/" not in f:
            return f"{f.rsplit('/', 1)[-1]}:{fr.lineno} {fr.name}"
    return "?"


class StepCounter:
    def __init__(self, *, sites: bool = False, syncs: bool = True):
        self.sites, self.syncs = sites, syncs
        self.steps: list[collections.Counter] = []
        self.step_sites: list[collections.Counter] = []
        self._cur: collections.Counter = collections.Counter()
        self._cur_sites: collections.Counter = collections.Counter()
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0          # count only the outermost call (a collective built from others counts once)

    def _record(self, key: tuple) -> None:
        self._cur[key] += 1
        if self.sites:
            self._cur_sites[(key, _site())] += 1

    def _wrap_collective(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kw: Any) -> Any:
            if self._depth == 0:
                first = args[0] if args else next(iter(kw.values()), None)
                if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "gather"):
                    first = args[1] if len(args) > 1 else kw.get("tensor", kw.get("input_tensor"))
                size = _group_size(kw if "group" in kw else {"group": _positional_group(name, args)})
                self._record(("coll", name, _numel(first), size))
            self._depth += 1
            try:
                return fn(*args, **kw)
            finally:
                self._depth -= 1
        return wrapped

    def _wrap_sync(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapped(t: Any, *args: Any, **kw: Any) -> Any:
            if self._depth == 0:
                self._record(("sync", name))
            self._depth += 1
            try:
                return fn(t, *args, **kw)
            finally:
                self._depth -= 1
        return wrapped

    def install(self) -> "StepCounter":
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._patch(dist, name, self._wrap_collective(name, getattr(dist, name)))
        if self.syncs:
            for name in HOST_SYNCS:
                self._patch(torch.Tensor, name, self._wrap_sync(name, getattr(torch.Tensor, name)))
        try:
            from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C
        except Exception:   # noqa: BLE001 - deepspeed missing: collectives only
            return self
        for name in ("fetch_sub_module", "release_sub_module"):
            self._patch(C, name, self._wrap_plain(name, getattr(C, name)))
        return self

    def _wrap_plain(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kw: Any) -> Any:
            self._record(("zero3", name))
            return fn(*args, **kw)
        return wrapped

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name, getattr(owner, name))))
        setattr(owner, name, new)

    def uninstall(self) -> None:
        for owner, name, old in reversed(self._saved):
            setattr(owner, name, old)
        self._saved.clear()

    def mark(self) -> None:
        """End the current step."""
        self.steps.append(self._cur)
        self.step_sites.append(self._cur_sites)
        self._cur, self._cur_sites = collections.Counter(), collections.Counter()

    def reset(self) -> None:
        """Drop what was counted since the last mark (e.g. set-up before the first step)."""
        self._cur, self._cur_sites = collections.Counter(), collections.Counter()


_GROUP_POS = {"all_reduce": 2, "broadcast": 2, "reduce": 3, "all_gather": 2, "all_gather_into_tensor": 2,
              "_all_gather_base": 2, "reduce_scatter": 3, "reduce_scatter_tensor": 3, "_reduce_scatter_base": 3,
              "all_gather_object": 2, "barrier": 0, "all_to_all_single": 4}


def _positional_group(name: str, args: tuple) -> Any:
    i = _GROUP_POS.get(name)
    return args[i] if i is not None and len(args) > i else None


def summary(c: collections.Counter) -> str:
    return ", ".join(f"{'/'.join(str(x) for x in k[1:])} x{n}" for k, n in sorted(c.items(), key=str))
