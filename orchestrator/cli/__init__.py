"""The ``meshpilot`` command line: :mod:`.main` builds the parser; one ``cmd_*`` module per command
(argparse and printing only)."""
from meshpilot.orchestrator.cli.main import main

__all__ = ["main"]
