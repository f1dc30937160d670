"""DeepSpeed's autotuner against ``meshpilot plan`` on one job, both choices through one training loop.

Issue #16 item 4. The job: meshpilot's built-in llama-2-7b (6.74B parameters, random weights),
sequence length 2048, global batch 16 sequences, bf16, AdamW, on the 2 GPUs of one node
(``benchmarks/configs/h200x2_check.yaml`` with the ``h200-sxm-4`` preset cut to 2 GPUs, 256 GiB
and 32 cores of host). Both deciders get the same space: data parallelism over both GPUs
(dp = 2, tp = 1), no offload, no activation checkpointing, ZeRO stage 0-3, micro-batch and
accumulation. meshpilot keeps its own DeepSpeed settings (buckets, overlap) for the stage it
picks; the autotuner in its ``fast`` mode runs DeepSpeed's defaults for each stage.

1. ``meshpilot plan JOB ... plan=auto plan.dp=2 plan.tp=1 plan.offload_optimizer=none
   plan.offload_params=none plan.activation_checkpointing=none --json --export-deepspeed``:
   time to decide (the command's wall time, Python start included), the chosen plan and its
   DeepSpeed config.
2. ``deepspeed --autotuning tune --num_gpus 2 benchmarks/autotune_train.py --deepspeed_config
   ds_autotune.json ...``: the config is meshpilot's exported one (same optimizer, precision,
   clipping) without its batch keys, with ``zero_optimization.stage`` = the stages to tune
   (default ``all``) and an ``autotuning`` section (``fast``, throughput metric, profile steps
   ``--profile-steps``, ``max_train_batch_size`` = the global batch, ``num_tuning_micro_batch_sizes``).
   DeepSpeed's own search runs: a model-info experiment (ZeRO-3, micro-batch 1, one forward:
   parameters and activation memory), then per stage that its memory estimate admits, a search
   for the smallest and largest micro-batch that run and a few micro-batches between them with
   accumulation ``max_train_batch_size / (mb * 2)``; every experiment is a separate launch of
   the script, its config passed base64. The autotuner gets a wall-time cap (``--tune-cap-s``,
   default: what the budget leaves after the final runs): at the cap its process group is
   stopped (SIGTERM, then SIGKILL) and the experiments that finished are kept. Every experiment
   is recorded from its results folder: name, stage, micro-batch, accumulation, DeepSpeed's
   metric, status (ok, oom, failed, cut by the cap). Time to decide: until
   ``ds_config_optimal.json`` is written (the autotuner finished), else the cap. Its choice: that
   file (the ``global`` row of its summary, which need not be the experiment with the highest
   metric: DeepSpeed records only some experiments of a stage), or at the cap the finished
   experiment with the highest metric.
3. Both choices through the same loop: ``deepspeed --num_gpus 2 benchmarks/autotune_train.py``
   without autotuning, ``--warmup`` untimed steps then ``--steps`` timed ones; tokens/s =
   global batch x seq_len / median step. The autotuner's choice runs at the job's global batch
   (its accumulation set to ``16 / (mb * 2)``) when its experiment ran another batch and the
   micro-batch divides; both numbers are recorded. Also reported: the best metric among all
   autotuner experiments, DeepSpeed's ``throughput`` (samples/s = train_batch_size / latency,
   latency = the CUDA-event-timed forward + backward + step of the last profiled step), and
   that times seq_len as tokens/s.
4. A table, and ``autotuner_vs_plan.json`` (card, date, versions, command; written after every
   stage). Every subprocess has a timeout; a failure costs its row, not the run.

Run (GPU machine, from the repository root; the ``deepspeed`` launcher on PATH, else a wrapper
for ``python -m deepspeed.launcher.runner`` is put there)::

    python benchmarks/autotuner_vs_plan.py --out $R/autotune --budget-s 500
    python benchmarks/autotuner_vs_plan.py --dry-run          # the job, the plan, the commands; no GPU
    python benchmarks/autotuner_vs_plan.py --cpu-smoke --out /tmp/at   # tiny model, 2 CPU ranks, DS_ACCELERATOR=cpu

``--dry-run`` is the default without CUDA (and without ``--cpu-smoke``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import kill_process_group, child_env, default_out, metadata, run_subprocess, write_json  # noqa: E402

TRAIN_SCRIPT = HERE / "autotune_train.py"
DEFAULT_JOB = HERE / "configs" / "h200x2_check.yaml"
GPU_SETS = ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "cluster.cpu_memory_gib=256",
            "cluster.cpu_cores=32", "train.seq_len=2048", "train.global_batch=16", "train.precision=bf16",
            "train.optimizer=adamw", "train.data=synthetic"]
CPU_SETS = ["model=tiny-llama", "cluster=local", "cluster.gpus_per_node=2", "train.seq_len=32",
            "train.global_batch=8", "train.precision=fp32", "train.optimizer=adamw", "train.lr=3.0e-3",
            "train.data=synthetic"]
SPACE = ["plan=auto", "plan.dp={world}", "plan.tp=1", "plan.offload_optimizer=none", "plan.offload_params=none",
         "plan.activation_checkpointing=none"]
RESTRICTION = ("both deciders search the same space: dp = {world} (every GPU), tp = 1, no optimizer or parameter "
               "offload, no activation checkpointing; ZeRO stage {stages}; micro-batch x accumulation. meshpilot keeps "
               "its own ZeRO settings for its stage; the autotuner (fast mode) runs DeepSpeed's defaults per stage")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
TABULATE_SHIM = '''"""Written by benchmarks/autotuner_vs_plan.py: DeepSpeed's autotuner asserts that `tabulate` is
importable to print its summary; this machine has no tabulate package. A pipe table."""


def tabulate(rows, headers=(), tablefmt="pipe"):
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in width) + "|"
    return "\\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
'''
MLFLOW_SHIM = '''raise ImportError("hidden by benchmarks/autotuner_vs_plan.py: "
                  "DeepSpeed's autotuner reads MLFLOW_RUN_ID whenever mlflow imports")
'''


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=str(DEFAULT_JOB), help="meshpilot job file (default %(default)s)")
    p.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                   help="job overrides (default: the llama-2-7b job above; the CPU smoke's tiny job with --cpu-smoke)")
    p.add_argument("--out", default=None, help="output folder (default $OUT or benchmarks/results)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall time of the whole benchmark (default %(default)s)")
    p.add_argument("--tune-cap-s", type=float, default=None,
                   help="the autotuner's wall-time cap (default: the budget left minus --final-reserve-s)")
    p.add_argument("--final-reserve-s", type=float, default=130.0,
                   help="kept for the two final runs when the cap is derived from the budget (default %(default)s)")
    p.add_argument("--run-timeout-s", type=float, default=110.0, help="limit of one final run (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of a final run (default %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps of a final run (default %(default)s)")
    p.add_argument("--stages", default=None, help='ZeRO stages the autotuner tunes: "all" or e.g. "0,1,2" '
                   '(default all; 0,2 with --cpu-smoke)')
    p.add_argument("--profile-steps", default="1,2",
                   help="autotuning start_profile_step,end_profile_step (default %(default)s)")
    p.add_argument("--num-tuning-mbs", type=int, default=2,
                   help="autotuning num_tuning_micro_batch_sizes (default %(default)s)")
    p.add_argument("--ds-autotuning", choices=("tune", "run"), default="tune",
                   help="deepspeed --autotuning mode; run also trains once with the optimum after tuning "
                        "(default tune)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the job, run the planner, print the commands; no GPU")
    p.add_argument("--cpu-smoke", action="store_true", help="the whole path on 2 CPU ranks with the tiny model (gloo)")
    return p.parse_args(argv)


# --- the pieces --------------------------------------------------------------------------------------

class Budget:
    def __init__(self, total_s: float):
        self.total_s, self.t0 = total_s, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()


def stage_list(text: str) -> Any:
    return "all" if text.strip() == "all" else [int(s) for s in text.split(",") if s.strip()]


def autotune_config(exported: dict[str, Any], *, stages: Any, global_batch: int, profile: tuple[int, int],
                    num_mbs: int, results_dir: Path, exps_dir: Path) -> dict[str, Any]:
    """The autotuner's input config: meshpilot's exported config (optimizer, precision, clipping) without its
    batch keys and ZeRO settings, the stages to tune, and the autotuning section."""
    cfg = {k: v for k, v in exported.items() if k not in BATCH_KEYS}
    cfg["zero_optimization"] = {"stage": stages}
    cfg["autotuning"] = {"enabled": True, "fast": True, "metric": "throughput", "start_profile_step": profile[0],
                         "end_profile_step": profile[1], "max_train_batch_size": global_batch,
                         "num_tuning_micro_batch_sizes": num_mbs, "results_dir": str(results_dir),
                         "exps_dir": str(exps_dir), "overwrite": True}
    return cfg


def at_global_batch(cfg: dict[str, Any], global_batch: int, world: int) -> tuple[dict[str, Any], str]:
    """``cfg`` (autotuning section dropped) with its accumulation set so that the batch is
    ``global_batch`` when its micro-batch allows; and a note of what changed."""
    out = {k: v for k, v in cfg.items() if k != "autotuning"}
    mb, tb = int(out.get("train_micro_batch_size_per_gpu", 1)), out.get("train_batch_size")
    if tb == global_batch:
        return out, "as chosen"
    if global_batch % (mb * world) == 0:
        gas = global_batch // (mb * world)
        note = (f"train_batch_size {tb} -> {global_batch} "
                f"(accumulation {out.get('gradient_accumulation_steps')} -> {gas})")
        out.update(train_batch_size=global_batch, gradient_accumulation_steps=gas)
        return out, note
    return out, f"as chosen: micro-batch {mb} x {world} ranks does not divide {global_batch}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _text(path: Path, limit: int = 400_000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return ""


def is_oom_text(text: str) -> bool:
    t = text.lower()
    return "out of memory" in t or "outofmemoryerror" in t or "cublas_status_alloc_failed" in t


def collect_trials(results_dir: Path, seq_len: int, *, capped: bool) -> list[dict[str, Any]]:
    """Every experiment of the autotuner from its results folder, in launch order."""
    from deepspeed.autotuning.utils import search_error
    rows = []
    for d in sorted(p for p in results_dir.iterdir() if p.is_dir()) if results_dir.is_dir() else []:
        exp = _read_json(d / "exp.json")
        if not exp:
            continue
        cfg = exp.get("ds_config") or {}
        metrics, info = _read_json(d / "metrics.json"), _read_json(d / "model_info.json")
        logs = _text(d / "stderr.log") + _text(d / "stdout.log")
        started = (d / "exp.json").stat().st_mtime
        ended = max(f.stat().st_mtime for f in d.iterdir() if f.is_file())
        row = dict(exp_id=exp.get("exp_id"), name=exp.get("name", d.name),
                   zero_stage=(cfg.get("zero_optimization") or {}).get("stage"),
                   micro_batch=cfg.get("train_micro_batch_size_per_gpu"),
                   grad_accum=cfg.get("gradient_accumulation_steps"), train_batch_size=cfg.get("train_batch_size"),
                   started_unix=round(started, 1), seconds=round(ended - started, 1),
                   deepspeed_error=search_error(str(d / "stderr.log")))
        if metrics:
            thr = float(metrics.get("throughput", 0.0))
            row.update(status="ok", throughput_samples_per_s=thr, tokens_per_s=thr * seq_len,
                       latency_s=float(metrics.get("latency", 0.0)) / 1e6,
                       tflops_per_gpu=float(metrics.get("FLOPS_per_gpu", 0.0)) / 1e12)
        elif info:
            row.update(status="ok (model info)", model_info=info)
        elif is_oom_text(logs):
            row.update(status="oom")
        else:
            row.update(status="failed", log_tail=logs[-1500:])
        rows.append(row)
    rows.sort(key=lambda r: (r["exp_id"] is None, r["exp_id"] or 0))
    if capped and rows and rows[-1]["status"] == "failed":
        rows[-1]["status"] = "cut by the cap"
    return rows


def optimal_name(summary: str) -> str | None:
    """The experiment DeepSpeed chose: the ``global`` row of its ``summary.txt`` table. It need not
    be the experiment with the highest metric (DeepSpeed records only some experiments per space)."""
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] == "global":
            return cells[3]
    return None


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [t for t in trials if t.get("throughput_samples_per_s")]
    return max(ok, key=lambda t: t["throughput_samples_per_s"]) if ok else None


def launcher(work: Path) -> tuple[list[str], dict[str, str]]:
    """The ``deepspeed`` launcher command and PATH/PYTHONPATH additions: a wrapper for
    ``python -m deepspeed.launcher.runner`` when no ``deepspeed`` is on PATH (the autotuner's
    experiments call ``deepspeed`` by name), and import shims the autotuner needs here."""
    extra: dict[str, str] = {}
    if shutil.which("deepspeed") is None:
        bindir = work / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        w = bindir / "deepspeed"
        w.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deepspeed.launcher.runner "$@"\n')
        w.chmod(0o755)
        extra["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    shims = []
    if importlib.util.find_spec("tabulate") is None:
        shims.append(("tabulate.py", TABULATE_SHIM))
    if importlib.util.find_spec("mlflow") is not None:
        shims.append(("mlflow.py", MLFLOW_SHIM))
    if shims:
        sd = work / "shim"
        sd.mkdir(parents=True, exist_ok=True)
        for name, text in shims:
            (sd / name).write_text(text)
        extra["PYTHONPATH"] = os.pathsep.join(x for x in (str(sd), os.environ.get("PYTHONPATH", "")) if x)
    return ["deepspeed"], extra


def run_env(extra: dict[str, str], *, cpu: bool, world: int) -> dict[str, str]:
    env = child_env()
    env.update(extra, PYTHONUNBUFFERED="1")
    if cpu:
        env.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(world), OMP_NUM_THREADS="1")
    return env


def wait_gpus_free(world: int, limit_s: float = 30.0, below_gib: float = 3.0) -> float | None:
    """Seconds until every GPU's NVML used memory is under ``below_gib`` (None: NVML unavailable or never)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return None
    t0 = time.monotonic()
    try:
        hs = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(world)]
        while time.monotonic() - t0 < limit_s:
            if all(pynvml.nvmlDeviceGetMemoryInfo(h).used < below_gib * 2**30 for h in hs):
                return round(time.monotonic() - t0, 1)
            time.sleep(0.5)
        return None
    finally:
        pynvml.nvmlShutdown()


