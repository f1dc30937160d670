"""Submitted jobs (``meshpilot submit``): their records and the backends' status, logs and cancel.

A submission is recorded in ``<out>/submission.json`` (handle, backend, run id, run dir, the
backend's native reference) plus an index entry under ``$MESHPILOT_HOME/submissions/``. The
scheduler, not a meshpilot process, is its controller, so ``meshpilot status/logs/cancel`` and
``meshpilot submit --status/--logs/--cancel`` both come here and ask the backend
(:mod:`.slurm`, :mod:`.mpi`, :mod:`.kubernetes`, :mod:`.ray_job`).

States (one vocabulary for every backend; TIMEOUT, OUT_OF_MEMORY, PREEMPTED and FAILED kept
apart): pending, running, requeued, suspended, succeeded, failed, cancelled, timeout,
out_of_memory, preempted, node_fail, unknown.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from meshpilot.orchestrator.atomic_io import write_atomic
from meshpilot.orchestrator.errors import ConfigError

BACKENDS = ("slurm", "k8s", "mpi", "ray")
RECORD = "submission.json"
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "preempted", "node_fail"})


def is_handle(ref: str) -> bool:
    """``slurm:1234``, ``k8s:ns/kind/name``, ``mpi:RUN_ID``, ``ray:SUBMISSION_ID``."""
    backend, sep, rest = ref.partition(":")
    return bool(sep and rest) and backend in BACKENDS


# --- Slurm ------------------------------------------------------------------------------------------

def _status_slurm(rec: dict[str, Any]) -> dict[str, Any]:
    from meshpilot.launch.slurm import SlurmClient
    st = SlurmClient().status(rec["native"]["job_id"]).to_dict()
    if st["state"] == "unknown":
        # Slurm forgets an ended job after MinJobAge unless accounting (sacct) runs: the batch log's last
        # word tells succeeded from failed, not the finer states
        log = Path(rec["run_dir"]) / "logs" / f"slurm-{rec['native']['job_id']}.out"
        ends = [ln for ln in (log.read_text(errors="replace").splitlines() if log.exists() else [])
                if ln.startswith("meshpilot: the job step ended with status ")]
        if ends:
            code = ends[-1].rsplit(" ", 1)[1]
            st.update(state="succeeded" if code == "0" else "failed", native_state="", exit_code=code,
                      reason="Slurm no longer knows the job; state from its batch log", source="batch log")
    return st


def _cancel_slurm(rec: dict[str, Any]) -> bool:
    from meshpilot.launch.slurm import SlurmClient
    if _status_slurm(rec)["state"] in TERMINAL:       # scancel of an ended job succeeds silently: nothing to do
        return False
    return SlurmClient().cancel(rec["native"]["job_id"])


def _logs_slurm(rec: dict[str, Any]) -> dict[str, list[Path]]:
    logs = Path(rec["run_dir"]) / "logs"
    if _slurm_ray(rec):           # Ray on Slurm: the batch log (the driver) and the controller's, then one log per rank
        ranks = sorted(logs.glob("rank*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        return {"main": [*sorted(logs.glob("slurm-*.out")), Path(rec["run_dir"]) / "controller.log"], "workers": ranks}
    nodes = sorted(logs.glob("node*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    return {"main": sorted(logs.glob("slurm-*.out")), "workers": nodes}


def _slurm_ray(rec: dict[str, Any]) -> bool:
    """A Slurm job of the ray mode (``meshpilot submit --slurm-mode ray``): per-rank logs, not per-node."""
    return rec.get("backend") == "slurm" and (rec.get("native") or {}).get("mode") == "ray"


# --- Open MPI ---------------------------------------------------------------------------------------

def _status_mpi(rec: dict[str, Any]) -> dict[str, Any]:
    from meshpilot.launch.mpi import status
    return status(rec["run_dir"], rec["native"]["pid"], rec["native"]["host"])


def _cancel_mpi(rec: dict[str, Any]) -> bool:
    from meshpilot.launch.mpi import cancel
    return cancel(rec["run_dir"], rec["native"]["pid"], rec["native"]["host"])


def _logs_mpi(rec: dict[str, Any]) -> dict[str, list[Path]]:
    return {"main": [Path(rec["run_dir"]) / "logs" / "mpirun.log"], "workers": []}


# --- Kubernetes -------------------------------------------------------------------------------------

def _client_k8s(rec: dict[str, Any]) -> Any:
    from meshpilot.launch.kubernetes import KubeClient
    return KubeClient.from_config(context=rec["native"].get("context"))


def _status_k8s(rec: dict[str, Any]) -> dict[str, Any]:
    return _client_k8s(rec).status(rec["native"])


def _cancel_k8s(rec: dict[str, Any]) -> bool:
    return _client_k8s(rec).cancel(rec["native"])


def _logs_k8s(rec: dict[str, Any]) -> dict[str, list[Path]]:
    out = Path(rec["out"]) / "logs"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for pod, text in sorted(_client_k8s(rec).logs(rec["native"]).items()):
        p = out / f"{pod}.log"
        write_atomic(p, text)
        paths.append(p)
    return {"main": [], "workers": paths}      # one log per pod (node)


# --- Ray --------------------------------------------------------------------------------------------

def _status_ray(rec: dict[str, Any]) -> dict[str, Any]:
    from meshpilot.launch.ray_job import RayJobs
    return RayJobs(rec["native"]["address"]).status(rec["native"]["submission_id"])


def _cancel_ray(rec: dict[str, Any]) -> bool:
    from meshpilot.launch.ray_job import RayJobs
    return RayJobs(rec["native"]["address"]).cancel(rec["native"]["submission_id"])


def _logs_ray(rec: dict[str, Any]) -> dict[str, list[Path]]:
    from meshpilot.launch.ray_job import RayJobs
    p = Path(rec["out"]) / "ray-job.log"
    write_atomic(p, RayJobs(rec["native"]["address"]).logs(rec["native"]["submission_id"]))
    # `meshpilot run` under the Ray job writes per-rank logs into the (shared) run directory
    ranks = Path(rec["run_dir"]) / "logs"
    workers = sorted(ranks.glob("rank*.log"), key=lambda q: int(re.sub(r"\D", "", q.stem) or 0)) if ranks.is_dir() else []
    return {"main": [p], "workers": workers}


_STATUS = {"slurm": _status_slurm, "k8s": _status_k8s, "mpi": _status_mpi, "ray": _status_ray}
_CANCEL = {"slurm": _cancel_slurm, "k8s": _cancel_k8s, "mpi": _cancel_mpi, "ray": _cancel_ray}
_LOGS = {"slurm": _logs_slurm, "k8s": _logs_k8s, "mpi": _logs_mpi, "ray": _logs_ray}


# --- records ----------------------------------------------------------------------------------------

def index_dir() -> Path:
    from meshpilot.orchestrator.run.store import meshpilot_home
    return meshpilot_home() / "submissions"


def records() -> list[dict[str, Any]]:
    out = []
    d = index_dir()
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(Path(json.loads(f.read_text())["record"]).read_text())
        except (OSError, ValueError, KeyError):
            continue
        out.append(rec)
    return sorted(out, key=lambda r: r.get("submitted", 0))


def record_in(path: str) -> dict[str, Any] | None:
    """The submission recorded in directory PATH, if any."""
    try:
        f = Path(path) / RECORD
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None


def find_record(ref: str) -> dict[str, Any]:
    """A submission by handle, run id (or unique prefix) or run/artefact directory."""
    rec = record_in(ref)
    if rec is not None:
        return rec
    recs = records()
    exact = [r for r in recs if ref in (r.get("handle"), r.get("run_id"))]
    if exact:
        return exact[-1]           # the latest, should a scheduler have reused a job id
    found = [r for r in recs if str(r.get("run_id", "")).startswith(ref)]
    if len(found) > 1:
        raise ConfigError("REF", ref, reason="matches several submissions", allowed=[r["handle"] for r in found][:10])
    if not found:
        raise ConfigError("REF", ref, reason="no such submission (handle, run id or run directory)",
                          fix="`meshpilot status` lists runs and submissions")
    return found[0]


def progress_of(run_dir: str) -> dict[str, Any]:
    """Rank 0's last step and loss from RUN_DIR/metrics.jsonl (when the run dir is visible from here)."""
    p = Path(run_dir) / "metrics.jsonl"
    try:
        lines = p.read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        return {k: rec.get(k) for k in ("step", "loss") if k in rec}
    return {}


