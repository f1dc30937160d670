"""The Ray gang: :class:`RayWorkerGroup`, the controller's
:class:`~meshpilot.orchestrator.run.protocol.WorkerGroup` on Ray.

1. **Reserve**: a placement group with one bundle per worker (:class:`~meshpilot.launch.gang.GangSpec`).
   ``pg.ready()`` is awaited with a timeout; on timeout the group is removed and the job fails
   with what is missing ("needs 8 GPUs in bundles of 1 on at most 2 nodes; the cluster has 4 GPUs").
2. **Place**: one :class:`~meshpilot.launch.actor.GangWorker` actor per bundle, ranked by
   :func:`~meshpilot.launch.gang.assign_ranks` and, within a node, by GPU id
   (:func:`~meshpilot.launch.gang.order_by_gpu`).
3. **Rendezvous** (as Ray Train does it): rank 0 reports its node IP and a free port; every
   worker gets MASTER_ADDR / MASTER_PORT / RANK / LOCAL_RANK / WORLD_SIZE
   (:func:`~meshpilot.launch.gang.local_ranks`).
4. **Watch** (:meth:`RayWorkerGroup.poll`): a finished ``run`` future is a result or a
   failure (``RayActorError``: the process died; an exception: the worker's error, e.g. a
   collective timeout); out of memory is told apart (:func:`classify_failure`): a worker exception
   that is torch's ``OutOfMemoryError`` or says "CUDA out of memory" (also wrapped, as DeepSpeed
   does) is ``gpu_oom``; Ray's memory monitor (``ray.exceptions.OutOfMemoryError`` from ``ray.get``,
   or an actor death whose message says the node ran low on memory) and Python's ``MemoryError``
   are ``host_oom``; a worker killed without a cause (the kernel's OOM killer sends SIGKILL, as a
   manual ``kill -9`` does: Ray cannot tell them apart) is ``host_oom`` only when this node's
   memory is still near its limit when the death is seen, else ``worker_died`` (retried). A
   ``progress()`` probe unanswered for ``heartbeat_timeout_s`` is a
   stale heartbeat; no new step for ``step_timeout_s`` is a hang. Rank 0's console notices (an
   op being compiled: :data:`~meshpilot.launch.actor.CONSOLE_LOGGER`) go to ``on_notice``.
5. **Tear down**: ``ray.kill`` every actor and remove the placement group.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional, Union

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.exceptions import OutOfMemoryError as RayOutOfMemoryError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from meshpilot.launch.actor import GangWorker, WorkerSpec
from meshpilot.launch.gang import GangSpec, assign_ranks, local_ranks, omp_threads_for, order_by_gpu
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.protocol import (DEFAULT_WORKER, Failure, FailureKind, GangError, GroupPoll,
                                                 Progress, classify_oom_text)
from meshpilot.orchestrator.run.store import pid_alive

log = logging.getLogger(__name__)

# a worker killed without a cause is taken for the kernel's OOM killer when the node's memory is at
# least this full when the death is seen (Ray's memory monitor kills from 0.95 by default)
HOST_MEMORY_NEAR_LIMIT = 0.95


def classify_failure(error: BaseException, cause: Optional[BaseException] = None) -> Optional[FailureKind]:
    """GPU_OOM / HOST_OOM when a worker's exception (``cause``) or Ray's error says it ran out of
    memory, else None."""
    for exc in (cause, error):
        if exc is None:
            continue
        if isinstance(exc, RayOutOfMemoryError) or isinstance(exc, MemoryError):
            return FailureKind.HOST_OOM
        t = type(exc)
        if t.__name__ == "OutOfMemoryError" and t.__module__.split(".")[0] == "torch":
            return FailureKind.GPU_OOM
    text = "\n".join(f"{type(x).__module__}.{type(x).__name__}: {x}" for x in (cause, error) if x is not None)
    return classify_oom_text(text[:20000])


def host_memory_fraction() -> Optional[float]:
    """This node's used memory fraction (1 - MemAvailable/MemTotal of /proc/meminfo), None if unknown."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k] = float(v.split()[0])
        return 1.0 - info["MemAvailable"] / info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError, ZeroDivisionError):
        return None


