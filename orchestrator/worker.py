"""``python -m meshpilot.orchestrator.worker``: one training rank (see :mod:`meshpilot.orchestrator.train.worker`).

Kept at this path because launchers and users start it by this name.
"""
import sys

from meshpilot.orchestrator.train.worker import main, run_worker  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
