"""Where the time from a launch command to the first training step goes.

Two parts, each writing JSON (card, date, versions) and a text table into ``--out``:

* ``--part worker``: the worker (``meshpilot.orchestrator.train.worker``) under torchrun on the
  run_vs_torchrun job (llama-1b, tp=2 x dp=2, ZeRO-2), 3 steps, every rank under cProfile.
  The first launch compiles DeepSpeed's ops; the second is the one reported: rank 0's
  start-up phases and the functions with the largest cumulative time (``worker_profile.txt``,
  the raw ``rank0.prof`` for ``python -m pstats``).
* ``--part ray``: an embedded ``ray.init`` as ``meshpilot run`` starts it, then 4 one-GPU actors
  that import torch and touch their GPU, in a fresh process per variant: Ray's defaults
  (num_cpus = the host's cores), worker prestart off, and num_cpus = the gang's CPUs.

    source .devbundle/setup.sh && python3 benchmarks/startup_profile.py --out $OUT   # ~2 min on 4 GPUs
    python3 benchmarks/startup_profile.py --part ray --gpus 0 --out /tmp/sp           # CPU actors
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meshpilot.comm.ports import free_port

HERE = Path(__file__).resolve().parent


def ray_variants(gpus: int) -> dict[str, dict[str, Any]]:
    """ray.init keyword arguments per variant; "num_cpus_gang" reserves only what `meshpilot
    run`'s gang takes (the threads per GPU rank x the GPUs; the one CPU actor of a run without GPUs)."""
    from meshpilot.orchestrator.config.clusters import cpu_threads_per_gpu_rank
    gang = gpus * cpu_threads_per_gpu_rank(os.cpu_count() or 1, gpus) if gpus else 1
    return {"default": {},
            "prestart_off": {"_system_config": {"prestart_worker_first_driver": False}},
            "num_cpus_gang": {"num_cpus": gang}}


def _inner(argv: list[str]) -> int:
    """One torchrun rank: the worker's main() under cProfile; the profile goes to PROF_DIR/rank<R>.prof."""
    from meshpilot.orchestrator.train import worker
    prof_dir = Path(os.environ["MP_PROF_DIR"])
    prof = cProfile.Profile()
    prof.enable()
    try:
        rc = worker.main(argv)
    finally:
        prof.disable()
        prof.dump_stats(str(prof_dir / f"rank{os.environ.get('RANK', '0')}.prof"))
    return rc or 0


def _top(prof_file: Path, n: int = 60) -> str:
    buf = io.StringIO()
    st = pstats.Stats(str(prof_file), stream=buf)
    st.sort_stats("cumulative").print_stats(n)
    return buf.getvalue()


def part_worker(out: Path, gpus: int, timeout: float, *, cpu_smoke: bool = False) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from run_vs_torchrun import write_job
    work = Path(tempfile.mkdtemp(prefix="mp_startup_profile_"))
    job = work / "job.yaml"
    info = (write_job(job, 3, "tiny-llama", ["cluster.accelerator=cpu", "train.seq_len=32", "train.precision=fp32"])
            if cpu_smoke else write_job(job, 3, "llama-1b", []))
    launches = []
    for i in range(2):                      # 0 compiles DeepSpeed's ops, 1 is reported
        prof_dir = out / f"worker_launch{i}"
        prof_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(gpus),
               "--master_port", str(free_port("127.0.0.1")), str(Path(__file__).resolve()), "--inner",
               "--job", str(job), "--run-dir", str(work / f"run{i}")]
        t0 = time.time()
        p = subprocess.run(cmd, env=dict(os.environ, MP_PROF_DIR=str(prof_dir)), capture_output=True, text=True,
                           timeout=timeout)
        wall = time.time() - t0
        (prof_dir / "launch.log").write_text(p.stdout + p.stderr)
        timeline = [x for x in (p.stdout + p.stderr).splitlines() if "[rank 0]" in x and "step 2 " not in x][:12]
        launches.append(dict(launch=i, rc=p.returncode, wall_s=round(wall, 2), rank0_log=timeline))
        print(f"worker launch {i}: rc={p.returncode} wall {wall:.1f}s", flush=True)
    prof0 = out / "worker_launch1" / "rank0.prof"
    if prof0.exists():
        text = _top(prof0)
        (out / "worker_profile.txt").write_text(text)
        print(text[:6000])
    return dict(plan=info["plan"], launches=launches)


_RAY_PROBE = r"""
import json, os, sys, time
t0 = time.time()
import ray
kw = json.loads(sys.argv[1]); gpus = int(sys.argv[2])
kw.setdefault("num_cpus", os.cpu_count())
t1 = time.time()
ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False,
         object_store_memory=150 * 2**20, **kw)
t2 = time.time()

@ray.remote
class Rank:
    def ready(self):
        import torch
        t = time.time()
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
        return t, time.time()

n = max(gpus, 1)
opts = dict(num_gpus=1, num_cpus=1) if gpus else dict(num_cpus=1)
pg = ray.util.placement_group([{"CPU": 1, **({"GPU": 1} if gpus else {})}] * n, strategy="STRICT_PACK")
ray.get(pg.ready())
t3 = time.time()
actors = [Rank.options(**opts, scheduling_strategy=ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
          placement_group=pg, placement_group_bundle_index=i)).remote() for i in range(n)]
marks = ray.get([a.ready.remote() for a in actors])
t4 = time.time()
ray.shutdown()
print(json.dumps(dict(import_ray_s=t1 - t0, ray_init_s=t2 - t1, placement_group_s=t3 - t2,
                      actors_ready_s=t4 - t3, torch_imported_at_s=max(m[0] for m in marks) - t3,
                      shutdown_s=time.time() - t4, num_cpus=kw["num_cpus"])))
"""


def part_ray(out: Path, gpus: int, repeats: int) -> dict[str, Any]:
    rows, variants = [], ray_variants(gpus)
    for r in range(repeats):
        for name, kw in variants.items():
            t0 = time.time()
            p = subprocess.run([sys.executable, "-c", _RAY_PROBE, json.dumps(kw), str(gpus)], capture_output=True,
                               text=True, timeout=180)
            row: dict[str, Any] = dict(variant=name, repeat=r, wall_s=round(time.time() - t0, 2), rc=p.returncode)
            try:
                row.update({k: (round(v, 2) if isinstance(v, float) else v)
                            for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()})
            except (ValueError, IndexError):
                row["error"] = (p.stdout + p.stderr)[-2000:]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return dict(variants=variants, rows=rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--inner":
        return _inner(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--part", choices=["worker", "ray", "all"], default="all")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs (default: all visible; 0 = CPU actors, ray part)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the Ray variants")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="the worker part on 4 CPU processes, tiny model")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    meta: dict[str, Any] = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                card=torch.cuda.get_device_name(0) if gpus else "cpu", gpus=gpus,
                                cpus=os.cpu_count(), torch=torch.__version__)
    import ray
    meta["ray"] = ray.__version__
    if args.part in ("ray", "all"):
        meta["ray_start"] = part_ray(out, gpus, args.repeats)
    if args.part in ("worker", "all") and (gpus >= 4 or args.cpu_smoke):
        import deepspeed
        meta["deepspeed"] = deepspeed.__version__
        meta["worker"] = part_worker(out, 4, args.timeout, cpu_smoke=args.cpu_smoke)
    (out / "startup_profile.json").write_text(json.dumps(meta, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
