"""The plan: one parallel layout, shared by the simulator, the planner and the executor.

A :class:`Plan` is pure data. It is built and validated without torch.distributed, a GPU or
a cluster; :meth:`Plan.check` raises :class:`ConfigError` (a ValueError) with a fix-it
message, and :meth:`Plan.layout` derives every rank's groups (see ``meshpilot.comm.layout``).
Its columnar form for batched scoring is :mod:`.codec`, its text forms :mod:`.text`.

Batch arithmetic: ``global_batch = micro_batch * grad_accum * dp`` sequences per optimizer
step (for zeroth-order plans the data-parallel degree is ``zo_dp``).

The rules below that the codec also evaluates over arrays of plans (:func:`world_size_of`,
:func:`zo2_upload_slices_of`) are written once, with arithmetic that works on Python scalars
and on numpy arrays alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from meshpilot.comm.layout import RankLayout, build_layout

from meshpilot.orchestrator.config.schema import (Checkpointing, ClusterConfig, Implementation, JobConfig, ModelConfig,
                                                  Offload, Optimizer, PlanConfig, TrainConfig, ZOMode)
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan import text


def world_size_of(dp, tp, zo_pertp, zo_dp, zeroth_order):
    """Ranks a plan uses: ``zo_pertp * zo_dp`` for a zeroth-order plan, ``dp * tp`` otherwise.

    Scalars or numpy arrays (``zeroth_order`` a bool or a bool array)."""
    zo = zeroth_order * 1
    return zo * zo_pertp * zo_dp + (1 - zo) * dp * tp


def zo2_upload_slices_of(world, zo2, gpus_per_node):
    """Slices ZO2 cuts every block upload into: the world size ``n`` when all ranks share one node
    (each rank moves 1/n of a block over its own PCIe link and the slices are all-gathered over
    the node's fabric), else 1 (whole blocks on every rank). Ranks fill nodes in blocks of
    ``gpus_per_node``, so they share one node exactly when ``1 < n <= gpus_per_node``.

    Scalars or numpy arrays (``zo2`` a bool or a bool array)."""
    sliced = zo2 * (world > 1) * (world <= gpus_per_node) * 1
    return sliced * world + (1 - sliced)


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    ep: int = 1
    zero_stage: int = 0
    offload_optimizer: Offload = Offload.NONE
    offload_params: Offload = Offload.NONE
    micro_batch: int = 1
    grad_accum: int = 1
    activation_checkpointing: Checkpointing = Checkpointing.NONE
    sequence_parallel: bool = False
    zo_mode: ZOMode = ZOMode.NONE
    zo_pertp: int = 1
    zo_dp: int = 1
    comm_overlap: bool = False
    """DeepSpeed's ``overlap_comm`` (ZeRO >= 1): gradient reductions run on a side stream beside the
    backward instead of on the compute stream, for more memory (side-stream allocator pools, a second
    reduction bucket at stages 1-2); at stage 3 the all-gathers run on a stream of their own too.
    :mod:`meshpilot.orchestrator.sim.memory` and ``.step_time`` model both settings; ``plan: auto``
    chooses. It does not change what a checkpoint holds, so :func:`.text.fingerprint` leaves it out."""

    def __post_init__(self) -> None:
        # choices given as their string values (``Plan(offload_optimizer="cpu")``) become members
        for name, choice in (("offload_optimizer", Offload), ("offload_params", Offload),
                             ("activation_checkpointing", Checkpointing), ("zo_mode", ZOMode)):
            object.__setattr__(self, name, choice(getattr(self, name)))

    # --- derived ------------------------------------------------------------------------
    @property
    def zeroth_order(self) -> bool:
        return self.zo_mode != ZOMode.NONE

    @property
    def offloads_optimizer(self) -> bool:
        """Optimizer states and fp32 gradients live in host memory (DeepSpeed's CPUAdam steps them)."""
        return self.offload_optimizer != Offload.NONE

    @property
    def offloads_params(self) -> bool:
        """ZeRO-3 parameter partitions live in host memory."""
        return self.offload_params != Offload.NONE

    @property
    def checkpoints_activations(self) -> bool:
        """Every transformer block's activations are recomputed in backward."""
        return self.activation_checkpointing != Checkpointing.NONE

    @property
    def zo2(self) -> bool:
        """ZO2: transformer blocks kept in host memory and streamed through the GPU."""
        return self.zo_mode == ZOMode.ZO2

    @property
    def world_size(self) -> int:
        """See :func:`world_size_of`."""
        return int(world_size_of(self.dp, self.tp, self.zo_pertp, self.zo_dp, self.zeroth_order))

    @property
    def data_parallel(self) -> int:
        """Ranks that see different data."""
        return self.zo_dp if self.zeroth_order else self.dp

    def zo2_upload_slices(self, gpus_per_node: int) -> int:
        """See :func:`zo2_upload_slices_of`."""
        return int(zo2_upload_slices_of(self.world_size, self.zo2, gpus_per_node))

    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel

    def layout(self, gpus_per_node: int) -> RankLayout:
        return build_layout(dp=self.dp, tp=self.tp, ep=self.ep, pertp=self.zo_pertp, zo_dp=self.zo_dp,
                            zeroth_order=self.zeroth_order, gpus_per_node=gpus_per_node)

    def describe(self) -> str:
        """A short one-line name, e.g. ``dp=4 tp=2 zero=2 mb=2x4 ac=full`` (:func:`.text.describe`)."""
        return text.describe(self)

    def to_config(self) -> dict[str, Any]:
        """The plan section of a job file that reproduces this plan exactly (plain values)."""
        return dict(dp=self.dp, tp=self.tp, ep=self.ep, zero_stage=self.zero_stage,
                    offload_optimizer=self.offload_optimizer.value, offload_params=self.offload_params.value,
                    micro_batch=self.micro_batch, activation_checkpointing=self.activation_checkpointing.value,
                    sequence_parallel=self.sequence_parallel,
                    zo=dict(mode=self.zo_mode.value, pertp=self.zo_pertp, dp=self.zo_dp),
                    comm_overlap=self.comm_overlap)

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)

    # --- validation -----------------------------------------------------------------------
    def check(self, model: ModelConfig, train: TrainConfig, cluster: ClusterConfig) -> None:
        """Raise ConfigError if this plan cannot run the job on the cluster.

        Cross-field rules only: each field's own values (choices, the zero stages, pertp) are the
        loader's (:func:`meshpilot.orchestrator.config.loader.validate_job`)."""
        gpus = cluster.nodes * cluster.gpus_per_node
        zo = self.zeroth_order
        if train.optimizer == Optimizer.ZO_SGD and not zo:
            raise ConfigError("plan.zo.mode", self.zo_mode, reason="train.optimizer=zo-sgd needs a zeroth-order plan",
                              fix="set plan.zo.mode=mezo (or zo2 to offload parameters to CPU)")
        if zo:
            if train.optimizer != Optimizer.ZO_SGD:
                raise ConfigError("train.optimizer", train.optimizer,
                                  reason=f"plan.zo.mode={self.zo_mode} trains with forward passes only",
                                  fix="set train.optimizer=zo-sgd, or plan.zo.mode=none")
            for key, val, bad, ok in (("plan.zero_stage", self.zero_stage, self.zero_stage != 0, 0),
                                      ("plan.tp", self.tp, self.tp != 1, 1), ("plan.ep", self.ep, self.ep != 1, 1),
                                      ("plan.dp", self.dp, self.dp != 1, 1),
                                      ("plan.offload_optimizer", self.offload_optimizer, self.offloads_optimizer,
                                       Offload.NONE),
                                      ("plan.offload_params", self.offload_params, self.offloads_params,
                                       Offload.NONE)):
                if bad:
                    raise ConfigError(key, val, reason="a zeroth-order plan keeps no gradients or optimizer state",
                                      fix=f"set {key}={ok}" + ("; use plan.zo.dp for data parallelism"
                                                               if key == "plan.dp" else ""))
        if model.implementation == Implementation.HF and (zo or self.tp > 1 or self.ep > 1):
            what = "zeroth order" if zo else ("tensor parallelism" if self.tp > 1 else "expert parallelism")
            raise ConfigError("model.implementation", model.implementation,
                              reason=f"transformers' model runs data parallel and ZeRO only, not {what}",
                              fix="model.implementation=builtin (it loads the same Hugging Face checkpoint)")
        tp = self.tp
        if tp > 1:
            for key, n in (("model.heads", model.heads), ("model.kv_heads", model.kv_heads), ("model.ffn", model.ffn)):
                if n % tp:
                    raise ConfigError("plan.tp", tp, reason=f"must divide {key}={n}",
                                      fix="choose tp among " + _divisors_str(n, cluster.gpus_per_node))
            if tp > cluster.gpus_per_node or cluster.gpus_per_node % tp:
                raise ConfigError("plan.tp", tp, reason=f"tensor parallelism would span nodes "
                                  f"(cluster.gpus_per_node={cluster.gpus_per_node})",
                                  fix="keep tp a divisor of gpus_per_node: " + _divisors_str(cluster.gpus_per_node,
                                                                                             cluster.gpus_per_node))
        if self.world_size > gpus:
            what = (f"pertp={self.zo_pertp} x zo.dp={self.zo_dp}" if zo else f"dp={self.dp} x tp={self.tp}")
            raise ConfigError("plan.zo.dp" if zo else "plan.dp", self.zo_dp if zo else self.dp,
                              reason=f"the plan needs {self.world_size} GPUs ({what}); cluster {cluster.name} has "
                                     f"{gpus} ({cluster.nodes} node(s) x {cluster.gpus_per_node})",
                              fix="lower the degrees or use a larger cluster (e.g. cluster.nodes=...)")
        if self.sequence_parallel:
            if tp == 1:
                raise ConfigError("plan.sequence_parallel", True, reason="needs plan.tp > 1")
            if train.seq_len % tp:
                raise ConfigError("plan.sequence_parallel", True,
                                  reason=f"train.seq_len={train.seq_len} is not divisible by plan.tp={tp}")
        if self.ep > 1:
            if model.num_experts == 0:
                raise ConfigError("plan.ep", self.ep, reason="expert parallelism needs an MoE model (model.num_experts > 0)")
            if model.num_experts % self.ep:
                raise ConfigError("plan.ep", self.ep, reason=f"must divide model.num_experts={model.num_experts}")
            if self.dp % self.ep:
                raise ConfigError("plan.ep", self.ep, reason=f"must divide plan.dp={self.dp} "
                                  "(expert parallelism re-divides the data-parallel ranks)")
        if self.zero_stage == 3 and model.num_experts:
            raise ConfigError("plan.zero_stage", 3, reason="DeepSpeed does not run MoE models under ZeRO-3 "
                              f"(model.num_experts={model.num_experts})",
                              fix="set plan.zero_stage to 0, 1 or 2 (expert optimizer states are still sharded "
                                  "over the expert-data-parallel ranks), or plan.ep>1 to split the experts")
        if self.comm_overlap and (zo or self.zero_stage == 0):
            raise ConfigError("plan.comm_overlap", True,
                              reason="overlap_comm is a ZeRO optimizer setting; "
                                     + ("a zeroth-order plan runs no DeepSpeed engine" if zo else
                                        "at plan.zero_stage=0 the engine all-reduces after backward whatever it says"),
                              fix="set plan.comm_overlap=false (or auto), or plan.zero_stage>=1")
        if self.offloads_params and self.zero_stage != 3:
            raise ConfigError("plan.offload_params", self.offload_params, reason="needs plan.zero_stage=3",
                              fix="set plan.zero_stage=3, or plan.offload_params=none")
        if self.offloads_optimizer:
            if self.zero_stage == 0:
                raise ConfigError("plan.offload_optimizer", self.offload_optimizer, reason="needs plan.zero_stage>=1",
                                  fix="set plan.zero_stage=2 (ZeRO-Offload), or plan.offload_optimizer=none")
            if train.optimizer != Optimizer.ADAMW:
                raise ConfigError("plan.offload_optimizer", self.offload_optimizer,
                                  reason=f"CPU offload runs DeepSpeed's CPUAdam; train.optimizer={train.optimizer}",
                                  fix="set train.optimizer=adamw, or plan.offload_optimizer=none")
        dpn = self.data_parallel
        if self.global_batch() != train.global_batch:
            ok = sorted(mb for mb in range(1, train.global_batch + 1) if train.global_batch % (mb * dpn) == 0)
            raise ConfigError("plan.micro_batch", self.micro_batch,
                              reason=f"train.global_batch={train.global_batch} must equal micro_batch x accumulation "
                                     f"x dp = {self.micro_batch} x {self.grad_accum} x {dpn}",
                              fix=("choose micro_batch among " + ", ".join(map(str, ok))) if ok else
                                  f"make train.global_batch a multiple of dp={dpn}")


def _divisors_str(n: int, limit: int) -> str:
    return ", ".join(str(d) for d in range(1, limit + 1) if n % d == 0)


def plan_from_config(pc: PlanConfig, job: JobConfig) -> Plan:
    """Resolve a fixed plan section (defaults for unset fields) into a checked Plan.

    ``plan.comm_overlap: auto`` (None) is chosen by the planner under ``plan: auto`` only; a fixed plan
    section has nothing to choose it and keeps false (the lean setting), so the worker, ``simulate`` and
    the exported DeepSpeed config agree without running the simulator here."""
    if pc.auto:
        raise ConfigError("plan", "auto", reason="the planner chooses this plan",
                          fix="run `meshpilot plan JOB` first, or give the degrees")
    t, c = job.train, job.cluster
    zo_mode = pc.zo.mode or (ZOMode.MEZO if t.optimizer == Optimizer.ZO_SGD else ZOMode.NONE)
    tp = pc.tp or 1
    if zo_mode != ZOMode.NONE:
        pertp, zo_dp = pc.zo.pertp or 1, pc.zo.dp or 1
        dpn, dp = zo_dp, pc.dp or 1
    else:
        pertp, zo_dp = pc.zo.pertp or 1, pc.zo.dp or 1
        dp = pc.dp or max(1, (c.nodes * c.gpus_per_node) // tp)
        dpn = dp
    if pc.micro_batch is None:
        if t.global_batch % dpn:
            raise ConfigError("train.global_batch", t.global_batch,
                              reason=f"is not divisible by the data-parallel degree {dpn}",
                              fix=f"use a multiple of {dpn}, or set plan.dp")
        mb = t.global_batch // dpn
    else:
        mb = pc.micro_batch
    accum = max(1, t.global_batch // (mb * dpn))
    plan = Plan(dp=dp, tp=tp, ep=pc.ep or 1, zero_stage=0 if pc.zero_stage is None else pc.zero_stage,
                offload_optimizer=pc.offload_optimizer or Offload.NONE,
                offload_params=pc.offload_params or Offload.NONE,
                micro_batch=mb, grad_accum=accum,
                activation_checkpointing=pc.activation_checkpointing or Checkpointing.NONE,
                sequence_parallel=bool(pc.sequence_parallel), zo_mode=zo_mode, zo_pertp=pertp, zo_dp=zo_dp,
                comm_overlap=bool(pc.comm_overlap))
    plan.check(job.model, t, c)
    return plan


def resolve_plan(job: JobConfig) -> Plan:
    """The job's fixed plan, checked against its model, training settings and cluster."""
    return plan_from_config(job.plan, job)
