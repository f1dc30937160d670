"""GPU benchmark: the built-in llama-style model under ZeRO-1/2/3 and CPU offload, through
meshpilot's worker and through a minimal direct-DeepSpeed loop (same model, same DeepSpeed
config, same batch) to measure meshpilot's step-time overhead.

Run (on 2-4 GPUs of one node; every config runs in its own torchrun subprocess so an OOM
only loses that row)::

    python benchmarks/train_bench.py --gpus 4 --out $OUT            # full list, < ~6 min on 4 H100
    python benchmarks/train_bench.py --gpus 2 --quick --out $OUT    # ~2-3 min
    python benchmarks/train_bench.py --only 1b_zero3 --repeats 3 --out $OUT   # overhead pair x3, ABA/BAB order
    python benchmarks/train_bench.py --cpu-smoke                     # CPU/gloo dry path (tiny model)
    python benchmarks/train_bench.py --list                          # print the configs and exit

Per config: median (and fastest) step time over the measured steps (after warm-up), tokens/s, MFU
(6 * P_active + 12 * L * S * h model FLOPs per token over the card's dense bf16 peak),
and per rank peak memory: torch max allocated / max reserved and NVML used. Writes
``train_bench_<UTC time>.json`` (card, date, torch/deepspeed versions, rows, overhead per
pair: ratio of the medians, and of the fastest steps) into ``--out`` (default $OUT, else the current
directory). ``--repeats N`` runs each pair N times, alternating which mode goes first. The same numbers are the
calibration data for the simulator's accuracy report.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: str
    plan: dict[str, Any]
    seq_len: int = 2048
    micro_batch: int = 2
    direct: bool = True           # also run the direct-DeepSpeed loop (overhead pair)
    steps: int = 12
    warmup: int = 4
    min_gpus: int = 2
    quick: bool = True            # part of --quick
    extra: dict[str, Any] = field(default_factory=dict)


CONFIGS = [
    # The overhead pairs measure 32 steps after 8 of warm-up (a few seconds of a ~20 s launch): with 8
    # measured steps the medians of two identical direct runs were 18% apart (2xH200, 2026-11-27).
    # ZeRO-3 is host-bound and its step times vary most (0.25-0.36 s within one run on 4xH200).
    BenchConfig("1b_zero1", "llama-1b", {"zero_stage": 1}, steps=40, warmup=8),
    BenchConfig("1b_zero3", "llama-1b", {"zero_stage": 3}, steps=40, warmup=8),
    BenchConfig("1b_zero2", "llama-1b", {"zero_stage": 2}, steps=40, warmup=8, quick=False),
    BenchConfig("1b_zero2_offload_opt", "llama-1b", {"zero_stage": 2, "offload_optimizer": "cpu"}, direct=False,
                steps=6, warmup=2, quick=False),
    BenchConfig("1b_zero3_offload_all", "llama-1b", {"zero_stage": 3, "offload_optimizer": "cpu",
                                                     "offload_params": "cpu"}, direct=False, steps=6, warmup=2),
    BenchConfig("7b_zero2_offload_opt_ac", "llama-2-7b", {"zero_stage": 2, "offload_optimizer": "cpu",
                                                        "activation_checkpointing": "full"}, micro_batch=1,
                direct=False, steps=5, warmup=2, quick=False, min_gpus=4),
    BenchConfig("7b_zero3_ac", "llama-2-7b", {"zero_stage": 3, "activation_checkpointing": "full"}, micro_batch=1,
                seq_len=2048, direct=False, steps=6, warmup=2, quick=False, min_gpus=4),
]
CPU_SMOKE = BenchConfig("cpu_smoke_tiny_zero2", "tiny-llama", {"zero_stage": 2}, seq_len=32, micro_batch=2,
                        steps=12, warmup=3)


def job_for(cfg: BenchConfig, world: int, *, cpu: bool):
    from meshpilot.orchestrator.config.loader import job_from_dict
    plan = {"dp": world, "tp": 1, "micro_batch": cfg.micro_batch, **cfg.plan}
    train = {"seq_len": cfg.seq_len, "global_batch": cfg.micro_batch * world, "steps": cfg.steps,
             "precision": "fp32" if cpu else "bf16", "lr": 1e-4, "data": "synthetic", "warmup_steps": 0}
    cluster = "local"
    overrides = [f"cluster.gpus_per_node={world}", f"cluster.accelerator={'cpu' if cpu else 'gpu'}"]
    if not cpu:
        import torch
        card = torch.cuda.get_device_name(0)
        # datasheet peak for MFU even where NVML (used by `local` detection) is missing
        cluster = "h100-sxm-4" if "H100" in card else "local"
    return job_from_dict({"model": cfg.model, "cluster": cluster, "train": train, "plan": plan},
                         [overrides[0]] + ([] if cluster != "local" else overrides[1:]))


# --- one rank of one config (runs under torchrun) ------------------------------------------------

def _worker(args: argparse.Namespace) -> int:
    cfg = next(c for c in CONFIGS + [CPU_SMOKE] if c.name == args.config)
    from meshpilot.orchestrator.train.worker import env_rank_info
    info = env_rank_info()
    cpu = args.cpu
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    job = job_for(cfg, info["world_size"], cpu=cpu)
    from meshpilot.orchestrator.plan.plan import resolve_plan
    plan = resolve_plan(job)
    counter = None
    if args.count_steps:       # count each step's collectives, ZeRO-3 fetches and host reads (no timing)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from step_counter import StepCounter
        counter = StepCounter().install()
    mark = counter.mark if counter is not None else None
    if args.mode == "meshpilot":
        row = _run_meshpilot(job, plan, info, cfg, on_step=mark)
    else:
        row = _run_direct(job, plan, info, cfg, cpu=cpu, on_step=mark)
    if counter is not None:
        counter.uninstall()
        # a steady-state step (step 0 holds the set-up, the last one the final memory gather)
        s = counter.steps[len(counter.steps) // 2]
        row["step_counts"] = {"step": len(counter.steps) // 2,
                              "counts": {"/".join(map(str, k)): n for k, n in sorted(s.items(), key=str)}}
    if info["rank"] == 0:
        Path(args.result).write_text(json.dumps(row))
    return 0


def _run_meshpilot(job, plan, info, cfg: BenchConfig, on_step=None) -> dict[str, Any]:
    """meshpilot's worker; ``on_step()`` (tests) is called after every step."""
    from meshpilot.orchestrator.train.worker import run_worker
    times: list[float] = []

    def hook(r: dict[str, Any]) -> None:
        times.append(r["step_time_s"])
        if on_step is not None:
            on_step()
    with tempfile.TemporaryDirectory(prefix="mp_bench_") as run_dir:
        res = run_worker(job, plan, run_dir=run_dir, resume=False, tensorboard=False, save_final=False,
                         log_every=10**9, on_step=hook, **info)
    return _row(job, cfg, times, res["peak_memory"], info["world_size"], "meshpilot", res["final_loss"])