def status_of(rec: dict[str, Any]) -> dict[str, Any]:
    st = dict(_STATUS[rec["backend"]](rec))
    st.update(handle=rec["handle"], backend=rec["backend"], run_id=rec["run_id"], run_dir=rec["run_dir"],
              total_steps=rec.get("total_steps"), world_size=rec.get("world_size"), plan=rec.get("plan"))
    st.update(progress_of(rec["run_dir"]))
    return st


def safe_status_of(rec: dict[str, Any]) -> dict[str, Any]:
    """status_of, or state ``unknown`` with the error: one unreachable scheduler must not hide the others."""
    try:
        return status_of(rec)
    except Exception as e:  # noqa: BLE001
        return dict(handle=rec.get("handle"), backend=rec.get("backend"), run_id=rec.get("run_id"),
                    run_dir=rec.get("run_dir"), total_steps=rec.get("total_steps"), state="unknown",
                    reason=f"{type(e).__name__}: {e}")


def log_paths(rec: dict[str, Any], rank: int | None = None) -> list[Path]:
    """The submission's logs: the launcher's/batch log and every per-node (per-pod, per-rank) log, or
    with RANK only the RANK-th worker log (Slurm: node<RANK>.log, Ray on Slurm and Ray: rank<RANK>.log,
    Kubernetes: the RANK-th pod). Kubernetes and Ray logs are fetched through the API into the artefact folder."""
    got = _LOGS[rec["backend"]](rec)
    if rank is None:
        return [*got["main"], *got["workers"]]
    if rec["backend"] == "mpi":
        raise ConfigError("--rank", rank, reason="mpirun writes one log for all ranks (lines are not split by rank)",
                          fix=f"meshpilot logs {rec['handle']}")
    world = int(rec.get("world_size") or 0)
    if world and not 0 <= rank < world:
        raise ConfigError("--rank", rank, reason=f"{rec['handle']} has ranks 0..{world - 1}")
    index = rank
    if rec["backend"] in ("slurm", "k8s") and world and rec.get("nodes") and not _slurm_ray(rec):
        index = rank // max(1, world // int(rec["nodes"]))      # one log per node (torchrun / pod) holds its ranks
    if not 0 <= index < len(got["workers"]):
        raise ConfigError("--rank", rank, reason=f"no log of rank {rank} yet ({len(got['workers'])} worker log(s): "
                          f"{', '.join(p.name for p in got['workers']) or 'none'})")
    return [got["workers"][index]]


def cancel(rec: dict[str, Any]) -> bool:
    """Ask the backend to cancel; False when there was nothing left to cancel. Idempotent."""
    return bool(_CANCEL[rec["backend"]](rec))


def line(st: dict[str, Any]) -> str:
    step = f"step {st.get('step', '-')}/{st.get('total_steps', '?')}"
    loss = f" loss {st['loss']:.4f}" if isinstance(st.get("loss"), (int, float)) else ""
    native = f" ({st.get('native_state') or '-'}{', ' + st['reason'] if st.get('reason') not in (None, '', 'None') else ''}"
    native += f", restarts {st['restarts']})" if st.get("restarts") else ")"
    return f"{st['handle']}  {st['state']}  {step}{loss}{native}  {st['run_dir']}"
