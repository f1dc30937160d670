"""The training script DeepSpeed's autotuner launches, and the one loop both chosen configs run in.

A plain DeepSpeed user script (one process per GPU, started by DeepSpeed's launcher or torchrun)::

    deepspeed --num_gpus 2 benchmarks/autotune_train.py --deepspeed_config ds.json \\
        --job benchmarks/configs/h200x2_check.yaml --set model=llama-2-7b train.seq_len=2048 \\
        --warmup 2 --steps 6 --result run.json

``--deepspeed_config`` is a JSON file or, as DeepSpeed's autotuner passes it to every
experiment (``deepspeed/autotuning/scheduler.py``: ``run_experiment``), the URL-safe base64 of
the config's JSON. ``deepspeed.initialize(args=...)`` reads it from ``args`` itself; the script
decodes it only to know, before the model exists, whether to build under ZeRO-3's
``zero.Init``. When the config has ``autotuning.enabled`` (an experiment), DeepSpeed's engine
profiles steps ``start_profile_step..end_profile_step``, writes the experiment's metrics
(``autotuning.metric_path``) and exits the process itself after step ``end_profile_step``; its
first experiment (``model_info.profile``) exits after the first forward.

What runs, as meshpilot's worker runs it (``orchestrator/train/engine_deepspeed.py``):

- the model: meshpilot's built-in transformer for the job's ``model`` section
  (``strategies.model.build_model``), random weights from ``train.seed`` drawn on this rank's
  GPU: under ``torch.device(gpu)`` for stages 0-2, inside ``deepspeed.zero.Init`` for stage 3
  (each rank keeps its 1/world shard as each layer is built); fp32, cast by DeepSpeed to the
  config's precision; the decay / no-decay parameter groups of ``strategies.zero.param_groups``;
- the data: the job's ``train.data`` (``synthetic``: uniform random tokens; ``demo``; a token
  file) laid out by ``orchestrator.train.data.ShardedBatches``
  with DeepSpeed's resolved batch (micro-batch ``mb``, accumulation ``gas``, ``world`` data-parallel
  ranks): step ``s``, micro-step ``m``, rank ``r`` reads global samples
  ``s*B + m*mb*world + r*mb + [0, mb)``, ``B = mb * gas * world``;
- the learning rate: meshpilot's warm-up + cosine schedule of the job's train section
  (``orchestrator.train.schedule.lr_at``), set before each step as meshpilot's loop does;
- one step: ``DeepSpeedTrainEngine.step``: for each micro-batch ``loss = engine(x, y);
  engine.backward(loss); engine.step()``; DeepSpeed reduces the gradients over the ranks at the
  accumulation boundary (all-reduce at stages 0-1, reduce-scatter at 2-3) and steps the
  optimizer; then one all-reduce of 2 numbers gives the step's loss, the mean over micro-batches
  and ranks.

Timing: each step is bracketed by a device synchronisation; the first ``--warmup`` steps are
not timed. Rank 0 writes ``--result``: the step times, their median over the timed steps, tokens/s
``= B * seq_len / median``, the losses, DeepSpeed's resolved batch and ZeRO stage, and every
rank's peak memory (``orchestrator.train.metrics.memory_stats``).

Python warnings go to stdout: DeepSpeed's scheduler calls an experiment failed when any line of
its stderr holds the word "error" (``autotuning/utils.py``: ``search_error``), which a harmless
warning can.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any


class MemoryTrace:
    """A DeepSpeed engine seen through its three training calls: after each forward, backward and ``step``
    (synchronised) it records torch's allocated and reserved bytes and their peaks so far; ``segments``
    summarises the caching allocator's segments (per stream: reserved, allocated, the largest free block).
    Every other attribute is the engine's."""

    def __init__(self, engine: Any, device: Any):
        self._engine, self._device = engine, device
        self.record: dict[str, list] = {"calls": [], "segments": []}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _mark(self, phase: str) -> None:
        import torch
        torch.cuda.synchronize(self._device)
        g = 2.0**30
        self.record["calls"].append(dict(
            phase=phase, allocated_gib=torch.cuda.memory_allocated(self._device) / g,
            reserved_gib=torch.cuda.memory_reserved(self._device) / g,
            max_allocated_gib=torch.cuda.max_memory_allocated(self._device) / g,
            max_reserved_gib=torch.cuda.max_memory_reserved(self._device) / g))

    def watch_loss(self, model: Any) -> None:
        """Split the backward at the end of the loss's: a backward pre-hook on the built-in model's ``final_norm``
        (it runs once the head and loss have given the gradient of the last hidden state) records a
        "loss backward" mark and resets torch's peak statistics, so the "backward" mark's peak is the layers'
        (with checkpointing, the recompute) alone. The run's own peak statistics then cover only that part."""
        import torch
        norm = getattr(model, "final_norm", None)
        if norm is None:
            return

        def done(*_: Any) -> None:
            self._mark("loss backward")
            torch.cuda.reset_peak_memory_stats(self._device)
        norm.register_full_backward_pre_hook(done)

    def watch_blocks(self, model: Any, steps: int = 1) -> None:
        """A mark after each block's forward and after each block's backward (hooks on every ``model.blocks[i]``)
        for the first ``steps`` micro-batches: how allocated memory grows layer by layer in the forward
        (activations, parameters kept gathered) and how the backward trades activations for gradients."""
        blocks = list(getattr(model, "blocks", []))
        seen = {"forward": 0, "backward": 0}

        def after(i: int, kind: str, last: int):
            def hook(*_: Any) -> None:
                if seen[kind] < steps:
                    self._mark(f"block {i} {kind}")
                if i == last:
                    seen[kind] += 1
            return hook
        for i, b in enumerate(blocks):
            b.register_forward_hook(after(i, "forward", len(blocks) - 1))
            b.register_full_backward_hook(after(i, "backward", 0))

    def __call__(self, *a: Any, **k: Any) -> Any:
        out = self._engine(*a, **k)
        self._mark("forward")
        return out

    def backward(self, *a: Any, **k: Any) -> Any:
        out = self._engine.backward(*a, **k)
        self._mark("backward")
        return out

    def step(self, *a: Any, **k: Any) -> Any:
        out = self._engine.step(*a, **k)
        self._mark("step")
        return out

    def segments(self, when: str) -> None:
        import torch
        g = 2.0**30
        by_stream: dict[str, dict[str, float]] = {}
        for seg in torch.cuda.memory_snapshot():
            d = by_stream.setdefault(str(seg.get("stream")), dict(segments=0, reserved_gib=0.0, allocated_gib=0.0,
                                                                   largest_free_gib=0.0, expandable=0))
            d["segments"] += 1
            d["expandable"] += int(bool(seg.get("is_expandable")))
            d["reserved_gib"] += seg["total_size"] / g
            d["allocated_gib"] += seg["allocated_size"] / g
            free = [b["size"] for b in seg.get("blocks", []) if b.get("state") == "inactive"]
            d["largest_free_gib"] = max(d["largest_free_gib"], max(free, default=0) / g)
        self.record["segments"].append(dict(when=when, streams=by_stream))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=None, help="meshpilot job file (its model and train sections are used)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="meshpilot overrides of the job")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up")
    p.add_argument("--result", default=None, help="rank 0 writes the result JSON here")
    p.add_argument("--local_rank", type=int, default=-1, help="set by DeepSpeed's launcher")
    p.add_argument("--trace-memory", default=None, metavar="FILE",
                   help="rank 0 writes torch's allocated/reserved bytes after every forward, backward and "
                        "optimizer call, and the caching allocator's segments after the first and last step, here")
    p.add_argument("--trace-loss-phase", action="store_true",
                   help="with --trace-memory: also mark the end of the loss's backward and reset the peak there "
                        "(MemoryTrace.watch_loss); the result's peaks then cover only the layers' backward")
    p.add_argument("--trace-blocks", type=int, default=0, metavar="N",
                   help="with --trace-memory: a mark after every block's forward and backward in the first N "
                        "micro-batches")
    p.add_argument("--checkpointing", action="store_true", help="full activation checkpointing of every block")
    # --deepspeed, --deepspeed_config: DeepSpeed's own arguments, read by deepspeed.initialize(args=...)
    import deepspeed
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("--deepspeed_config (a JSON file or its base64) is required")
    return args


