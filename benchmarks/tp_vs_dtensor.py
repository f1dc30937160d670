#!/usr/bin/env python
"""meshpilot's Megatron-style tensor parallelism vs PyTorch's DTensor tensor parallelism.

The model is meshpilot's built-in llama-style transformer (default ~1.36B parameters:
24 layers, hidden 2048, 16 heads, SwiGLU ffn 5632, vocab 32000), bf16 parameters, AdamW
(foreach, no master weights, identical for both). For each tp degree (default 1, 2, 4; a
group of tp GPUs training ONE micro-batch, no data parallelism) one fresh group of NCCL
processes runs, in the same processes and on the same GPUs:

1. ``ours``: ``build_model(cfg, Plan(tp=t), groups)``: column/row-parallel layers with
   all-reduces in autograd functions and the vocabulary-parallel cross-entropy;
2. ``dtensor``: the single-process ``build_model(cfg, Plan(), None)`` (same weights, same
   seed) parallelised by ``torch.distributed.tensor.parallel.parallelize_module``:
   q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel, the embedding RowwiseParallel,
   the LM head ColwiseParallel with sharded logits and ``loss_parallel`` (as torchtitan).

Each is timed over ``--steps`` steps (forward + backward + optimizer step, after
``--warmup``); tokens/s = micro_batch * seq / step time, MFU = (6 N + 12 L s h) * tokens/s
/ (t * peak bf16 FLOP/s). A few more steps under torch.profiler give the communication
share: time of NCCL kernels / time of all kernels, and the NCCL time per layer and step.
With tp > 1 a third row, ``ours-sp``, adds sequence parallelism (all-gather /
reduce-scatter instead of all-reduce; norms on sequence shards). The first-step losses of both are recorded (they should agree to bf16 rounding). When the
simulator is importable, its predicted time breakdown for the same job is stored beside.

Output: a table on stdout and ``tp_vs_dtensor_<date>.json`` in ``--out`` (default $OUT,
else ./bench_out): card, date, versions, configuration, numbers. Each tp degree runs in
its own process group with a deadline, and each variant in try/except (an OOM loses one
cell, not the run).

GPU (the lead's run, 4 H100):  python benchmarks/tp_vs_dtensor.py --out $OUT
Quick (fewer steps):           python benchmarks/tp_vs_dtensor.py --quick --out $OUT
CPU dry path (gloo, tp 1 and 2, tiny dims, fp32):  python benchmarks/tp_vs_dtensor.py --dry-run
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import queue as queue_mod
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")

try:                                    # installed (pip install -e .)
    import meshpilot.orchestrator  # noqa: F401
except ImportError:                     # a bare checkout: the folders are meshpilot's subpackages
    import types
    _pkg = types.ModuleType("meshpilot")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[1])]
    sys.modules["meshpilot"] = _pkg

from meshpilot.comm.ports import free_port  # noqa: E402  (after the bare-checkout fallback)

# H100/H200 SXM dense bf16 peak (datasheet, no sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Bench:
    layers: int = 24
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 16
    ffn: int = 5632
    vocab: int = 32000
    seq: int = 2048
    micro_batch: int = 4
    warmup: int = 3
    steps: int = 10
    profile_steps: int = 2
    tp_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    variants: list[str] = field(default_factory=lambda: ["ours", "dtensor", "ours-sp"])  # ours-sp: tp > 1 only
    deadline_s: float = 150.0        # per tp degree (both variants)
    cpu_init: bool = False           # library CPU init (exact weights, slow for 1.3B) instead of GPU draws
    peak_tflops: float | None = None
    dry_run: bool = False
    seed: int = 1234


def model_config(b: Bench):
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.strategies.model import resolved_model_config
    return resolved_model_config(ModelConfig(name="llama-1.3b-bench", arch="llama", layers=b.layers, hidden=b.hidden,
                                             heads=b.heads, kv_heads=b.kv_heads, ffn=b.ffn, vocab=b.vocab,
                                             max_positions=b.seq, tie_embeddings=False))


def flops_per_token(b: Bench, n_params: int) -> float:
    """Training FLOPs per token: 6 N (forward 2N, backward 4N) + 12 L s h (attention scores)."""
    return 6.0 * n_params + 12.0 * b.layers * b.seq * b.hidden


# --- worker side --------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(b: Bench, device):
    import torch
    g = torch.Generator().manual_seed(b.seed)
    ids = torch.randint(0, b.vocab, (b.micro_batch, b.seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids.to(device), labels.to(device)


def _dtensor_model(cfg, b: Bench, device, dtype, world: int):
    """The single-process model, parallelised with torch.distributed.tensor.parallel."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                                   parallelize_module)

    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model
    model = build_model(cfg, Plan(), None, seed=b.seed, dtype=dtype, device=device)
    mesh = init_device_mesh(device.type, (world,))
    block_plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                  "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
                  "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                  "mlp.down_proj": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, mesh, block_plan)
    parallelize_module(model, mesh, {
        "tok_embed": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})

    def loss_fn(ids, labels):
        h = model.embed(ids)
        for block in model.blocks:
            h = block(h)
        logits = model.lm_head(model.final_norm(h))
        with loss_parallel():
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    def backward(loss):
        with loss_parallel():
            loss.backward()

    return model, loss_fn, backward


