"""The training worker: one process per GPU (or CPU worker), started by every launcher.

:func:`run_worker` runs one rank of a plan: it checks everything a user can get wrong
(plan, data file, checkpoint to resume) before allocating anything, initialises
torch.distributed (nccl on GPU, gloo on CPU with DeepSpeed's CPU accelerator), builds the
plan's process groups, the model (under ``deepspeed.zero.Init`` for stage 3) and the
DeepSpeed engine, then trains ``train.steps`` optimizer steps:

    for step s: lr = warmup_cosine(s); for each of grad_accum micro-batches of this dp rank:
    loss = engine(input_ids, labels); engine.backward(loss); engine.step()

(DeepSpeed averages gradients over dp at the accumulation boundary and steps the
optimizer there). Checkpoints every ``train.checkpoint_every`` steps, at the end, and when a
stop is requested (SIGUSR2/SIGTERM or ``stop_event``); resumes at the exact step, data
position and RNG state from ``RUN_DIR/checkpoints/latest`` when it exists.

Command line (Slurm, Kubernetes, MPI, torchrun)::

    python -m meshpilot.orchestrator.worker --job resolved_job.yaml --run-dir DIR [--resume PATH]

reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, or SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, or OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from meshpilot.orchestrator.train.checkpoint import CheckpointManager, find_checkpoint, read_meta
from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.train.data import BatchLayout, ShardedBatches, resolve_source
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.sim.flops import mfu, model_flops_per_token
from meshpilot.orchestrator.train.metrics import MetricsLogger, StepRecord, memory_stats
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.train.preemption import StopRequest
from meshpilot.orchestrator.train.schedule import lr_at

log = logging.getLogger(__name__)

ModelFactory = Callable[[JobConfig, Plan, Any], nn.Module]
StepHook = Callable[[dict[str, Any]], None]


# --- checks before any resource is allocated ----------------------------------------------------

def preflight(job: JobConfig, plan: Plan, *, world_size: int, run_dir: str | Path,
              resume: str | Path | None | bool = "auto", rank: int = 0) -> tuple[Path, str] | None:
    """Every user mistake as a ConfigError; returns the checkpoint (root, tag) to resume from, or None."""
    plan.check(job.model, job.train, job.cluster)
    if world_size != plan.world_size:
        raise ConfigError("plan", plan.to_config(), reason=f"needs {plan.world_size} ranks, the launcher started "
                          f"{world_size}", fix="start one process per rank of the plan (WORLD_SIZE)")
    resolve_source(job.train.data, vocab=job.model.vocab, seq_len=job.train.seq_len, seed=job.train.seed)
    if resume is False or resume is None:
        return None
    if resume == "auto":
        root = Path(run_dir) / "checkpoints"
        found = find_checkpoint(root) if root.is_dir() else None
    else:
        found = find_checkpoint(resume)
    if found is not None:
        root, tag = found
        meta = read_meta(root / tag)
        CheckpointManager(root, job, plan, rank=rank, world_size=world_size).check_compatible(meta, root / tag)
    return found


# --- distributed setup -------------------------------------------------------------------------

def _use_cpu(job: JobConfig) -> bool:
    return job.cluster.accelerator == "cpu" or not torch.cuda.is_available()


def _init_distributed(*, rank: int, world_size: int, master_addr: str, master_port: int, on_cpu: bool,
                      timeout_s: float, local_rank: int = 0) -> bool:
    """Initialise the default process group; False if the caller had already done it.

    On GPU the group is bound to this rank's device (``device_id``) as
    ``deepspeed.init_distributed`` binds it for a plain DeepSpeed script (the direct loop of
    benchmarks/train_bench.py): eager NCCL initialisation, and torch may then create later
    groups by splitting the default communicator. Unbound, the worker's NCCL setup differed
    from that loop's; the effect on step time is not measured (GPU only).
    """
    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not {rank} of {world_size}")
        return False
    backend = "gloo" if on_cpu else "nccl"
    kwargs: dict[str, Any] = {}
    if not on_cpu:
        device = _device(on_cpu, local_rank)
        torch.cuda.set_device(device)
        if world_size > 1 and _can_bind_device():
            kwargs["device_id"] = device
    # env:// (MASTER_ADDR/PORT set by run_worker): under torchrun it joins the agent's store
    # (TORCHELASTIC_USE_AGENT_STORE) instead of opening a second server on MASTER_PORT
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    log.info("rank %d: torch.distributed %s initialised (%d ranks, master %s:%d)", rank, backend, world_size,
             master_addr, master_port)
    return True


def _can_bind_device() -> bool:
    """Whether init_process_group takes ``device_id`` safely (DeepSpeed's rule: torch >= 2.3,
    not 2.6.0 < torch < 2.7.1, where binding hangs: pytorch/pytorch#153960)."""
    import inspect

    from torch.torch_version import TorchVersion
    if "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return False
    v = TorchVersion(torch.__version__.split("+")[0])
    return not ("2.6.0" < v < "2.7.1")


def _device(on_cpu: bool, local_rank: int) -> torch.device:
    """cpu, or cuda:local_rank (cuda:0 when one GPU is visible, e.g. Ray's per-actor CUDA_VISIBLE_DEVICES)."""
    if on_cpu:
        return torch.device("cpu")
    return torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local_rank)