def run_autotuner(cmd: list[str], env: dict[str, str], *, cap_s: float, results_dir: Path,
                  log: Path) -> dict[str, Any]:
    """Run the autotuner in its own process group; stop the group at ``cap_s``. Returns rc, wall time,
    whether it was capped, and when ``ds_config_optimal.json`` appeared (seconds from the start)."""
    optimal = results_dir / "ds_config_optimal.json"
    t0 = time.monotonic()
    decided = None
    with open(log, "w") as logf:
        p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while p.poll() is None and time.monotonic() - t0 < cap_s:
                if decided is None and optimal.exists():
                    decided = time.monotonic() - t0
                time.sleep(0.5)
        finally:                                    # the cap, or this driver being stopped
            capped = p.poll() is None
            if capped:
                kill_process_group(p)
                try:                                # ranks that outlived the launcher's own handler
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    wall = time.monotonic() - t0
    if decided is None and optimal.exists():
        decided = wall
    return dict(rc=p.returncode, wall_s=round(wall, 1), capped=capped, cap_s=round(cap_s, 1),
                decided_s=None if decided is None else round(decided, 1))


def final_run(name: str, cfg: dict[str, Any], *, launch: list[str], env: dict[str, str], world: int, job: str,
              sets: list[str], warmup: int, steps: int, timeout_s: float, work: Path, gpus: bool) -> dict[str, Any]:
    """One chosen config through autotune_train.py (no autotuning), in its own process group with a timeout."""
    from harness import NvmlSampler
    from meshpilot.comm.ports import free_port
    cfg_path, res_path, log = work / f"ds_{name}_run.json", work / f"run_{name}.json", work / f"run_{name}.log"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    res_path.unlink(missing_ok=True)
    cmd = [*launch, "--num_gpus", str(world), "--master_port", str(free_port()), str(TRAIN_SCRIPT),
           "--deepspeed_config", str(cfg_path), "--job", job, "--set", *sets, "--warmup", str(warmup),
           "--steps", str(steps), "--result", str(res_path)]
    t0 = time.monotonic()
    with NvmlSampler(list(range(world)) if gpus else []) as nv:
        rc = run_subprocess(cmd, env, timeout_s, log)
    row: dict[str, Any] = dict(name=name, command=" ".join(cmd), rc=rc, wall_s=round(time.monotonic() - t0, 1),
                               timeout_s=round(timeout_s, 1), nvml=nv.result())
    res = _read_json(res_path)
    if rc == 0 and res:
        row.update(status="ok", **{k: v for k, v in res.items() if k != "deepspeed_config"})
    else:
        text = _text(log)
        row.update(status="timeout" if rc == 124 else "oom" if is_oom_text(text) else "failed", log_tail=text[-2000:])
    return row