def _ours_model(cfg, b: Bench, device, dtype, world: int, sequence_parallel: bool = False):
    from meshpilot.comm.groups import build_process_groups
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model
    plan = Plan(dp=1, tp=world, sequence_parallel=sequence_parallel)
    groups = build_process_groups(plan.layout(gpus_per_node=max(world, 1)))
    model = build_model(cfg, plan, groups, seed=b.seed, dtype=dtype, device=device)
    return model, (lambda ids, labels: model(ids, labels)), (lambda loss: loss.backward())


def _comm_share(prof, device, layers: int, steps: int) -> dict[str, float]:
    """Communication time as a share of all device time, and per layer and step.

    GPU: NCCL kernels / all kernels (kernel events, each counted once; if this torch lists no
    kernel events, each CPU op's self device time, which attributes every kernel to the op
    that launched it). CPU (dry run): self CPU time of c10d/gloo ops / all ops."""
    from torch.autograd import DeviceType
    events = list(prof.key_averages())

    def tally(evs, timeof, is_comm):
        c = t = 0.0
        for ev in evs:
            x = float(timeof(ev) or 0.0)
            t += x
            c += x if is_comm(ev) else 0.0
        return c, t

    if device.type == "cuda":
        nccl = lambda ev: "nccl" in ev.key.lower()  # noqa: E731
        kernels = [ev for ev in events if ev.device_type == DeviceType.CUDA]
        comm, total = tally(kernels, lambda ev: getattr(ev, "device_time_total", None)
                            or getattr(ev, "cuda_time_total", 0.0), nccl)
        if total == 0.0:
            comm, total = tally([ev for ev in events if ev.device_type == DeviceType.CPU],
                                lambda ev: getattr(ev, "self_device_time_total", None)
                                or getattr(ev, "self_cuda_time_total", 0.0), nccl)
    else:
        comm, total = tally(events, lambda ev: ev.self_cpu_time_total,
                            lambda ev: any(s in ev.key.lower() for s in ("c10d", "gloo", "all_reduce", "allreduce",
                                                                          "all_gather", "reduce_scatter")))
    return dict(comm_share=comm / total if total else 0.0, comm_ms_per_step=comm / 1e3 / steps,
                comm_ms_per_layer=comm / 1e3 / steps / layers, device_ms_per_step=total / 1e3 / steps)


def _optimizers(model) -> list:
    """AdamW (foreach) over the parameters; DTensor and plain tensors cannot share a foreach
    call, so the DTensor variant gets one optimizer per kind (same arithmetic)."""
    import torch
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())
    kinds = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return [torch.optim.AdamW(ps, lr=1e-5, foreach=True) for ps in kinds if ps]


