"""The gang's arithmetic: its shape, which bundle gets which rank, each rank's GPU and threads.

Pure functions of plain data (no Ray, no torch), so every rule is testable without a cluster:

* :func:`gang_spec` -> :class:`GangSpec`: one placement bundle per rank, ``{"GPU": 1, "CPU": c}``
  or ``{"CPU": 1}``; STRICT_PACK when the gang fits one node, else PACK.
* :func:`capacity_shortfall`: what a cluster's total resources lack to ever hold the gang (a job
  needing GPUs on a machine without any is refused at once instead of waiting out the placement).
* :func:`assign_ranks`: ranks node by node, so the contiguous ranks of a tensor-parallel group
  share a node; a layout that would still split such a group across nodes is refused.
* :func:`order_by_gpu` and :func:`local_ranks`: within a node, rank r drives the node's r-th GPU
  (as torchrun has it); every worker of a node sees the node's assigned GPUs
  (CUDA_VISIBLE_DEVICES) and LOCAL_RANK is its GPU's index in that list.
* :func:`omp_threads_for`: OMP_NUM_THREADS of a GPU rank.
* :func:`parse_fail_at`: the failure-injection spec of ``MESHPILOT_FAIL_AT_STEP`` (``FAIL_AT_ENV``):
  ``rank:step`` makes that rank SIGKILL itself after that step, on the first attempt only;
  ``rank:step:hang`` makes it stop training there while its actor keeps answering heartbeats
  (the other ranks then wait in the step's collective: a hang); ``rank:step:stop`` makes it
  SIGSTOP itself: the process lives but answers nothing (a stale heartbeat).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol

from meshpilot.orchestrator.config.clusters import threads_per_rank
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.protocol import Failure, FailureKind, GangError

FAIL_AT_ENV = "MESHPILOT_FAIL_AT_STEP"
FAIL_MODES = ("kill", "hang", "stop")


@dataclass(frozen=True)
class GangSpec:
    world_size: int
    use_gpus: bool
    cpus_per_worker: int
    max_nodes: int
    tp: int

    @property
    def bundles(self) -> list[dict[str, float]]:
        b: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpus:
            b["GPU"] = 1
        return [dict(b) for _ in range(self.world_size)]

    @property
    def strategy(self) -> str:
        return "STRICT_PACK" if self.max_nodes == 1 else "PACK"

    def describe_need(self) -> str:
        unit = "GPU" if self.use_gpus else "CPU"
        n = self.world_size if self.use_gpus else self.world_size * self.cpus_per_worker
        per = 1 if self.use_gpus else self.cpus_per_worker
        extra = f" (+{self.cpus_per_worker} CPU each)" if self.use_gpus else ""
        return (f"needs {n} {unit}s in bundles of {per}{extra} on at most {self.max_nodes} "
                f"node{'s' if self.max_nodes > 1 else ''}")


def capacity_shortfall(spec: GangSpec, total: Mapping[str, float], where: str = "the Ray cluster") -> Optional[str]:
    """What ``where`` (whose resources, all of them, busy or free, are ``total``) lacks to ever hold
    the gang, or None. A shortfall here is permanent for a fixed cluster: waiting for the placement
    group cannot help. (Per-node packing is left to the placement itself.)"""
    have_gpu, have_cpu = int(total.get("GPU", 0)), int(total.get("CPU", 0))
    missing = []
    if spec.use_gpus and have_gpu < spec.world_size:
        missing.append(f"the plan needs {spec.world_size} GPU{'s' if spec.world_size != 1 else ''} (one per rank), "
                       f"{where} has {have_gpu}")
    need_cpu = spec.world_size * spec.cpus_per_worker
    if have_cpu < need_cpu:
        missing.append(f"the gang needs {need_cpu} CPUs ({spec.cpus_per_worker} per rank), {where} has {have_cpu}")
    return "; ".join(missing) or None


def gang_spec(world_size: int, tp: int, *, accelerator: str, gpus_per_node: int, cpu_cores: int,
              cpu_threads_per_rank: Optional[int] = None) -> GangSpec:
    """One bundle per rank: a GPU and :func:`threads_per_rank` CPUs (GPU ranks), or one CPU (CPU workers)."""
    use_gpus = accelerator == "gpu"
    cpus = threads_per_rank(cpu_cores, gpus_per_node, cpu_threads_per_rank) if use_gpus else 1
    return GangSpec(world_size=world_size, use_gpus=use_gpus, cpus_per_worker=cpus,
                    max_nodes=(world_size - 1) // gpus_per_node + 1, tp=tp)


def assign_ranks(bundle_nodes: list[str], tp: int) -> list[int]:
    """Rank of each bundle: bundles grouped by node (nodes in order of first appearance),
    so ranks r..r+tp-1 of a tensor-parallel group share a node. Raises GangError if one cannot."""
    order: dict[str, list[int]] = {}
    for i, n in enumerate(bundle_nodes):
        order.setdefault(n, []).append(i)
    ranked = [i for idxs in order.values() for i in idxs]
    ranks = [0] * len(bundle_nodes)
    for r, i in enumerate(ranked):
        ranks[i] = r
    node_of_rank = [bundle_nodes[i] for i in ranked]
    for start in range(0, len(ranked), tp):
        if len(set(node_of_rank[start:start + tp])) > 1:
            raise GangError(Failure(FailureKind.PLACEMENT,
                                    f"tensor-parallel group of ranks {start}..{start + tp - 1} was placed across "
                                    f"nodes; every node must hold a multiple of tp={tp} workers", retryable=True))
    return ranks


def _gpu_key(gpu_id: str) -> tuple[int, str]:
    return len(gpu_id), gpu_id          # "10" after "9"


def order_by_gpu(where: list[dict[str, Any]]) -> list[int]:
    """A permutation of the actors (given in rank order) that keeps each rank's node but, within a
    node, gives the node's ranks to its actors in ascending GPU id: rank r of a node drives the
    node's r-th GPU, the order torchrun uses. Ray hands GPUs to actors in no fixed order, and
    consecutive ranks form the tensor-parallel groups: on hosts whose NVLink joins GPUs in pairs
    or islands (H100/H200 NVL), a group on GPUs 0 and 2 would all-reduce over PCIe. Actors
    without GPUs keep their order. ``where[r]`` has ``node_id`` and ``gpu_ids`` (strings)."""
    order = list(range(len(where)))
    by_node: dict[str, list[int]] = {}
    for r, w in enumerate(where):
        by_node.setdefault(w["node_id"], []).append(r)
    for ranks in by_node.values():
        if not all(where[r]["gpu_ids"] for r in ranks):
            continue
        by_gpu = sorted(ranks, key=lambda r: [_gpu_key(g) for g in where[r]["gpu_ids"]])
        for r, actor in zip(ranks, by_gpu):
            order[r] = actor
    return order


def local_ranks(where: list[dict[str, Any]], use_gpus: bool) -> tuple[list[int], list[Optional[str]]]:
    """LOCAL_RANK per rank and, with GPUs, the CUDA_VISIBLE_DEVICES every worker of a node shares."""
    per_node: dict[str, list[int]] = {}
    for r, w in enumerate(where):
        per_node.setdefault(w["node_id"], []).append(r)
    local = [0] * len(where)
    visible: list[Optional[str]] = [None] * len(where)
    for ranks in per_node.values():
        if use_gpus:
            ids = sorted({g for r in ranks for g in where[r]["gpu_ids"]}, key=_gpu_key)
            for r in ranks:
                local[r] = ids.index(where[r]["gpu_ids"][0])
                visible[r] = ",".join(ids)
        else:
            for i, r in enumerate(ranks):
                local[r] = i
    return local, visible


class PlanFlags(Protocol):
    """The parts of a plan that decide whether a rank does math on the CPU."""

    @property
    def offloads_optimizer(self) -> bool: ...

    @property
    def offloads_params(self) -> bool: ...

    @property
    def zeroth_order(self) -> bool: ...


def omp_threads_for(plan: PlanFlags, cpus_per_worker: int,
                    environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """OpenMP threads of a GPU rank. A user's OMP_NUM_THREADS (in the controller's environment) is
    kept (None). Otherwise a GPU rank gets 1, as torchrun gives it, unless its plan does math on
    the CPU, which gets the bundle's cores: ZeRO-Offload (DeepSpeed's CPU Adam runs on OpenMP
    threads) and zeroth-order plans (the model is built and cast on the host). Ray's default
    (the bundle's cores for every actor) left 7 idle OpenMP threads per rank."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    cpu_math = plan.offloads_optimizer or plan.offloads_params or plan.zeroth_order
    return cpus_per_worker if cpu_math else 1


def parse_fail_at(value: Optional[str]) -> Optional[tuple[int, int, str]]:
    """``RANK:STEP`` or ``RANK:STEP:MODE`` (MODE kill, the default, hang or stop) -> (rank, step, mode)."""
    if not value:
        return None
    try:
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(value)
        mode = parts[2] if len(parts) == 3 else "kill"
        if mode not in FAIL_MODES:
            raise ValueError(mode)
        return int(parts[0]), int(parts[1]), mode
    except ValueError:
        raise ConfigError(FAIL_AT_ENV, value,
                          reason="must be RANK:STEP or RANK:STEP:MODE (kill, hang, stop), e.g. 1:5") from None
