"""Measure zeroth-order (MeZO) training of the reference HF Llama model on real GPUs.

A plain MeZO loop (Malladi et al. 2023) on ``transformers.LlamaForCausalLM`` in bf16, under
``torch.no_grad``: per step, with a seed s shared by every rank and z(s) ~ N(0, I) regenerated
parameter by parameter in a fixed order (never stored),

    theta += eps z(s);   L+ = loss(theta, batch)
    theta -= 2 eps z(s); L- = loss(theta, batch)
    theta += eps z(s)                                  (restore)
    g = (L+ - L-) / (2 eps)
    theta -= lr (g z(s) + wd theta)

Parallel forms of the plan (rank = z * pertp + s, as in meshpilot's rank layout):
- perturbation parallel (``plan.zo.pertp=2``): the rank with s=0 computes L+ and the rank with
  s=1 computes L- on the same batch at the same time;
- ZO data parallel (``plan.zo.dp``): each pair/rank has its own batch.
Both reduce to one all-reduce (SUM) of one scalar per step: every rank contributes
sign * L (pertp=2) or L+ - L- (pertp=1), and g = sum / (zo_dp * 2 eps). Every rank then
applies the identical update, so parameters stay equal without being communicated.

Records the same numbers as measure_deepspeed.py (NVML peak during the steps, torch max
reserved/allocated, median step time, OOM), for configs of kind ``zo`` in configs/accuracy.yaml.

    python benchmarks/measure_zo.py --out results/
    python benchmarks/measure_zo.py --dry-run
    python benchmarks/measure_zo.py --cpu-smoke          # tiny pertp=2 config on CPU over gloo
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402

OUT_NAME = "zo_measurements.json"


def perturb(params, scale: float, seed: int, device) -> None:
    """theta += scale * z(seed), z drawn parameter by parameter from one generator in a fixed order."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    for p in params:
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        p.add_(z, alpha=scale)


def mezo_update(named_params, g: float, lr: float, wd: float, seed: int, device) -> None:
    """theta -= lr (g z(seed) + wd theta); no weight decay on norms (1-D parameters)."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in named_params:
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        if wd and p.ndim > 1:
            p.mul_(1.0 - lr * wd)
        p.add_(z, alpha=-lr * g)


def _rank_main(rank: int, world: int, port: int, cfg: H.BenchConfig, device_kind: str, result_dir: str,
               started, finished) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import logging
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("measure_zo")
    res: dict[str, Any] = dict(rank=rank, status=None)
    device = torch.device("cpu")
    try:
        device = H.init_rank(rank, world, device_kind)

        job, plan = cfg.job(), cfg.plan()
        seq, mb, t = job.train.seq_len, plan.micro_batch, job.train
        pertp, zo_dp = plan.zo_pertp, plan.zo_dp
        groups = plan.layout(world).groups_of(rank)    # rank = z * pertp + s (meshpilot.comm.layout)
        pair, sign = groups.zo_dp.index(rank), float(groups.zo_sign)
        hf = H.hf_llama_config(job.model, seq)
        torch.manual_seed(t.seed)                      # identical initial weights on every rank
        model = H.build_hf_llama(hf, device)
        model.eval()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            res["after_init"] = dict(allocated_gib=round(torch.cuda.memory_allocated(device) / H.GiB, 4),
                                     reserved_gib=round(torch.cuda.memory_reserved(device) / H.GiB, 4))
            torch.cuda.reset_peak_memory_stats(device)
        gen = torch.Generator(device=device).manual_seed(t.seed + 7919 * pair)   # the pair's data
        batches = [torch.randint(0, job.model.vocab, (mb, seq), device=device, generator=gen)
                   for _ in range(plan.grad_accum)]

        def loss_of(x) -> float:
            return float(model(input_ids=x, labels=x).loss.float().item())

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        eps, times, gs = t.zo_eps, [], []
        dist.barrier()
        if rank == 0:
            started.set()
        with torch.no_grad():
            for step in range(cfg.warmup + cfg.steps):
                sync()
                dist.barrier()
                t0 = time.perf_counter()
                seed = (t.seed * 1_000_003 + step) % (2**62)     # the same on every rank
                contrib = 0.0
                for x in batches:
                    if pertp == 1:
                        perturb(params, eps, seed, device)
                        lp = loss_of(x)
                        perturb(params, -2 * eps, seed, device)
                        lm = loss_of(x)
                        perturb(params, eps, seed, device)
                        contrib += lp - lm
                    else:
                        perturb(params, sign * eps, seed, device)
                        contrib += sign * loss_of(x)
                        perturb(params, -sign * eps, seed, device)
                buf = torch.tensor([contrib], dtype=torch.float64, device=device)
                dist.all_reduce(buf)
                g = float(buf.item()) / (zo_dp * 2 * eps * len(batches))
                mezo_update(named, g, t.lr, t.weight_decay, seed, device)
                sync()
                times.append(time.perf_counter() - t0)
                gs.append(g)
                log.info("rank %d step %d: %.3f s g=%.4g", rank, step, times[-1], g)
        dist.barrier()
        if rank == 0:
            finished.set()
        tt = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
        res.update(status="ok", step_times_s=[round(x, 5) for x in tt.cpu().tolist()], projected_grads=gs,
                   **H.memory_stats(device))
        if not all(x == x for x in gs):
            res.update(status="error", error=f"NaN projected gradient {gs}")
    except BaseException as e:  # noqa: BLE001 - every failure is a result (OOM is the expected one)
        res.update(status="oom" if H.is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:1500]}",
                   traceback=traceback.format_exc()[-3000:])
        try:
            res.update(H.memory_stats(device))
        except Exception:
            pass
    H.write_rank_result(result_dir, rank, res)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cpu_smoke_config() -> H.BenchConfig:
    raw = dict(model="tiny-llama", cluster="local",
               train=dict(seq_len=64, global_batch=2, optimizer="zo-sgd", precision="bf16"),
               plan=dict(micro_batch=2, zo=dict(mode="mezo", pertp=2)))
    return H.BenchConfig(name="cpu-smoke-tiny-mezo-pertp2", kind="zo", raw=raw, overrides=(), warmup=1,
                         steps=2, timeout_s=300, exclusive=True, quick=True)


def main(argv: list[str] | None = None) -> int:
    return H.bench_main(argv, description=__doc__, kind="zo", rank_main=_rank_main, out_name=OUT_NAME,
                        script=Path(__file__).resolve(), smoke=cpu_smoke_config)


if __name__ == "__main__":
    sys.exit(main())
