"""Run a function on N real torch.distributed processes (gloo, CPU) and collect the results.

    from dist_utils import run_distributed
    results = run_distributed(my_fn, 4, arg1, arg2, timeout=60)   # [rank0's return, rank1's, ...]

``my_fn(rank, world_size, *args)`` must be a module-level (picklable) function; it runs in
a fresh process (forked from a forkserver that has imported torch once, which makes
start-up fast on a loaded machine) with the default process group already initialised
(gloo, on a free localhost port) and one intra-op thread. Its return value is pickled back (tensors
included). If any rank raises, :class:`DistributedWorkerError` is raised in the parent
with every failing rank's traceback; ranks left waiting in a collective are terminated.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp

from meshpilot.comm.ports import free_port


class DistributedWorkerError(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""

    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        super().__init__(f"rank(s) {sorted(failures)} failed:\n{text}")


def _worker(rank: int, world_size: int, port: int, backend: str, pg_timeout: float, fn: Callable,
            args: tuple, results: Any, environ: dict[str, str]) -> None:
    import torch
    import torch.distributed as dist
    # the forkserver started with the environment of its first use: take the caller's current one
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def _context() -> Any:
    """A forkserver context whose server has imported torch and meshpilot once, so that
    each worker starts by fork (fast on a loaded machine) in a clean, thread-free process.
    Falls back to spawn where forkserver does not exist."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:
        return mp.get_context("spawn")
    # only stable, heavy imports: a module that fails to import would take the server down
    ctx.set_forkserver_preload(["torch", "torch.distributed", "omegaconf"])
    return ctx


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
                    backend: str = "gloo", grace: float = 5.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the results by rank.

    ``timeout`` bounds the whole run (seconds); after the first failure the other ranks get
    ``grace`` seconds to finish or fail before they are terminated. If the free port was
    taken by someone else between choosing and binding it, the run is retried once.
    """
    for attempt in range(2):
        try:
            return _run_once(fn, world_size, args, timeout=timeout, backend=backend, grace=grace)
        except DistributedWorkerError as e:
            port_lost = any("address already in use" in tb.lower() or "eaddrinuse" in tb.lower()
                            for tb in e.failures.values())
            if attempt or not port_lost:
                raise
    raise AssertionError("unreachable")


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, *, timeout: float, backend: str,
              grace: float) -> list[Any]:
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, max(timeout, 10.0), fn, args, results,
                                                          dict(os.environ)),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(failures) < world_size:
            now = time.monotonic()
            if now >= deadline:
                missing = sorted(set(range(world_size)) - set(values) - set(failures))
                if failures:
                    break
                raise TimeoutError(f"run_distributed: ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(1.0, deadline - now))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in values and r not in failures]
                for r in dead:
                    failures[r] = f"process exited with code {procs[r].exitcode} without reporting"
                continue
            if ok:
                values[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        for p in procs:
            p.join(timeout=2.0 if not failures else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
    if failures:
        raise DistributedWorkerError(failures)
    return [values[r] for r in range(world_size)]