def _seed_everything(seed: int, rank: int) -> None:
    import random
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def _default_model_factory(job: JobConfig, plan: Plan, groups: Any) -> nn.Module:
    """The built-in transformer, built on the default device (the GPU for ZeRO 0-2, see
    :func:`_build_device`; the CPU otherwise) in fp32; DeepSpeed casts and places it."""
    from meshpilot.strategies.model import build_model
    return build_model(job.model, plan, groups, seed=job.train.seed, dtype=torch.float32,
                       device=torch.get_default_device())


def _build_device(device: torch.device, plan: Plan) -> Any:
    """Context for building the built-in model: ``torch.device(gpu)`` for ZeRO stages 0-2 on a
    GPU (weights drawn and created on the GPU, no host round trip); a no-op on the CPU and for
    stage 3, whose ``zero.Init`` partitions each parameter as it is created."""
    if device.type == "cuda" and plan.zero_stage < 3:
        return torch.device(device)
    return contextlib.nullcontext()


def train_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# --- the worker ----------------------------------------------------------------------------------

def run_worker(job: JobConfig, plan: Plan, *, rank: int, world_size: int, local_rank: int, master_addr: str,
               master_port: int, run_dir: str | Path, on_step: StepHook | None = None,
               stop_event: threading.Event | None = None, model_factory: ModelFactory | None = None,
               resume: str | Path | bool | None = "auto", dist_timeout_s: float = 300.0,
               log_every: int = 1, tensorboard: bool = True, save_final: bool = True) -> dict[str, Any]:
    """Train ``plan`` as ``rank`` of ``world_size``; returns this rank's final metrics.

    ``model_factory(job, plan, groups) -> nn.Module`` replaces the built-in transformer (e.g. a
    user's Hugging Face model: data parallel + ZeRO only, its ``forward(input_ids, labels)``
    must return the mean loss). ``save_final=False`` skips the checkpoint after the last step
    (benchmarks). ``resume``: "auto" (continue from RUN_DIR/checkpoints/latest
    if present), a checkpoint path, or False. ``on_step`` gets every step's record on every
    rank. Returns ``{"status": "completed"|"stopped", "step", "start_step", "losses",
    "final_loss", "param_checksum", "tokens_per_s", "mfu", "peak_memory", "checkpoint"}``.
    """
    run_dir = Path(run_dir)
    resume_from = preflight(job, plan, world_size=world_size, run_dir=run_dir, resume=resume, rank=rank)
    on_cpu = _use_cpu(job)
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed reads these from the environment (Slurm/MPI launches set other names)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port))
    owns_pg = _init_distributed(rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
                                on_cpu=on_cpu, timeout_s=dist_timeout_s, local_rank=local_rank)
    if plan.zeroth_order:
        from meshpilot.orchestrator.train.zo_worker import train_zeroth_order
        device = _device(on_cpu, local_rank)
        try:
            return train_zeroth_order(job, plan, rank=rank, world_size=world_size, device=device, run_dir=run_dir,
                                      resume_from=resume_from, on_step=on_step, stop_event=stop_event,
                                      model_factory=model_factory, tensorboard=tensorboard, log_every=log_every,
                                      save_final=save_final)
        finally:
            if owns_pg and dist.is_initialized():
                dist.destroy_process_group()
    stop = StopRequest(rank, stop_event).install()
    try:
        return _train(job, plan, rank=rank, world_size=world_size, local_rank=local_rank, run_dir=run_dir,
                      on_cpu=on_cpu, on_step=on_step, stop=stop, model_factory=model_factory,
                      resume_from=resume_from, log_every=log_every, tensorboard=tensorboard, save_final=save_final)
    finally:
        stop.uninstall()
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()