def describe_config(cfg: dict[str, Any] | None) -> str:
    if not cfg:
        return "-"
    z = (cfg.get("zero_optimization") or {}).get("stage")
    return (f"zero={z} mb={cfg.get('train_micro_batch_size_per_gpu')}x{cfg.get('gradient_accumulation_steps')} "
            f"batch={cfg.get('train_batch_size')}")


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def tables(data: dict[str, Any]) -> str:
    mp, at = data.get("meshpilot") or {}, data.get("autotuner") or {}
    runs = {r["name"]: r for r in data.get("runs", [])}
    lines = [f"{'decider':20s} {'decide s':>9s}  {'choice':34s} {'status':8s} {'tokens/s':>9s} {'median s':>9s} "
             f"{'NVML GiB':>8s}"]
    for name, label, t, choice in (
            ("meshpilot", "meshpilot plan", mp.get("wall_s"), mp.get("chosen_plan")),
            ("autotuner", "DeepSpeed autotuner", at.get("decide_s"),
             f"{at.get('choice_name') or '-'} ({describe_config(at.get('choice_run_config'))})")):
        r = runs.get(name, {})
        peaks = (r.get("nvml") or {}).get("nvml_peak_all_gib") or []
        lines.append(f"{label:20s} {_f(t, '9.1f')}  {str(choice)[:34]:34s} {r.get('status', '-'):8s} "
                     f"{_f(r.get('tokens_per_s'), '9,.0f')} {_f(r.get('median_step_s'), '9.3f')} "
                     f"{_f(max(peaks) if peaks else None, '8.1f')}")
    if at.get("capped"):
        lines.append(f"  the autotuner was stopped at its cap of {at.get('cap_s')} s; "
                     f"its choice: {at.get('choice_source')}")
    lines.append(f"tokens/s meshpilot / autotuner (same loop): {_f(data.get('ratio_meshpilot_over_autotuner'), '.3f')}")
    b = data.get("best_trial")
    if b:
        lines.append(f"best autotuner experiment: {b['name']} {b['throughput_samples_per_s']:.3f} samples/s "
                     f"(DeepSpeed's throughput metric) = {b['tokens_per_s']:,.0f} tokens/s")
    lines.append(f"\n{'exp':>3s} {'name':24s} {'zero':>4s} {'mb':>3s} {'gas':>3s} {'batch':>5s} {'s':>6s} "
                 f"{'samples/s':>10s} {'tokens/s':>9s}  status")
    for t in at.get("trials", []):
        lines.append(f"{_f(t.get('exp_id'), '3d')} {t['name'][:24]:24s} {str(t.get('zero_stage')):>4s} "
                     f"{str(t.get('micro_batch')):>3s} {str(t.get('grad_accum')):>3s} "
                     f"{str(t.get('train_batch_size')):>5s} "
                     f"{_f(t.get('seconds'), '6.1f')} {_f(t.get('throughput_samples_per_s'), '10.3f')} "
                     f"{_f(t.get('tokens_per_s'), '9,.0f')}  {t['status']}")
    return "\n".join(lines)


