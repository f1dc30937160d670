"""The backpropagation engine: the plan's model in a DeepSpeed engine (ZeRO 0-3, offload, tensor
and expert parallelism through the plan's process groups).

One step, for this rank's ``grad_accum`` micro-batches (x_m, y_m)::

    for m: loss_m = engine(x_m, y_m); engine.backward(loss_m); engine.step()
    [sum_m loss_m / grad_accum, stop flag]  all-reduced (SUM) over the world

DeepSpeed averages the gradients over dp at the accumulation boundary (all-reduce, or
reduce-scatter under ZeRO 2/3, over the plan's dp group; expert gradients over edp) and steps
the optimizer there. The one extra all-reduce (2 elements) carries the logged loss, the world
sum over ranks divided by the world size (tp ranks of a replica hold equal losses, so this is
the mean over dp replicas), and the stop decision. Nothing else per step gathers or reads
parameters: tests/test_train_step_counts.py holds the per-step work equal to a plain DeepSpeed
loop's.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from meshpilot.comm.groups import ProcessGroups
from meshpilot.orchestrator.config.schema import Implementation, JobConfig
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.train.checkpoint import CheckpointManager, CheckpointMeta
from meshpilot.orchestrator.train.engine import (MicroBatches, ModelFactory, RunContext, StartupPhases, StepOutcome,
                                                 train_dtype)

log = logging.getLogger(__name__)
# records of this logger also reach the controller's console (meshpilot.launch.actor.CONSOLE_LOGGER)
console = logging.getLogger("meshpilot.console")


class DeepSpeedTrainEngine:
    """:class:`~meshpilot.orchestrator.train.engine.TrainEngine` over a DeepSpeed engine."""

    def __init__(self, engine: Any, plan: Plan, groups: ProcessGroups, *, device: torch.device, world_size: int):
        self.engine, self.plan, self.groups = engine, plan, groups
        self.device, self.world_size = device, world_size
        self.data_rank = groups.dp_rank
        self._lr = 0.0

    def set_lr(self, lr: float) -> None:
        self._lr = lr
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, micro_batches: MicroBatches, stop_local: bool) -> StepOutcome:
        engine, device = self.engine, self.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for input_ids, labels in micro_batches:
            loss = engine(torch.from_numpy(input_ids).to(device), torch.from_numpy(labels).to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().to(torch.float64)
        red = torch.stack([loss_sum / self.plan.grad_accum, torch.full_like(loss_sum, 1.0 if stop_local else 0.0)])
        dist.all_reduce(red)
        loss_total, stop_total = red.tolist()          # the step's one device-to-host read
        return StepOutcome(loss=loss_total / self.world_size, lr=self._lr, stop=stop_total > 0)

    def grad_norm(self) -> float | None:
        gn = self.engine.get_global_grad_norm()
        return None if gn is None else float(gn)

    def save(self, ckpt: CheckpointManager, *, step: int, consumed_samples: int) -> Path:
        return ckpt.save(self.engine, step=step, consumed_samples=consumed_samples)

    def load(self, ckpt: CheckpointManager, root: Path, tag: str) -> CheckpointMeta:
        return ckpt.load(self.engine, root, tag)

    def param_checksum(self) -> float:
        return param_checksum(self.engine, self.plan)

    def full_weights(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """Every parameter as the full fp32 tensor on rank 0 (None elsewhere) and which copy it is
        (collective; :func:`meshpilot.orchestrator.train.export.gather_deepspeed_weights`)."""
        from meshpilot.orchestrator.train.export import gather_deepspeed_weights
        return gather_deepspeed_weights(self.engine, rank=dist.get_rank())

    def results(self) -> dict[str, Any]:
        return {}


def build_deepspeed_engine(ctx: RunContext, model_factory: ModelFactory | None,
                           phases: StartupPhases) -> DeepSpeedTrainEngine:
    """Process groups, the model (under ``deepspeed.zero.Init`` for stage 3) and the DeepSpeed
    engine for ``ctx.plan`` on an initialised default process group (collective)."""
    import deepspeed  # after DS_ACCELERATOR is set

    from meshpilot.comm.groups import build_process_groups
    from meshpilot.strategies.deepspeed_config import deepspeed_config
    from meshpilot.strategies.zero import construction_context, initialize_engine

    job, plan, rank, device, t = ctx.job, ctx.plan, ctx.rank, ctx.device, ctx.job.train
    if not ctx.on_cpu:
        torch.cuda.set_device(device)
    with announce_op_builds(["ShareMemCommBuilder"] if deepspeed.comm.comm.cdb is None else [], rank=rank):
        deepspeed.init_distributed(dist_backend="gloo" if ctx.on_cpu else "nccl", dist_init_required=False)
    groups = build_process_groups(plan.layout(job.cluster.gpus_per_node))
    phases.mark("deepspeed import + process groups")
    _seed_everything(t.seed, rank)

    ds_config = deepspeed_config(job, plan, on_cpu=ctx.on_cpu)
    if plan.offloads_optimizer and torch.get_num_threads() == 1 and (os.cpu_count() or 1) > 1:
        log.warning("rank %d: optimizer offload with 1 OpenMP thread: DeepSpeed's CPU Adam will use one core of "
                    "%d (torchrun sets OMP_NUM_THREADS=1 when unset); set OMP_NUM_THREADS to the cores per rank",
                    rank, os.cpu_count() or 1)
    if rank == 0:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1, default=str) + "\n")
    if model_factory is None and job.model.implementation == Implementation.HF:
        from meshpilot.strategies.hf_adapter import hf_model_factory
        # transformers' model class (model.implementation: hf), built in the dtype of build_dtype's rule
        model_factory = functools.partial(hf_model_factory, dtype=build_dtype(job, plan))
        build_ctx = _build_device(device, plan)
    else:
        build_ctx = _build_device(device, plan) if model_factory is None else contextlib.nullcontext()
    factory = model_factory or _default_model_factory
    if model_factory is None:
        # import the model's classes before zero.Init: classes first defined inside Init keep its
        # partitioning __init__ wrapper after Init exits (a later non-stage-3 model would be partitioned)
        import meshpilot.strategies.model  # noqa: F401
    with construction_context(job, plan, groups, ds_config, dtype=train_dtype(t.precision)), build_ctx:
        model = factory(job, plan, groups)
    phases.mark("model build")
    if plan.zero_stage != 3 and any(hasattr(p, "ds_id") for p in model.parameters()):
        raise RuntimeError(f"rank {rank}: the model was built with ZeRO-3 partitioned parameters although "
                           f"plan.zero_stage={plan.zero_stage}: an earlier ZeRO-3 engine in this process left "
                           "DeepSpeed's zero.Init patches on the model classes; run each plan in a fresh process")
    with announce_op_builds([b for b in [optimizer_op_builder(ds_config)] if b], rank=rank):
        engine = initialize_engine(model, job, plan, groups, ds_config=ds_config)
    phases.mark("DeepSpeed engine")
    return DeepSpeedTrainEngine(engine, plan, groups, device=device, world_size=ctx.world_size)


# --- DeepSpeed's JIT-compiled ops: a notice before a build that is not cached ---------------------

def optimizer_op_builder(ds_config: dict[str, Any]) -> str | None:
    """The op builder DeepSpeed's engine loads for the config's optimizer (its rule in
    ``DeepSpeedEngine.get_optimizer_configuration``): none for ``torch_adam``, CPU Adam for an
    offloaded optimizer, else FusedAdam; None for other optimizers."""
    opt = ds_config.get("optimizer") or {}
    if str(opt.get("type", "")).lower() not in ("adam", "adamw") or (opt.get("params") or {}).get("torch_adam"):
        return None
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    return "CPUAdamBuilder" if offload in ("cpu", "nvme") else "FusedAdamBuilder"


def jit_build_pending(builder: Any) -> str | None:
    """Why loading DeepSpeed's op ``builder`` will compile it now, or None when it will not.

    ``OpBuilder.load`` (deepspeed/ops/op_builder/builder.py) returns an op already loaded in
    this process (``OpBuilder._loaded_ops``) or one installed prebuilt (``installed_ops`` of
    ``deepspeed.git_version_info``, for the same accelerator); otherwise ``jit_load`` runs
    ``torch.utils.cpp_extension.load`` in the op's build directory (TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions/<python>_<accelerator>/<name>), where ninja compiles unless
    ``<name>.so`` is there, built from these sources (build.ninja names them: another DeepSpeed
    install sharing the folder makes ninja rebuild) and newer than them."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils.cpp_extension import _get_build_directory

    if builder.name in OpBuilder._loaded_ops:
        return None
    if installed_ops.get(builder.name, False) and accelerator_name == get_accelerator()._name:
        return None
    folder = Path(_get_build_directory(builder.name, verbose=False))
    lib = folder / f"{builder.name}.so"
    if not lib.is_file():
        return f"not built yet in {folder}"
    ninja = folder / "build.ninja"
    sources = [os.path.abspath(builder.deepspeed_src_path(p)) for p in builder.sources()]
    if not ninja.is_file() or not all(src in ninja.read_text() for src in sources):
        return f"{folder} holds a build from another DeepSpeed install"
    if max(os.path.getmtime(src) for src in sources) > lib.stat().st_mtime:
        return f"its sources are newer than {lib}"
    return None


