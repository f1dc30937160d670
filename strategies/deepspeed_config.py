"""The DeepSpeed configuration dictionary for one job and plan.

:func:`deepspeed_config` is pure (no torch.distributed, no GPU): it maps the plan onto
DeepSpeed's keys. It is the one builder: the worker runs its output, ``meshpilot plan
--export-deepspeed`` writes it, and the simulator reads its bucket sizes, persistence
threshold and overlap through :func:`zero_settings`, so the three cannot drift apart.

Batch arithmetic (DeepSpeed checks the same identity at start-up)::

    train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp

where ``dp`` is the plan's data-parallel degree (tensor-parallel ranks of one replica see
the same micro-batch, so they are not counted).

ZeRO: stage 1 shards optimizer states over the dp ranks, stage 2 also gradients
(reduce-scatter instead of all-reduce), stage 3 also parameters (all-gather before each
layer's forward and backward). ``offload_optimizer=cpu`` keeps fp32 master weights and
Adam moments in pinned host memory and steps them with DeepSpeed's CPUAdam;
``offload_params=cpu`` (stage 3) keeps the parameter shards in pinned host memory too.

``overlap_comm`` is the plan's ``comm_overlap`` (stages 1-3; ``plan: auto`` chooses it per plan).
In DeepSpeed 0.19 it moves the gradient reductions from the compute stream to a side stream
(``reduction_stream`` at stages 1-2, ``reduce_and_partition_stream`` at stage 3, which with it off
*is* the compute stream) and at stage 3 also the all-gather launches (``parameter_offload.py``:
``allgather_stream`` is the default stream unless overlap_comm). Stages 1-2 then double the
reduction bucket (``setup_buckets``). What that costs and saves is modelled in
``meshpilot.orchestrator.sim.memory`` and ``.step_time``.

User keys from ``train.deepspeed_extra`` are merged last (nested mappings key by key) and
every overridden or added key is returned by :func:`merge_extra` so the caller logs it.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from meshpilot.orchestrator.config.schema import Accelerator, JobConfig, Optimizer, Precision
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan.plan import Plan

log = logging.getLogger(__name__)

DEFAULT_BUCKET = 200_000_000
"""Elements of the ZeRO gradient-reduction bucket and of the stage 1-2 parameter all-gather bucket
(DeepSpeed's default is 5e8). The reduce bucket is one staging buffer of this many model-dtype
elements on every rank (``sim.memory`` counts it); the stage-3 prefetch bucket is a quarter of it."""
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1.0e-8


def deepspeed_config(job: JobConfig, plan: Plan, extra: Mapping[str, Any] | None = None,
                     *, on_cpu: bool | None = None) -> dict[str, Any]:
    """DeepSpeed's config dict for ``plan``; ``extra`` (default ``job.train.deepspeed_extra``) merged in.

    ``on_cpu`` selects torch's AdamW instead of DeepSpeed's FusedAdam (a CUDA kernel) when
    the optimizer is not offloaded; default: ``job.cluster.accelerator == "cpu"``.
    """
    if plan.zeroth_order:
        raise ConfigError("plan.zo.mode", plan.zo_mode, reason="zeroth-order plans do not use a DeepSpeed engine",
                          fix="train them with meshpilot.strategies.zo")
    t = job.train
    if on_cpu is None:
        on_cpu = job.cluster.accelerator == Accelerator.CPU
    cfg: dict[str, Any] = {
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.dp,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": float(t.grad_clip),
        "steps_per_print": 10**9,          # meshpilot logs its own metrics
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": _zero_section(plan),
    }
    cfg.update(_precision_section(t.precision))
    cfg["optimizer"] = _optimizer_section(job, plan, on_cpu=on_cpu)
    user = job.train.deepspeed_extra if extra is None else extra
    if user:
        cfg, changed = merge_extra(cfg, user)
        log.info("deepspeed_extra: user keys %s", ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    _check_batch(cfg, plan)
    return cfg


def _zero_section(plan: Plan) -> dict[str, Any]:
    z: dict[str, Any] = {"stage": plan.zero_stage}
    if plan.zero_stage == 0:
        return z
    z.update(reduce_bucket_size=DEFAULT_BUCKET, contiguous_gradients=True, overlap_comm=bool(plan.comm_overlap))
    if plan.zero_stage in (1, 2):
        z.update(allgather_partitions=True, allgather_bucket_size=DEFAULT_BUCKET, reduce_scatter=True)
    if plan.zero_stage == 3:
        z.update(stage3_prefetch_bucket_size=DEFAULT_BUCKET // 4, stage3_param_persistence_threshold=10_000,
                 stage3_max_live_parameters=10**9, stage3_max_reuse_distance=10**9,
                 stage3_gather_16bit_weights_on_model_save=False)
    if plan.offloads_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offloads_params:
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
    return z


def _precision_section(precision: Precision) -> dict[str, Any]:
    if precision == Precision.BF16:
        return {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    if precision == Precision.FP16:
        # dynamic loss scaling: start at 2^16, halve on overflow, double after 1000 clean steps
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                         "hysteresis": 2, "min_loss_scale": 1}, "bf16": {"enabled": False}}
    return {"bf16": {"enabled": False}, "fp16": {"enabled": False}}          # fp32


def _optimizer_section(job: JobConfig, plan: Plan, *, on_cpu: bool) -> dict[str, Any]:
    t = job.train
    if t.optimizer == Optimizer.ADAMW:
        params: dict[str, Any] = {"lr": t.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                                  "weight_decay": t.weight_decay}
        if on_cpu and not plan.offloads_optimizer:
            params["torch_adam"] = True      # FusedAdam is a CUDA kernel
        return {"type": "AdamW", "params": params}
    if t.optimizer == Optimizer.SGD:
        return {"type": "SGD", "params": {"lr": t.lr, "momentum": 0.0, "weight_decay": t.weight_decay}}
    raise ConfigError("train.optimizer", t.optimizer, reason="is not a DeepSpeed optimizer",
                      allowed=(Optimizer.ADAMW, Optimizer.SGD))


@dataclass(frozen=True)
class ZeroSettings:
    """What DeepSpeed runs for a config's ``zero_optimization`` section: the key's value where the
    config sets it, else DeepSpeed's default (deepspeed/runtime/zero/config.py). Sizes in elements."""
    stage: int = 0
    reduce_bucket_size: float = 5e8
    allgather_bucket_size: float = 5e8
    prefetch_bucket_size: float = 5e7            # stage3_prefetch_bucket_size
    max_live_parameters: float = 1e9             # stage3_max_live_parameters
    persistence_threshold: float = 1e5           # stage3_param_persistence_threshold: smaller tensors stay gathered
    max_reuse_distance: float = 1e9              # stage3_max_reuse_distance: a parameter used again within this
                                                 # many elements of the trace is not released after its module
    sub_group_size: float = 1e9                  # stage 3 steps its partition in sub-groups of about this many elements
    overlap_comm: bool = False
    """Gradient reductions run on a side stream, concurrently with the backward, instead of on the
    compute stream; at stage 3 the prefetching all-gathers are launched from a stream of their own
    too (they are asynchronous NCCL work either way, so prefetched gathers overlap compute with it
    off as well). DeepSpeed's default is true at stage 3 only. Stage 0 has no ZeRO optimizer: the
    engine all-reduces after backward whatever the key says, so it is false there."""


def zero_settings(cfg: Mapping[str, Any]) -> ZeroSettings:
    """The :class:`ZeroSettings` of a DeepSpeed config dict (e.g. :func:`deepspeed_config`'s)."""
    z = cfg.get("zero_optimization") or {}
    d = ZeroSettings()
    stage = int(z.get("stage", d.stage))
    overlap = z.get("overlap_comm")
    return ZeroSettings(
        stage=stage,
        reduce_bucket_size=float(z.get("reduce_bucket_size", d.reduce_bucket_size)),
        allgather_bucket_size=float(z.get("allgather_bucket_size", d.allgather_bucket_size)),
        prefetch_bucket_size=float(z.get("stage3_prefetch_bucket_size", d.prefetch_bucket_size)),
        max_live_parameters=float(z.get("stage3_max_live_parameters", d.max_live_parameters)),
        persistence_threshold=float(z.get("stage3_param_persistence_threshold", d.persistence_threshold)),
        max_reuse_distance=float(z.get("stage3_max_reuse_distance", d.max_reuse_distance)),
        sub_group_size=float(z.get("sub_group_size", d.sub_group_size)),
        overlap_comm=stage > 0 and (stage == 3 if overlap is None else bool(overlap)))


def merge_extra(base: Mapping[str, Any], extra: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``base`` with ``extra`` merged in (mappings recursively); returns (merged, {dotted key: new value})."""
    out = copy.deepcopy(dict(base))
    changed: dict[str, Any] = {}

    def rec(dst: dict[str, Any], src: Mapping[str, Any], prefix: str) -> None:
        for k, v in src.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
                rec(dst[k], v, key + ".")
            else:
                if dst.get(k, object()) != v:
                    changed[key] = v
                dst[k] = copy.deepcopy(v) if not isinstance(v, Mapping) else _plain(v)

    rec(out, extra, "")
    return out, changed


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _check_batch(cfg: dict[str, Any], plan: Plan) -> None:
    tb, mb, ga = cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    if tb != mb * ga * plan.dp:
        raise ConfigError("train.deepspeed_extra", {"train_batch_size": tb},
                          reason=f"train_batch_size must equal micro batch x accumulation x dp = {mb} x {ga} x {plan.dp}",
                          fix="set the batch through train.global_batch and plan.micro_batch, not deepspeed_extra")
    z = cfg.get("zero_optimization", {}).get("stage", 0)
    if z != plan.zero_stage:
        raise ConfigError("train.deepspeed_extra", {"zero_optimization.stage": z},
                          reason=f"contradicts plan.zero_stage={plan.zero_stage} (the simulator scored the plan's stage)",
                          fix="set plan.zero_stage instead")
