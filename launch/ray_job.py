"""Ray job submission: the request of one job (pure, byte-stable) and Ray's JobSubmissionClient around it.

The job runs ``meshpilot run job.yaml --run-dir RUN_DIR --address auto --no-progress`` as the
entrypoint on an existing Ray cluster: the same gang controller as a local ``meshpilot run``
(placement group, restarts from the last checkpoint), driven from the head node. The runtime
environment uploads a folder holding only the resolved ``job.yaml`` (``working_dir``; the run
directory with its checkpoints is never uploaded) and sets PYTHONUNBUFFERED. RUN_DIR must be on
storage every node sees (a shared file system), as with Slurm.

:func:`job_request` writes ``ray_job.json`` (entrypoint, runtime_env without the working_dir,
submission_id, metadata); :class:`RayJobs` submits it to the dashboard address
(``http://head:8265``), reads status and logs, and stops it (Ray sends SIGTERM to the entrypoint;
``meshpilot run`` tears the gang down and ends ``cancelled``).
"""
from __future__ import annotations

import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from meshpilot.orchestrator.errors import ConfigError

# Ray's JobStatus -> meshpilot's submitted-job state
RAY_STATES = {"PENDING": "pending", "RUNNING": "running", "STOPPED": "cancelled", "SUCCEEDED": "succeeded",
              "FAILED": "failed"}


@dataclass(frozen=True)
class RayJobSpec:
    name: str
    run_dir: str
    world_size: int
    python: str = "python"              # the cluster's interpreter (with meshpilot installed)
    comments: tuple[str, ...] = ()

    def check(self) -> None:
        for k, v in (("name", self.name), ("run dir", self.run_dir), ("python", self.python)):
            if any(ord(c) < 32 or ord(c) == 127 for c in v):
                raise ConfigError(k, v, reason="contains a control character")


def job_request(spec: RayJobSpec) -> dict[str, Any]:
    """What is submitted (``working_dir`` is added at submission)."""
    spec.check()
    entrypoint = shlex.join([spec.python, "-m", "meshpilot.orchestrator.cli", "run", "job.yaml", "--run-dir",
                             spec.run_dir, "--address", "auto", "--no-progress"])
    return {"submission_id": f"meshpilot-{spec.name}", "entrypoint": entrypoint,
            "runtime_env": {"env_vars": {"PYTHONUNBUFFERED": "1"}},
            "metadata": {"meshpilot_run": spec.name, "world_size": str(spec.world_size),
                         "plan": " | ".join(spec.comments)}}


class RayJobs:
    """Ray's JobSubmissionClient for one dashboard address (``client`` replaceable in tests)."""

    def __init__(self, address: str, client: Any = None):
        self.address = address
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient
            _token_auth_for_client()
            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as e:
                raise ConfigError("--address", self.address, reason=f"no Ray job server answers there: {e}",
                                  fix="the Ray dashboard address, e.g. http://head:8265") from None
        return self._client

    def submit(self, request: dict[str, Any], *, working_dir: str, submission_id: Optional[str] = None) -> str:
        """Submit with a working_dir holding only ``working_dir``/job.yaml; returns the submission id."""
        tmp = Path(tempfile.mkdtemp(prefix="meshpilot-rayjob-"))
        try:
            shutil.copy(Path(working_dir) / "job.yaml", tmp / "job.yaml")
            runtime_env = dict(request.get("runtime_env") or {}, working_dir=str(tmp))
            try:
                return self.client.submit_job(entrypoint=request["entrypoint"], runtime_env=runtime_env,
                                              submission_id=submission_id or request["submission_id"],
                                              metadata=request.get("metadata"))
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError("--to", "ray", reason=f"the job server at {self.address} refused the job: {e}",
                                  fix="a submission id exists once per cluster: --resume submits it under a new id"
                                  if "already exists" in str(e) else None) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def status(self, submission_id: str) -> dict[str, Any]:
        info = self.client.get_job_info(submission_id)
        native = str(getattr(info.status, "value", info.status))
        return dict(state=RAY_STATES.get(native, "unknown"), native_state=native, reason=info.message or "")

    def cancel(self, submission_id: str) -> bool:
        """Stop the job (SIGTERM to the entrypoint). False if it had already ended."""
        return bool(self.client.stop_job(submission_id))

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)


def _token_auth_for_client() -> None:
    """Ray 2.60 turns token authentication on for new clusters; a client sends the token only in token
    mode. As ``ray start`` and :func:`meshpilot.launch.ray_cluster.connect_ray` do: with RAY_AUTH_MODE
    unset and a token available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), use it."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # an older Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
