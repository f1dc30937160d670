"""The Ray gang: one worker actor per rank, gang-scheduled through a placement group.

Connection (:func:`connect_ray`): an explicit address, else ``RAY_ADDRESS``, else an
embedded local Ray started with the job's cluster size (``num_gpus`` GPUs, or for CPU
workers ``gpus_per_node`` CPU slots, so a job that needs more workers than the cluster
config declares cannot be placed).

Gang (:class:`RayWorkerGroup`, the controller's ``WorkerGroup``):

1. **Reserve**: a placement group with one bundle per worker, ``{"GPU": 1, "CPU": c}`` or
   ``{"CPU": 1}``; STRICT_PACK when the gang fits one node, else PACK. ``pg.ready()`` is
   awaited with a timeout; on timeout the group is removed and the job fails with what is
   missing ("needs 8 GPUs in bundles of 1 on at most 2 nodes; the cluster has 4 GPUs").
2. **Place**: one :class:`GangWorker` actor per bundle. Ranks are assigned node by node, so
   the contiguous ranks of a tensor-parallel group share a node; a layout that would still
   split a tensor-parallel group across nodes is refused.
3. **Rendezvous** (as Ray Train does it): rank 0 reports its node IP and a free port; every
   worker gets MASTER_ADDR / MASTER_PORT / RANK / LOCAL_RANK / WORLD_SIZE. With GPUs, every
   worker of a node sees the union of the node's assigned GPUs (CUDA_VISIBLE_DEVICES) and
   LOCAL_RANK is its GPU's index in that list.
4. **Watch** (:meth:`RayWorkerGroup.poll`): a finished ``run`` future is a result or a
   failure (``RayActorError``: the process died; an exception: the worker's error, e.g. a
   collective timeout); a ``progress()`` probe unanswered for ``heartbeat_timeout_s`` is a
   stale heartbeat; no new step for ``step_timeout_s`` is a hang.
5. **Tear down**: ``ray.kill`` every actor and remove the placement group.

Failure injection for tests: ``MESHPILOT_FAIL_AT_STEP=rank:step`` in the controller's
environment makes that rank SIGKILL itself after that step, on the first attempt only;
``rank:step:hang`` makes it stop training there instead while its actor keeps answering
heartbeats (the other ranks then wait in the step's collective: a hang); ``rank:step:stop``
makes it SIGSTOP itself: the process lives but answers nothing (a stale heartbeat).
"""
from __future__ import annotations

import importlib
import logging
import os
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from meshpilot.comm.ports import free_port
from meshpilot.orchestrator.config.clusters import cpu_threads_per_gpu_rank
from meshpilot.orchestrator.run.controller import Failure, GangError, GroupPoll, Progress
from meshpilot.orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_WORKER = "meshpilot.orchestrator.train.worker:run_worker"
FAIL_AT_ENV = "MESHPILOT_FAIL_AT_STEP"


# --- connecting ---------------------------------------------------------------------------

@dataclass
class RaySession:
    address: str
    embedded: bool

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()


def connect_ray(address: Optional[str], *, accelerator: str, workers_per_node: int, nodes: int = 1,
                object_store_mb: int = 150) -> RaySession:
    """Connect to a running cluster or start an embedded one sized from the cluster config.

    Embedded with GPUs: Ray counts the GPUs this machine shows (CUDA_VISIBLE_DEVICES, else
    NVML; the driver never imports torch), ``num_cpus`` = its cores.
    Embedded CPU workers: ``num_cpus = workers_per_node`` (each worker takes one CPU slot).
    (Having Ray's pre-started workers import torch while the gang is placed was measured
    and dropped: on 4 H200s the four imports delayed the placement by 10 s, more than the
    7 s they saved inside the workers; benchmarks/results/2026-11-27-s3-h200x4, run_vs_torchrun_tp2dp2_preload.)
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        _token_auth_for_client()
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return RaySession(address=address, embedded=False)
    if accelerator == "gpu":
        kw: dict[str, Any] = dict(num_cpus=os.cpu_count() or 1)
    else:
        kw = dict(num_gpus=0, num_cpus=workers_per_node)
    kw["object_store_memory"] = object_store_mb * 2**20
    log.info("starting an embedded local Ray (%s)", ", ".join(f"{k}={v}" for k, v in kw.items()))
    ctx = ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, **kw)
    if accelerator == "gpu":
        log.info("embedded Ray sees %d GPU(s)", int(ray.cluster_resources().get("GPU", 0)))
    return RaySession(address=getattr(ctx, "address_info", {}).get("gcs_address", "local"), embedded=True)


def _token_auth_for_client() -> None:
    """Ray 2.60 turns token authentication on for new local clusters, but a driver that
    connects to an existing one sends no token unless RAY_AUTH_MODE=token. Do what
    ``ray start`` does: with RAY_AUTH_MODE unset and a token available (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), switch this process to token mode."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # an older Ray without token authentication
        return
    if maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
        log.info("Ray token authentication: using the local token")


