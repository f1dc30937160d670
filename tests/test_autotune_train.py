"""benchmarks/autotune_train.py (the script DeepSpeed's autotuner launches) and the driver
benchmarks/autotuner_vs_plan.py, on CPU.

- The script trains the tiny model under torchrun with gloo, its DeepSpeed config passed as the
  autotuner passes it (URL-safe base64 of the JSON, ``deepspeed/autotuning/scheduler.py``), and
  its per-step losses equal those of a single-process PyTorch reference (``train_utils.
  reference_losses``: same model, data order, AdamW, clipping and schedule), which falls over
  the steps: ZeRO-2 on 2 ranks (micro-batch 2 x accumulation 2), and ZeRO-0 on 1 rank as an
  autotuning experiment, where DeepSpeed's engine writes the metrics and ends the process.
- The driver's pieces on hand-made autotuner folders (statuses, DeepSpeed's metric in tokens/s,
  the choice at the job's batch) and its ``--dry-run``.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "autotune_train.py"
sys.path.insert(0, str(BENCH))

SETS = ["model=tiny-llama", "cluster=local", "train.seq_len=32", "train.global_batch=8", "train.precision=fp32",
        "train.lr=3.0e-3", "train.warmup_steps=0", "train.steps=4", "train.weight_decay=0.1", "train.grad_clip=1.0",
        "train.data=demo", "train.seed=7"]
RTOL = 1e-5


def _job():
    from meshpilot.orchestrator.config.loader import load_job
    return load_job(None, SETS)


def _scheduler_b64(cfg: dict) -> str:
    """What DeepSpeed's scheduler passes after --deepspeed_config (run_experiment)."""
    return base64.urlsafe_b64encode(json.dumps(cfg).encode("utf-8")).decode("utf-8")


def _launch(world: int, cfg: dict, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(SCRIPT),
           "--deepspeed_config", _scheduler_b64(cfg), "--set", *SETS, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_script_trains_like_the_single_process_reference_and_ends_an_autotuning_experiment(tmp_path):
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.deepspeed_config import deepspeed_config
    from train_utils import reference_losses

    job = _job()
    zero2 = deepspeed_config(job, Plan(dp=2, zero_stage=2, micro_batch=2, grad_accum=2), on_cpu=True)
    # an autotuning experiment as the scheduler writes it: the autotuning section with its metric path
    zero0 = deepspeed_config(job, Plan(dp=1, zero_stage=0, micro_batch=4, grad_accum=2), on_cpu=True)
    metrics = tmp_path / "metrics.json"
    zero0["autotuning"] = {"enabled": True, "start_profile_step": 1, "end_profile_step": 2,
                           "metric_path": str(metrics), "metric": "throughput"}
    result = tmp_path / "zero2.json"
    p2 = _launch(2, zero2, ["--warmup", "1", "--steps", "3", "--result", str(result)])
    p0 = _launch(1, zero0, ["--warmup", "0", "--steps", "50", "--result", str(tmp_path / "never.json")])
    ref = reference_losses(job)
    out2, _ = p2.communicate(timeout=240)
    out0, _ = p0.communicate(timeout=240)
    assert p2.returncode == 0, out2[-3000:]
    assert p0.returncode == 0, out0[-3000:]
    assert len(ref) == 4 and ref[-1] < ref[0] - 0.05, ref          # the steps train: a wrong update shows

    r = json.loads(result.read_text())
    assert (r["zero_stage"], r["micro_batch"], r["grad_accum"], r["train_batch_size"], r["world"]) == (2, 2, 2, 8, 2)
    assert r["losses"] == pytest.approx(ref, rel=RTOL), f"ZeRO-2 x 2 ranks vs single process:\n{r['losses']}\n{ref}"
    assert len(r["step_times_s"]) == 4 and r["median_step_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["median_step_s"])

    # DeepSpeed's engine ended the experiment after step end_profile_step (3 optimizer steps, 0-based 0..2):
    # the losses of steps 0 and 1 were printed, step 2's all-reduce never ran, no result was written
    printed = [float(x) for x in re.findall(r"^step \d+ loss ([0-9.]+)", out0, flags=re.M)]
    assert printed == pytest.approx(ref[:2], rel=RTOL), out0[-3000:]
    assert not (tmp_path / "never.json").exists()
    m = json.loads(metrics.read_text())
    assert m["throughput"] > 0 and m["latency"] > 0
    # DeepSpeed's metric: samples/s = train_batch_size / latency, latency in microseconds
    assert m["throughput"] == pytest.approx(8 * 1e6 / m["latency"])


def _exp(root: Path, exp_id: int, name: str, stage: int, mb: int, gas: int, *, metrics=None, stderr="", stdout=""):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": mb,
           "gradient_accumulation_steps": gas, "train_batch_size": mb * gas * 2, "autotuning": {"enabled": True}}
    (d / "exp.json").write_text(json.dumps({"exp_id": exp_id, "name": name, "ds_config": cfg}))
    (d / "ds_config.json").write_text(json.dumps(cfg))
    (d / "stderr.log").write_text(stderr)
    (d / "stdout.log").write_text(stdout)
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))