def _run_direct(job, plan, info, cfg: BenchConfig, *, cpu: bool, on_step=None) -> dict[str, Any]:
    """The minimal loop a user would write with DeepSpeed alone (same model, config and batch);
    ``on_step()`` (tests) is called after every step."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from meshpilot.orchestrator.train.metrics import memory_stats
    from meshpilot.strategies.deepspeed_config import deepspeed_config
    from meshpilot.strategies.model import build_model

    rank, world = info["rank"], info["world_size"]
    device = torch.device("cpu") if cpu else torch.device("cuda", info["local_rank"])
    if not cpu:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    ds_config = deepspeed_config(job, plan, on_cpu=cpu)
    import torch._dynamo  # noqa: F401  (before zero.Init, see meshpilot.strategies.zero)
    # stage 3: built under zero.Init; else built on the GPU, as meshpilot's worker does
    ctx = (deepspeed.zero.Init(config_dict_or_path=ds_config) if plan.zero_stage == 3
           else torch.device(device) if device.type == "cuda" else _Null())
    with ctx:
        model = build_model(job.model, plan, None, seed=job.train.seed, device=torch.get_default_device())
    # the usual decay / no-decay parameter groups (biases and norms without weight decay)
    def decays(n: str, p: Any) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2 and not n.endswith(".bias")
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": job.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    t = job.train
    g = torch.Generator(device="cpu").manual_seed(rank)
    times, loss = [], None
    for _ in range(t.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(plan.grad_accum):
            x = torch.randint(0, job.model.vocab, (plan.micro_batch, t.seq_len + 1), generator=g).to(device)
            loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step()
    mem: list[Any] = [None] * world
    from dataclasses import asdict
    dist.all_gather_object(mem, asdict(memory_stats(rank, device)))
    return _row(job, cfg, times, mem, world, "direct", float(loss.item()))


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return None


def _row(job, cfg: BenchConfig, times: list[float], memory: list[Any], world: int, mode: str,
         loss: float | None) -> dict[str, Any]:
    from meshpilot.orchestrator.sim.flops import mfu
    from meshpilot.orchestrator.config.models import param_counts
    measured = times[cfg.warmup:] or times
    step = statistics.median(measured)
    tokens = job.train.global_batch * job.train.seq_len
    return {"config": cfg.name, "mode": mode, "model": cfg.model, "params": param_counts(job.model).total,
            "plan": cfg.plan, "world": world, "seq_len": job.train.seq_len, "global_batch": job.train.global_batch,
            "step_time_s": step, "step_time_min_s": min(measured), "step_times_s": times,
            "tokens_per_s": tokens / step,
            "mfu": mfu(job, tokens / step, world, zeroth_order=False), "final_loss": loss, "memory": memory,
            # the caching allocator's mode: the worker sets the job's (meshpilot), the direct loop leaves torch's
            "expandable_segments": job.train.expandable_segments if mode == "meshpilot" else False}


# --- driver ----------------------------------------------------------------------------------------

def _launch(cfg: BenchConfig, mode: str, nproc: int, *, cpu: bool, timeout: float,
            count_steps: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mp_bench_res_") as d:
        result = Path(d) / "row.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", "--config", cfg.name, "--mode", mode, "--result", str(result)]
        if cpu:
            cmd.append("--cpu")
        if count_steps:
            cmd.append("--count-steps")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if cpu:
            env["DS_ACCELERATOR"] = "cpu"
        threads = None if cpu else _omp_threads(cfg, nproc)
        if threads is not None:          # what `meshpilot run` gives the rank (torchrun alone would give 1)
            env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"config": cfg.name, "mode": mode, "error": f"timeout after {timeout:.0f}s"}
        if p.returncode != 0 or not result.is_file():
            tail = (p.stdout + p.stderr)[-3000:]
            err = "out of memory" if "out of memory" in tail.lower() else f"exit {p.returncode}"
            return {"config": cfg.name, "mode": mode, "error": err, "log_tail": tail}
        row = json.loads(result.read_text())
        row["wall_s"] = time.time() - t0
        row["omp_num_threads"] = env.get("OMP_NUM_THREADS", "1 (torchrun's default)")
        return row


def _omp_threads(cfg: BenchConfig, nproc: int) -> int | None:
    """OpenMP threads per rank as meshpilot's Ray gang sets them: 1, or the rank's share of the
    host's cores (at most 8) when the plan offloads to the CPU, whose Adam runs on OpenMP threads.
    None: the caller's OMP_NUM_THREADS stands. (The offload rows of 2026-11-27 ran under torchrun's
    default of 1 thread: CPU Adam on one core per rank.)"""
    from meshpilot.launch.gang import gang_spec, omp_threads_for
    from meshpilot.orchestrator.plan.plan import Plan
    cpus = gang_spec(nproc, 1, accelerator="gpu", gpus_per_node=nproc, cpu_cores=os.cpu_count() or 1).cpus_per_worker
    return omp_threads_for(Plan(**cfg.plan), cpus)


def _fmt_gib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**30:.1f}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'config':26} {'mode':9} {'step s':>8} {'tok/s':>9} {'MFU':>6} {'alloc GiB':>9} {'resv GiB':>9} {'nvml GiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:26} {r['mode']:9} ERROR {r['error']}")
            continue
        mem = [m for m in r["memory"] if m]
        peak = lambda k: max((m.get(k) or 0 for m in mem), default=None) or None  # noqa: E731
        lines.append(f"{r['config']:26} {r['mode']:9} {r['step_time_s']:8.3f} {r['tokens_per_s']:9.0f} "
                     f"{100 * r['mfu']:5.1f}% {_fmt_gib(peak('torch_allocated_peak')):>9} "
                     f"{_fmt_gib(peak('torch_reserved_peak')):>9} {_fmt_gib(peak('nvml_used')):>9}")
    return "\n".join(lines)


def _overheads(rows: list[dict[str, Any]], key: str = "step_time_s") -> dict[str, float]:
    """meshpilot vs direct step time in percent per config: the median over repeats of each mode's
    ``key`` (the per-run median step time, or ``step_time_min_s``: the fastest measured step, the
    least disturbed by other work on the host)."""
    out = {}
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if "error" not in r:
            by.setdefault((r["config"], r["mode"]), []).append(r[key])
    for (name, mode), vals in by.items():
        if mode == "meshpilot" and (name, "direct") in by:
            out[name] = 100.0 * (statistics.median(vals) / statistics.median(by[(name, "direct")]) - 1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible, at most 4)")
    ap.add_argument("--quick", action="store_true", help="the short list (ZeRO-1/3 pairs, one offload row)")
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the JSON (default $OUT)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per subprocess (x2 for the 7B row)")
    ap.add_argument("--budget", type=float, default=330.0,
                    help="stop starting new configs after this many seconds (rows left are marked skipped)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each meshpilot/direct pair this many times, alternating which mode goes first "
                         "(overhead = ratio of the medians over repeats)")
    ap.add_argument("--count-steps", action="store_true",
                    help="also count one steady-state step's collectives, ZeRO-3 fetches and host reads per mode "
                         "(rows' step_counts; the counting wrappers add host time: compare counts, not times)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on 2 CPU processes (gloo): checks the script")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("meshpilot", "direct"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)

    configs = [CPU_SMOKE] if args.cpu_smoke else [c for c in CONFIGS if c.quick or not args.quick]
    if args.only:
        names = set(args.only.split(","))
        configs = [c for c in CONFIGS + [CPU_SMOKE] if c.name in names]
    if args.list:
        for c in configs:
            print(f"{c.name:26} {c.model:12} {c.plan} mb={c.micro_batch} seq={c.seq_len} direct={c.direct}")
        return 0
    import torch
    cpu = args.cpu_smoke
    if cpu:
        nproc, card = 2, "cpu"
    else:
        if not torch.cuda.is_available():
            print("train_bench: no CUDA device; use --cpu-smoke for the CPU dry path", file=sys.stderr)
            return 2
        nproc = min(args.gpus or torch.cuda.device_count(), torch.cuda.device_count())
        card = torch.cuda.get_device_name(0)
    import deepspeed
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    now = _dt.datetime.now(_dt.timezone.utc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_bench_{now.strftime('%Y%m%dT%H%M%SZ')}.json"

    def write_report() -> tuple[dict[str, float], dict[str, float]]:
        """(Re)write the JSON from the rows so far: a run cut short by a time limit keeps them."""
        over, over_min = _overheads(rows), _overheads(rows, "step_time_min_s")
        report = {"benchmark": "train_bench", "card": card, "gpus": nproc, "date": now.isoformat(),
                  "torch": torch.__version__, "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda,
                  "quick": args.quick, "repeats": args.repeats, "rows": rows,
                  "overhead_pct": over, "overhead_min_step_pct": over_min, "wall_s": time.time() - t_start}
        path.write_text(json.dumps(report, indent=1, default=str))
        return over, over_min
    for c in configs:
        if not cpu and nproc < c.min_gpus:
            rows.append({"config": c.name, "mode": "meshpilot", "error": f"needs {c.min_gpus} GPUs"})
            continue
        modes: list[str] = []
        for i in range(max(1, args.repeats) if c.direct else 1):
            pair = ("meshpilot", "direct") if c.direct else ("meshpilot",)
            modes += list(pair if i % 2 == 0 else pair[::-1])      # ABBA...: neither mode always runs first
        for mode in modes:
            elapsed = time.time() - t_start
            if elapsed > args.budget:
                rows.append({"config": c.name, "mode": mode, "error": f"skipped: time budget {args.budget:.0f}s spent"})
                continue
            print(f"[{elapsed:6.0f}s] {c.name} {mode} on {nproc} x {card} ...", flush=True)
            timeout = args.timeout * (2 if c.model == "llama-2-7b" else 1)
            rows.append(_launch(c, mode, nproc, cpu=cpu, timeout=timeout, count_steps=args.count_steps))
            r = rows[-1]
            print(f"         -> {r.get('error') or '%.3f s/step' % r['step_time_s']}", flush=True)
            write_report()
    over, over_min = write_report()
    print(_table(rows))
    for name, pct in over.items():
        print(f"meshpilot overhead on step time, {name}: {pct:+.2f}% median, {over_min[name]:+.2f}% fastest step "
              "(target <= 3%)")
    counted = {(r["config"], r["mode"]): r["step_counts"]["counts"] for r in rows if "step_counts" in r}
    for (name, mode), m in counted.items():
        d = counted.get((name, "direct"))
        if mode == "meshpilot" and d is not None:
            diff = {k: (m.get(k, 0), d.get(k, 0)) for k in sorted(set(m) | set(d)) if m.get(k, 0) != d.get(k, 0)}
            print(f"per-step counts, {name}, meshpilot vs direct where they differ: {diff}")
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
