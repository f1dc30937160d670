"""The Ray actor that runs one rank: :class:`GangWorker`, and the :class:`WorkerSpec` it is given.

``GangWorker.run`` redirects the process's stdout/stderr and log records to the rank's log
file, sets the rendezvous environment (MASTER_ADDR / MASTER_PORT / RANK / LOCAL_RANK /
WORLD_SIZE, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS), calls the worker function
(:class:`~meshpilot.orchestrator.run.protocol.WorkerFunction`, resolved from ``MODULE:FUNCTION``)
in one of the actor's threads, and returns its result with the step timing added.
``progress`` (the heartbeat) and ``stop`` stay answerable from the actor's other threads;
``progress`` also carries the messages the worker logged to :data:`CONSOLE_LOGGER` (e.g. a
DeepSpeed op being compiled), which the controller shows on its console.
The failure injection of :func:`meshpilot.launch.gang.parse_fail_at` is carried out here.
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
from typing import Any, Optional

import ray

from meshpilot.comm.ports import USE_EXISTING_STORE_ENV, bound_address, listen_socket, rendezvous_store
from meshpilot.orchestrator.run.protocol import DEFAULT_WORKER, WorkerFunction

GIB = 2**30

# Log records of this logger (in the worker: an op build, a long start-up step) are meant for the
# user's console too: the actor keeps their messages in its progress, the group shows rank 0's.
CONSOLE_LOGGER = "meshpilot.console"


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


def resolve_worker_fn(ref: str) -> WorkerFunction:
    """The function named by ``MODULE:FUNCTION`` (``MODULE`` alone means ``MODULE:run_worker``)."""
    mod, _, name = ref.partition(":")
    fn: WorkerFunction = getattr(importlib.import_module(mod), name or "run_worker")
    return fn


class RankFilter(logging.Filter):
    """Adds ``rank`` to every log record, for the rank log's format."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def redirect_output(log_path: str, attempt: int, rank: int) -> None:
    """Send this process's stdout/stderr (file descriptors 1 and 2, so C++ and DeepSpeed
    output too) and its log records to the rank's log file, under a header line per attempt."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)       # owner-only, like the run dir
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.write(1, f"\n===== attempt {attempt} rank {rank} pid {os.getpid()} "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(open(1, "w", buffering=1, closefd=False))
    h.addFilter(RankFilter(rank))
    h.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.INFO)


class NoticeHandler(logging.Handler):
    """Collects the messages of :data:`CONSOLE_LOGGER` records into ``sink`` (under ``lock``)."""

    def __init__(self, sink: list[str], lock: threading.Lock):
        super().__init__(logging.INFO)
        self.sink, self.sink_lock = sink, lock        # (logging.Handler has its own ``lock``)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        with self.sink_lock:
            self.sink.append(msg)


def plain_metrics(metrics: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Metrics as plain Python numbers (tensors -> float), cheap to ship to the controller."""
    out = {}
    for k, v in (metrics or {}).items():
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def fallback_memory_peaks() -> dict[str, Optional[float]]:
    """Memory peaks (GiB) of this process, for a worker function whose result lacks
    ``memory_peaks_gib`` (a user's function: meshpilot's worker reports its own, with NVML's
    peak sampled through the whole run). NVML stays None here, as nothing sampled it; torch's
    peaks are read only where this process already imported torch and used CUDA."""
    allocated = reserved = None
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                allocated = torch.cuda.max_memory_allocated() / GIB
                reserved = torch.cuda.max_memory_reserved() / GIB
        except Exception:       # a broken CUDA state must not lose the rank's result
            pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"nvml": None, "allocated": allocated, "reserved": reserved, "host_rss": rss / GIB}


