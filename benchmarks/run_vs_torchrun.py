"""`meshpilot run` (Ray controller) vs the same training launched by torchrun directly.

Same job, same plan (tp=2 x dp=2, ZeRO-2, bf16, 4 GPUs), same worker
(``meshpilot.orchestrator.train.worker``), same call, alternating order. For each launch:

* tokens/s, two ways, computed identically for both launchers from the worker's
  ``metrics.jsonl`` (rank 0 writes one record per step): ``timed`` = tokens per step x steps /
  the sum of the worker's own step times (after ``--warmup`` steps); ``wall`` = tokens per
  step x steps / the wall time between the first and last record after warm-up, as seen by
  polling the file every 20 ms (this includes any per-step cost of the launcher, e.g. the
  controller's progress hook);
* time from the command to the first training step (the first record appearing), after a
  warm-up launch has compiled DeepSpeed's ops (FusedAdam), so compilation is excluded.

Writes ``run_vs_torchrun.json`` (card, date, versions, every launch, the ratios) into ``--out``
(default $OUT) and prints a table. Each launch is its own subprocess with a timeout, so an
OOM or a hang costs one row, not the run. ``--dry-run`` (the default without CUDA) only
resolves the job and prints the two command lines.

    source .devbundle/setup.sh && python3 benchmarks/run_vs_torchrun.py --out $OUT          # ~5 min
    python3 benchmarks/run_vs_torchrun.py --quick --out $OUT                                # ~3 min
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from meshpilot.comm.ports import free_port

JOB = {
    "model": "llama-1b",
    "cluster": "h100-sxm-4",
    "train": {"seq_len": 2048, "global_batch": 16, "precision": "bf16", "lr": 1.0e-4, "warmup_steps": 2,
              "checkpoint_every": 0, "checkpoint_final": False, "data": "synthetic"},
    "plan": {"tp": 2, "dp": 2, "zero_stage": 2, "micro_batch": 4},
}


def write_job(path: Path, steps: int, model: str, overrides: list[str]) -> dict[str, Any]:
    """The resolved job file both launchers read (meshpilot's own loader checks it here)."""
    from meshpilot.orchestrator.config.loader import dump_job, job_from_dict
    from meshpilot.orchestrator.plan.plan import resolve_plan
    raw = json.loads(json.dumps(JOB))
    raw["model"] = model
    raw["train"]["steps"] = steps
    job = job_from_dict(raw, overrides)
    plan = resolve_plan(job)
    path.write_text(dump_job(job))
    return dict(plan=plan.describe(), world_size=plan.world_size,
                tokens_per_step=job.train.global_batch * job.train.seq_len)


def commands(job_file: Path, run_dir: Path, world: int) -> dict[str, list[str]]:
    return {
        "meshpilot_run": [sys.executable, "-m", "meshpilot.orchestrator.cli", "run", str(job_file),
                          "--run-dir", str(run_dir / "meshpilot"), "--no-progress", "--max-restarts", "0", "--force"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
                     "--master_addr", "127.0.0.1", "--master_port", str(free_port("")),
                     "-m", "meshpilot.orchestrator.train.worker", "--job", str(job_file), "--run-dir", str(run_dir / "torchrun")],
    }


def launch(name: str, cmd: list[str], metrics: Path, *, tokens_per_step: int, warmup: int,
           timeout: float, log: Path) -> dict[str, Any]:
    """Run one launch, polling metrics.jsonl for the time each step's record appears."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    seen: dict[int, float] = {}
    seen_rec: dict[int, dict] = {}
    t0 = time.time()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env)
        pos = 0
        while True:
            rc = p.poll()
            if metrics.exists():
                with open(metrics) as f:
                    f.seek(pos)
                    chunk = f.read()
                    # only complete lines
                    cut = chunk.rfind("\n") + 1
                    pos += len(chunk[:cut].encode())
                    now = time.time()
                    for line in chunk[:cut].splitlines():
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if "step" in rec:
                            seen.setdefault(int(rec["step"]), now)
                            seen_rec[int(rec["step"])] = rec
            if rc is not None:
                break
            if time.time() - t0 > timeout:
                p.kill()
                p.wait()
                return dict(name=name, ok=False, error=f"timed out after {timeout:.0f}s", log=str(log))
            time.sleep(0.02)
    wall = time.time() - t0
    if p.returncode != 0 or not seen:
        tail = log.read_text(errors="replace")[-1500:]
        return dict(name=name, ok=False, error=f"exit {p.returncode}", log_tail=tail)
    steps = sorted(seen)
    measured = [s for s in steps if s > warmup]
    recs = [seen_rec[s] for s in measured]
    timed = tokens_per_step * len(recs) / sum(r["step_time_s"] for r in recs) if recs else None
    wall_tps = None
    if len(measured) >= 2:
        span = seen[measured[-1]] - seen[measured[0] - 1 if measured[0] - 1 in seen else measured[0]]
        n = measured[-1] - (measured[0] - 1 if measured[0] - 1 in seen else measured[0])
        wall_tps = tokens_per_step * n / span if span > 0 else None
    return dict(name=name, ok=True, wall_s=round(wall, 2), command_to_first_step_s=round(seen[steps[0]] - t0, 2),
                steps=len(steps), tokens_per_s_timed=timed, tokens_per_s_wall=wall_tps,
                final_loss=seen_rec[steps[-1]].get("loss"),
                step_times_s=[round(seen_rec[s]["step_time_s"], 4) for s in steps])


def _topology() -> Optional[str]:
    """``nvidia-smi topo -m``: which GPU pairs NVLink joins (the tensor-parallel pairs' links)."""
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory (default $OUT or .)")
    ap.add_argument("--quick", action="store_true", help="one pair of launches, 12 steps")
    ap.add_argument("--steps", type=int, default=None, help="training steps per launch (default 30, quick 12)")
    ap.add_argument("--pairs", type=int, default=None, help="alternating (meshpilot, torchrun) pairs (default 2)")
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from tokens/s (default 3)")
    ap.add_argument("--model", default=JOB["model"], help="model preset (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per launch (default 240)")
    ap.add_argument("--dry-run", action="store_true", help="resolve the job, print the commands, run nothing")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="job overrides, e.g. plan.micro_batch=2")
    args = ap.parse_args(argv)
    steps = args.steps or (12 if args.quick else 30)
    pairs = args.pairs or (1 if args.quick else 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="mp_run_vs_torchrun_"))
    job_file = work / "job.yaml"
    info = write_job(job_file, steps, args.model, args.overrides)
    dry = args.dry_run or not cuda or torch.cuda.device_count() < info["world_size"]
    cmds = commands(job_file, work / "pair0", info["world_size"])
    print(f"job: {args.model}, {info['plan']}, {steps} steps, {info['tokens_per_step']} tokens/step")
    for k, c in cmds.items():
        print(f"{k}: {' '.join(c)}")
    if dry:
        why = "--dry-run" if args.dry_run else f"needs {info['world_size']} CUDA GPUs"
        print(f"dry run ({why}): nothing launched")
        shutil.rmtree(work, ignore_errors=True)
        return 0

    import deepspeed
    import ray
    meta = dict(card=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                deepspeed=deepspeed.__version__, ray=ray.__version__, cuda=torch.version.cuda, job=JOB | {"model": args.model},
                plan=info["plan"], steps=steps, warmup_steps=args.warmup, overrides=args.overrides,
                topology=_topology())
    rows: list[dict[str, Any]] = []
    # warm-up launch: compiles DeepSpeed's ops once, so neither launcher pays for it below
    wjob = work / "warm.yaml"
    write_job(wjob, 2, args.model, args.overrides)
    wc = commands(wjob, work / "warm", info["world_size"])["torchrun"]
    w = launch("warmup(torchrun)", wc, work / "warm" / "torchrun" / "metrics.jsonl",
               tokens_per_step=info["tokens_per_step"], warmup=0, timeout=max(args.timeout, 300),
               log=out / "warmup.log")
    print(f"warm-up: {w}", flush=True)

    def best(name: str, key: str) -> Optional[float]:
        v = [r[key] for r in rows if r["name"] == name and r.get("ok") and r.get(key)]
        return max(v) if v else None

    def first(name: str) -> Optional[float]:
        v = [r["command_to_first_step_s"] for r in rows if r["name"] == name and r.get("ok")]
        return min(v) if v else None

    def write() -> dict[str, Any]:
        """(Re)write run_vs_torchrun.json from the launches so far (after each one: a run cut
        short by a time limit keeps what finished)."""
        summary: dict[str, Any] = {}
        for key in ("tokens_per_s_timed", "tokens_per_s_wall"):
            a, b = best("meshpilot_run", key), best("torchrun", key)
            summary[key] = dict(meshpilot_run=a, torchrun=b, ratio=(a / b) if a and b else None)
        summary["command_to_first_step_s"] = dict(meshpilot_run=first("meshpilot_run"), torchrun=first("torchrun"))
        result = dict(meta, warmup_launch=w, launches=rows, summary=summary,
                      targets=dict(tokens_per_s_ratio=">= 0.97", meshpilot_command_to_first_step_s="< 20"))
        (out / "run_vs_torchrun.json").write_text(json.dumps(result, indent=1, default=str))
        return summary

    summary = write()                     # the warm-up alone, in case no launch below finishes
    for i in range(pairs):
        order = ["meshpilot_run", "torchrun"] if i % 2 == 0 else ["torchrun", "meshpilot_run"]
        cmds = commands(job_file, work / f"pair{i}", info["world_size"])
        for name in order:
            sub = "meshpilot" if name == "meshpilot_run" else "torchrun"
            r = launch(name, cmds[name], work / f"pair{i}" / sub / "metrics.jsonl",
                       tokens_per_step=info["tokens_per_step"], warmup=args.warmup, timeout=args.timeout,
                       log=out / f"{name}_{i}.log")
            r["pair"] = i
            if name == "meshpilot_run" and r.get("ok"):
                mdir = work / f"pair{i}" / "meshpilot"
                try:
                    s = json.loads((mdir / "summary.json").read_text())
                    r["controller_time_to_first_step_s"] = s.get("time_to_first_step_s")
                    r["controller_tokens_per_s"] = s.get("tokens_per_s")
                    r["startup_phases_s"] = [x.get("startup_phases_s") for x in s.get("results", [])]
                except Exception as e:
                    r["summary_error"] = str(e)
                for src, dst in (("controller.log", "controller"), ("logs/rank0.log", "rank0")):
                    if (mdir / src).exists():          # the start-up timeline (controller and rank 0)
                        shutil.copy(mdir / src, out / f"{name}_{i}_{dst}.log")
            rows.append(r)
            print(json.dumps(r), flush=True)
            summary = write()

    print(f"\n{meta['card']} x{meta['gpus']}  {meta['date']}  torch {meta['torch']}  deepspeed {meta['deepspeed']}  "
          f"ray {meta['ray']}\n{args.model} {info['plan']}, {steps} steps (first {args.warmup} excluded)")
    print(f"{'launcher':<16}{'pair':>5}{'tok/s timed':>14}{'tok/s wall':>14}{'cmd->step1 s':>14}{'wall s':>9}")
    for r in rows:
        if r.get("ok"):
            print(f"{r['name']:<16}{r['pair']:>5}{r['tokens_per_s_timed'] or 0:>14,.0f}{r['tokens_per_s_wall'] or 0:>14,.0f}"
                  f"{r['command_to_first_step_s']:>14.1f}{r['wall_s']:>9.1f}")
        else:
            print(f"{r['name']:<16}{r['pair']:>5}  FAILED: {r.get('error')}")
    for key in ("tokens_per_s_timed", "tokens_per_s_wall"):
        ratio = summary[key]["ratio"]
        print(f"ratio meshpilot/torchrun ({key}): " + ("-" if ratio is None else f"{ratio:.3f}"))
    print(f"command -> first step: {summary['command_to_first_step_s']}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
