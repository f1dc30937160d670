"""DeepSpeed ZeRO engines for a plan: construction (stage 3 under ``zero.Init``) and initialisation.

Sharding groups. The engine is given ``mpu=groups`` (our :class:`ProcessGroups`), so
DeepSpeed's "data-parallel group" is the plan's dp column: ZeRO partitions optimizer states
(stage 1), gradients (stage 2, reduce-scatter over dp) and parameters (stage 3, all-gather
over dp) across the ``dp`` ranks only; tensor-parallel shards stay whole on their rank and
gradient norms for clipping are summed over tp (DeepSpeed asks ``mpu`` for the model
parallel group).

Experts (``param.meshpilot_expert = True``). Rank ``r`` holds different experts than the
other ranks of its expert-parallel group, so an expert's gradient is averaged only over the
expert-data-parallel group ``edp`` (the ranks holding the same experts), and its optimizer
state is sharded over ``edp``. We express this in DeepSpeed's own terms: expert params get
``allreduce = False`` and ``group_name = "ep_size_<ep>"``, our ep/edp groups are registered
under that name in ``deepspeed.utils.groups``, the optimizer gets separate ``moe`` parameter
groups, and the engine is told that the model has MoE layers (DeepSpeed only detects its
own ``deepspeed.moe.layer.MoE`` modules otherwise).

Weight decay: parameters with fewer than 2 dimensions (biases, norm scales) get no decay.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from meshpilot.comm.groups import ProcessGroups
from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.plan.plan import Plan

from .deepspeed_config import deepspeed_config

log = logging.getLogger(__name__)


def expert_group_name(plan: Plan) -> str:
    return f"ep_size_{plan.ep}"


def construction_context(job: JobConfig, plan: Plan, groups: ProcessGroups, ds_config: dict[str, Any],
                         *, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``deepspeed.zero.Init`` over the dp group for stage 3 (each rank materialises only its 1/dp
    shard of every parameter, on CPU when params are offloaded); a no-op context otherwise."""
    if plan.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    import torch._dynamo  # noqa: F401  imported lazily by torch inside Init otherwise, where it clashes
    # with Init's patched Tensor.__new__ ("Signature mismatch ... tensor_pynew")
    remote = "cpu" if plan.offloads_params else None
    # dtype=None on purpose: Init then takes the dtype from the config's bf16/fp16 sections. An explicit
    # dtype is ignored on accelerators without fp16 (DeepSpeed 0.19.8 partition_parameters._set_dtype
    # falls to bf16 on the CPU accelerator), which would round fp32 weights to bf16.
    del dtype
    return deepspeed.zero.Init(data_parallel_group=groups.dp, remote_device=remote,
                               pin_memory=remote is not None and torch.cuda.is_available(),
                               config_dict_or_path=ds_config, mpu=groups)