def _run_variant(name: str, cfg, b: Bench, device, dtype, world: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    if name == "dtensor":
        model, loss_fn, backward = _dtensor_model(cfg, b, device, dtype, world)
    else:
        model, loss_fn, backward = _ours_model(cfg, b, device, dtype, world, sequence_parallel=name == "ours-sp")
    build_s = time.perf_counter() - t0
    opts = _optimizers(model)
    ids, labels = _batch(b, device)

    def step() -> float:
        loss = loss_fn(ids, labels)
        backward(loss)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    loss0 = step()
    loss0 = loss0.detach().float()
    first_loss = float(loss0.full_tensor()) if hasattr(loss0, "full_tensor") else float(loss0)
    for _ in range(max(0, b.warmup - 1)):
        step()
    _sync(device)
    times = []
    for _ in range(b.steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(b.profile_steps):
            step()
        _sync(device)
    comm = _comm_share(prof, device, b.layers, b.profile_steps)
    times.sort()
    med = times[len(times) // 2]
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1 and name != "dtensor":          # local shards: count the full model
        n_local_sharded = sum(p.numel() for p in model.parameters() if getattr(p, "meshpilot_tp_dim", None) is not None)
        n_repl = n_params - n_local_sharded
        n_params = n_repl + n_local_sharded * world
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    tokens_s = b.micro_batch * b.seq / med
    return dict(variant=name, ok=True, step_s_median=med, step_s_min=times[0], tokens_per_s=tokens_s,
                n_params=n_params, flops_per_token=flops_per_token(b, n_params), first_loss=first_loss,
                build_s=build_s, peak_mem_gib=mem, **comm)


def _fast_device_init(device) -> None:
    """Benchmark-only: draw each full tensor on the GPU instead of the CPU (seconds instead of
    minutes for 1.3B parameters per rank). Still one generator per full parameter name, so
    both variants get identical weights and the sharding stays layout independent; the
    values differ from the CPU draw of :func:`meshpilot.strategies.init_utils.full_normal`."""
    import zlib

    import torch

    from meshpilot.strategies import model as model_mod
    from meshpilot.strategies import tensor_parallel

    def full_normal_on_device(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std

    from meshpilot.strategies import init_utils
    for mod in (init_utils, tensor_parallel, model_mod):          # init_utils: what RandomWeights calls
        if hasattr(mod, "full_normal"):
            mod.full_normal = full_normal_on_device


def _worker(rank: int, world: int, port: int, b: Bench, results) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        cuda = torch.cuda.is_available() and not b.dry_run
        if cuda:
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
            if not b.cpu_init:
                _fast_device_init(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(1)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        dtype = torch.bfloat16 if cuda else torch.float32
        cfg = model_config(b)
        rows = []
        for name in b.variants:
            if name == "ours-sp" and world == 1:
                continue
            try:
                rows.append(_run_variant(name, cfg, b, device, dtype, world))
            except Exception as e:  # noqa: BLE001 - one OOM must not lose the other variant
                oom = "out of memory" in str(e).lower()
                rows.append(dict(variant=name, ok=False, error=("OOM: " if oom else "") + f"{type(e).__name__}: {e}",
                                 traceback=traceback.format_exc()[-3000:]))
            if cuda:                      # the variant's model is gone once _run_variant returned
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            dist.barrier()
        results.put((rank, rows))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        results.put((rank, [dict(variant="all", ok=False, error=traceback.format_exc()[-3000:])]))


def run_tp_degree(b: Bench, world: int) -> list[dict[str, Any]]:
    """Run every variant for one tp degree in a fresh group of ``world`` processes; rank 0's rows."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, b, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, list] = {}
    deadline = time.monotonic() + b.deadline_s
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, rows = results.get(timeout=1.0)
                got[rank] = rows
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    if 0 not in got:
        return [dict(variant=v, ok=False, error=f"no result from rank 0 within {b.deadline_s:.0f} s "
                     f"(other ranks: {sorted(got)})") for v in b.variants]
    rows = got[0]
    # a rank other than 0 failing in a variant marks that variant failed
    for r, other in got.items():
        for row, o in zip(rows, other):
            if row.get("ok") and not o.get("ok"):
                row.update(ok=False, error=f"rank {r}: {o.get('error')}")
    return rows


# --- parent ---------------------------------------------------------------------------------------

def simulator_prediction(b: Bench, tp: int) -> dict[str, Any] | None:
    """The simulator's step-time breakdown for the same job on h100-sxm-4 (None if unavailable)."""
    try:
        from meshpilot.orchestrator.config.loader import job_from_dict
        from meshpilot.orchestrator.plan.plan import Plan
        from meshpilot.orchestrator.sim.simulator import simulate
        cfg = model_config(b)
        job = job_from_dict(dict(model={k: getattr(cfg, k) for k in ("name", "arch", "layers", "hidden", "heads",
                                                                     "kv_heads", "ffn", "vocab", "max_positions",
                                                                     "tie_embeddings")},
                                 cluster="h100-sxm-4",
                                 train=dict(seq_len=b.seq, global_batch=b.micro_batch, precision="bf16"),
                                 plan=dict(dp=1, tp=tp, micro_batch=b.micro_batch)))
        est = simulate(job, Plan(dp=1, tp=tp, micro_batch=b.micro_batch))
        tb = est.time_breakdown_s
        tp_keys = [k for k in tb if "tp" in k.lower()]
        share = sum(tb[k] for k in tp_keys) / est.step_time_s if est.step_time_s else None
        return dict(step_time_s=est.step_time_s, tokens_per_s=est.tokens_per_s, mfu=est.mfu, time_breakdown_s=tb,
                    tp_comm_keys=tp_keys, tp_comm_share=share,
                    tp_comm_ms_per_layer=sum(tb[k] for k in tp_keys) * 1e3 / b.layers)
    except Exception as e:  # noqa: BLE001 - a prediction is optional in a benchmark
        return dict(error=f"{type(e).__name__}: {e}")


def environment() -> dict[str, Any]:
    import torch
    info: dict[str, Any] = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                torch=torch.__version__, python=sys.version.split()[0],
                                cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        info["deepspeed"] = None
    info["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return info


def peak_tflops(card: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)


def parse_args(argv: list[str] | None = None) -> tuple[Bench, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output directory (default $OUT)")
    p.add_argument("--quick", action="store_true", help="fewer steps (about half the time)")
    p.add_argument("--dry-run", action="store_true", help="CPU/gloo, tiny dims, tp 1 and 2: checks the code path")
    p.add_argument("--tp", type=int, nargs="+", help="tp degrees (default 1 2 4)")
    p.add_argument("--layers", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cpu-init", action="store_true", help="initialise with the library's CPU draws (slow)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s of one GPU for MFU (default: by card name)")
    a = p.parse_args(argv)
    b = Bench()
    if a.quick:
        b = dataclasses.replace(b, warmup=2, steps=4, profile_steps=1, deadline_s=110.0,
                                variants=["ours", "dtensor"])
    if a.dry_run:
        b = dataclasses.replace(b, layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=256, seq=32,
                                micro_batch=2, warmup=1, steps=2, profile_steps=1, tp_sizes=[1, 2],
                                deadline_s=240.0, dry_run=True)
    for k in ("layers", "seq", "micro_batch", "steps"):
        if getattr(a, k) is not None:
            b = dataclasses.replace(b, **{k: getattr(a, k)})
    if a.tp:
        b = dataclasses.replace(b, tp_sizes=a.tp)
    b = dataclasses.replace(b, peak_tflops=a.peak_tflops, cpu_init=a.cpu_init)
    return b, Path(a.out)


def main(argv: list[str] | None = None) -> int:
    b, out_dir = parse_args(argv)
    env = environment()
    import torch
    if not b.dry_run and torch.cuda.device_count() < max(b.tp_sizes):
        print(f"needs {max(b.tp_sizes)} GPUs, found {torch.cuda.device_count()} (use --dry-run on CPU)")
        return 2
    peak = peak_tflops(env["card"], b.peak_tflops)
    print(f"# tp_vs_dtensor on {env['card']}  torch {env['torch']}  deepspeed {env['deepspeed']}  "
          f"model L={b.layers} h={b.hidden} a={b.heads} f={b.ffn} V={b.vocab}  mb={b.micro_batch} s={b.seq}",
          flush=True)
    rows = []
    t_start = time.time()
    for tp in b.tp_sizes:
        t0 = time.time()
        for r in run_tp_degree(b, tp):
            r["tp"] = tp
            if r.get("ok") and peak:
                r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / (tp * peak * 1e12)
            rows.append(r)
        pred = simulator_prediction(b, tp)
        for r in rows:
            if r["tp"] == tp:
                r["simulator"] = pred
        print(f"  tp={tp} done in {time.time() - t0:.0f} s", flush=True)
    # table
    print(f"\n{'tp':>3} {'variant':>8} {'tok/s':>10} {'MFU':>6} {'step ms':>8} {'comm %':>7} {'comm ms/layer':>14} "
          f"{'loss0':>8} {'vs dtensor':>10}")
    for tp in b.tp_sizes:
        by = {r["variant"]: r for r in rows if r["tp"] == tp}
        for name, r in by.items():
            if not r.get("ok"):
                print(f"{tp:>3} {name:>8}  FAILED: {r.get('error', '')[:100]}")
                continue
            d = by.get("dtensor")
            ratio = (r["tokens_per_s"] / d["tokens_per_s"]) if d and d.get("ok") else float("nan")
            r["speedup_vs_dtensor"] = ratio
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            print(f"{tp:>3} {name:>8} {r['tokens_per_s']:>10.0f} {mfu:>6} {r['step_s_median'] * 1e3:>8.1f} "
                  f"{r['comm_share']:>7.1%} {r['comm_ms_per_layer']:>14.3f} {r['first_loss']:>8.4f} {ratio:>10.2f}")
    for tp in b.tp_sizes:
        pred = next((r.get("simulator") for r in rows if r["tp"] == tp), None)
        if pred and "error" not in pred and pred.get("tp_comm_share") is not None:
            print(f"simulator tp={tp}: step {pred['step_time_s'] * 1e3:.1f} ms, {pred['tokens_per_s']:.0f} tok/s, "
                  f"tp communication share {pred['tp_comm_share']:.1%}, {pred['tp_comm_ms_per_layer']:.3f} ms/layer "
                  f"(keys {pred['tp_comm_keys']})")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"tp_vs_dtensor_{stamp}.json"
    path.write_text(json.dumps(dict(benchmark="tp_vs_dtensor", env=env, config=asdict(b), peak_tflops=peak,
                                    total_s=time.time() - t_start, rows=rows), indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
