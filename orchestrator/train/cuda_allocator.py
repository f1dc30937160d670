"""The CUDA caching allocator's mode for one training rank (``train.expandable_segments``).

PyTorch's caching allocator keeps what it got from the driver. In its default mode every request
that no cached block can serve becomes a new ``cudaMalloc`` segment, and a block is only split
from the segment it lives in, so blocks freed by one phase of a step (the activations) do not
serve a larger request of another (the optimizer's flat fp32 buffers): both stay reserved, which
the simulator models (:mod:`meshpilot.orchestrator.sim.memory`). With ``expandable_segments:True``
each stream has one segment whose virtual range grows by mapping pages at its end, and adjacent
free blocks merge. Measured on 2 x H200 (benchmarks/results/2026-11-30-s2-h200x2/alloc, built-in
llama-2-7b ZeRO-2) the mode did not lower the reserve: 18.6 against 13.1 GiB without overlap_comm,
12.3 against 19.7 with it, at the same step time; so the default stays torch's, and the mode is a
user's choice. The worker sets the job's mode before its first CUDA allocation, unless the
environment already names ``expandable_segments`` (then the environment's value runs, and the
worker says so where it differs from the job).
"""
from __future__ import annotations

import logging
import os
from typing import MutableMapping

import torch

log = logging.getLogger(__name__)

# torch >= 2.9 reads PYTORCH_ALLOC_CONF first and the older name after it
ENV_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def environment_setting(environ: MutableMapping[str, str]) -> str | None:
    """The allocator settings the environment gives (the first of :data:`ENV_NAMES` set), or None."""
    return next((environ[n] for n in ENV_NAMES if environ.get(n)), None)


def environment_value(environ: MutableMapping[str, str], name: str) -> str | None:
    """The value the environment's allocator settings give ``name`` (``key:value`` items, comma-separated), or None
    where they do not name it."""
    for item in (environment_setting(environ) or "").split(","):
        key, _, value = item.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def expandable_from_environment(environ: MutableMapping[str, str]) -> bool | None:
    """True/False where the environment's settings name ``expandable_segments``, None where they do not."""
    value = environment_value(environ, "expandable_segments")
    return None if value is None else value.lower() == "true"


def configure_allocator(expandable: bool, environ: MutableMapping[str, str] | None = None,
                        max_split_size_mb: int | None = None) -> bool:
    """Put the caching allocator in the mode ``expandable`` names (and, where given, its ``max_split_size_mb``);
    returns the mode in force.

    The environment's ``expandable_segments`` (``max_split_size_mb``) wins where it is set (logged when it
    differs from the job). Otherwise the setting is applied through torch's allocator-settings call, which takes
    effect for segments created after it (all of them, when called before the first allocation)."""
    environ = os.environ if environ is None else environ
    from_env = expandable_from_environment(environ)
    settings = []
    if from_env is not None:
        if from_env != expandable:
            log.warning("train.expandable_segments is %s but the environment sets expandable_segments:%s (%s); "
                        "the environment's value runs and the simulator's memory prediction assumed %s",
                        expandable, from_env, environment_setting(environ), expandable)
    else:
        settings.append(f"expandable_segments:{'True' if expandable else 'False'}")
    if max_split_size_mb is not None:
        if environment_value(environ, "max_split_size_mb") is not None:
            log.warning("train.max_split_size_mb is %d but the environment sets %s; the environment's value runs",
                        max_split_size_mb, environment_setting(environ))
        else:
            settings.append(f"max_split_size_mb:{int(max_split_size_mb)}")
    if settings:
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        if setter is None:                               # torch < 2.9
            setter = torch.cuda.memory._set_allocator_settings
        setter(",".join(settings))
        log.info("CUDA caching allocator: %s", ",".join(settings))
    return expandable if from_env is None else from_env