# --- the gang's shape ---------------------------------------------------------------------

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


def gang_spec(world_size: int, tp: int, *, accelerator: str, gpus_per_node: int, cpu_cores: int) -> GangSpec:
    use_gpus = accelerator == "gpu"
    cpus = cpu_threads_per_gpu_rank(cpu_cores, gpus_per_node) if use_gpus else 1
    return GangSpec(world_size=world_size, use_gpus=use_gpus, cpus_per_worker=cpus,
                    max_nodes=(world_size - 1) // gpus_per_node + 1, tp=tp)


def _cluster_has(use_gpus: bool) -> str:
    total = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    key = "GPU" if use_gpus else "CPU"
    have = int(total.get(key, 0))
    avail = int(ray.available_resources().get(key, 0))
    busy = f", {avail} free" if avail != have else ""
    return f"the cluster has {have} {key}s{busy} on {len(alive)} node{'s' if len(alive) != 1 else ''}"


def assign_ranks(bundle_nodes: list[str], tp: int) -> list[int]:
    """Rank of each bundle: bundles grouped by node (nodes in order of first appearance),
    so ranks r..r+tp-1 of a tensor-parallel group share a node. Raises if one cannot."""
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
            raise GangError(Failure("placement", f"tensor-parallel group of ranks {start}..{start + tp - 1} was "
                                    "placed across nodes; every node must hold a multiple of tp={tp} workers",
                                    retryable=True))
    return ranks


# --- the worker actor ---------------------------------------------------------------------

@dataclass
class WorkerSpec:
    """Everything one rank needs; sent to its actor's ``run``."""
    job: Any
    plan: Any
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    run_dir: str
    attempt: int
    worker_fn: str = DEFAULT_WORKER
    cuda_visible_devices: Optional[str] = None
    fail_at_step: Optional[int] = None        # failure injection: after this step (attempt 0) ...
    fail_mode: str = "kill"                   # ... SIGKILL self ("kill"), block ("hang") or SIGSTOP self ("stop")
    omp_threads: Optional[int] = None         # OMP_NUM_THREADS for the rank (None: leave Ray's value)


def omp_threads_for(plan: Any, cpus_per_worker: int, environ: Optional[dict[str, str]] = None) -> Optional[int]:
    """OpenMP threads of a rank. A user's OMP_NUM_THREADS (in the controller's environment) is
    kept. Otherwise a GPU rank gets 1, as torchrun gives it, unless its plan does math on the
    CPU, which gets the bundle's cores: ZeRO-Offload (DeepSpeed's CPU Adam runs on OpenMP
    threads) and zeroth-order plans (the model is built and cast on the host). Ray's default
    (the bundle's cores for every actor) left 7 idle OpenMP threads per rank."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    cpu_math = (getattr(plan, "offload_optimizer", "none") != "none" or getattr(plan, "offload_params", "none") != "none"
                or getattr(plan, "zo_mode", "none") != "none")
    return cpus_per_worker if cpu_math else 1


def resolve_worker_fn(ref: str) -> Callable[..., dict]:
    mod, _, name = ref.partition(":")
    return getattr(importlib.import_module(mod), name or "run_worker")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


@ray.remote(max_concurrency=4)
class GangWorker:
    """One rank. ``run`` trains in one of the actor's threads while ``progress`` and ``stop``
    stay answerable from the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {"step": -1, "metrics": {}, "time": time.time()}
        self._stop = threading.Event()

    def where(self) -> dict[str, Any]:
        return dict(node_ip=ray.util.get_node_ip_address(), node_id=ray.get_runtime_context().get_node_id(),
                    pid=os.getpid(), gpu_ids=[str(g) for g in ray.get_gpu_ids()])

    def free_port(self) -> int:
        return free_port("")

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress, now=time.time())

    def stop(self) -> None:
        self._stop.set()

    def run(self, spec: WorkerSpec, log_path: str) -> dict[str, Any]:
        self._redirect_output(log_path, spec)
        env = dict(MASTER_ADDR=spec.master_addr, MASTER_PORT=str(spec.master_port), RANK=str(spec.rank),
                   LOCAL_RANK=str(spec.local_rank), WORLD_SIZE=str(spec.world_size),
                   MESHPILOT_ATTEMPT=str(spec.attempt))
        if spec.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
        if spec.omp_threads is not None:
            env["OMP_NUM_THREADS"] = str(spec.omp_threads)
            if "torch" in sys.modules:            # read at the first parallel op; set it if torch is already in
                sys.modules["torch"].set_num_threads(spec.omp_threads)
        os.environ.update(env)
        lg = logging.getLogger("meshpilot.worker")
        lg.info("rank %d: attempt %d, world %d, local rank %d, master %s:%d, pid %d, OMP_NUM_THREADS %s", spec.rank,
                spec.attempt, spec.world_size, spec.local_rank, spec.master_addr, spec.master_port, os.getpid(),
                os.environ.get("OMP_NUM_THREADS"))
        fn = resolve_worker_fn(spec.worker_fn)
        t0 = time.time()

        def on_step(*args: Any) -> None:
            # the worker calls on_step(record_dict) (record["step"] is 1-based) or on_step(step, metrics)
            if len(args) == 1 and isinstance(args[0], dict):
                step, metrics = args[0].get("step", -1), args[0]
            else:
                step, metrics = args[0], (args[1] if len(args) > 1 else {})
            with self._lock:
                now = time.time()
                if self._progress.get("first_step_time") is None:
                    self._progress.update(first_step_time=now, first_step=int(step))
                self._progress.update(step=int(step), metrics=_plain(metrics), time=now)
            if spec.fail_at_step is None or spec.attempt != 0 or int(step) != spec.fail_at_step:
                return
            if spec.fail_mode == "hang":
                lg.warning("rank %d: failure injection: hanging after step %d", spec.rank, step)
                while not self._stop.is_set():          # heartbeats are answered on the actor's other threads
                    time.sleep(0.2)
            else:
                sig = signal.SIGSTOP if spec.fail_mode == "stop" else signal.SIGKILL
                lg.warning("rank %d: failure injection: %s after step %d", spec.rank, sig.name, step)
                for h in logging.getLogger().handlers:
                    h.flush()
                os.kill(os.getpid(), sig)

        try:
            result = fn(spec.job, spec.plan, rank=spec.rank, world_size=spec.world_size, local_rank=spec.local_rank,
                        master_addr=spec.master_addr, master_port=spec.master_port, run_dir=spec.run_dir,
                        on_step=on_step, stop_event=self._stop)
        except BaseException:
            lg.error("rank %d: worker failed:\n%s", spec.rank, traceback.format_exc())
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        out = dict(result or {})
        out.setdefault("rank", spec.rank)
        out["pid"] = os.getpid()
        out["wall_s"] = time.time() - t0
        with self._lock:
            for k in ("first_step", "first_step_time"):
                out[k] = self._progress.get(k)
            out["last_step"], out["last_step_time"] = self._progress["step"], self._progress["time"]
        out.setdefault("peak_memory_gib", _peak_memory_gib())
        lg.info("rank %d: finished in %.1fs", spec.rank, out["wall_s"])
        return out

    @staticmethod
    def _redirect_output(log_path: str, spec: WorkerSpec) -> None:
        """Send this process's stdout/stderr (file descriptors 1 and 2, so C++ and DeepSpeed
        output too) and its log records to the rank's log file."""
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.write(1, f"\n===== attempt {spec.attempt} rank {spec.rank} pid {os.getpid()} "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        h = logging.StreamHandler(open(1, "w", buffering=1, closefd=False))
        h.addFilter(_RankFilter(spec.rank))
        h.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as plain Python numbers (tensors -> float), cheap to ship to the controller."""
    out = {}
    for k, v in (metrics or {}).items():
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def _peak_memory_gib() -> float:
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2**30
    except Exception:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)


# --- the gang -----------------------------------------------------------------------------

def parse_fail_at(value: Optional[str]) -> Optional[tuple[int, int, str]]:
    """``RANK:STEP`` or ``RANK:STEP:MODE`` (MODE kill, the default, hang or stop) -> (rank, step, mode)."""
    if not value:
        return None
    try:
        parts = value.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(value)
        mode = parts[2] if len(parts) == 3 else "kill"
        if mode not in ("kill", "hang", "stop"):
            raise ValueError(mode)
        return int(parts[0]), int(parts[1]), mode
    except ValueError:
        raise ConfigError(FAIL_AT_ENV, value, reason="must be RANK:STEP or RANK:STEP:MODE (kill, hang, stop), e.g. 1:5") from None


class RayWorkerGroup:
    """The controller's WorkerGroup on Ray (see the module docstring for the protocol)."""

    def __init__(self, job: Any, plan: Any, run_dir: str, *, spec: GangSpec, log_path: Callable[[int], str],
                 worker_fn: str = DEFAULT_WORKER, placement_timeout_s: float = 60.0,
                 heartbeat_timeout_s: float = 60.0, step_timeout_s: float = 600.0,
                 start_timeout_s: float = 900.0, fail_at: Optional[tuple[int, int, str]] = None):
        self.job, self.plan, self.run_dir, self.spec = job, plan, run_dir, spec
        self.log_path, self.worker_fn = log_path, worker_fn
        self.placement_timeout_s, self.heartbeat_timeout_s = placement_timeout_s, heartbeat_timeout_s
        self.step_timeout_s, self.start_timeout_s = step_timeout_s, start_timeout_s
        self.fail_at = fail_at
        self._pg = None
        self._actors: list[Any] = []          # index = rank
        self._futures: list[Any] = []         # index = rank
        self._pids: list[int] = []
        self._nodes: list[str] = []
        self._probes: dict[int, tuple[Any, float]] = {}
        self._last_step = -1
        self._last_step_time = 0.0
        self._started = 0.0
        self.attempt = 0
        self.start_times: dict[int, float] = {}

    # --- start ------------------------------------------------------------------------
    def start(self, attempt: int) -> list[int]:
        try:
            return self._start(attempt)
        except GangError:
            raise
        except (RayActorError, GetTimeoutError, RayTaskError) as e:
            raise GangError(Failure("rendezvous", f"forming the gang failed: {_first_line(e)}")) from None

    def _start(self, attempt: int) -> list[int]:
        self.attempt = attempt
        sp = self.spec
        self._pg = placement_group(sp.bundles, strategy=sp.strategy, name=f"meshpilot-{os.getpid()}-{attempt}")
        ready, _ = ray.wait([self._pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            msg = f"{sp.describe_need()}; {_cluster_has(sp.use_gpus)}"
            self.shutdown()
            raise GangError(Failure("placement", f"the gang could not be placed within "
                                    f"{self.placement_timeout_s:.0f}s: {msg}", retryable=False))
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
            raise GangError(Failure("rendezvous", f"worker actors did not start: {e}")) from None
        order = order_by_gpu(where)           # rank r of a node <-> its r-th GPU, as torchrun has it
        self._actors, where = [self._actors[i] for i in order], [where[i] for i in order]
        self._pids = [w["pid"] for w in where]
        self._nodes = [w["node_ip"] for w in where]
        master_addr = where[0]["node_ip"]
        master_port = ray.get(self._actors[0].free_port.remote(), timeout=60)
        local_ranks, visible = _local_ranks(where, sp.use_gpus)
        omp = omp_threads_for(self.plan, sp.cpus_per_worker) if sp.use_gpus else None
        self._futures = []
        for r, a in enumerate(self._actors):
            ws = WorkerSpec(job=self.job, plan=self.plan, rank=r, world_size=sp.world_size, local_rank=local_ranks[r],
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
        log.info("gang attempt %d: %d worker(s) placed (%s), master %s:%d, pids %s%s", attempt, sp.world_size,
                 sp.strategy, master_addr, master_port, self._pids,
                 f", GPU of each rank {[w['gpu_ids'] for w in where]}" if sp.use_gpus else "")
        return list(self._pids)

    @property
    def pids(self) -> list[int]:
        return list(self._pids)

    # --- poll -------------------------------------------------------------------------
    def poll(self) -> GroupPoll:
        failure = self._check_futures()
        if isinstance(failure, list):
            return GroupPoll(results=failure)
        progress = self._check_progress()
        if failure is None:
            failure = self._check_liveness()
        return GroupPoll(progress=progress, failure=failure)

    def _check_futures(self):
        ready, _ = ray.wait(self._futures, num_returns=len(self._futures), timeout=0)
        if not ready:
            return None
        died, errored = [], []
        for r, f in enumerate(self._futures):
            if f not in ready:
                continue
            try:
                ray.get(f, timeout=0)
            except RayActorError as e:
                died.append(Failure("worker_died", f"worker process (pid {self._pids[r]} on {self._nodes[r]}) "
                                    f"died (killed, out of memory or crashed; see logs/rank{r}.log): "
                                    f"{_first_line(e)[:160]}", rank=r))
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                retry = not isinstance(cause, (ConfigError, ImportError, TypeError))
                errored.append(Failure("worker_error", f"{type(cause).__name__ if cause else 'error'}: "
                                       f"{_first_line(cause or e)} (see logs/rank{r}.log)", rank=r, retryable=retry))
        if died:                # a dead process explains its peers' connection errors
            return died[0]
        if errored:
            return errored[0]
        if len(ready) == len(self._futures):
            return [ray.get(f) for f in self._futures]
        return None

    def _check_progress(self) -> Optional[Progress]:
        """Send (at most one outstanding) progress probe per worker; collect answers."""
        now = time.monotonic()
        latest = None
        for r, a in enumerate(self._actors):
            probe = self._probes.get(r)
            if probe is None:
                self._probes[r] = (a.progress.remote(), now)
                continue
            ref, sent = probe
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            del self._probes[r]
            try:
                p = ray.get(ref)
            except RayActorError:
                continue  # the run future reports the death
            if r == 0 and p["step"] >= 0:
                latest = Progress(step=p["step"], metrics=p["metrics"])
            if p["step"] > self._last_step:
                self._last_step, self._last_step_time = p["step"], now
        return latest

    def _check_liveness(self) -> Optional[Failure]:
        now = time.monotonic()
        for r, (ref, sent) in self._probes.items():
            if now - sent > self.heartbeat_timeout_s:
                return Failure("heartbeat_stale", f"worker (pid {self._pids[r]} on {self._nodes[r]}) has not "
                               f"answered a heartbeat for {now - sent:.0f}s", rank=r)
        if self._last_step < 0:
            if now - self._started > self.start_timeout_s:
                return Failure("step_timeout", f"no training step within {self.start_timeout_s:.0f}s of the start")
        elif now - self._last_step_time > self.step_timeout_s:
            return Failure("step_timeout", f"no step after step {self._last_step} for {self.step_timeout_s:.0f}s "
                           "(a hung collective?)")
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
            while node == here and time.monotonic() < deadline and _pid_exists(pid):
                time.sleep(0.1)
        self._actors, self._futures, self._pg, self._probes = [], [], None, {}


def order_by_gpu(where: list[dict[str, Any]]) -> list[int]:
    """A permutation of the actors (given in rank order) that keeps each rank's node but, within a
    node, gives the node's ranks to its actors in ascending GPU id: rank r of a node drives the
    node's r-th GPU, the order torchrun uses. Ray hands GPUs to actors in no fixed order, and
    consecutive ranks form the tensor-parallel groups: on hosts whose NVLink joins GPUs in pairs
    or islands (H100/H200 NVL), a group on GPUs 0 and 2 would all-reduce over PCIe. Actors
    without GPUs keep their order."""
    order = list(range(len(where)))
    by_node: dict[str, list[int]] = {}
    for r, w in enumerate(where):
        by_node.setdefault(w["node_id"], []).append(r)
    for ranks in by_node.values():
        if not all(where[r]["gpu_ids"] for r in ranks):
            continue
        key = lambda r: [(len(g), g) for g in where[r]["gpu_ids"]]     # "10" after "9"
        for r, actor in zip(ranks, sorted(ranks, key=key)):
            order[r] = actor
    return order


def _local_ranks(where: list[dict[str, Any]], use_gpus: bool) -> tuple[list[int], list[Optional[str]]]:
    """LOCAL_RANK per rank and, with GPUs, the CUDA_VISIBLE_DEVICES every worker of a node shares."""
    per_node: dict[str, list[int]] = {}
    for r, w in enumerate(where):
        per_node.setdefault(w["node_id"], []).append(r)
    local = [0] * len(where)
    visible: list[Optional[str]] = [None] * len(where)
    for node, ranks in per_node.items():
        if use_gpus:
            ids = sorted({g for r in ranks for g in where[r]["gpu_ids"]}, key=lambda g: (len(g), g))
            for r in ranks:
                local[r] = ids.index(where[r]["gpu_ids"][0])
                visible[r] = ",".join(ids)
        else:
            for i, r in enumerate(ranks):
                local[r] = i
    return local, visible


def _pid_exists(pid: int) -> bool:
    from meshpilot.orchestrator.run.store import pid_alive
    return pid_alive(pid, unknown=False)


def _first_line(e: Any) -> str:
    s = str(e).strip().splitlines()
    return s[-1][:300] if s else type(e).__name__