@contextlib.contextmanager
def announce_op_builds(builder_names: list[str], *, rank: int) -> Iterator[None]:
    """Around a DeepSpeed call that loads these ops (``create_op_builder`` class names): rank 0
    logs, to the console logger, each op that will be compiled first and how long the call took
    after. A check that fails says nothing (it must never stop training)."""
    pending: list[str] = []
    if rank == 0 and builder_names:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops import __compatible_ops__ as compatible
        for cls in builder_names:
            try:
                b = get_accelerator().create_op_builder(cls)
                # an op this machine cannot build (or the accelerator's "not implemented" stand-in) is not built
                why = jit_build_pending(b) if b is not None and compatible.get(b.NAME, False) else None
            except Exception as e:
                log.debug("rank 0: cannot tell whether DeepSpeed op %s is built: %s", cls, e)
                continue
            if why:
                pending.append(b.name)
                console.info("building DeepSpeed op %s (first use; cached afterwards): %s; this can take minutes",
                             b.name, why)
    t0 = time.perf_counter()
    yield
    if pending:
        console.info("built DeepSpeed op%s %s in %.1f s", "s" if len(pending) > 1 else "", ", ".join(pending),
                     time.perf_counter() - t0)


def _seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def build_dtype(job: JobConfig, plan: Plan) -> torch.dtype:
    """The dtype a model is built in: fp32 at ZeRO 0-2, where DeepSpeed casts and places it; the
    training dtype at ZeRO-3. There DeepSpeed takes the dtype of its 16-bit partitions from the
    parameters as built (``DeepSpeedZeroOptimizer_Stage3.dtype``): with parameter offload a fp32 build
    made the host copies fp32, every gathered parameter was fp32 and the forward and backward ran in
    fp32 (measured: llama-2-7b with 8 layers, mb 4, ZeRO-3 + parameter offload on 2 x H200, saved
    activations 1.9x those without offload and a 4.6 s step against 0.33 s;
    benchmarks/results/2026-11-30-s4-h200x2/trace)."""
    return train_dtype(job.train.precision) if plan.zero_stage == 3 else torch.float32


