"""Connecting the driver to Ray: :func:`connect_ray` -> :class:`RaySession`.

An explicit address, else ``RAY_ADDRESS``, else an embedded local Ray started with the job's
cluster size (``num_gpus`` GPUs, or for CPU workers ``gpus_per_node`` CPU slots, so a job that
needs more workers than the cluster config declares cannot be placed). A driver that connects
to an existing cluster uses token authentication when a token is available, as ``ray start`` does.

An embedded Ray is started with ``address="local"`` (never joining a cluster recorded by an
earlier ``ray start``), listens on 127.0.0.1 only (:func:`loopback_only`), and keeps token
authentication on with an owner-only token file (:func:`secure_token_file`).

:func:`wait_for_nodes` (``python -m meshpilot.launch.ray_cluster --wait-nodes N ADDRESS``) waits
until a cluster started with ``ray start`` has all its nodes (the sbatch script of Ray on Slurm).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import ray

from meshpilot.orchestrator.config.node_limits import node_cpu_cores

log = logging.getLogger(__name__)


@dataclass
class RaySession:
    """The driver's connection; :meth:`close` shuts this process's Ray client (and an embedded Ray) down."""
    address: str
    embedded: bool

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()

    def total_resources(self) -> dict[str, float]:
        """Every resource of the cluster's live nodes, busy or free (``ray.cluster_resources()``)."""
        return dict(ray.cluster_resources())


def embeds(address: Optional[str]) -> bool:
    """Whether :func:`connect_ray` starts an embedded Ray (no address given, no RAY_ADDRESS)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def local_gpu_count() -> int:
    """The GPUs an embedded Ray counts on this machine, by Ray's own rule (its NVIDIA accelerator
    manager: NVML's device count, limited by CUDA_VISIBLE_DEVICES), without starting Ray."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    m = get_accelerator_manager_for_resource("GPU")
    if m is None:
        return 0
    n = m.get_current_node_num_accelerators()
    visible = m.get_current_process_visible_accelerator_ids()
    return min(n, len(visible)) if visible is not None else n


def embedded_resources(accelerator: str, workers_per_node: int) -> dict[str, Any]:
    """The resources :func:`connect_ray` gives an embedded Ray (see there)."""
    if accelerator == "gpu":
        return dict(num_cpus=node_cpu_cores())
    return dict(num_gpus=0, num_cpus=workers_per_node)


def connect_ray(address: Optional[str], *, accelerator: str, workers_per_node: int, nodes: int = 1,
                object_store_mb: int = 150, memory_usage_threshold: Optional[float] = None) -> RaySession:
    """Connect to a running cluster or start an embedded one sized from the cluster config.

    Embedded with GPUs: Ray counts the GPUs this machine shows (CUDA_VISIBLE_DEVICES, else
    NVML; the driver never imports torch), ``num_cpus`` = the cores this process may use (its affinity set and
    cgroup CPU quota, :func:`node_cpu_cores`).
    Embedded CPU workers: ``num_cpus = workers_per_node`` (each worker takes one CPU slot).
    (Having Ray's pre-started workers import torch while the gang is placed was measured
    and dropped: on 4 H200s the four imports delayed the placement by 10 s, more than the
    7 s they saved inside the workers; benchmarks/results/2026-11-27-s3-h200x4, run_vs_torchrun_tp2dp2_preload.)
    ``memory_usage_threshold`` (the job's ``cluster.memory_usage_threshold``): the fraction of the
    node's memory above which an embedded Ray's memory monitor kills a worker (the raylet's
    ``memory_usage_threshold`` system config, Ray's default 0.95), so that the simulator's host
    limit and the monitor's are one number. A running cluster keeps its own setting.
    Raises ConnectionError when the cluster at ``address`` cannot be reached.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        _token_auth_for_client()
        secure_token_file()
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return RaySession(address=address, embedded=False)
    kw = embedded_resources(accelerator, workers_per_node)
    kw["object_store_memory"] = object_store_mb * 2**20
    if memory_usage_threshold is not None:
        kw["_system_config"] = {"memory_usage_threshold": float(memory_usage_threshold)}
    log.info("starting an embedded local Ray (%s)", ", ".join(f"{k}={v}" for k, v in kw.items()))
    loopback_only()
    secure_token_file()
    # address="local": a new cluster even when /tmp/ray/ray_current_cluster names one left by an
    # earlier `ray start` (address=None would join that one)
    ctx = ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                   **kw)
    secure_token_file()
    if accelerator == "gpu":
        log.info("embedded Ray sees %d GPU(s)", int(ray.cluster_resources().get("GPU", 0)))
    return RaySession(address=getattr(ctx, "address_info", {}).get("gcs_address", "local"), embedded=True)


# Ray binds its services to the node IP it detects, and its metrics endpoint to every interface;
# with this switch off (Ray's own setting, meant for single-machine Windows/macOS clusters), an
# embedded Ray uses 127.0.0.1 for every service, the metrics endpoint included, and so does the
# rendezvous of the gang (its master address is the node IP Ray reports).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Make the embedded Ray of this process (and its child processes) listen on 127.0.0.1 only."""
    os.environ[LOOPBACK_ENV] = "0"
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


