#!/usr/bin/env python
"""Zeroth-order benchmarks on H100s: ZO2 memory vs model size, DistZO2 throughput.

Parts (each configuration runs in its own subprocess, launched with torch.distributed.run
when it needs several GPUs, so an OOM or a hang costs only that configuration):

1. memory: ZO2 (blocks offloaded to pinned CPU memory) on one GPU, OPT-style built-in
   models in bf16 at batch 1, seq 2048; peak GPU memory (torch max allocated / reserved)
   against the weights alone and a plain-MeZO budget (``--budget-gb``, default 8 GB: every
   model listed above 2.7B cannot even hold its weights there), next to ZO2's published
   figures (1.3B 3.75 GB, 2.7B 4.14, 6.7B 4.99, 13B 6.18, 30B 8.86).
2. throughput: plain MeZO step rate (samples/s) on 1 GPU vs pertp=2 on 2 GPUs (target
   >= 1.8x), zo dp=4 and 2D (pertp=2 x zo dp=2) on 4 GPUs (target >= 3.4x); same global
   batch, same model. On a 2-GPU machine: zo dp=2 (held to the 2-GPU target, 1.8x), no 2D.
3. sliced: ZO2 with zo dp=n on n GPUs (n = 4, or 2 on a 2-GPU machine), with and without
   sliced upload (each rank uploads 1/n of a block and all-gathers over NVLink).

Each result is written to ``--out`` (default $OUT, else ./zo_bench_out) as zo_bench.json
with the card name, date and versions; a table is printed. Next to each plan, the
simulator's prediction is added when ``meshpilot.orchestrator.sim.simulator`` can score it.

    python benchmarks/zo_bench.py --quick            # ~3 min on 4 H100s
    python benchmarks/zo_bench.py                    # ~6 min; adds 13B to the memory sweep
    python benchmarks/zo_bench.py --big              # adds opt-30b (needs ~70 GB host RAM per run)
    python benchmarks/zo_bench.py --dry              # CPU, tiny model, gloo: checks the code path here
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
import traceback
import zlib
from pathlib import Path
from typing import Any

PUBLISHED_ZO2_GB = {"opt-1.3b": 3.75, "opt-2.7b": 4.14, "opt-6.7b": 4.99, "opt-13b": 6.18, "opt-30b": 8.86,
                    "opt-66b": 12.07, "opt-175b": 18.04}


# --- worker (one configuration, one process per rank) -----------------------------------------

def _fast_init() -> None:
    """Replace the built-in model's N(0, std) initialisation by a repeated 1M-element random
    tile in bf16 (a 13B model initialises in seconds instead of minutes; values are
    irrelevant for memory and speed)."""
    import torch
    import meshpilot.strategies.init_utils as iu
    from meshpilot.strategies import model as m, tensor_parallel as tp

    def fast_normal(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
        tile = (torch.randn(1 << 20, generator=gen) * std).to(torch.bfloat16)
        n = 1
        for s in shape:
            n *= s
        out = torch.empty(n, dtype=torch.bfloat16)
        full = n // tile.numel()
        if full:
            out[: full * tile.numel()].view(full, -1).copy_(tile.expand(full, -1))
        rest = n - full * tile.numel()
        if rest:
            out[n - rest:].copy_(tile[:rest])
        return out.view(shape)

    for mod in (iu, m, tp):
        if hasattr(mod, "full_normal"):
            mod.full_normal = fast_normal
    try:
        from meshpilot.strategies import moe
        moe.full_normal = fast_normal
    except ImportError:
        pass


def _tiny_cfg():
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.orchestrator.config.models import model_preset
    return ModelConfig(**model_preset("tiny-gpt2"))


def run_worker(spec: dict[str, Any], result_path: str) -> None:
    import torch
    import torch.distributed as dist
    from meshpilot.comm.groups import build_process_groups
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.orchestrator.config.models import model_preset, param_counts
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model, resolved_model_config
    from meshpilot.strategies.zo import build_zo_trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(seconds=300))
    try:
        cfg = _tiny_cfg() if spec["model"] == "tiny" else ModelConfig(**model_preset(spec["model"]))
        cfg = resolved_model_config(cfg)
        pertp, zo_dp, batch = spec["pertp"], spec["zo_dp"], spec["batch"]
        plan = Plan(zo_mode=spec["mode"], zo_pertp=pertp, zo_dp=zo_dp, micro_batch=batch // zo_dp)
        assert plan.world_size == world, (plan.world_size, world)
        groups = build_process_groups(plan.layout(gpus_per_node=world)) if world > 1 else None
        dtype = torch.bfloat16 if cuda else torch.float32
        if cuda:
            _fast_init()
        t0 = time.perf_counter()
        model = build_model(cfg, plan, None, seed=0, dtype=dtype, device="cpu")
        if spec["mode"] == "mezo":
            model.to(device)
        trainer = build_zo_trainer(model, plan, groups, lr=1e-7, eps=1e-3, seed=0, device=device,
                                   sliced_upload=spec.get("sliced", False))
        setup_s = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(rank // pertp)
        local_b = batch // zo_dp
        ids = torch.randint(0, cfg.vocab, (local_b, spec["seq"]), generator=gen).to(device)
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize(device)

        for _ in range(spec["warmup"]):
            trainer.step(ids, labels)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for _ in range(spec["steps"]):
            t = time.perf_counter()
            r = trainer.step(ids, labels)
            sync()
            times.append(time.perf_counter() - t)
            losses.append(r.loss)
        trainer.flush()
        sync()
        mem = {"max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
               "max_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if cuda else None}
        if world > 1:
            all_mem: list[Any] = [None] * world
            dist.all_gather_object(all_mem, mem)
            if cuda:
                mem = {k: max(m[k] for m in all_mem) for k in mem}
        pc = param_counts(cfg)
        res = dict(spec=spec, world=world, setup_s=setup_s, step_times_s=times,
                   step_time_s=statistics.median(times), samples_per_s=batch / statistics.median(times),
                   tokens_per_s=batch * spec["seq"] / statistics.median(times), losses=losses,
                   params=pc.total, weights_gb=pc.total * (2 if cuda else 4) / 1e9, **mem)
        if rank == 0:
            Path(result_path).write_text(json.dumps(res))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --- driver ------------------------------------------------------------------------------------

def _configs(args: argparse.Namespace, ngpu: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(part, name, spec) for every configuration to run."""
    dev = "cpu" if args.dry else "cuda"
    out: list[tuple[str, str, dict[str, Any]]] = []
    parts = set(args.parts.split(","))
    if "memory" in parts:
        sizes = (["tiny"] if args.dry else args.sizes.split(",") if args.sizes else ["opt-1.3b", "opt-6.7b"]
                 if args.quick else ["opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b"]) + (["opt-30b"] if args.big else [])
        seq = 64 if args.dry else 2048
        for m in sizes:
            out.append(("memory", f"zo2 {m}", dict(mode="zo2", model=m, pertp=1, zo_dp=1, batch=1, seq=seq,
                                                   warmup=1, steps=2 if args.quick or args.dry else 3, device=dev)))
    if "throughput" in parts:
        m = "tiny" if args.dry else args.tp_model
        b, s = (4, 32) if args.dry else (args.batch, args.seq)
        steps = 2 if args.dry else (4 if args.quick else 8)
        common = dict(mode="mezo", model=m, batch=b, seq=s, warmup=1 if args.dry else 2, steps=steps, device=dev)
        out.append(("throughput", "mezo 1 gpu", dict(common, pertp=1, zo_dp=1)))
        out.append(("throughput", "pertp=2", dict(common, pertp=2, zo_dp=1)))
        # zo dp over every visible GPU (4, or 2 on a 2-GPU machine; 2 in --dry); 2D needs 4
        dp = 2 if args.dry else (4 if ngpu >= 4 else 2)
        out.append(("throughput", f"zo dp={dp}", dict(common, pertp=1, zo_dp=dp)))
        if args.dry or ngpu >= 4:
            out.append(("throughput", "2D pertp=2 x dp=2", dict(common, pertp=2, zo_dp=2)))
    if "sliced" in parts:
        m = "tiny" if args.dry else ("opt-2.7b" if args.quick else "opt-6.7b")
        n = 2 if args.dry else max(2, min(4, ngpu))
        common = dict(mode="zo2", model=m, pertp=1, zo_dp=n, batch=n, seq=64 if args.dry else 1024,
                      warmup=1, steps=2 if args.dry or args.quick else 4, device=dev)
        out.append(("sliced", f"zo2 dp={n} full upload", dict(common, sliced=False)))
        out.append(("sliced", f"zo2 dp={n} sliced upload", dict(common, sliced=True)))
    return out