def _default_model_factory(job: JobConfig, plan: Plan, groups: Any) -> nn.Module:
    """The built-in transformer, built on the default device (the GPU for ZeRO 0-2, see
    :func:`_build_device`; the CPU otherwise) in :func:`build_dtype`."""
    from meshpilot.strategies.model import build_model
    return build_model(job.model, plan, groups, seed=job.train.seed, dtype=build_dtype(job, plan),
                       device=torch.get_default_device())


def _build_device(device: torch.device, plan: Plan) -> Any:
    """Context for building the built-in model: ``torch.device(gpu)`` for ZeRO stages 0-2 on a
    GPU (weights drawn and created on the GPU, no host round trip); a no-op on the CPU and for
    stage 3, whose ``zero.Init`` partitions each parameter as it is created."""
    if device.type == "cuda" and plan.zero_stage < 3:
        return torch.device(device)
    return contextlib.nullcontext()


def param_checksum(engine: Any, plan: Plan) -> float:
    """Sum of every element of the full (unsharded) model's parameters, in float64 (collective).

    ZeRO-3 shards are gathered; tensor- and expert-parallel shards are reassembled by the
    built-in model's ``full_state_dict``, so the value does not depend on the plan. For other
    models (no ``full_state_dict``): the local parameters' sum (no tensor parallelism there).
    """
    import deepspeed

    from meshpilot.strategies.checksum import tensor_sum64
    module = engine.module
    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    if zero3 and plan.tp == 1 and plan.ep == 1:        # one parameter at a time: never the whole model on one device
        total = 0.0
        for p in params:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                total += tensor_sum64(p)
        return total
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    with ctx:          # one tensor at a time: the checksum must not raise the peak the run measured
        if hasattr(module, "full_sum"):
            return module.full_sum()
        return float(sum(tensor_sum64(p) for p in params))