def secure_token_file() -> None:
    """Keep Ray's token authentication on and its token private: with RAY_AUTH_MODE unset, a new
    local Ray turns token authentication on and writes ~/.ray/auth_token (with the default umask,
    readable by every user); create it owner-only first and tighten an existing one. A
    RAY_AUTH_MODE=disabled chosen by the user is respected, with a warning."""
    try:
        from ray._private.authentication import authentication_token_setup as ats
    except ImportError:          # an older Ray without token authentication
        return
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: anyone who can reach this machine's Ray ports can run code as you")
        return
    path = ats._get_default_token_path()
    try:
        if not path.exists() and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            old = os.umask(0o077)
            try:
                ats.generate_and_save_token()
            finally:
                os.umask(old)
        for p, private in ((path.parent, 0o700), (path, 0o600)):
            st = p.stat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                os.chmod(p, private)
    except (OSError, AttributeError) as e:
        log.warning("could not make the Ray token file %s private: %s", path, e)


def _token_auth_for_client() -> None:
    """Ray 2.60 turns token authentication on for new local clusters, but a driver that
    connects to an existing one sends no token unless RAY_AUTH_MODE=token. Do what
    ``ray start`` does: with RAY_AUTH_MODE unset and a token available (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), switch this process to token mode."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # an older Ray without token authentication
        return
    if maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
        log.info("Ray token authentication: using the local token")


def wait_for_nodes(address: str, nodes: int, timeout_s: float, *, poll_s: float = 0.5) -> int:
    """Connect to the Ray cluster at ``address`` (token authentication as :func:`connect_ray`) and
    wait until it has ``nodes`` alive nodes; returns how many it has. Raises TimeoutError after
    ``timeout_s`` (checked at least once), and what ``ray.init`` raises when the cluster cannot be
    reached.
    Used by the sbatch script of ``meshpilot submit --to slurm --slurm-mode ray`` between
    ``ray start`` on every node and the driver."""
    import time
    deadline = time.monotonic() + max(0.0, timeout_s)
    _token_auth_for_client()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes:
                return alive
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the Ray cluster at {address} has {alive} of {nodes} node(s) after {timeout_s:.0f} s")
            time.sleep(poll_s)
    finally:
        ray.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m meshpilot.launch.ray_cluster --wait-nodes N [--timeout S] ADDRESS``: exit 0 once the
    cluster has N alive nodes, 1 when it does not within S seconds or cannot be reached."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m meshpilot.launch.ray_cluster",
                                description="wait until a Ray cluster has N alive nodes")
    p.add_argument("address", help="GCS address HOST:PORT")
    p.add_argument("--wait-nodes", type=int, required=True, metavar="N")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S")
    args = p.parse_args(argv)
    try:
        n = wait_for_nodes(args.address, args.wait_nodes, args.timeout)
    except Exception as e:  # noqa: BLE001 - unreachable, refused, timed out: the script stops Ray and ends
        print(f"meshpilot: waiting for {args.wait_nodes} Ray node(s) at {args.address}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    print(f"meshpilot: the Ray cluster at {args.address} has {n} node(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
