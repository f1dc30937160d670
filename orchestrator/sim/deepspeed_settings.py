"""The DeepSpeed settings of every plan in a batch, read from the config the worker would run.

For each plan the simulator needs what DeepSpeed is configured to do: the reduce bucket (a
staging buffer), the stage-3 prefetch bucket and live-parameter cap (the gathered window), the
persistence threshold (which tensors ZeRO-3 fetches), the reuse distance (which gathered tensors
ZeRO-3 keeps), the stage-3 optimizer sub-group (the fp32 gradient it materialises at a time) and
whether the reductions run on a side stream (overlap_comm). They are read with :func:`meshpilot.strategies.deepspeed_config.zero_settings` from
:func:`meshpilot.strategies.deepspeed_config.deepspeed_config` (the builder the worker and
``--export-deepspeed`` use, ``train.deepspeed_extra`` merged in), never from constants here.

The builder's ``zero_optimization`` section depends on the plan only through its zero stage, its
two offload flags and its comm_overlap, so it is built once per distinct (stage, offload optimizer,
offload parameters, overlap) of the batch (at most 18), from the first plan that has them; a
``train.deepspeed_extra`` overlap_comm overrides the plan's, as it does in the worker. Zeroth-order plans run
no DeepSpeed engine; their entries are 0 (the models do not read them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshpilot.strategies.deepspeed_config import ZeroSettings, deepspeed_config, zero_settings

from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.plan.codec import PlanArrays


@dataclass(frozen=True)
class DeepSpeedSettings:
    """One entry per plan (elements for the sizes)."""
    reduce_bucket_size: np.ndarray
    prefetch_bucket_size: np.ndarray
    max_live_parameters: np.ndarray
    persistence_threshold: np.ndarray
    sub_group_size: np.ndarray
    overlap_comm: np.ndarray          # bool
    max_reuse_distance: np.ndarray


_FIELDS = ("reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters", "persistence_threshold",
           "sub_group_size", "overlap_comm", "max_reuse_distance")


def deepspeed_settings(job: JobConfig, a: PlanArrays) -> DeepSpeedSettings:
    """The settings of every plan of ``a`` (see the module docstring)."""
    key = np.where(a.zeroth_order, -1, a.zero * 8 + a.off_opt * 4 + a.off_param * 2 + a.overlap)
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    per_key = [_settings(job, a, int(i)) if k >= 0 else None for k, i in zip(uniq, first)]
    inv = inv.reshape(-1)
    cols = {}
    for name in _FIELDS:
        vals = np.array([0.0 if s is None else float(getattr(s, name)) for s in per_key])
        cols[name] = vals[inv]
    cols["overlap_comm"] = cols["overlap_comm"].astype(bool)
    return DeepSpeedSettings(**cols)


def _settings(job: JobConfig, a: PlanArrays, i: int) -> ZeroSettings:
    return zero_settings(deepspeed_config(job, a.plan(i)))