def param_groups(model: nn.Module, *, weight_decay: float, plan: Plan) -> list[dict[str, Any]]:
    """Optimizer parameter groups: decay / no-decay, and expert params in their own ``moe`` groups."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()
        decay = ndim >= 2 and not name.endswith(".bias")
        expert = bool(getattr(p, "meshpilot_expert", False))
        buckets.setdefault((decay, expert), []).append(p)
    out = []
    for (decay, expert), params in sorted(buckets.items()):
        g: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0,
                             "name": ("decay" if decay else "no_decay") + ("_expert" if expert else "")}
        if expert:
            g.update(moe=True, name=expert_group_name(plan))
        out.append(g)
    return out


def mark_experts_for_deepspeed(model: nn.Module, plan: Plan, groups: ProcessGroups) -> int:
    """Tag expert params the way DeepSpeed's MoE code recognises them and register our groups.

    Returns the number of expert parameters. DeepSpeed keeps its expert groups in module-level
    dicts of ``deepspeed.utils.groups`` keyed by name; we store our (already created) ep/edp
    groups there instead of letting DeepSpeed create its own rank layout.
    """
    experts = [p for p in model.parameters() if getattr(p, "meshpilot_expert", False)]
    if not experts:
        return 0
    from deepspeed.utils import groups as ds_groups
    name = expert_group_name(plan)
    for p in experts:
        p.allreduce = False
        p.group_name = name
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp
    if hasattr(ds_groups, "_EXPERT_PARALLEL_GROUP_RANKS"):
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ranks.ep)
    if hasattr(ds_groups, "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.ranks.edp)
    return len(experts)


def mark_tensor_parallel_for_deepspeed(model: nn.Module, plan: Plan) -> int:
    """Flag tp-sharded params (``param.meshpilot_tp_dim``) with DeepSpeed's ``tensor_model_parallel``.

    DeepSpeed's gradient norm (for clipping) sums squares over the model-parallel group, counting
    a parameter on every tp rank only when it is flagged model-parallel and otherwise only on tp
    rank 0 (replicated params). Unflagged shards would be counted once instead of tp times and
    the clipped gradients would differ from the single-process run.
    """
    if plan.tp == 1:
        return 0
    n = 0
    for p in model.parameters():
        if getattr(p, "meshpilot_tp_dim", None) is not None:
            p.tensor_model_parallel = True
            n += 1
    return n


def _engine_class(has_experts: bool, num_experts: int) -> type:
    from deepspeed.runtime.engine import DeepSpeedEngine
    if not has_experts:
        return DeepSpeedEngine

    class ExpertAwareEngine(DeepSpeedEngine):
        """DeepSpeed's engine, told that the model has expert layers made of flagged params."""

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            if not self.has_moe_layers:
                self.has_moe_layers = True
                self.num_experts.append(num_experts)

    return ExpertAwareEngine


def initialize_engine(model: nn.Module, job: JobConfig, plan: Plan, groups: ProcessGroups, *,
                      ds_config: dict[str, Any] | None = None) -> Any:
    """Wrap ``model`` in a DeepSpeed engine for ``plan``; returns the engine.

    Communication per optimizer step (dp = plan.dp, Psi = parameters of this tp shard):
    stage 0/1 all-reduce gradients over dp (stage 1 then all-gathers updated shards), stage 2
    reduce-scatters gradients and all-gathers parameters, stage 3 all-gathers each layer's
    parameters in forward and backward and reduce-scatters gradients. Expert gradients use
    the edp group instead of dp.
    """
    import deepspeed
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero import partition_parameters

    cfg = ds_config if ds_config is not None else deepspeed_config(job, plan)
    ds_dist.init_distributed(dist_backend=_backend(), dist_init_required=False)
    n_expert_params = mark_experts_for_deepspeed(model, plan, groups)
    mark_tensor_parallel_for_deepspeed(model, plan)
    params = param_groups(model, weight_decay=job.train.weight_decay, plan=plan)
    if n_expert_params == 0:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=cfg, mpu=groups,
                                          dist_init_required=False)
    else:
        # deepspeed.initialize always builds a plain DeepSpeedEngine; these are its steps for a
        # non-pipeline model with our expert-aware subclass.
        partition_parameters.shutdown_init_context()
        config_class = DeepSpeedConfig(cfg, groups)
        engine = _engine_class(True, job.model.num_experts)(
            args=None, model=model, optimizer=None, model_parameters=params, training_data=None,
            lr_scheduler=None, mpu=groups, dist_init_required=False, collate_fn=None, config=cfg,
            config_class=config_class)
        partition_parameters.restore_init_context()
    log.info("rank %d: DeepSpeed engine zero_stage=%d dp=%d tp=%d ep=%d expert_params=%d offload_opt=%s "
             "offload_params=%s", groups.ranks.rank, plan.zero_stage, plan.dp, plan.tp, plan.ep, n_expert_params,
             plan.offload_optimizer, plan.offload_params)
    return engine


def _backend() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().communication_backend_name()