def _train(job: JobConfig, plan: Plan, *, rank: int, world_size: int, local_rank: int, run_dir: Path,
           on_cpu: bool, on_step: StepHook | None, stop: StopRequest, model_factory: ModelFactory | None,
           resume_from: tuple[Path, str] | None, log_every: int, tensorboard: bool,
           save_final: bool = True) -> dict[str, Any]:
    phases = _Phases()
    import deepspeed  # after DS_ACCELERATOR is set

    from meshpilot.comm.groups import build_process_groups
    from meshpilot.strategies.deepspeed_config import deepspeed_config
    from meshpilot.strategies.zero import construction_context, initialize_engine

    t = job.train
    device = _device(on_cpu, local_rank)
    if not on_cpu:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", dist_init_required=False)
    groups = build_process_groups(plan.layout(job.cluster.gpus_per_node))
    phases.mark("deepspeed import + process groups")
    _seed_everything(t.seed, rank)

    ds_config = deepspeed_config(job, plan, on_cpu=on_cpu)
    if plan.offload_optimizer != "none" and torch.get_num_threads() == 1 and (os.cpu_count() or 1) > 1:
        log.warning("rank %d: optimizer offload with 1 OpenMP thread: DeepSpeed's CPU Adam will use one core of "
                    "%d (torchrun sets OMP_NUM_THREADS=1 when unset); set OMP_NUM_THREADS to the cores per rank",
                    rank, os.cpu_count() or 1)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1, default=str) + "\n")
    factory = model_factory or _default_model_factory
    if model_factory is None:
        # import the model's classes before zero.Init: classes first defined inside Init keep its
        # partitioning __init__ wrapper after Init exits (a later non-stage-3 model would be partitioned)
        import meshpilot.strategies.model  # noqa: F401
    build_ctx = _build_device(device, plan) if model_factory is None else contextlib.nullcontext()
    with construction_context(job, plan, groups, ds_config, dtype=train_dtype(t.precision)), build_ctx:
        model = factory(job, plan, groups)
    phases.mark("model build")
    if plan.zero_stage != 3 and any(hasattr(p, "ds_id") for p in model.parameters()):
        raise RuntimeError(f"rank {rank}: the model was built with ZeRO-3 partitioned parameters although "
                           f"plan.zero_stage={plan.zero_stage}: an earlier ZeRO-3 engine in this process left "
                           "DeepSpeed's zero.Init patches on the model classes; run each plan in a fresh process")
    engine = initialize_engine(model, job, plan, groups, ds_config=ds_config)
    phases.mark("DeepSpeed engine")

    ckpt = CheckpointManager(run_dir / "checkpoints", job, plan, rank=rank, world_size=world_size)
    start_step = 0
    if resume_from is not None:
        meta = ckpt.load(engine, *resume_from)
        start_step = meta.step
    source = resolve_source(t.data, vocab=job.model.vocab, seq_len=t.seq_len, seed=t.seed)
    batches = ShardedBatches(source, BatchLayout(global_batch=t.global_batch, micro_batch=plan.micro_batch,
                                                 grad_accum=plan.grad_accum, dp=plan.dp, dp_rank=groups.dp_rank),
                             seed=t.seed)
    phases.mark("checkpoint + data")
    metrics = MetricsLogger(run_dir, rank=rank, tensorboard=tensorboard, log_every=log_every)
    tokens_per_step = t.global_batch * t.seq_len
    losses: list[float] = []
    rec: StepRecord | None = None
    status, last_ckpt = "completed", None
    step = start_step
    if rank == 0:
        log.info("rank 0: start-up after the process group: %s", phases)
        log.info("rank 0: training %s from step %d to %d (%d tokens/step, %.3g model FLOPs/token)",
                 " ".join(f"{k}={v}" for k, v in asdict(plan).items()), start_step, t.steps, tokens_per_step,
                 model_flops_per_token(job.model, t.seq_len, zeroth_order=False))
    try:
        while step < t.steps:
            lr = lr_at(step, lr=t.lr, warmup=t.warmup_steps, total=t.steps)
            for g in engine.optimizer.param_groups:
                g["lr"] = lr
            _sync(device)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for input_ids, labels in batches.step_batches(step):
                loss = engine(torch.from_numpy(input_ids).to(device), torch.from_numpy(labels).to(device))
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().to(torch.float64)
            # one all-reduce per step for the logged loss and the stop decision: the world sum of the
            # ranks' losses / world = the mean over dp replicas (tp ranks of a replica hold equal losses)
            # (nothing else per step gathers or reads parameters: the checksum is taken once after the
            # loop; tests/test_train_step_counts.py holds the per-step work equal to a plain DeepSpeed loop's)
            red = torch.stack([loss_sum / plan.grad_accum, torch.full_like(loss_sum, 1.0 if stop.local else 0.0)])
            dist.all_reduce(red)
            loss_total, stop_total = red.tolist()          # the step's one device-to-host read
            loss_val, stopping = loss_total / world_size, stop_total > 0
            _sync(device)
            dt = time.perf_counter() - t0
            step += 1
            losses.append(loss_val)
            mem = _gather_memory(rank, device, world_size) if (step % log_every == 0 or step == t.steps) else []
            gn = engine.get_global_grad_norm()
            rec = StepRecord(step=step, loss=loss_val, lr=lr, step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                             mfu=mfu(job, tokens_per_step / dt, world_size, zeroth_order=False),
                             grad_norm=None if gn is None else float(gn), memory=mem)
            metrics.write(rec)
            if on_step is not None:
                on_step(asdict(rec))
            periodic = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
            if stopping or periodic or (step == t.steps and save_final and t.checkpoint_final):
                last_ckpt = ckpt.save(engine, step=step,
                                      consumed_samples=ShardedBatches.consumed_samples(step, t.global_batch))
            if stopping:
                status = "stopped"
                log.warning("rank %d: stopped at step %d on request; checkpoint %s", rank, step, last_ckpt)
                break
        checksum = param_checksum(engine, plan)
    finally:
        metrics.close()
    return {"status": status, "rank": rank, "start_step": start_step, "step": step, "losses": losses,
            "final_loss": losses[-1] if losses else None, "param_checksum": checksum,
            "tokens_per_s": rec.tokens_per_s if rec else None, "mfu": rec.mfu if rec else None,
            "step_time_s": rec.step_time_s if rec else None,
            "peak_memory": rec.memory if rec else [], "checkpoint": str(last_ckpt) if last_ckpt else None,
            "startup_phases_s": phases.seconds}


