#!/usr/bin/env python
"""meshpilot's MoE layer vs DeepSpeed's (deepspeed.moe.layer.MoE): tokens/s and all-to-all time share.

For each expert-parallel degree (default 1, 2, 4 on 4 GPUs; every GPU is a data-parallel
rank with its own tokens, ep re-divides them), one fresh group of NCCL processes builds a
stack of ``--layers`` residual MoE FFN layers (``x = x + MoE(x)``; SwiGLU experts, 8 experts,
top-2, capacity factor 1.25, bf16) twice, ours and DeepSpeed's, with IDENTICAL weights
(DeepSpeed's gate and experts are copied from ours; its top-2 gate without the random
second-expert sampling routes exactly like ours: same top-2, same renormalised gates, same
capacity ceil(cf*T*k/E) per rank and the same first-choices-first priority), and times
forward+backward (no optimizer step) on the same inputs in the same processes. Then a few
steps under torch.profiler give the time of the NCCL kernels: all-to-all (SendRecv /
AllToAll kernels) and all communication, as a share of the step's wall time.

Output: a table on stdout and ``moe_vs_deepspeed_<date>.json`` in ``--out`` (default $OUT,
else ./bench_out): card, date, versions, configuration and the numbers. Each ep degree
runs in its own process group with a deadline, so an OOM or hang loses only that row.

GPU (the lead's run, 4 H100):   python benchmarks/moe_vs_deepspeed.py --out $OUT
Quick:                          python benchmarks/moe_vs_deepspeed.py --quick --out $OUT
CPU dry path (gloo, 2 ranks, tiny dims, fp32; also checks ours == DeepSpeed numerically):
                                python benchmarks/moe_vs_deepspeed.py --dry-run
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshpilot.comm.ports import free_port

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
ROUNDS = 2          # alternating timing rounds per implementation; the best is reported


@dataclass
class Bench:
    hidden: int = 2048
    ffn: int = 5632
    experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    layers: int = 2
    batch: int = 8                 # sequences per GPU
    seq: int = 1024
    warmup: int = 3
    steps: int = 10
    profile_steps: int = 3
    dtype: str = "bf16"
    world: int = 4
    ep_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    deadline_s: float = 90.0       # per ep degree
    dry_run: bool = False


def parse_args(argv: list[str] | None = None) -> tuple[Bench, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="output directory (default $OUT)")
    p.add_argument("--quick", action="store_true", help="fewer steps, smaller batch, one layer")
    p.add_argument("--dry-run", action="store_true", help="CPU/gloo, 2 ranks, tiny dims (default when no CUDA)")
    p.add_argument("--ep", default=None, help="comma-separated ep degrees (default 1,2,4 up to the GPU count)")
    p.add_argument("--world", type=int, default=None, help="processes (default: GPUs visible, at most 4)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args(argv)

    import torch
    b = Bench()
    gpus = torch.cuda.device_count()
    if a.dry_run or gpus == 0:
        b = Bench(hidden=64, ffn=128, experts=8, layers=2, batch=2, seq=16, warmup=1, steps=2, profile_steps=1,
                  dtype="fp32", world=2, ep_sizes=[1, 2], deadline_s=120.0, dry_run=True)
    else:
        b.world = min(gpus, 4) if a.world is None else a.world
    if a.quick and not b.dry_run:
        b.warmup, b.steps, b.profile_steps, b.layers, b.batch, b.deadline_s = 2, 5, 2, 1, 4, 60.0
    for k in ("hidden", "ffn", "experts", "top_k", "capacity_factor", "layers", "batch", "seq", "steps"):
        if getattr(a, k) is not None:
            setattr(b, k, getattr(a, k))
    if a.world is not None:
        b.world = a.world
    if a.ep is not None:
        b.ep_sizes = [int(x) for x in a.ep.split(",")]
    b.ep_sizes = [e for e in b.ep_sizes if e <= b.world and b.world % e == 0 and b.experts % e == 0]
    return b, Path(a.out)


# ------------------------------------------------------------------------------------------------
# worker side

def _swiglu_expert(hidden: int, ffn: int):
    import torch.nn as nn
    import torch.nn.functional as F

    class SwiGLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Linear(hidden, ffn, bias=False)
            self.w3 = nn.Linear(hidden, ffn, bias=False)
            self.w2 = nn.Linear(ffn, hidden, bias=False)

        def forward(self, x):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    return SwiGLU()


def _build(b: Bench, ep: int, device: Any, dtype: Any):
    """Both stacks with identical weights: (ours, deepspeed's, our process groups)."""
    import torch
    import torch.nn as nn
    from deepspeed.moe.layer import MoE

    from meshpilot.comm.groups import build_process_groups
    from meshpilot.comm.layout import build_layout
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.strategies.moe import MoEFeedForward
    from meshpilot.strategies.weights import RandomWeights

    world = torch.distributed.get_world_size()
    groups = build_process_groups(build_layout(dp=world, ep=ep, gpus_per_node=world))
    m = ModelConfig(name="bench", arch="mixtral", layers=b.layers, hidden=b.hidden, heads=16, ffn=b.ffn,
                    vocab=32000, num_experts=b.experts, top_k=b.top_k, capacity_factor=b.capacity_factor)
    ours = nn.ModuleList(MoEFeedForward(m, ep_group=groups.ep, name_prefix=f"layers.{i}.mlp", weights=RandomWeights(1234),
                                        dtype=dtype, device=device) for i in range(b.layers))
    ds = nn.ModuleList()
    for i in range(b.layers):
        layer = MoE(b.hidden, _swiglu_expert(b.hidden, b.ffn), num_experts=b.experts, ep_size=ep, k=b.top_k,
                    capacity_factor=b.capacity_factor, eval_capacity_factor=b.capacity_factor, min_capacity=0,
                    drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
        with torch.no_grad():
            o = ours[i]
            layer.deepspeed_moe.gate.wg.weight.copy_(o.router.weight)
            for le, ex in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
                ex.w1.weight.copy_(o.w1[le])
                ex.w3.weight.copy_(o.w3[le])
                ex.w2.weight.copy_(o.w2[le])
        layer.set_deepspeed_parallelism()
        ds.append(layer.to(device=device, dtype=dtype))
    return ours, ds, groups


def _forward(impl: str, stack, x):
    aux = x.new_zeros((), dtype=x.dtype).float()
    for layer in stack:
        if impl.startswith("ours"):
            layer.expert_compute = "grouped" if impl == "ours-grouped" else "loop"
            x = x + layer(x)
            aux = aux + layer.last_aux_loss
        else:
            y, l_aux, _ = layer(x)
            x = x + y
            aux = aux + 0.01 * l_aux
    return x, aux


def _step(impl: str, stack, x) -> None:
    y, aux = _forward(impl, stack, x)
    loss = y.float().pow(2).mean() + aux
    loss.backward()
    for p in stack.parameters():
        p.grad = None


def _comm_times(prof, cuda: bool) -> tuple[float, float]:
    """(all-to-all us, all communication us) from profiler events: NCCL kernels on GPU, c10d ops on CPU."""
    from torch.autograd import DeviceType
    a2a = comm = 0.0
    for e in prof.events():
        name = e.name.lower()
        if cuda:
            if getattr(e, "device_type", None) != DeviceType.CUDA or "nccl" not in name:
                continue
            us = e.time_range.elapsed_us()
            comm += us
            if "sendrecv" in name or "alltoall" in name or "all_to_all" in name:
                a2a += us
        else:
            if not name.startswith("c10d::"):
                continue
            us = e.cpu_time_total
            comm += us
            if "alltoall" in name or "all_to_all" in name:
                a2a += us
    return a2a, comm


def _sync(cuda: bool) -> None:
    import torch
    import torch.distributed as dist
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()


def _step_seconds(impl: str, stack, x, b: Bench, cuda: bool) -> float:
    """Mean wall time of one forward+backward over ``b.steps`` steps (slowest rank), after warm-up."""
    import torch
    import torch.distributed as dist
    for _ in range(b.warmup):
        _step(impl, stack, x)
    _sync(cuda)
    t0 = time.perf_counter()
    for _ in range(b.steps):
        _step(impl, stack, x)
    _sync(cuda)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=x.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() / b.steps


def _profiled(impl: str, stack, x, b: Bench, cuda: bool) -> dict[str, float]:
    """Communication time share over ``b.profile_steps`` profiled steps."""
    import torch
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        _sync(cuda)
        t0 = time.perf_counter()
        for _ in range(b.profile_steps):
            _step(impl, stack, x)
        _sync(cuda)
        prof_s = time.perf_counter() - t0
    a2a_us, comm_us = _comm_times(prof, cuda)
    return {"a2a_share": a2a_us / 1e6 / prof_s, "comm_share": comm_us / 1e6 / prof_s,
            "a2a_ms_per_step": a2a_us / 1e3 / b.profile_steps}


def _measure(impls: dict[str, Any], x, b: Bench, cuda: bool) -> dict[str, dict[str, Any]]:
    """Time every implementation in ``ROUNDS`` alternating rounds (best round kept), then profile each."""
    import torch
    out: dict[str, dict[str, Any]] = {name: {} for name in impls}
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, stack in impls.items():
            if "error" in out[name]:
                continue
            try:
                t = _step_seconds(name, stack, x, b, cuda)
                best[name] = min(best.get(name, float("inf")), t)
            except Exception as e:   # OOM, or the grouped GEMM refusing: keep the other numbers
                out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                for p in stack.parameters():
                    p.grad = None
                if cuda:
                    torch.cuda.empty_cache()
    tokens = torch.distributed.get_world_size() * b.batch * b.seq
    for name, stack in impls.items():
        if name in best and "error" not in out[name]:
            out[name] = {"step_ms": best[name] * 1e3, "tokens_per_s": tokens / best[name],
                         **_profiled(name, stack, x, b, cuda)}
    return out


def _worker(rank: int, b: Bench, ep: int, port: int, result_file: str) -> None:
    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and not b.dry_run
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(b.world))
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=b.world,
                            timeout=_dt.timedelta(seconds=int(b.deadline_s)))
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[b.dtype]
    row: dict[str, Any] = {"ep": ep}
    try:
        ours, ds, groups = _build(b, ep, device, dtype)
        g = torch.Generator(device="cpu").manual_seed(100 + rank)
        x = torch.randn(b.batch, b.seq, b.hidden, generator=g).to(device=device, dtype=dtype)
        # numerical agreement (same weights, same routing), checked with a capacity that drops
        # nothing (cf = E/k gives C = T): with drops the two differ by design, since DeepSpeed
        # renormalises a token's gates over its kept assignments and we keep the top-k gates
        with torch.no_grad():
            for o, d in zip(ours, ds):
                o.capacity_factor = d.deepspeed_moe.gate.capacity_factor = b.experts / b.top_k
            yo, _ = _forward("ours", ours, x)
            yd, _ = _forward("ds", ds, x)
            for o, d in zip(ours, ds):
                o.capacity_factor = d.deepspeed_moe.gate.capacity_factor = b.capacity_factor
            _forward("ours", ours, x)      # drop statistics at the benchmarked capacity
        diff = torch.tensor([(yo.float() - yd.float()).abs().max().item(),
                             yo.float().abs().max().item()], dtype=torch.float64, device=device)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)      # on the device: NCCL has no CPU tensors
        row["max_abs_diff_vs_deepspeed"], row["max_abs_output"] = diff.cpu().tolist()
        st = ours[0].last_stats
        row["dropped_fraction_layer0"] = st["dropped"].item() / (st["local_tokens"] * b.top_k * groups.ep_size)
        row.update(_measure({"ours": ours, "deepspeed": ds, "ours-grouped": ours}, x, b, cuda))
        if cuda:
            row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:  # report, don't hide: the row carries the error
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-2000:]
    if rank == 0:
        Path(result_file).write_text(json.dumps(row))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# driver

