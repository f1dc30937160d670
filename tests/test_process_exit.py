"""orchestrator/train/process_exit.py: a training process's exit code and its last output survive os._exit."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, sys
from meshpilot.orchestrator.train.process_exit import exit_process
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
print("last line, still buffered", end="")      # a pipe is block-buffered: os._exit alone would drop it
logging.getLogger("x").info("logged")
exit_process(3)
print("never")
"""


def test_exit_code_and_buffered_output_survive():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
    assert p.stdout == "last line, still buffered"
    assert "logged" in p.stderr
