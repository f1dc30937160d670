"""A local Ray cluster for a test module, held by a child process so that `meshpilot run` subprocesses
connect to it with ``--address`` instead of each starting its own (Ray's start is most of a tiny run)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_HOLDER = r"""
import sys, ray
port = int(sys.argv[2])
ctx = ray.init(num_cpus=int(sys.argv[1]), num_gpus=0, include_dashboard=port > 0, object_store_memory=120 * 2**20,
               **(dict(dashboard_host="127.0.0.1", dashboard_port=port) if port > 0 else {}))
print("http://" + ctx.dashboard_url if port > 0 else ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()
ray.shutdown()
"""


def subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `meshpilot` subprocess: its own MESHPILOT_HOME, no inherited Ray address or
    failure injection."""
    env = dict(os.environ, MESHPILOT_HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MESHPILOT_FAIL_AT_STEP", None)
    env.update(extra)
    return env


@contextmanager
def held_ray_cluster(home: Path, num_cpus: int = 6, *, dashboard_port: int = 0, env: dict[str, str] | None = None,
                     ) -> Iterator[str]:
    """Start a Ray head in a child process; yield its GCS address, or with ``dashboard_port`` the http
    address of its dashboard (Ray's job submission API); shut it down on exit."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(num_cpus), str(dashboard_port)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env or subprocess_env(home), cwd=home)
    addr = p.stdout.readline().strip()
    assert addr, "the Ray holder process did not start"
    try:
        yield addr
    finally:
        p.stdin.close()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            p.wait(timeout=30)
