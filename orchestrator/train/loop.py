"""The training loop: one sequence of steps for every engine (:mod:`.engine`).

From ``start`` (0, or the resumed checkpoint's step) to ``train.steps``, step ``s`` (0-based)::

    lr = warmup_cosine(s)                         (the engine applies it; ZO trainers evaluate it themselves)
    outcome = engine.step(batches of step s for this rank's data shard, stop flag)
    record (loss, lr, step time, tokens/s, MFU, grad norm; every rank's memory on log steps)
    checkpoint after step s+1 when: a stop was agreed, s+1 is a multiple of
        train.checkpoint_every, or s+1 = train.steps (train.checkpoint_final, unless save_final=False)
    stop after the checkpoint when a stop was agreed
    a NaN or infinite loss raises NonFiniteLoss (the run fails at that step, no checkpoint)

Data: global samples ``[s B, (s+1) B)`` (B = train.global_batch) are read by step ``s`` whatever
the plan (:class:`ShardedBatches`), so after ``k`` steps ``k B`` samples are consumed and a
resumed run needs only the step. MFU follows :mod:`meshpilot.orchestrator.sim.flops` (3
forward-equivalents per token with backpropagation, 2 for a zeroth-order step).

Evaluation (``train.eval_every`` > 0): after step s+1 when s+1 is a multiple of it, and after the
last step, the validation loss over ``train.eval_batches`` global batches of the eval split
(:mod:`.evaluation`), before the step's record is written (its ``eval_loss`` and
``eval_perplexity``) and before the checkpoint; not after a step whose loss is not finite or
that agreed to stop. Its time is not part of the step time.

Communication per step beyond the engine's: on log steps one ``all_gather_object`` of every
rank's memory statistics; on evaluation steps the forward passes and one ``all_gather`` of 3
numbers per rank. After the loop, with ``train.export: hf`` (a run that completed
``train.steps``), the Hugging Face export (:mod:`.export`: every parameter gathered to rank 0),
then the parameter checksum (collective).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from meshpilot.orchestrator.errors import NonFiniteLoss
from meshpilot.orchestrator.sim.flops import mfu, model_flops_per_token
from meshpilot.orchestrator.train.checkpoint import CheckpointManager
from meshpilot.orchestrator.train.data import BatchLayout, ShardedBatches, resolve_job_source
from meshpilot.orchestrator.train.evaluation import EvalResult, eval_batch_count, evaluate
from meshpilot.orchestrator.train.engine import RunContext, StartupPhases, TrainEngine
from meshpilot.orchestrator.train.metrics import MetricsLogger, StepRecord, memory_stats
from meshpilot.orchestrator.train.preemption import StopRequest
from meshpilot.orchestrator.train.schedule import lr_at

log = logging.getLogger(__name__)


def train(ctx: RunContext, engine: TrainEngine, stop: StopRequest, phases: StartupPhases) -> dict[str, Any]:
    """Train ``engine`` from the resumed step (or 0) to ``train.steps``; this rank's result dict:
    ``status`` ("completed" | "stopped"), ``rank``, ``start_step``, ``step``, ``losses``,
    ``final_loss``, ``param_checksum``, ``tokens_per_s``, ``mfu``, ``step_time_s`` (of the last
    step), ``peak_memory`` (every rank's, from the last log step), ``checkpoint`` (the last one
    written), ``startup_phases_s``, ``eval_loss`` / ``eval_perplexity`` (the last evaluation's, None
    without ``train.eval_every``), ``evals`` (every evaluation of this run: step, loss, perplexity,
    labels), and the engine's own entries."""
    job, plan, rank, world_size = ctx.job, ctx.plan, ctx.rank, ctx.world_size
    t = job.train
    ckpt = CheckpointManager(ctx.run_dir / "checkpoints", job, plan, rank=rank, world_size=world_size,
                             keep=t.keep_checkpoints)
    start_step = 0
    if ctx.resume_from is not None:
        root, tag = ctx.resume_from
        tag = ckpt.resolve_verified(root, tag)          # SHA-256 of every file; falls back past a damaged one
        start_step = engine.load(ckpt, root, tag).step
    source = resolve_job_source(job)
    layout = BatchLayout(global_batch=t.global_batch, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                         dp=plan.data_parallel, dp_rank=engine.data_rank)
    batches = ShardedBatches(source, layout, seed=t.seed)
    eval_batches, n_eval, last_eval, evals = None, 0, None, []   # train.eval_every: see .evaluation
    if t.eval_every > 0:
        eval_source = resolve_job_source(job, split="eval")
        eval_batches = ShardedBatches(eval_source, layout, seed=t.seed, shuffle=False)
        n_eval = eval_batch_count(t.eval_batches, eval_source.num_samples, t.global_batch)
    phases.mark("checkpoint + data")
    metrics = MetricsLogger(ctx.run_dir, rank=rank, tensorboard=ctx.tensorboard, log_every=ctx.log_every)
    tokens_per_step = t.global_batch * t.seq_len
    losses: list[float] = []
    rec: StepRecord | None = None
    status, last_ckpt = "completed", None
    step = start_step
    if rank == 0:
        log.info("rank 0: start-up after the process group: %s", phases)
        log.info("rank 0: training %s from step %d to %d (%d tokens/step, %.3g model FLOPs/token, %d torch threads)",
                 " ".join(f"{k}={v}" for k, v in asdict(plan).items()), start_step, t.steps, tokens_per_step,
                 model_flops_per_token(job.model, t.seq_len, zeroth_order=plan.zeroth_order), torch.get_num_threads())
    try:
        while step < t.steps:
            lr = lr_at(step, lr=t.lr, warmup=t.warmup_steps, total=t.steps)
            engine.set_lr(lr)
            engine.sync()
            t0 = time.perf_counter()
            out = engine.step(batches.step_batches(step), stop.local)
            engine.sync()
            dt = time.perf_counter() - t0
            step += 1
            losses.append(out.loss)
            finite = math.isfinite(out.loss)
            mem = _gather_memory(rank, ctx.device, world_size) if (step % ctx.log_every == 0 or step == t.steps) else []
            ev: EvalResult | None = None
            if eval_batches is not None and finite and not out.stop and (step % t.eval_every == 0 or step == t.steps):
                last_eval = ev = evaluate(engine, eval_batches, n_eval, device=ctx.device)
                evals.append({"step": step, "eval_loss": ev.loss, "eval_perplexity": ev.perplexity,
                              "eval_labels": ev.labels})
            rec = StepRecord(step=step, loss=out.loss, lr=out.lr, step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                             mfu=mfu(job, tokens_per_step / dt, world_size, zeroth_order=plan.zeroth_order),
                             grad_norm=engine.grad_norm(), memory=mem,
                             eval_loss=ev.loss if ev else None, eval_perplexity=ev.perplexity if ev else None)
            metrics.write(rec)
            if ctx.on_step is not None:
                ctx.on_step(asdict(rec))
            if not finite:          # every rank holds the same (all-reduced) loss: all stop here, no checkpoint
                raise NonFiniteLoss(step, out.loss, hint=f"train.lr={t.lr:g}, learning rate of the step {out.lr:g}")
            periodic = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
            if out.stop or periodic or (step == t.steps and ctx.save_final and t.checkpoint_final):
                last_ckpt = engine.save(ckpt, step=step,
                                        consumed_samples=ShardedBatches.consumed_samples(step, t.global_batch))
            if out.stop:
                status = "stopped"
                log.warning("rank %d: stopped at step %d on request; checkpoint %s", rank, step, last_ckpt)
                break
        exported = None
        if status == "completed" and step == t.steps and t.export == "hf":
            from meshpilot.orchestrator.train.export import export_at_end
            exported = export_at_end(ctx, engine)
        checksum = engine.param_checksum()
    finally:
        metrics.close()
    return {"status": status, "rank": rank, "start_step": start_step, "step": step, "losses": losses,
            "final_loss": losses[-1] if losses else None, "param_checksum": checksum,
            "tokens_per_s": rec.tokens_per_s if rec else None, "mfu": rec.mfu if rec else None,
            "step_time_s": rec.step_time_s if rec else None,
            "peak_memory": rec.memory if rec else [], "checkpoint": str(last_ckpt) if last_ckpt else None,
            "startup_phases_s": phases.seconds, "export": str(exported) if exported else None,
            "eval_loss": last_eval.loss if last_eval else None,
            "eval_perplexity": last_eval.perplexity if last_eval else None, "evals": evals, **engine.results()}


def _gather_memory(rank: int, device: torch.device, world_size: int) -> list[dict[str, Any]]:
    mine = asdict(memory_stats(rank, device))
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, mine)
    return out