def run_one(b: Bench, ep: int) -> dict[str, Any]:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "row.json")
        ctx = mp.start_processes(_worker, args=(b, ep, free_port(), result), nprocs=b.world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + b.deadline_s + 60     # + start-up
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    return {"ep": ep, "error": f"timed out after {b.deadline_s + 60:.0f} s"}
        except Exception as e:
            if not os.path.exists(result):
                return {"ep": ep, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
        if not os.path.exists(result):
            return {"ep": ep, "error": "no result written"}
        return json.loads(Path(result).read_text())


def predicted_a2a_ms(b: Bench, ep: int, cluster: str = "h100-sxm-4") -> float | None:
    """The simulator's all-to-all time per step for this configuration (comm.cost_model, the
    ``cluster`` preset's rates): 4 all-to-alls per MoE layer (dispatch and combine, forward
    and backward) of tokens*k*capacity_factor*h values. None if the model is unavailable."""
    try:
        from meshpilot.comm.cost_model import LinkRates, collective_time
        from meshpilot.orchestrator.config.clusters import cluster_preset
        from meshpilot.orchestrator.config.loader import job_from_dict
        job = job_from_dict({"model": "tiny-mixtral", "cluster": cluster_preset(cluster)})
        rates = LinkRates.from_cluster(job.cluster)
        width = 4 if b.dtype == "fp32" else 2
        nbytes = b.batch * b.seq * b.top_k * b.capacity_factor * b.hidden * width
        return 1e3 * 4 * b.layers * float(collective_time("all_to_all", nbytes, ep, 1, ep, rates))
    except Exception:
        return None


def _versions() -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except Exception as e:
        info["deepspeed"] = f"unavailable: {e}"
    info["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info["gpus"] = torch.cuda.device_count()
    return info


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'ep':>3} {'impl':>12} {'tokens/s':>12} {'step ms':>9} {'a2a share':>10} {'comm share':>11} "
            f"{'a2a ms':>7} {'vs DS':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['ep']:>3} ERROR {r['error'][:100]}")
            continue
        ds_tps = r.get("deepspeed", {}).get("tokens_per_s")
        for impl in ("ours", "deepspeed", "ours-grouped"):
            m = r.get(impl, {})
            if "error" in m or not m:
                lines.append(f"{r['ep']:>3} {impl:>12} ERROR {m.get('error', 'missing')[:80]}")
                continue
            ratio = f"{m['tokens_per_s'] / ds_tps:.2f}x" if ds_tps else "-"
            lines.append(f"{r['ep']:>3} {impl:>12} {m['tokens_per_s']:>12.0f} {m['step_ms']:>9.2f} "
                         f"{m['a2a_share']:>10.1%} {m['comm_share']:>11.1%} {m['a2a_ms_per_step']:>7.2f} {ratio:>7}")
        lines.append(f"    max |ours - deepspeed| = {r.get('max_abs_diff_vs_deepspeed', float('nan')):.3g} "
                     f"(max |y| {r.get('max_abs_output', float('nan')):.3g}), dropped "
                     f"{r.get('dropped_fraction_layer0', float('nan')):.2%} of assignments in layer 0")
        sim = r.get("simulated_a2a_ms_per_step_h100_sxm_4")
        if sim is not None:
            lines.append(f"    simulator (h100-sxm-4 rates): all-to-all {sim:.2f} ms per step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    b, out = parse_args(argv)
    info = _versions()
    print(f"MoE benchmark on {b.world} x {info['card']}: hidden {b.hidden}, ffn {b.ffn}, {b.experts} experts, "
          f"top-{b.top_k}, capacity factor {b.capacity_factor}, {b.layers} layers, {b.batch}x{b.seq} tokens/GPU, "
          f"{b.dtype}, ep in {b.ep_sizes}", flush=True)
    rows = []
    for ep in b.ep_sizes:
        t0 = time.monotonic()
        row = run_one(b, ep)
        row["simulated_a2a_ms_per_step_h100_sxm_4"] = predicted_a2a_ms(b, ep)
        rows.append(row)
        print(f"ep={ep} done in {time.monotonic() - t0:.0f} s", flush=True)
    print(_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    path = out / f"moe_vs_deepspeed_{now:%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps({"benchmark": "moe_vs_deepspeed", "date": now.isoformat(), **info,
                                "config": asdict(b), "results": rows}, indent=2))
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
