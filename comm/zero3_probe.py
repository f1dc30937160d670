"""Host time of DeepSpeed ZeRO-3's parameter fetch on this machine: ``calibration.zero3_fetch_ms``.

A ZeRO-3 pass runs, for every partitioned parameter tensor (more elements than the persistence threshold), the
coordinator's fetch and release on the host (``partitioned_param_coordinator.fetch_sub_module`` /
``release_sub_module``: status checks, the all-gather launch, stream bookkeeping), and every nn.Module's pre- and
post-forward hooks. Where a pass's compute is small that host time is the pass's floor (sim/step_time.py
``zero3_pass_excess``), and it is the host CPU's: the constants' 1.2 ms per fetched tensor was fitted on one H200
host, and the same plan's host-bound passes ran 1.46x faster on another (sim/step_time.py).

Measured here: a stack of ``layers`` blocks of seven ``hidden x hidden`` linears and a LayerNorm (llama's seven
matrices per layer; the norm stays persistent), with a micro-batch of ``tokens`` tokens, so that the arithmetic is
negligible, trained for a few steps through a real DeepSpeed ZeRO-3 engine on one rank (NCCL on a GPU, gloo on CPU)
with meshpilot's ZeRO-3 settings (strategies/deepspeed_config.py), and the same stack without DeepSpeed. Per forward
pass, after warm-up (the coordinator's trace is recorded at the first step):

    zero3_fetch_s = (t_forward(ZeRO-3) - t_forward(plain) - modules x zero3_module_hook_s) / fetched tensors

with ``zero3_module_hook_s`` the simulator's constant (the same split the step-time model uses). One rank gathers
from itself: the all-gathers are NCCL launches on a one-rank group, whose transfer time the simulator counts apart
(the collective cost model), so the host part is what this measures.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ports import free_port


@dataclass(frozen=True)
class Zero3Sample:
    layers: int
    hidden: int
    tokens: int
    fetched_tensors: int          # partitioned tensors fetched per pass (the linears)
    modules: int                  # nn.Modules whose hooks run per pass
    zero3_forward_s: float        # median forward of the ZeRO-3 engine
    plain_forward_s: float        # median forward of the same stack without DeepSpeed
    module_hook_s: float          # the simulator's per-module hook constant subtracted
    fetch_ms: float               # host milliseconds per fetched tensor per pass


def _stack(layers: int, hidden: int):
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linears = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(7))
            self.norm = nn.LayerNorm(hidden)

        def forward(self, x):
            for lin in self.linears:
                x = lin(x)
            return self.norm(x)

    return nn.Sequential(*[Block() for _ in range(layers)])


def _time_forwards(run_step, sync, warmup: int, iters: int) -> float:
    times = []
    for i in range(warmup + iters):
        sync()
        t0 = time.perf_counter()
        out = run_step("forward")
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        run_step("backward", out)
    return statistics.median(times)


def _worker(out_path: str, port: int, device: str, layers: int, hidden: int, tokens: int, warmup: int,
            iters: int, persistence_threshold: int) -> None:
    """One spawned process: a one-rank group, the ZeRO-3 engine and the plain stack, timed; JSON to ``out_path``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    import deepspeed
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-6, "torch_adam": True}},
           "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                 "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8 / 4,
                                 "stage3_param_persistence_threshold": persistence_threshold,
                                 "stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 10**9}}
    x = torch.randn(1, tokens, hidden, device=dev, dtype=dtype)
    with deepspeed.zero.Init(config_dict_or_path=cfg, dtype=dtype):
        model = _stack(layers, hidden)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

    def z3_step(phase: str, out: Any = None):
        if phase == "forward":
            return engine(x)
        engine.backward(out.float().pow(2).mean())
        engine.step()

    z3 = _time_forwards(z3_step, sync, warmup, iters)
    plain_model = _stack(layers, hidden).to(dev, dtype)

    def plain_step(phase: str, out: Any = None):
        if phase == "forward":
            return plain_model(x)
        out.float().pow(2).mean().backward()
        plain_model.zero_grad(set_to_none=True)

    plain = _time_forwards(plain_step, sync, warmup, iters)
    fetched = sum(1 for p in plain_model.parameters() if p.numel() > persistence_threshold)
    modules = sum(1 for _ in plain_model.modules())
    Path(out_path).write_text(json.dumps(dict(z3=z3, plain=plain, fetched=fetched, modules=modules)))
    dist.destroy_process_group()


def probe_zero3_fetch(device: str, module_hook_s: float, *, layers: int = 8, hidden: int = 512, tokens: int = 16,
                      warmup: int = 3, iters: int = 10, persistence_threshold: int = 10_000,
                      timeout_s: float = 300.0) -> Zero3Sample:
    """Time the ZeRO-3 forward against the plain one in a spawned one-rank process (module docstring)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="meshpilot-zero3-probe-") as tmp:
        out = os.path.join(tmp, "zero3.json")
        p = ctx.Process(target=_worker, args=(out, free_port(), device, layers, hidden, tokens, warmup, iters,
                                              persistence_threshold))
        p.start()
        p.join(timeout_s)
        if p.is_alive():
            p.terminate()
            p.join(5)
            raise TimeoutError(f"ZeRO-3 probe did not finish in {timeout_s:.0f} s")
        if p.exitcode != 0 or not Path(out).exists():
            raise RuntimeError(f"ZeRO-3 probe process exited with {p.exitcode}")
        d = json.loads(Path(out).read_text())
    fetch_s = max(d["z3"] - d["plain"] - d["modules"] * module_hook_s, 0.0) / d["fetched"]
    return Zero3Sample(layers=layers, hidden=hidden, tokens=tokens, fetched_tensors=d["fetched"],
                       modules=d["modules"], zero3_forward_s=d["z3"], plain_forward_s=d["plain"],
                       module_hook_s=module_hook_s, fetch_ms=fetch_s * 1e3)