# --- the benchmark -------------------------------------------------------------------------------------

def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")     # unwinds through the finally blocks that stop process groups


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)            # e.g. gpu_session.sh's timeout: take the experiments down too
    budget = Budget(args.budget_s)
    cpu = args.cpu_smoke
    if not cpu and not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device: --dry-run (use --cpu-smoke to run the whole path on CPU)", flush=True)
            args.dry_run = True
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.config.models import param_counts

    sets = list(args.set) if args.set is not None else list(CPU_SETS if cpu else GPU_SETS)
    job = load_job(args.job, sets)
    world = job.cluster.nodes * job.cluster.gpus_per_node
    stages = stage_list(args.stages or ("0,2" if cpu else "all"))
    space = [s.format(world=world) for s in SPACE]
    restriction = RESTRICTION.format(world=world, stages="0-3" if stages == "all" else stages)
    gb, seq = job.train.global_batch, job.train.seq_len
    print(f"job: {job.model.name} ({param_counts(job.model).total / 1e9:.2f}B parameters), seq_len {seq}, global batch "
          f"{gb}, {job.train.precision.value}, {job.train.optimizer.value}, {world} ranks on {job.cluster.name}\n"
          f"restriction: {restriction}", flush=True)
    out = Path(args.out) if args.out else default_out()
    work = Path(tempfile.mkdtemp(prefix="autotuner_vs_plan_")) if args.dry_run else out
    work.mkdir(parents=True, exist_ok=True)

    # 1. meshpilot plan
    ds_mp = work / "ds_meshpilot.json"
    plan_cmd = [sys.executable, "-m", "meshpilot.orchestrator.cli", "plan", args.job, *sets, *space, "--json",
                "--top", "20", "--export-deepspeed", str(ds_mp)]
    t0 = time.monotonic()
    try:
        p = subprocess.run(plan_cmd, capture_output=True, text=True, timeout=180)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        rc, stdout, stderr = 124, "", "timeout"
    plan_wall = time.monotonic() - t0
    found = _read_json_text(stdout) if rc == 0 else None
    top = (found or {}).get("top") or []
    mp: dict[str, Any] = dict(command=" ".join(plan_cmd), rc=rc, wall_s=round(plan_wall, 2),
                              planner_elapsed_s=(found or {}).get("elapsed_s"),
                              chosen_plan=top[0]["plan"] if top else None, chosen=top[0] if top else None,
                              plans_scored=(found or {}).get("scored"), plans_fitting=(found or {}).get("fitting"),
                              top=[dict(plan=e["plan"], step_time_s=e.get("step_time_s"),
                                        tokens_per_s=e.get("tokens_per_s"), peak_memory_gib=e.get("peak_memory_gib"))
                                   for e in top], error=None if rc == 0 else stderr[-2000:])
    exported = _read_json(ds_mp)
    if exported is not None and cpu:
        exported["optimizer"]["params"]["torch_adam"] = True     # CPU smoke: FusedAdam is a CUDA kernel
        ds_mp.write_text(json.dumps(exported, indent=1))
    mp["deepspeed_config"] = exported
    print(f"meshpilot plan: {mp['chosen_plan']} in {plan_wall:.2f} s (rc {rc}); config {ds_mp}", flush=True)
    if exported is None:
        print(f"meshpilot plan failed: {stderr[-2000:]}", flush=True)
        return 1

    # 2. the autotuner's input
    at_dir = work / "autotuning"
    ds_at = work / "ds_autotune.json"
    start, end = (int(x) for x in args.profile_steps.split(","))
    at_cfg = autotune_config(exported, stages=stages, global_batch=gb, profile=(start, end),
                             num_mbs=args.num_tuning_mbs, results_dir=at_dir / "results", exps_dir=at_dir / "exps")
    ds_at.write_text(json.dumps(at_cfg, indent=1))
    launch, extra = launcher(work)
    env = run_env(extra, cpu=cpu, world=world)
    at_cmd = [*launch, "--autotuning", args.ds_autotuning, "--num_gpus", str(world), str(TRAIN_SCRIPT),
              "--deepspeed_config", str(ds_at), "--job", args.job, "--set", *sets, "--warmup", "0", "--steps", "100"]
    if args.dry_run:
        print("\n# DeepSpeed autotuner input (" + str(ds_at) + "):\n" + json.dumps(at_cfg, indent=1))
        print("\n# autotuner:\n" + " ".join(at_cmd))
        print("\n# final runs (each chosen config, same loop):\n" + " ".join(
            [*launch, "--num_gpus", str(world), "--master_port", "PORT", str(TRAIN_SCRIPT), "--deepspeed_config",
             "CHOSEN.json", "--job", args.job, "--set", *sets, "--warmup", str(args.warmup), "--steps", str(args.steps),
             "--result", "RUN.json"]))
        cap = args.tune_cap_s or args.budget_s - args.final_reserve_s - 60
        print(f"\n# budget {args.budget_s:.0f} s: meshpilot plan ~{plan_wall:.0f} s, FusedAdam build ~40 s (GPU), "
              f"autotuner cap {cap:.0f} s, two final runs within {args.final_reserve_s:.0f} s")
        print(f"(files of this dry run in {work})")
        return 0
    data: dict[str, Any] = dict(benchmark="autotuner_vs_plan", **metadata(),
                                command=" ".join([sys.executable, *sys.argv]),
                                job=dict(file=args.job, overrides=sets, model=job.model.name,
                                         params=param_counts(job.model).total, seq_len=seq, global_batch=gb,
                                         precision=job.train.precision.value, world=world),
                                restriction=restriction, space_overrides=space, meshpilot=mp,
                                autotuner=dict(command=" ".join(at_cmd), config=at_cfg,
                                               env_added={k: v for k, v in extra.items()}),
                                runs=[], budget_s=args.budget_s)
    json_path = out / "autotuner_vs_plan.json"
    write_json(json_path, data)

    if not cpu:
        from harness import precompile_ops
        print("building DeepSpeed's FusedAdam once (every experiment would otherwise wait for it) ...", flush=True)
        data["op_build"] = precompile_ops(env, 300, work, ["fused_adam"])
        print(f"  {data['op_build']}", flush=True)

    # 3. the autotuner, capped
    cap = args.tune_cap_s if args.tune_cap_s is not None else max(60.0, budget.left() - args.final_reserve_s)
    print(f"[{budget.elapsed():6.1f} s] DeepSpeed autotuner (cap {cap:.0f} s): {' '.join(at_cmd)}", flush=True)
    res = run_autotuner(at_cmd, env, cap_s=cap, results_dir=at_dir / "results", log=work / "autotuner.log")
    res["gpus_free_after_s"] = None if cpu else wait_gpus_free(world)
    trials = collect_trials(at_dir / "results", seq, capped=res["capped"])
    best = best_trial(trials)
    optimal = _read_json(at_dir / "results" / "ds_config_optimal.json")
    name = best["name"] if best else None
    if optimal is not None:
        choice, source = optimal, "ds_config_optimal.json (the autotuner finished)"
        name = optimal_name(_text(at_dir / "results" / "summary.txt"))
    elif best is not None:
        choice = _read_json(at_dir / "results" / best["name"] / "ds_config.json")
        source = "the highest metric among the experiments that finished before the cap (the autotuner wrote no choice)"
    else:
        choice, source = None, "none: no experiment finished"
    at = data["autotuner"]
    at.update(res, decide_s=res["decided_s"] if res["decided_s"] is not None else res["wall_s"], trials=trials,
              choice_source=source, choice_name=name, choice_config=choice,
              summary=_text(at_dir / "results" / "summary.txt") or None)
    data["best_trial"] = best
    write_json(json_path, data)
    print(f"[{budget.elapsed():6.1f} s] autotuner: rc {res['rc']}, {res['wall_s']} s, capped {res['capped']}, "
          f"{len(trials)} experiments; choice {name} ({source})", flush=True)

    # 4. both choices, same loop
    runs = []
    if choice is not None:
        run_cfg, note = at_global_batch(choice, gb, world)
        at.update(choice_run_config=run_cfg, choice_run_note=note)
        runs.append(("autotuner", run_cfg))
    runs.append(("meshpilot", exported))
    for i, (who, cfg) in enumerate(runs):
        left = len(runs) - i
        timeout = max(30.0, min(args.run_timeout_s, (budget.left() - 5) / left))
        print(f"[{budget.elapsed():6.1f} s] final run {who}: {describe_config(cfg)} (limit {timeout:.0f} s)",
              flush=True)
        row = final_run(who, cfg, launch=launch, env=env, world=world, job=args.job, sets=sets, warmup=args.warmup,
                        steps=args.steps, timeout_s=timeout, work=work, gpus=not cpu)
        data["runs"].append(row)
        print(f"  {row['status']} tokens/s {row.get('tokens_per_s')} median {row.get('median_step_s')} s", flush=True)
        write_json(json_path, data)
    by = {r["name"]: r for r in data["runs"]}
    a, m = (by.get("autotuner") or {}).get("tokens_per_s"), (by.get("meshpilot") or {}).get("tokens_per_s")
    data["ratio_meshpilot_over_autotuner"] = m / a if a and m else None
    data["elapsed_s"] = round(budget.elapsed(), 1)
    write_json(json_path, data)
    print("\n" + tables(data))
    print(f"\nwrote {json_path} ({data['elapsed_s']} s)")
    return 0


def _read_json_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