@ray.remote(max_concurrency=4)
class GangWorker:
    """One rank. ``run`` trains in one of the actor's threads while ``progress`` and ``stop``
    stay answerable from the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {"step": -1, "metrics": {}, "time": time.time()}
        self._notices: list[str] = []          # CONSOLE_LOGGER messages, in order
        self._stop = threading.Event()
        self._listener: Any = None             # rank 0: the rendezvous socket, bound to this node's address
        self._store: Any = None                # rank 0: the TCPStore served on it while the worker runs
        self.stop_signal: Optional[str] = None
        self._failure_peaks: Optional[dict[str, Any]] = None   # the memory peaks when the worker raised
        self._catch_stop_signals()

    def _catch_stop_signals(self) -> None:
        """SIGTERM and SIGUSR2 (preemption, eviction) ask the worker to checkpoint and stop, like
        :meth:`stop`. Ray runs ``run`` in one of the actor's threads, where a worker cannot install
        signal handlers (:class:`~meshpilot.orchestrator.train.preemption.StopRequest` only does so in
        the main thread); the actor is created in the process's main thread, whose handlers Ray's
        task loop runs every few milliseconds, so they are installed here. A second SIGTERM falls
        back to the previous handler (Ray's: exit), so a wedged worker can still be ended."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            old = signal.getsignal(sig)

            def handle(signum: int, frame: Any, old: Any = old) -> None:
                if self._stop.is_set() and signum == signal.SIGTERM and callable(old):
                    old(signum, frame)
                    return
                self.stop_signal = signal.Signals(signum).name
                self._stop.set()
                logging.getLogger("meshpilot.worker").warning(
                    "%s received: the worker checkpoints and stops after the current step", self.stop_signal)

            signal.signal(sig, handle)

    def where(self) -> dict[str, Any]:
        return dict(node_ip=ray.util.get_node_ip_address(), node_id=ray.get_runtime_context().get_node_id(),
                    pid=os.getpid(), gpu_ids=[str(g) for g in ray.get_gpu_ids()])

    def free_port(self) -> int:
        """A port for the rendezvous on this node's address (not every interface), held open
        until :meth:`run` serves the rank-0 store on it (see :func:`meshpilot.comm.ports.rendezvous_store`)."""
        if self._listener is not None:
            self._listener.close()
        self._listener = listen_socket(ray.util.get_node_ip_address())
        return bound_address(self._listener)[1]

    def progress(self) -> dict[str, Any]:
        """The latest step and its metrics, and every console notice so far (``notices``)."""
        with self._lock:
            out = dict(self._progress, notices=list(self._notices), now=time.time())
            if self._failure_peaks is not None:
                out["memory_peaks_gib"] = dict(self._failure_peaks)
            return out

    def stop(self) -> None:
        self._stop.set()

    def run(self, spec: WorkerSpec, log_path: str) -> dict[str, Any]:
        t_called = time.time()
        redirect_output(log_path, spec.attempt, spec.rank)
        console = logging.getLogger(CONSOLE_LOGGER)
        if not any(isinstance(h, NoticeHandler) for h in console.handlers):
            console.addHandler(NoticeHandler(self._notices, self._lock))
        console.setLevel(logging.INFO)
        env = dict(MASTER_ADDR=spec.master_addr, MASTER_PORT=str(spec.master_port), RANK=str(spec.rank),
                   LOCAL_RANK=str(spec.local_rank), WORLD_SIZE=str(spec.world_size),
                   MESHPILOT_ATTEMPT=str(spec.attempt))
        if spec.rank == 0 and self._listener is not None and bound_address(self._listener)[1] == spec.master_port:
            # serve the store on the node's address; every rank (this one too) joins it as a client
            self._store = rendezvous_store(self._listener, spec.world_size)
            self._listener.close()
            self._listener = None
            env[USE_EXISTING_STORE_ENV] = "True"
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
        fn = resolve_worker_fn(spec.worker_fn)           # imports the worker module (torch, ...)
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
                self._progress.update(step=int(step), metrics=plain_metrics(metrics), time=now)
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
        except BaseException as e:
            lg.error("rank %d: worker failed:\n%s", spec.rank, traceback.format_exc())
            # the peaks at the failure (the controller reads them through progress() for an out-of-memory
            # report): the worker's own when it attached them to the exception, else this process's
            peaks = getattr(e, "memory_peaks_gib", None)
            try:
                peaks = dict(peaks) if isinstance(peaks, dict) else fallback_memory_peaks()
            except Exception:
                peaks = None
            with self._lock:
                self._failure_peaks = peaks
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        out = dict(result or {})
        out.setdefault("rank", spec.rank)
        out["pid"] = os.getpid()
        out["wall_s"] = time.time() - t0
        if self.stop_signal is not None:
            out["stop_signal"] = self.stop_signal
        # wall times of this rank's start-up, for the run summary's phases (see launch.group)
        out.setdefault("launch_times", {}).update(run_called=t_called, worker_imported=t0)
        with self._lock:
            for k in ("first_step", "first_step_time"):
                out[k] = self._progress.get(k)
            out["last_step"], out["last_step_time"] = self._progress["step"], self._progress["time"]
        if "memory_peaks_gib" not in out:
            # only for a worker function that does not report its peaks (see fallback_memory_peaks)
            out["memory_peaks_gib"] = fallback_memory_peaks()
        lg.info("rank %d: finished in %.1fs", spec.rank, out["wall_s"])
        return out
