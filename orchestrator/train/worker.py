"""The training worker: one process per GPU (or CPU worker), started by every launcher.

:func:`run_worker` runs one rank of a plan: it checks everything a user can get wrong
(plan, data file, checkpoint to resume) before allocating anything, initialises
torch.distributed (nccl on GPU, gloo on CPU with DeepSpeed's CPU accelerator), starts the
device-memory peak sampler (:mod:`.memory_peaks`), builds the plan's engine (:mod:`.engine_deepspeed`
for backpropagation, :mod:`.engine_zo` for zeroth-order plans) and runs the training loop
(:mod:`.loop`) for ``train.steps`` optimizer steps. Checkpoints every ``train.checkpoint_every``
steps, at the end, and when a stop is requested (SIGUSR2/SIGTERM or ``stop_event``); resumes at
the exact step, data position and RNG state from ``RUN_DIR/checkpoints/latest`` when it exists.

Command line (Slurm, Kubernetes, MPI, torchrun)::

    python -m meshpilot.orchestrator.worker --job RUN_DIR/job.yaml --run-dir RUN_DIR [--resume PATH]

reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, or SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, or OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from meshpilot.orchestrator.config.schema import JobConfig
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.train.checkpoint import CheckpointManager, find_checkpoint, read_meta
from meshpilot.orchestrator.train.cuda_allocator import configure_allocator
from meshpilot.orchestrator.train.data import resolve_job_source
from meshpilot.orchestrator.train.engine import ModelFactory, RunContext, StartupPhases, StepHook
from meshpilot.orchestrator.train.engine_deepspeed import build_deepspeed_engine
from meshpilot.orchestrator.train.engine_zo import build_zo_engine
from meshpilot.orchestrator.train.loop import train
from meshpilot.orchestrator.train import memory_history
from meshpilot.orchestrator.train.memory_peaks import PeakSampler, host_memory_gib, memory_peaks_gib
from meshpilot.orchestrator.train.metrics import PhaseTimer
from meshpilot.orchestrator.train.preemption import StopRequest

log = logging.getLogger(__name__)


# --- checks before any resource is allocated ----------------------------------------------------

def preflight(job: JobConfig, plan: Plan, *, world_size: int, run_dir: str | Path,
              resume: str | Path | None | bool = "auto", rank: int = 0) -> tuple[Path, str] | None:
    """Every user mistake as a ConfigError; returns the checkpoint (root, tag) to resume from, or None."""
    plan.check(job.model, job.train, job.cluster)
    if world_size != plan.world_size:
        raise ConfigError("plan", plan.to_config(), reason=f"needs {plan.world_size} ranks, the launcher started "
                          f"{world_size}", fix="start one process per rank of the plan (WORLD_SIZE)")
    resolve_job_source(job)                              # a dataset: its prepared cache, never tokenized here
    if job.train.eval_every > 0:
        resolve_job_source(job, split="eval")
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
    "final_loss", "param_checksum", "tokens_per_s", "mfu", "peak_memory", "checkpoint",
    "memory_peaks_gib", ...}`` (see :func:`.loop.train`); ``memory_peaks_gib`` holds this rank's
    ``nvml`` (sampled through the run), ``allocated`` and ``reserved`` (torch) and ``host_rss``
    peaks in GiB, each None where its source is unavailable; ``host_memory_gib`` the host peaks (the
    process's RssAnon + RssShmem, the node's MemTotal - MemAvailable, each with its value at the
    start: :func:`.memory_peaks.host_memory_gib`); ``step_times_s`` every step's wall time
    (seconds, in order) and ``phases_s`` the median forward/backward/optimizer seconds per step
    (:class:`~meshpilot.orchestrator.train.metrics.PhaseTimer`; None for zeroth-order engines).
    """
    run_dir = Path(run_dir)
    step_times: list[float] = []
    user_on_step = on_step

    step_ends_us: list[float] = []

    def on_step(record: dict[str, Any]) -> None:        # noqa: F811 (wraps the caller's hook)
        step_times.append(float(record["step_time_s"]))
        step_ends_us.append(memory_history.now_us())
        if user_on_step is not None:
            user_on_step(record)
    resume_from = preflight(job, plan, world_size=world_size, run_dir=run_dir, resume=resume, rank=rank)
    on_cpu = _use_cpu(job)
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed reads these from the environment (Slurm/MPI launches set other names)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port))
    if not on_cpu:                                  # before the first CUDA allocation (the process group's)
        configure_allocator(job.train.expandable_segments, max_split_size_mb=job.train.max_split_size_mb)
    owns_pg = _init_distributed(rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
                                on_cpu=on_cpu, timeout_s=dist_timeout_s, local_rank=local_rank)
    ctx = RunContext(job=job, plan=plan, rank=rank, world_size=world_size, device=_device(on_cpu, local_rank),
                     run_dir=run_dir, resume_from=resume_from, on_step=on_step, log_every=log_every,
                     tensorboard=tensorboard, save_final=save_final)
    stop = StopRequest(rank, stop_event).install()
    sampler = PeakSampler.for_rank(ctx.device).start()     # NVML, this process's and the node's host memory
    recording = job.train.memory_history and memory_history.start(ctx.device)
    try:
        phases = StartupPhases()
        build = build_zo_engine if plan.zeroth_order else build_deepspeed_engine
        engine = build(ctx, model_factory, phases)
        timer = None if plan.zeroth_order else PhaseTimer(plan.grad_accum, ctx.device).attach(engine.engine)
        result = train(ctx, engine, stop, phases)
        result["phases_s"] = None if timer is None else timer.medians()
        result["step_times_s"] = step_times
    finally:
        nvml_peak = sampler.stop()
        if recording:
            try:            # a diagnosis must not replace the run's own error (this is the finally of a failed run too)
                memory_history.write(ctx.device, run_dir, rank, step_ends_us)
            except Exception as e:      # noqa: BLE001
                log.warning("rank %d: allocator history not written: %s", rank, e)
        stop.uninstall()
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()
    result["memory_peaks_gib"] = memory_peaks_gib(ctx.device, nvml_peak)
    result["host_memory_gib"] = host_memory_gib(sampler)
    return result


