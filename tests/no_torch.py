"""Run the ``meshpilot`` CLI in a subprocess in which torch (and other named packages) cannot be imported:
the driver commands must work there."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Sequence

_TEMPLATE = textwrap.dedent("""
    import sys

    BLOCKED = {blocked!r}

    class _Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not importable in this test")
            return None

    sys.meta_path.insert(0, _Refuse())
    {body}
""")

_MAIN = "\n".join([
    "from meshpilot.orchestrator.cli import main",
    "rc = main(sys.argv[1:])",
    'assert "torch" not in sys.modules, "the driver imported torch"',
    "sys.exit(rc)",
])


def no_torch_code(blocked: Sequence[str] = ("torch", "deepspeed"), body: str = _MAIN) -> str:
    """Python source that blocks ``blocked`` and then runs ``body`` (default: the CLI on sys.argv)."""
    return _TEMPLATE.format(blocked=tuple(blocked), body=body)


def run_without(args: Sequence[str], home: Path, blocked: Sequence[str] = ("torch", "deepspeed"),
                timeout: float = 120) -> subprocess.CompletedProcess:
    """``meshpilot ARGS`` with ``blocked`` not importable, MESHPILOT_HOME=home, in ``home``."""
    env = dict(os.environ, MESHPILOT_HOME=str(home))
    return subprocess.run([sys.executable, "-c", no_torch_code(blocked), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=home)