class _Phases:
    """Wall time of consecutive start-up phases (seconds, in order), for the log and the result."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather_memory(rank: int, device: torch.device, world_size: int) -> list[dict[str, Any]]:
    mine = asdict(memory_stats(rank, device))
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, mine)
    return out


def param_checksum(engine: Any, plan: Plan) -> float:
    """Sum of every element of the full (unsharded) model's parameters, in float64 (collective).

    ZeRO-3 shards are gathered; tensor- and expert-parallel shards are reassembled by the
    built-in model's ``full_state_dict``, so the value does not depend on the plan. For other
    models (no ``full_state_dict``): the local parameters' sum (no tensor parallelism there).
    """
    import deepspeed
    module = engine.module
    params = list(module.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    if zero3 and plan.tp == 1 and plan.ep == 1:        # one parameter at a time: never the whole model on one device
        total = 0.0
        for p in params:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                total += float(p.detach().double().sum().item())
        return total
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else _null()
    with ctx:
        if hasattr(module, "full_state_dict"):
            tensors = list(module.full_state_dict().values())
        else:
            tensors = [p.detach() for p in params]
        return float(sum(x.double().sum().item() for x in tensors))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


# --- command line ----------------------------------------------------------------------------------

def env_rank_info(env: dict[str, str] | None = None) -> dict[str, Any]:
    """rank, world_size, local_rank, master_addr, master_port from torchrun, Slurm or Open MPI variables."""
    e = dict(os.environ if env is None else env)
    for r, w, lr in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
                     ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")):
        if r in e and w in e:
            rank, world = int(e[r]), int(e[w])
            local = int(e.get(lr, rank))
            break
    else:
        raise ConfigError("environment", reason="no rank variables: set RANK/WORLD_SIZE/LOCAL_RANK (torchrun), "
                          "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun) or OMPI_COMM_WORLD_* (mpirun)")
    if "MASTER_ADDR" not in e or "MASTER_PORT" not in e:
        raise ConfigError("environment", reason="MASTER_ADDR and MASTER_PORT must be set",
                          fix="export MASTER_ADDR=<host of rank 0> MASTER_PORT=<free port>")
    return dict(rank=rank, world_size=world, local_rank=local, master_addr=e["MASTER_ADDR"],
                master_port=int(e["MASTER_PORT"]))


def _configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import resolve_plan

    p = argparse.ArgumentParser(prog="python -m meshpilot.orchestrator.worker", description="one training rank")
    p.add_argument("--job", required=True, help="resolved job YAML (meshpilot writes resolved_job.yaml)")
    p.add_argument("--run-dir", required=True, help="run directory (checkpoints, metrics.jsonl, tensorboard/)")
    p.add_argument("--resume", default="auto", help="'auto' (RUN_DIR/checkpoints if present), 'none', or a path")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        info = env_rank_info()
        _configure_logging(info["rank"])
        job = load_job(args.job, args.overrides)
        plan = resolve_plan(job)
        resume: Any = False if args.resume == "none" else args.resume
        result = run_worker(job, plan, run_dir=args.run_dir, resume=resume, log_every=args.log_every, **info)
    except ConfigError as e:
        print(f"meshpilot worker: error: {e}", file=sys.stderr)
        return 2
    if info["rank"] == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    return 0 if result["status"] in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