# --- command line ----------------------------------------------------------------------------------

def env_rank_info(env: dict[str, str] | None = None) -> dict[str, Any]:
    """rank, world_size, local_rank, master_addr, master_port from torchrun, Open MPI or Slurm variables.

    Open MPI's variables are read before Slurm's: mpirun inside an sbatch allocation inherits the
    batch step's SLURM_PROCID=0. Under mpirun without MASTER_ADDR/MASTER_PORT, rank 0's host name
    and a free port on it are broadcast over mpi4py (:func:`_mpi_rendezvous`)."""
    e = dict(os.environ if env is None else env)
    for r, w, lr in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                     ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                     ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if r in e and w in e:
            rank, world = int(e[r]), int(e[w])
            local = int(e.get(lr, rank))
            break
    else:
        raise ConfigError("environment", reason="no rank variables: set RANK/WORLD_SIZE/LOCAL_RANK (torchrun), "
                          "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun) or OMPI_COMM_WORLD_* (mpirun)")
    if ("MASTER_ADDR" not in e or "MASTER_PORT" not in e) and r == "OMPI_COMM_WORLD_RANK":
        addr, port = _mpi_rendezvous(rank)
        e.setdefault("MASTER_ADDR", addr)
        e.setdefault("MASTER_PORT", str(port))
    if "MASTER_ADDR" not in e or "MASTER_PORT" not in e:
        raise ConfigError("environment", reason="MASTER_ADDR and MASTER_PORT must be set",
                          fix="export MASTER_ADDR=<host of rank 0> MASTER_PORT=<free port>")
    return dict(rank=rank, world_size=world, local_rank=local, master_addr=e["MASTER_ADDR"],
                master_port=int(e["MASTER_PORT"]))


def _mpi_rendezvous(rank: int) -> tuple[str, int]:
    """(rank 0's host name, a free port there), the same on every rank: one mpi4py broadcast."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("environment", reason="mpirun without MASTER_ADDR/MASTER_PORT needs mpi4py to find rank 0",
                          fix='pip install "meshpilot[mpi]", or export MASTER_ADDR and MASTER_PORT to every rank') from None
    import socket

    from meshpilot.comm.ports import free_port
    mine = (socket.gethostname(), free_port("")) if rank == 0 else None
    addr, port = MPI.COMM_WORLD.bcast(mine, root=0)
    return str(addr), int(port)


def _configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import resolve_plan

    p = argparse.ArgumentParser(prog="python -m meshpilot.orchestrator.worker", description="one training rank")
    p.add_argument("--job", required=True, help="job YAML, e.g. the resolved job `meshpilot run` writes to "
                   "<run dir>/job.yaml")
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
    from meshpilot.orchestrator.train.process_exit import exit_process
    exit_process(main())     # not sys.exit: process_exit.py says why
