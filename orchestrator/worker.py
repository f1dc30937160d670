"""``python -m meshpilot.orchestrator.worker``: one training rank (see :mod:`meshpilot.orchestrator.train.worker`).

Kept at this path because launchers and users start it by this name.
"""
from meshpilot.orchestrator.train.worker import main, run_worker  # noqa: F401

if __name__ == "__main__":
    from meshpilot.orchestrator.train.process_exit import exit_process
    exit_process(main())     # not sys.exit: a gloo thread can abort the rank during finalization (process_exit.py)
