"""Ending a training process after its process groups are torn down, without the interpreter's finalization.

Why not ``sys.exit``: a gloo process group's worker threads (``ProcessGroupGloo::runLoop``) drop
their reference to a finished collective after the caller's ``wait()`` has returned. A barrier
keeps the collectives queued before it alive, so the last reference to an ``all_gather_object``
tensor owned by Python can be dropped on a worker thread while the main thread is already in
``Py_FinalizeEx``. Releasing a Python-owned tensor needs the GIL; CPython ends a thread that asks
for the GIL during finalization with ``pthread_exit``, whose forced unwind crosses a ``noexcept``
destructor (``~AsyncBarrierWork``) and calls ``std::terminate``: the rank aborts with SIGABRT
("terminate called without an active exception") after training finished, and torchrun or srun
report the job failed. This was read off a core dump of the 2-rank ZeRO-2 CPU run in
``tests/test_autotune_train.py`` (1 abort in 30 repetitions on a 2-core machine).
``destroy_process_group`` does not prevent it: DeepSpeed still holds its groups, so their threads
live until finalization.

``exit_process`` does what finalization would have done that matters here: it flushes stdio and
the logging handlers and, where mpi4py initialised MPI (a worker under mpirun without
MASTER_ADDR, train/worker.py ``env_rank_info``), finalizes it as mpi4py's exit hook would (Open
MPI's launcher fails a job one of whose processes exits without ``MPI_Finalize``). Then it ends
the process with ``os._exit``. Call it only after everything the run writes is written and closed.
"""
from __future__ import annotations

import logging
import os
import sys


def exit_process(code: int) -> None:
    """Flush stdout, stderr and logging, finalize MPI if mpi4py initialised it, then ``os._exit(code)`` (no other
    atexit handler, no interpreter finalization)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):       # a closed or broken pipe: nothing left to flush to
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
