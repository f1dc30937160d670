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

``exit_process`` flushes what finalization would have flushed (stdio, logging handlers) and ends
the process with ``os._exit``. Call it only after everything the run writes is written and closed.
"""
from __future__ import annotations

import logging
import os
import sys


def exit_process(code: int) -> None:
    """Flush stdout, stderr and logging, then ``os._exit(code)`` (no atexit handlers, no finalization)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):       # a closed or broken pipe: nothing left to flush to
            pass
    os._exit(code)
