"""Helpers for the DeepSpeed training tests: tiny jobs and plain-PyTorch reference trainers.

The references use only torch (no DeepSpeed): the same built-in model, the same data order
(:class:`ShardedBatches`), the same warmup+cosine schedule, ``torch.optim.AdamW`` with the
same betas/eps and no-decay rule, and global-norm gradient clipping.
"""
from __future__ import annotations

import os
from typing import Any

import torch

TINY_TRAIN = {"seq_len": 32, "global_batch": 8, "steps": 20, "precision": "fp32", "lr": 3e-3,
              "warmup_steps": 3, "weight_decay": 0.1, "grad_clip": 1.0, "data": "demo", "seed": 7}


def tiny_job(plan: dict[str, Any], model: str = "tiny-llama", **train: Any):
    from meshpilot.orchestrator.config.loader import job_from_dict
    return job_from_dict({"model": model, "cluster": "local", "train": {**TINY_TRAIN, **train}, "plan": plan},
                         ["cluster.gpus_per_node=4"])


def run(job, rank: int, world: int, run_dir: str, **kw: Any) -> dict[str, Any]:
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.train.worker import run_worker
    return run_worker(job, resolve_plan(job), rank=rank, world_size=world, local_rank=rank, master_addr="127.0.0.1",
                      master_port=int(os.environ.get("MASTER_PORT", "0")), run_dir=run_dir, tensorboard=False, **kw)


def _optimizer(model: torch.nn.Module, job) -> torch.optim.Optimizer:
    from meshpilot.strategies.deepspeed_config import ADAM_BETAS, ADAM_EPS
    from meshpilot.strategies.zero import param_groups
    from meshpilot.orchestrator.plan.plan import Plan
    groups = param_groups(model, weight_decay=job.train.weight_decay, plan=Plan())
    return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                             lr=job.train.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def reference_losses(job, *, dp: int = 1, dp_rank: int = 0, ddp_group: Any = None, shards: int = 1) -> list[float]:
    """Train the single-process model (ddp_group None) or one DDP replica; the global mean loss per step.

    ``shards > 1`` (single process): each step's batch is split into the ``shards`` parts that
    ``shards`` data-parallel ranks would see, and their gradients are accumulated with weight
    1/shards. This is the single-process equivalent of data parallelism for losses that are not
    linear in the batch (the MoE load-balancing loss and expert capacity are per micro-batch)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from meshpilot.orchestrator.train.data import BatchLayout, ShardedBatches, resolve_source
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.train.schedule import lr_at
    from meshpilot.strategies.model import build_model

    t = job.train
    model = build_model(job.model, Plan(), None, seed=t.seed)
    net = DDP(model, process_group=ddp_group) if ddp_group is not None else model
    opt = _optimizer(model, job)
    parts = dp * shards
    src = resolve_source(t.data, vocab=job.model.vocab, seq_len=t.seq_len, seed=t.seed)
    mb = t.global_batch // parts
    shard_batches = [ShardedBatches(src, BatchLayout(global_batch=t.global_batch, micro_batch=mb, grad_accum=1,
                                                     dp=parts, dp_rank=dp_rank * shards + k), seed=t.seed)
                     for k in range(shards)]
    losses = []
    for step in range(t.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=t.lr, warmup=t.warmup_steps, total=t.steps)
        opt.zero_grad(set_to_none=True)
        val = torch.zeros((), dtype=torch.float64)
        for b in shard_batches:
            x, y = b.micro_batch(step, 0)
            loss = net(torch.from_numpy(x), torch.from_numpy(y)) / shards
            loss.backward()
            val += loss.detach().double()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if ddp_group is not None:
            dist.all_reduce(val, group=ddp_group)
            val /= dp
        losses.append(float(val))
    return losses


def param_sum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))