def _launch(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    world = spec["pertp"] * spec["zo_dp"]
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--result", str(res)]
        if world > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   *cmd[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            return {"error": f"timeout after {timeout:.0f} s", "log_tail": str(e.stderr or "")[-2000:]}
        if p.returncode != 0 or not res.exists():
            text = (p.stdout or "") + (p.stderr or "")
            oom = "out of memory" in text.lower()
            return {"error": "OOM" if oom else f"exit code {p.returncode}", "log_tail": text[-3000:]}
        out = json.loads(res.read_text())
        out["wall_s"] = time.perf_counter() - t0
        return out


def preset_for(card: str) -> str:
    """The cluster preset of the measured card (H200 machines were lent for H100 requests)."""
    return "h200-sxm-4" if "H200" in card.upper() else "h100-sxm-4"


def _simulated(spec: dict[str, Any], cluster: str = "h100-sxm-4") -> dict[str, Any] | None:
    """The simulator's prediction for the same plan on ``cluster``, if it can score it."""
    try:
        from meshpilot.orchestrator.config.loader import job_from_dict
        from meshpilot.orchestrator.plan.plan import Plan
        from meshpilot.orchestrator.sim.simulator import simulate
        model = "tiny-gpt2" if spec["model"] == "tiny" else spec["model"]
        world = spec["pertp"] * spec["zo_dp"]
        job = job_from_dict({"model": model, "cluster": cluster,
                             "train": {"optimizer": "zo-sgd", "seq_len": spec["seq"], "global_batch": spec["batch"],
                                       "precision": "bf16"},
                             "plan": {"zo": {"mode": spec["mode"], "pertp": spec["pertp"], "dp": spec["zo_dp"]}}})
        plan = Plan(zo_mode=spec["mode"], zo_pertp=spec["pertp"], zo_dp=spec["zo_dp"],
                    micro_batch=spec["batch"] // spec["zo_dp"])
        est = simulate(job, plan)
        keep = {}
        for k in ("step_time_s", "tokens_per_s", "peak_memory_gib", "gpu_memory_gib", "cpu_memory_gib_per_node",
                  "fits"):
            v = getattr(est, k, None)
            if isinstance(v, (int, float, bool)):
                keep[k] = v
        return keep or {"repr": repr(est)[:300], "world": world}
    except Exception as e:  # noqa: BLE001 - the prediction is optional
        return {"unavailable": f"{type(e).__name__}: {e}"[:200]}


def _env_info(dry: bool) -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        info["deepspeed"] = None
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["zo_kernel"] = os.environ.get("MESHPILOT_ZO_KERNEL", "auto")
    if torch.cuda.is_available() and not dry:
        info["card"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["card"] = "cpu (dry run)"
        info["gpus"] = 0
    return info


def _table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'part':<11}{'config':<28}{'step s':>9}{'samples/s':>11}{'speedup':>9}{'peak GB':>9}"
             f"{'weights GB':>12}{'ZO2 paper GB':>14}{'sim step s':>11}{'sim GiB':>9}  note"]
    for r in results:
        m = r.get("measured", {})
        if "error" in m:
            lines.append(f"{r['part']:<11}{r['name']:<28}  {m['error']}")
            continue
        peak = m.get("max_allocated_gb")
        sim = r.get("simulated") or {}
        lines.append(f"{r['part']:<11}{r['name']:<28}{m['step_time_s']:>9.3f}{m['samples_per_s']:>11.2f}"
                     f"{(r.get('speedup') or float('nan')):>9.2f}{(peak if peak is not None else float('nan')):>9.2f}"
                     f"{m['weights_gb']:>12.2f}{(r.get('published_gb') or float('nan')):>14.2f}"
                     f"{sim.get('step_time_s', float('nan')):>11.3f}{sim.get('peak_memory_gib', float('nan')):>9.2f}"
                     f"  {r.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "zo_bench_out", help="directory for zo_bench.json")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and steps (~3 min on 4 H100s)")
    ap.add_argument("--big", action="store_true", help="add opt-30b to the memory sweep")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny model, gloo: check the code path without a GPU")
    ap.add_argument("--parts", default="memory,throughput,sliced")
    ap.add_argument("--sizes", default=None, help="models of the memory part, e.g. opt-1.3b,opt-13b")
    ap.add_argument("--budget-gb", type=float, default=8.0, help="plain-MeZO GPU budget for the memory part")
    ap.add_argument("--tp-model", default="opt-1.3b", help="model of the throughput part")
    ap.add_argument("--batch", type=int, default=32, help="global batch of the throughput part")
    ap.add_argument("--seq", type=int, default=1024, help="sequence length of the throughput part")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per configuration")
    ap.add_argument("--kernel", choices=["auto", "triton", "torch"], default="auto",
                    help="perturbation passes: the fused Triton kernel (auto on CUDA) or the PyTorch ops")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker), args.result)
        return 0
    os.environ["MESHPILOT_ZO_KERNEL"] = args.kernel        # inherited by every worker

    import torch
    ngpu = 0 if args.dry else torch.cuda.device_count()
    if not args.dry and ngpu == 0:
        print("no CUDA device: use --dry for the CPU code path", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = _env_info(args.dry)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for part, name, spec in _configs(args, ngpu):
        world = spec["pertp"] * spec["zo_dp"]
        row: dict[str, Any] = {"part": part, "name": name, "spec": spec}
        if not args.dry and world > ngpu:
            row["measured"] = {"error": f"skipped: needs {world} GPUs, {ngpu} visible"}
        else:
            try:
                row["measured"] = _launch(spec, args.timeout)
            except Exception:  # noqa: BLE001 - one configuration never ends the run
                row["measured"] = {"error": traceback.format_exc()[-1500:]}
        row["simulated"] = _simulated(spec, preset_for(info["card"]))
        if part == "memory":
            row["published_gb"] = PUBLISHED_ZO2_GB.get(spec["model"])
            w = row["measured"].get("weights_gb")
            if w is not None:
                row["note"] = (f"weights {'exceed' if w > args.budget_gb else 'fit'} the plain-MeZO budget "
                               f"{args.budget_gb:g} GB")
        results.append(row)
        print(f"[{time.perf_counter() - t_start:6.0f} s] {part}/{name}: "
              f"{row['measured'].get('error') or 'ok %.3f s/step' % row['measured']['step_time_s']}", flush=True)
    base = {}
    for r in results:
        m = r["measured"]
        if "error" in m:
            continue
        if r["name"] == "mezo 1 gpu":
            base["throughput"] = m["samples_per_s"]
        if r["part"] == "sliced" and "full upload" in r["name"]:
            base["sliced"] = m["samples_per_s"]
    # the targets: >= 1.8x on 2 GPUs, >= 3.4x on 4 (zo dp=2 is held to the 2-GPU one)
    targets = {"pertp=2": 1.8, "zo dp=2": 1.8, "zo dp=4": 3.4, "2D pertp=2 x dp=2": 3.4}
    for r in results:
        m = r["measured"]
        if "error" in m or r["part"] not in base:
            continue
        r["speedup"] = m["samples_per_s"] / base[r["part"]]
        if r["name"] in targets:
            r["target"] = targets[r["name"]]
            r["note"] = f"target >= {targets[r['name']]}x: {'met' if r['speedup'] >= r['target'] else 'NOT met'}"
    table = _table(results)
    print(info)
    print(table)
    path = out_dir / "zo_bench.json"
    path.write_text(json.dumps({"info": info, "args": vars(args), "results": results,
                                "total_s": time.perf_counter() - t_start}, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
