"""Measure the reference workload on real GPUs: HF Llama + DeepSpeed, one process per GPU.

The workload (what the simulator must predict): ``transformers.LlamaForCausalLM`` built from a
``LlamaConfig`` with the dims of a meshpilot model section (random init, no download, SDPA
attention), trained with DeepSpeed in bf16 with AdamW (DeepSpeed's FusedAdam; DeepSpeedCPUAdam
with optimizer offload) and DeepSpeed's defaults otherwise; the loss is HF's causal-LM loss,
computed on fp32 logits. ZeRO-3 models are built under ``deepspeed.zero.Init``; others are
built in bf16 directly on the GPU. Activation checkpointing is HF's
``gradient_checkpointing_enable`` (non-reentrant).

Per config (benchmarks/configs/accuracy.yaml, kind: deepspeed) it records: NVML peak used
memory per GPU during the training steps (sampled every 10 ms, nothing subtracted), torch's
max_memory_reserved and max_memory_allocated per rank (peak stats reset after the engine is
built, so they cover the steps; the values after initialisation are kept too), the median
optimizer-step time over the measured steps after warm-up (the slowest rank of each step),
and whether it ran out of memory. Each config runs in its own subprocess group with a
timeout; configs needing fewer GPUs run side by side on disjoint GPUs (offload configs alone).

    python benchmarks/measure_deepspeed.py --out results/            # all configs
    python benchmarks/measure_deepspeed.py --quick                   # a subset
    python benchmarks/measure_deepspeed.py --only m1b-z2-dp4-mb4
    python benchmarks/measure_deepspeed.py --dry-run                 # the config table and jobs
    DS_ACCELERATOR=cpu python benchmarks/measure_deepspeed.py --cpu-smoke   # tiny config on CPU/gloo
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402

OUT_NAME = "deepspeed_measurements.json"


def ds_config(plan, train) -> dict[str, Any]:
    """The DeepSpeed config of a meshpilot plan: bf16, AdamW, ZeRO stage and offload; DeepSpeed defaults otherwise."""
    zero: dict[str, Any] = {"stage": plan.zero_stage}
    if plan.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": "cpu"}
    if plan.offload_params != "none":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.dp,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay,
                                                   "betas": [0.9, 0.999], "eps": 1e-8}},
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# --- one rank ----------------------------------------------------------------------------------

def _rank_main(rank: int, world: int, port: int, cfg: H.BenchConfig, device_kind: str, result_dir: str,
               started, finished) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import logging
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("measure_deepspeed")
    res: dict[str, Any] = dict(rank=rank, status=None)
    try:
        device = H.init_rank(rank, world, device_kind)
        import deepspeed
        from transformers import LlamaForCausalLM
        # deepspeed.comm must know the group before zero.Init reads the world size from it (it wraps the
        # torch.distributed group initialised above; without this, zero.Init sees world size 1)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")

        job, plan = cfg.job(), cfg.plan()
        seq, mb = job.train.seq_len, plan.micro_batch
        hf = H.hf_llama_config(job.model, seq)
        dsc = ds_config(plan, job.train)
        torch.manual_seed(job.train.seed)
        t0 = time.perf_counter()
        if plan.zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=dsc, dtype=torch.bfloat16):
                model = LlamaForCausalLM(hf)
        else:
            model = H.build_hf_llama(hf, device)
        if plan.activation_checkpointing == "full":
            H.enable_checkpointing(model)
        model.train()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=dsc)
        res["init_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            res["after_init"] = dict(allocated_gib=round(torch.cuda.memory_allocated(device) / H.GiB, 4),
                                     reserved_gib=round(torch.cuda.memory_reserved(device) / H.GiB, 4),
                                     max_allocated_gib=round(torch.cuda.max_memory_allocated(device) / H.GiB, 4))
            torch.cuda.reset_peak_memory_stats(device)
        gen = torch.Generator(device=device).manual_seed(job.train.seed + rank)
        batches = [torch.randint(0, job.model.vocab, (mb, seq), device=device, generator=gen)
                   for _ in range(plan.grad_accum)]

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        times, losses = [], []
        dist.barrier()
        if rank == 0:
            started.set()
        for step in range(cfg.warmup + cfg.steps):
            sync()
            dist.barrier()
            t = time.perf_counter()
            for x in batches:                   # grad_accum micro-batches = one optimizer step
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
                engine.step()
            sync()
            times.append(time.perf_counter() - t)
            losses.append(float(loss.detach().float().item()))
            log.info("rank %d step %d: %.3f s loss %.4f", rank, step, times[-1], losses[-1])
        dist.barrier()
        if rank == 0:
            finished.set()
        tt = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        slowest = tt.cpu().tolist()
        res.update(status="ok", step_times_s=[round(x, 5) for x in slowest], losses=losses,
                   **H.memory_stats(device))
        if not all(l == l and abs(l) < 1e4 for l in losses):
            res.update(status="error", error=f"non-finite or absurd loss {losses}")
    except BaseException as e:  # noqa: BLE001 - every failure is a result (OOM is the expected one)
        res.update(status="oom" if H.is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:1500]}",
                   traceback=traceback.format_exc()[-3000:])
        try:
            res.update(H.memory_stats(device))  # type: ignore[possibly-undefined]
        except Exception:
            pass
    H.write_rank_result(result_dir, rank, res)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)          # NCCL teardown after a failure can hang; the results are written


# --- the top level: harness.bench_main ------------------------------------------------------------

def cpu_smoke_config() -> H.BenchConfig:
    raw = dict(model="tiny-llama", cluster="local",
               train=dict(seq_len=64, global_batch=4, optimizer="adamw", precision="bf16"),
               plan=dict(dp=2, zero_stage=2, micro_batch=2, offload_optimizer="cpu"))
    # optimizer offload: DeepSpeedCPUAdam, the one op that CPU tests build anyway (FusedAdam would be a second build)
    return H.BenchConfig(name="cpu-smoke-tiny-z2-offopt-dp2", kind="deepspeed", raw=raw, overrides=(), warmup=1,
                         steps=2, timeout_s=900, exclusive=True, quick=True)


def _ops(configs: list[H.BenchConfig]) -> list[str]:
    """DeepSpeed JIT ops to build before the configs run: FusedAdam, and CPUAdam for offload configs."""
    offload = any(c.plan().offload_optimizer != "none" for c in configs)
    return ["fused_adam"] + (["cpu_adam"] if offload else [])


def main(argv: list[str] | None = None) -> int:
    return H.bench_main(argv, description=__doc__, kind="deepspeed", rank_main=_rank_main, out_name=OUT_NAME,
                        script=Path(__file__).resolve(), smoke=cpu_smoke_config,
                        dry_extra=lambda c: "deepspeed config: " + json.dumps(ds_config(c.plan(), c.job().train)),
                        ops=_ops)


if __name__ == "__main__":
    sys.exit(main())