class RayWorkerGroup:
    """The controller's WorkerGroup on Ray (see the module docstring for the protocol).
    ``job`` and ``plan`` are shipped to every rank as they are; ``log_path(rank)`` names the rank's log file."""

    def __init__(self, job: Any, plan: Any, run_dir: str, *, spec: GangSpec, log_path: Callable[[int], str],
                 worker_fn: str = DEFAULT_WORKER, placement_timeout_s: float = 60.0,
                 heartbeat_timeout_s: float = 60.0, step_timeout_s: float = 600.0,
                 start_timeout_s: float = 900.0, fail_at: Optional[tuple[int, int, str]] = None,
                 on_notice: Optional[Callable[[str], None]] = None):
        self.job, self.plan, self.run_dir, self.spec = job, plan, run_dir, spec
        self.log_path, self.worker_fn = log_path, worker_fn
        self.placement_timeout_s, self.heartbeat_timeout_s = placement_timeout_s, heartbeat_timeout_s
        self.step_timeout_s, self.start_timeout_s = step_timeout_s, start_timeout_s
        self.fail_at, self.on_notice = fail_at, on_notice
        self._pg: Any = None
        self._actors: list[Any] = []          # index = rank
        self._futures: list[Any] = []         # index = rank
        self._pids: list[int] = []
        self._nodes: list[str] = []
        self._probes: dict[int, tuple[Any, float]] = {}
        self._last_step = -1
        self._last_step_time = 0.0
        self._started = 0.0
        self._notices_seen = 0                # rank 0's console notices already shown
        self._launch_times: dict[str, float] = {}
        self.attempt = 0

    # --- start ------------------------------------------------------------------------
    def start(self, attempt: int) -> list[int]:
        try:
            return self._start(attempt)
        except GangError:
            raise
        except (RayActorError, GetTimeoutError, RayTaskError) as e:
            raise GangError(Failure(FailureKind.RENDEZVOUS, f"forming the gang failed: {_first_line(e)}")) from None

    def _start(self, attempt: int) -> list[int]:
        self.attempt = attempt
        sp = self.spec
        self._launch_times = {"gang_start": time.time()}
        self._pg = placement_group(sp.bundles, strategy=sp.strategy, name=f"meshpilot-{os.getpid()}-{attempt}")
        ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            msg = f"{sp.describe_need()}; {_cluster_has(sp.use_gpus)}"
            self.shutdown()
            raise GangError(Failure(FailureKind.PLACEMENT, f"the gang could not be placed within "
                                    f"{self.placement_timeout_s:.0f}s: {msg}", retryable=False))
        self._launch_times["placed"] = time.time()
        table = placement_group_table(self._pg)
        bundle_nodes = [table["bundles_to_node_id"][i] for i in range(sp.world_size)]
        ranks = assign_ranks(bundle_nodes, sp.tp)
        by_rank = sorted(range(sp.world_size), key=lambda i: ranks[i])
        self._actors = [
            GangWorker.options(num_cpus=sp.cpus_per_worker, num_gpus=1 if sp.use_gpus else 0,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(
                                   self._pg, placement_group_bundle_index=i),
                               name=None).remote()
            for i in by_rank]
        try:
            where = ray.get([a.where.remote() for a in self._actors], timeout=self.start_timeout_s)
        except (RayActorError, GetTimeoutError) as e:
            raise GangError(Failure(FailureKind.RENDEZVOUS, f"worker actors did not start: {e}")) from None
        self._launch_times["actors_ready"] = time.time()
        order = order_by_gpu(where)           # rank r of a node <-> its r-th GPU, as torchrun has it
        self._actors, where = [self._actors[i] for i in order], [where[i] for i in order]
        self._pids = [w["pid"] for w in where]
        self._nodes = [w["node_ip"] for w in where]
        master_addr = where[0]["node_ip"]
        master_port = ray.get(self._actors[0].free_port.remote(), timeout=60)
        local, visible = local_ranks(where, sp.use_gpus)
        omp = omp_threads_for(self.plan, sp.cpus_per_worker) if sp.use_gpus else None
        self._futures = []
        for r, a in enumerate(self._actors):
            ws = WorkerSpec(job=self.job, plan=self.plan, rank=r, world_size=sp.world_size, local_rank=local[r],
                            master_addr=master_addr, master_port=master_port, run_dir=self.run_dir, attempt=attempt,
                            worker_fn=self.worker_fn, cuda_visible_devices=visible[r],
                            fail_at_step=self.fail_at[1] if self.fail_at and self.fail_at[0] == r else None,
                            fail_mode=self.fail_at[2] if self.fail_at else "kill",
                            omp_threads=omp)
            self._futures.append(a.run.remote(ws, self.log_path(r)))
        now = time.monotonic()
        self._started = self._last_step_time = now
        self._last_step = -1
        self._probes = {}
        self._notices_seen = 0
        log.info("gang attempt %d: %d worker(s) placed (%s), master %s:%d, pids %s%s", attempt, sp.world_size,
                 sp.strategy, master_addr, master_port, self._pids,
                 f", GPU of each rank {[w['gpu_ids'] for w in where]}" if sp.use_gpus else "")
        return list(self._pids)

    @property
    def pids(self) -> list[int]:
        return list(self._pids)

    # --- poll -------------------------------------------------------------------------
    def poll(self) -> GroupPoll:
        finished = self._check_futures()
        if isinstance(finished, list):
            return GroupPoll(results=finished)
        progress = self._check_progress()
        failure = finished if finished is not None else self._check_liveness()
        return GroupPoll(progress=progress, failure=failure)

    def _check_futures(self) -> Union[Failure, list[dict[str, Any]], None]:
        """Every rank's result once all returned, the first failure among those that ended, else None."""
        ready, _ = ray.wait(self._futures, num_returns=len(self._futures), timeout=0)
        if not ready:
            return None
        died, errored, oom = [], [], []
        for r, f in enumerate(self._futures):
            if f not in ready:
                continue
            try:
                ray.get(f, timeout=0)
            except RayActorError as e:
                died.append(self._death(r, e))
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                kind = classify_failure(e, cause)
                if kind is not None:
                    oom.append(Failure(kind, f"{type(cause).__name__ if cause else 'error'}: {_first_line(cause or e)} "
                                       f"(see logs/rank{r}.log)", rank=r, retryable=False,
                                       memory_peak_gib=self._failure_peak(r, kind)))
                    continue
                retry = not isinstance(cause, (ConfigError, ImportError, TypeError))
                errored.append(Failure(FailureKind.WORKER_ERROR, f"{type(cause).__name__ if cause else 'error'}: "
                                       f"{_first_line(cause or e)} (see logs/rank{r}.log)", rank=r, retryable=retry))
            except RayOutOfMemoryError as e:        # Ray's memory monitor killed the task
                oom.append(Failure(FailureKind.HOST_OOM, f"Ray's memory monitor killed the worker (pid "
                                   f"{self._pids[r]} on {self._nodes[r]}): {_first_line(e)}", rank=r,
                                   retryable=False))
            except (RayError, Exception) as e:      # a node died, an object was lost: never an unhandled traceback
                died.append(Failure(FailureKind.WORKER_DIED, f"worker (pid {self._pids[r]} on {self._nodes[r]}) "
                                    f"failed: {type(e).__name__}: {_first_line(e)[:200]}", rank=r))
        if oom:                 # out of memory explains its peers' connection errors and deaths
            return oom[0]
        if died:                # a dead process explains its peers' connection errors
            return died[0]
        if errored:
            return errored[0]
        if len(ready) == len(self._futures):
            results = [ray.get(f) for f in self._futures]
            for r in results:       # the controller's side of the start-up, for the summary's phases
                if isinstance(r, dict):
                    r["launch_times"] = {**self._launch_times, **(r.get("launch_times") or {})}
            return results
        return None

    def _death(self, r: int, e: RayActorError) -> Failure:
        """A dead worker process: host OOM when Ray's memory monitor says it killed it, or (the
        kernel's OOM killer, probably) when this node's memory is near its limit; else worker_died."""
        text = str(e)
        kind = classify_oom_text(text)
        who = f"worker process (pid {self._pids[r]} on {self._nodes[r]})"
        if kind is not None:
            return Failure(kind, f"{who} was killed for memory: {_oom_line(text)}", rank=r, retryable=False)
        frac = host_memory_fraction() if self._nodes[r] == _node_ip() else None
        if frac is not None and frac >= HOST_MEMORY_NEAR_LIMIT:
            return Failure(FailureKind.HOST_OOM, f"{who} died (SIGKILL, probably the kernel's OOM killer) with "
                           f"the node's memory {frac:.0%} used (see logs/rank{r}.log): {_first_line(e)[:160]}",
                           rank=r, retryable=False)
        return Failure(FailureKind.WORKER_DIED, f"{who} died (killed, out of memory or crashed; see "
                       f"logs/rank{r}.log): {_first_line(e)[:160]}", rank=r)

    def _failure_peak(self, r: int, kind: FailureKind) -> Optional[float]:
        """The peak (GiB) rank ``r`` recorded when its worker raised: GPU (NVML, else torch's reserved)
        for a GPU OOM, the host RSS for a host OOM; None when unknown."""
        try:
            p = ray.get(self._actors[r].progress.remote(), timeout=5).get("memory_peaks_gib") or {}
        except Exception:
            return None
        keys = ("nvml", "reserved", "allocated") if kind is FailureKind.GPU_OOM else ("host_rss",)
        return next((float(p[k]) for k in keys if p.get(k) is not None), None)

    def _check_progress(self) -> Optional[Progress]:
        """Collect the answered progress probes and send the next one at once (at most one
        outstanding per worker), so every poll sees a probe answered since the last poll; rank 0's
        console notices are logged and passed to ``on_notice``."""
        now = time.monotonic()
        latest = None
        for r, a in enumerate(self._actors):
            probe = self._probes.get(r)
            if probe is not None:
                ref, _sent = probe
                done, _ = ray.wait([ref], timeout=0)
                if not done:
                    continue
                del self._probes[r]
                try:
                    p = ray.get(ref)
                except (RayActorError, RayOutOfMemoryError):
                    # the worker died (Ray's memory monitor may kill it inside this probe, which then raises its
                    # OutOfMemoryError here): the run future reports and classifies the death
                    continue
                if r == 0:
                    self._show_notices(p.get("notices") or [])
                    if p["step"] >= 0:
                        latest = Progress(step=p["step"], metrics=p["metrics"])
                if p["step"] > self._last_step:
                    self._last_step, self._last_step_time = p["step"], now
            self._probes[r] = (a.progress.remote(), now)
        return latest

    def _show_notices(self, notices: list[str]) -> None:
        for msg in notices[self._notices_seen:]:
            log.info("rank 0: %s", msg)
            if self.on_notice is not None:
                try:
                    self.on_notice(msg)
                except Exception:          # the console must never fail the run
                    log.exception("showing a worker notice failed")
        self._notices_seen = max(self._notices_seen, len(notices))

    def _check_liveness(self) -> Optional[Failure]:
        now = time.monotonic()
        for r, (_ref, sent) in self._probes.items():
            if now - sent > self.heartbeat_timeout_s:
                return Failure(FailureKind.HEARTBEAT_STALE, f"worker (pid {self._pids[r]} on {self._nodes[r]}) has "
                               f"not answered a heartbeat for {now - sent:.0f}s", rank=r)
        if self._last_step < 0:
            if now - self._started > self.start_timeout_s:
                return Failure(FailureKind.STEP_TIMEOUT,
                               f"no training step within {self.start_timeout_s:.0f}s of the start")
        elif now - self._last_step_time > self.step_timeout_s:
            return Failure(FailureKind.STEP_TIMEOUT, f"no step after step {self._last_step} for "
                           f"{self.step_timeout_s:.0f}s (a hung collective?)")
        return None

    # --- stop / shutdown ---------------------------------------------------------------
    def stop(self, grace_s: float) -> None:
        for a in self._actors:
            try:
                a.stop.remote()
            except Exception:
                pass
        if self._futures:
            ray.wait(self._futures, num_returns=len(self._futures), timeout=grace_s)

    def shutdown(self) -> None:
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
        # wait until the worker processes are gone, so a restarted gang gets their resources and ports
        deadline = time.monotonic() + 30
        here = ray.util.get_node_ip_address() if ray.is_initialized() else None
        for pid, node in zip(self._pids, self._nodes):
            while node == here and time.monotonic() < deadline and pid_alive(pid, unknown=False):
                time.sleep(0.1)
        self._actors, self._futures, self._pg, self._probes = [], [], None, {}


def _cluster_has(use_gpus: bool) -> str:
    total = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    key = "GPU" if use_gpus else "CPU"
    have = int(total.get(key, 0))
    avail = int(ray.available_resources().get(key, 0))
    busy = f", {avail} free" if avail != have else ""
    return f"the cluster has {have} {key}s{busy} on {len(alive)} node{'s' if len(alive) != 1 else ''}"


def _node_ip() -> Optional[str]:
    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return None


def _oom_line(text: str) -> str:
    """The line of Ray's message that says why the worker was killed."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    hit = next((x for x in lines if classify_oom_text(x) is not None), lines[-1] if lines else "")
    return hit[:300]


def _first_line(e: Any) -> str:
    s = str(e).strip().splitlines()
    return s[-1][:300] if s else type(e).__name__