def test_driver_reads_every_experiment_and_takes_deepspeeds_best(tmp_path):
    from autotuner_vs_plan import at_global_batch, autotune_config, best_trial, collect_trials, optimal_name

    root = tmp_path / "results"
    _exp(root, 1, "z0_gas1_tmbspg1", 0, 1, 1, stderr="torch.OutOfMemoryError: CUDA out of memory. Tried to ...")
    _exp(root, 2, "z1_gas1_tmbspg2", 1, 2, 1, metrics={"throughput": 5.0, "latency": 8.0e5, "FLOPS_per_gpu": 3e14})
    _exp(root, 3, "z1_gas4_tmbspg2", 1, 2, 4, metrics={"throughput": 6.5, "latency": 16 / 6.5 * 1e6})
    _exp(root, 10, "z2_gas2_tmbspg4", 2, 4, 2, stderr="RuntimeError: NCCL failure")
    _exp(root, 11, "z2_gas1_tmbspg5", 2, 5, 1, stdout="step 0 loss 10.1")
    rows = collect_trials(root, 2048, capped=True)
    assert [r["exp_id"] for r in rows] == [1, 2, 3, 10, 11]                       # launch order, not name order
    assert [r["status"] for r in rows] == ["oom", "ok", "ok", "failed", "cut by the cap"]
    assert rows[1]["tokens_per_s"] == 5.0 * 2048 and rows[1]["latency_s"] == pytest.approx(0.8)
    assert rows[1]["tflops_per_gpu"] == pytest.approx(300.0)
    assert rows[3]["deepspeed_error"] == "NCCL failure"                          # DeepSpeed's own verdict, kept
    assert best_trial(rows)["name"] == "z1_gas4_tmbspg2"
    assert collect_trials(root, 2048, capped=False)[-1]["status"] == "failed"
    summary = ("| tuning_space | num_experiments | best_metric_val | best_exp_name |\n|---|---|---|---|\n"
               "| z1 | 2 | 5.0 | z1_gas1_tmbspg2 |\n| global | 2 | 5.0 | z1_gas1_tmbspg2 |\n"
               "\n\nTuning completed in 0:01:00.")
    assert optimal_name(summary) == "z1_gas1_tmbspg2" and optimal_name("") is None

    # the choice runs at the job's batch: accumulation 16 / (mb x 2) when the micro-batch divides it
    cfg = json.loads((root / "z1_gas1_tmbspg2" / "ds_config.json").read_text())
    run, note = at_global_batch(cfg, 16, 2)
    batch = (run["train_batch_size"], run["gradient_accumulation_steps"], run["train_micro_batch_size_per_gpu"])
    assert batch == (16, 4, 2)
    assert "autotuning" not in run and "4" in note
    odd = dict(cfg, train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=2, train_batch_size=12)
    run, note = at_global_batch(odd, 16, 2)
    assert run["train_batch_size"] == 12 and "does not divide" in note
    assert at_global_batch(dict(cfg, train_batch_size=16, gradient_accumulation_steps=4), 16, 2)[1] == "as chosen"

    exported = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                "zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": True},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}
    at = autotune_config(exported, stages="all", global_batch=16, profile=(1, 2), num_mbs=2,
                         results_dir=tmp_path / "r", exps_dir=tmp_path / "e")
    assert not set(at) & {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
    assert at["zero_optimization"] == {"stage": "all"} and at["optimizer"] == exported["optimizer"]
    assert at["autotuning"]["max_train_batch_size"] == 16 and at["autotuning"]["fast"] is True


def test_driver_dry_run_plans_and_prints_the_commands():
    p = subprocess.run([sys.executable, str(BENCH / "autotuner_vs_plan.py"), "--dry-run"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = p.stdout
    assert "llama-2-7b (6.74B parameters), seq_len 2048, global batch 16" in out
    assert "dp = 2 (every GPU), tp = 1, no optimizer or parameter offload, no activation checkpointing" in out
    chosen = re.search(r"meshpilot plan: (dp=2 tp=1 zero=\d mb=\d+x\d+)", out)
    assert chosen, out
    assert "--autotuning tune --num_gpus 2" in out and '"max_train_batch_size": 16' in out
    assert "--set model=llama-2-7b" in out and "--deepspeed_config CHOSEN.json" in out