def read_config(value: str) -> dict[str, Any]:
    """The DeepSpeed config named by ``--deepspeed_config``: a JSON file, or URL-safe base64 JSON."""
    if os.path.isfile(value):
        return json.loads(Path(value).read_text())
    return json.loads(base64.urlsafe_b64decode(value.encode()).decode())


def encode_config(cfg: dict[str, Any]) -> str:
    """``cfg`` as DeepSpeed's autotuner passes it on the command line (URL-safe base64 of its JSON)."""
    return base64.urlsafe_b64encode(json.dumps(cfg).encode()).decode()


def zero_stage(cfg: dict[str, Any]) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def autotuning_steps(cfg: dict[str, Any]) -> int | None:
    """Steps after which DeepSpeed's engine exits an autotuning experiment (``end_profile_step``
    + 1, DeepSpeed's default 5 when unset), with one to spare; None outside autotuning."""
    at = cfg.get("autotuning") or {}
    if not at.get("enabled"):
        return None
    return int(at.get("end_profile_step", 5)) + 2


def _warnings_to_stdout() -> None:
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        sys.stdout.write(warnings.formatwarning(message, category, filename, lineno, line))
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    _warnings_to_stdout()
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    args = parse_args(argv)
    cfg = read_config(args.deepspeed_config)

    import deepspeed
    import torch
    import torch.distributed as dist

    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.train.data import BatchLayout, ShardedBatches, resolve_source
    from meshpilot.orchestrator.train.engine_deepspeed import DeepSpeedTrainEngine, build_dtype
    from meshpilot.orchestrator.train.metrics import memory_stats
    from meshpilot.orchestrator.train.schedule import lr_at
    import meshpilot.strategies.model as model_module   # before zero.Init (strategies/zero.py says why)
    from meshpilot.strategies.zero import param_groups

    job = load_job(args.job, args.set)
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    if on_cpu:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = zero_stage(cfg)
    # tp = 1, no offload; checkpointing only with --checkpointing (the job's plan section is not read)
    plan = Plan(dp=world, zero_stage=stage, activation_checkpointing="full" if args.checkpointing else "none")
    t0 = time.perf_counter()
    if stage == 3:
        import torch._dynamo  # noqa: F401  before zero.Init (strategies/zero.py says why)
        build: Any = deepspeed.zero.Init(config_dict_or_path=cfg)
    else:
        build = torch.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with build:     # in the worker's dtype (the training dtype under zero.Init, fp32 otherwise)
        model = model_module.build_model(job.model, plan, None, seed=job.train.seed, dtype=build_dtype(job, plan),
                                         device=torch.get_default_device())
    built_s = time.perf_counter() - t0
    params = param_groups(model, weight_decay=job.train.weight_decay, plan=plan)
    engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=params)
    mb, gas, batch = (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                      engine.train_batch_size())
    plan = dataclasses.replace(plan, micro_batch=mb, grad_accum=gas)
    init_s = time.perf_counter() - t0
    seq = job.train.seq_len
    source = resolve_source(job.train.data, vocab=job.model.vocab, seq_len=seq, seed=job.train.seed)
    data = ShardedBatches(source,
                          BatchLayout(global_batch=batch, micro_batch=mb, grad_accum=gas, dp=world, dp_rank=rank),
                          seed=job.train.seed)
    tracer = MemoryTrace(engine, device) if args.trace_memory and device.type == "cuda" else None
    if tracer is not None and args.trace_loss_phase:
        tracer.watch_loss(model)
    if tracer is not None and args.trace_blocks:
        tracer.watch_blocks(model, steps=args.trace_blocks)
    trainer = DeepSpeedTrainEngine(tracer or engine, plan, types.SimpleNamespace(dp_rank=rank), device=device,
                                   world_size=world)

    total = args.warmup + args.steps
    cap = autotuning_steps(cfg)
    if cap is not None:                      # an autotuning experiment: DeepSpeed's engine ends the process
        total = min(total, cap)
    times, losses = [], []
    t = job.train
    for step in range(total):
        trainer.set_lr(lr_at(step, lr=t.lr, warmup=t.warmup_steps, total=t.steps))
        trainer.sync()
        ts = time.perf_counter()
        out = trainer.step(data.step_batches(step), stop_local=False)
        trainer.sync()
        times.append(time.perf_counter() - ts)
        losses.append(out.loss)
        if tracer is not None and step in (0, total - 1):
            tracer.segments(f"after step {step}")
        if rank == 0:
            print(f"step {step} loss {out.loss:.6f} time {times[-1]:.3f} s", flush=True)

    mem: list[Any] = [None] * world
    dist.all_gather_object(mem, dataclasses.asdict(memory_stats(rank, device)))
    timed = times[args.warmup:]
    median = statistics.median(timed) if timed else None
    result = dict(zero_stage=stage, micro_batch=mb, grad_accum=gas, train_batch_size=batch, world=world,
                  seq_len=seq, model=job.model.name, params=sum(int(getattr(p, "ds_numel", p.numel()))
                                                                for p in model.parameters()),
                  warmup=args.warmup, step_times_s=times, losses=losses,
                  median_step_s=median, min_step_s=min(timed) if timed else None,
                  tokens_per_s=batch * seq / median if median else None,
                  model_build_s=round(built_s, 3), init_s=round(init_s, 3), memory=mem,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  deepspeed_config=cfg)
    if rank == 0 and tracer is not None:
        Path(args.trace_memory).write_text(json.dumps(tracer.record, indent=1))
    if rank == 0 and args.result:
        Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from meshpilot.orchestrator.train.process_exit import exit_process
    exit_process(main())     # not sys.exit: a gloo thread can abort the rank during finalization (process_exit.py)
