"""The plan: one parallel layout, shared by the simulator, the planner and the executor.

A :class:`Plan` is pure data. It is built and validated without torch.distributed, a GPU or
a cluster; :meth:`Plan.check` raises :class:`ConfigError` (a ValueError) with a fix-it
message, and :meth:`Plan.layout` derives every rank's groups (see ``meshpilot.comm.layout``).

Batch arithmetic: ``global_batch = micro_batch * grad_accum * dp`` sequences per optimizer
step (for zeroth-order plans the data-parallel degree is ``zo_dp``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from meshpilot.comm.layout import RankLayout, build_layout

from meshpilot.orchestrator.config.schema import ClusterConfig, JobConfig, ModelConfig, PlanConfig, TrainConfig
from meshpilot.orchestrator.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    ep: int = 1
    zero_stage: int = 0
    offload_optimizer: str = "none"
    offload_params: str = "none"
    micro_batch: int = 1
    grad_accum: int = 1
    activation_checkpointing: str = "none"
    sequence_parallel: bool = False
    zo_mode: str = "none"          # none | mezo | zo2
    zo_pertp: int = 1
    zo_dp: int = 1

    # --- derived ------------------------------------------------------------------------
    @property
    def zeroth_order(self) -> bool:
        return self.zo_mode != "none"

    @property
    def offloads_optimizer(self) -> bool:
        """Optimizer states and fp32 gradients live in host memory (DeepSpeed's CPUAdam steps them)."""
        return self.offload_optimizer != "none"

    @property
    def offloads_params(self) -> bool:
        """ZeRO-3 parameter partitions live in host memory."""
        return self.offload_params != "none"

    @property
    def checkpoints_activations(self) -> bool:
        """Every transformer block's activations are recomputed in backward."""
        return self.activation_checkpointing != "none"

    @property
    def zo2(self) -> bool:
        """ZO2: transformer blocks kept in host memory and streamed through the GPU."""
        return self.zo_mode == "zo2"

    @property
    def world_size(self) -> int:
        return self.zo_pertp * self.zo_dp if self.zeroth_order else self.dp * self.tp

    @property
    def data_parallel(self) -> int:
        """Ranks that see different data."""
        return self.zo_dp if self.zeroth_order else self.dp

    def zo2_upload_slices(self, gpus_per_node: int) -> int:
        """Slices ZO2 cuts every block upload into: the world size when all ranks share one node (each
        rank moves 1/n of a block over its own PCIe link and the slices are all-gathered over the
        node's fabric), else 1 (whole blocks on every rank). Ranks fill nodes in blocks of
        ``gpus_per_node``, so they share one node exactly when ``world_size <= gpus_per_node``."""
        n = self.world_size
        return n if self.zo2 and 1 < n <= gpus_per_node else 1

    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel

    def layout(self, gpus_per_node: int) -> RankLayout:
        return build_layout(dp=self.dp, tp=self.tp, ep=self.ep, pertp=self.zo_pertp, zo_dp=self.zo_dp,
                            zeroth_order=self.zeroth_order, gpus_per_node=gpus_per_node)

    def describe(self) -> str:
        """A short one-line name, e.g. ``dp=4 tp=2 zero=2 mb=2x4 ac=full``."""
        if self.zeroth_order:
            return f"zo={self.zo_mode} pertp={self.zo_pertp} zo_dp={self.zo_dp} mb={self.micro_batch}x{self.grad_accum}"
        s = f"dp={self.dp} tp={self.tp}"
        if self.ep > 1:
            s += f" ep={self.ep}"
        s += f" zero={self.zero_stage} mb={self.micro_batch}x{self.grad_accum}"
        if self.offload_optimizer != "none":
            s += " off_opt"
        if self.offload_params != "none":
            s += " off_param"
        if self.activation_checkpointing != "none":
            s += f" ac={self.activation_checkpointing}"
        if self.sequence_parallel:
            s += " sp"
        return s

    def to_config(self) -> dict[str, Any]:
        """The plan section of a job file that reproduces this plan exactly."""
        return dict(dp=self.dp, tp=self.tp, ep=self.ep, zero_stage=self.zero_stage,
                    offload_optimizer=self.offload_optimizer, offload_params=self.offload_params,
                    micro_batch=self.micro_batch, activation_checkpointing=self.activation_checkpointing,
                    sequence_parallel=self.sequence_parallel,
                    zo=dict(mode=self.zo_mode, pertp=self.zo_pertp, dp=self.zo_dp))

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)

    # --- validation -----------------------------------------------------------------------
    def check(self, model: ModelConfig, train: TrainConfig, cluster: ClusterConfig) -> None:
        """Raise ConfigError if this plan cannot run the job on the cluster."""
        gpus = cluster.nodes * cluster.gpus_per_node
        zo = self.zeroth_order
        if train.optimizer == "zo-sgd" and not zo:
            raise ConfigError("plan.zo.mode", self.zo_mode, reason="train.optimizer=zo-sgd needs a zeroth-order plan",
                              fix="set plan.zo.mode=mezo (or zo2 to offload parameters to CPU)")
        if zo:
            if train.optimizer != "zo-sgd":
                raise ConfigError("train.optimizer", train.optimizer,
                                  reason=f"plan.zo.mode={self.zo_mode} trains with forward passes only",
                                  fix="set train.optimizer=zo-sgd, or plan.zo.mode=none")
            for key, val, ok in (("plan.zero_stage", self.zero_stage, 0), ("plan.tp", self.tp, 1),
                                 ("plan.ep", self.ep, 1), ("plan.dp", self.dp, 1),
                                 ("plan.offload_optimizer", self.offload_optimizer, "none"),
                                 ("plan.offload_params", self.offload_params, "none")):
                if val != ok:
                    raise ConfigError(key, val, reason="a zeroth-order plan keeps no gradients or optimizer state",
                                      fix=f"set {key}={ok}" + ("; use plan.zo.dp for data parallelism"
                                                               if key == "plan.dp" else ""))
            if self.zo_pertp not in (1, 2):
                raise ConfigError("plan.zo.pertp", self.zo_pertp, allowed=(1, 2))
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
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("plan.zero_stage", self.zero_stage, allowed=(0, 1, 2, 3))
        if self.zero_stage == 3 and model.num_experts:
            raise ConfigError("plan.zero_stage", 3, reason="DeepSpeed does not run MoE models under ZeRO-3 "
                              f"(model.num_experts={model.num_experts})",
                              fix="set plan.zero_stage to 0, 1 or 2 (expert optimizer states are still sharded "
                                  "over the expert-data-parallel ranks), or plan.ep>1 to split the experts")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ConfigError("plan.offload_params", self.offload_params, reason="needs plan.zero_stage=3",
                              fix="set plan.zero_stage=3, or plan.offload_params=none")
        if self.offload_optimizer != "none":
            if self.zero_stage == 0:
                raise ConfigError("plan.offload_optimizer", self.offload_optimizer, reason="needs plan.zero_stage>=1",
                                  fix="set plan.zero_stage=2 (ZeRO-Offload), or plan.offload_optimizer=none")
            if train.optimizer != "adamw":
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
    """Resolve a fixed plan section (defaults for unset fields) into a checked Plan."""
    if pc.auto:
        raise ConfigError("plan", "auto", reason="the planner chooses this plan",
                          fix="run `meshpilot plan JOB` first, or give the degrees")
    t, c = job.train, job.cluster
    zo_mode = pc.zo.mode or ("mezo" if t.optimizer == "zo-sgd" else "none")
    tp = pc.tp or 1
    if zo_mode != "none":
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
                offload_optimizer=pc.offload_optimizer or "none", offload_params=pc.offload_params or "none",
                micro_batch=mb, grad_accum=accum, activation_checkpointing=pc.activation_checkpointing or "none",
                sequence_parallel=bool(pc.sequence_parallel), zo_mode=zo_mode, zo_pertp=pertp, zo_dp=zo_dp)
    plan.check(job.model, t, c)
    return plan


def resolve_plan(job: JobConfig) -> Plan:
    """The job's fixed plan, checked against its model, training settings and cluster."""
    return plan_from_config(job.plan, job)
