"""Connecting the driver to Ray: :func:`connect_ray` -> :class:`RaySession`.

An explicit address, else ``RAY_ADDRESS``, else an embedded local Ray started with the job's
cluster size (``num_gpus`` GPUs, or for CPU workers ``gpus_per_node`` CPU slots, so a job that
needs more workers than the cluster config declares cannot be placed). A driver that connects
to an existing cluster uses token authentication when a token is available, as ``ray start`` does.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import ray

log = logging.getLogger(__name__)


@dataclass
class RaySession:
    """The driver's connection; :meth:`close` shuts this process's Ray client (and an embedded Ray) down."""
    address: str
    embedded: bool

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()


def connect_ray(address: Optional[str], *, accelerator: str, workers_per_node: int, nodes: int = 1,
                object_store_mb: int = 150) -> RaySession:
    """Connect to a running cluster or start an embedded one sized from the cluster config.

    Embedded with GPUs: Ray counts the GPUs this machine shows (CUDA_VISIBLE_DEVICES, else
    NVML; the driver never imports torch), ``num_cpus`` = its cores.
    Embedded CPU workers: ``num_cpus = workers_per_node`` (each worker takes one CPU slot).
    (Having Ray's pre-started workers import torch while the gang is placed was measured
    and dropped: on 4 H200s the four imports delayed the placement by 10 s, more than the
    7 s they saved inside the workers; benchmarks/results/2026-11-27-s3-h200x4, run_vs_torchrun_tp2dp2_preload.)
    Raises ConnectionError when the cluster at ``address`` cannot be reached.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        _token_auth_for_client()
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return RaySession(address=address, embedded=False)
    if accelerator == "gpu":
        kw: dict[str, Any] = dict(num_cpus=os.cpu_count() or 1)
    else:
        kw = dict(num_gpus=0, num_cpus=workers_per_node)
    kw["object_store_memory"] = object_store_mb * 2**20
    log.info("starting an embedded local Ray (%s)", ", ".join(f"{k}={v}" for k, v in kw.items()))
    ctx = ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, **kw)
    if accelerator == "gpu":
        log.info("embedded Ray sees %d GPU(s)", int(ray.cluster_resources().get("GPU", 0)))
    return RaySession(address=getattr(ctx, "address_info", {}).get("gcs_address", "local"), embedded=True)


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
