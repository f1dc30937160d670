"""Per-regime error bands of the simulator's GPU-memory prediction, from the committed measured set.

Scores the current simulator (default constants) on the measurements committed under
benchmarks/results/ and writes ``orchestrator/sim/error_bands.json``, which the planner reads
(see :mod:`meshpilot.orchestrator.sim.error_bands` for the rule). Only held-out rows count:

* measure_deepspeed / measure_zo / train_bench JSONs: the held-out half of
  ``accuracy_report.split`` (every other config in file order; the constants were fitted on
  the other half, benchmarks/accuracy_report.py);
* ``meshpilot run`` directories (job.yaml + summary.json with the NVML peak sampled through the
  run): all held out (measured after the constants were fitted).

A run that ran out of memory has no peak; if the simulator predicted it to fit, the band must
at least cover the card, so the row counts as (capacity, predicted).

    python benchmarks/error_bands.py [--write] [--json-out PATH]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# the files, in the order, of the fit that set the simulator's default constants
# (benchmarks/results/2026-11-27-h200x2/README.md): its held-out half is the same here
MEASUREMENTS = [
    "results/2026-11-27-h200x4/deepspeed_measurements_shard1.json",
    "results/2026-11-27-h200x4/deepspeed_measurements_shard2.json",
    "results/2026-11-27-h200x4/zo_measurements.json",
    "results/2026-11-27-h200x2/deepspeed_measurements_dp2.json",
    "results/2026-11-27-h200x2/deepspeed_measurements_offload.json",
]
# (not 2026-11-29-s2-h200x2/hf7b: its NVML readings include 28 GiB held by the benchmark's own process)
CHOICE_8B = [f"results/2026-11-30-s6-h200x2/choice8b/{n}" for n in ("auto", "z1_mb1x8", "z2_mb8x1_ckpt")]
# llama-3-8b's plan: auto after the ZeRO 1-2 gradient copies were added, beside the plan measured fastest before
# (predicted before they ran: results/2026-11-30-s7-cpu/preregistered), held out for memory and step time
CHOICE_8B2 = [f"results/2026-11-30-s8-h200x2/choice8b2/{n}" for n in ("auto", "z1_mb1x8")]
# and after the activation count and ZeRO-2's gradient phases changed it (results/2026-11-30-s8-h200x2/preregistered)
CHOICE_8B3 = [f"results/2026-11-30-s8-h200x2/choice8b3/{n}" for n in ("auto", "z1_mb1x8")]
# plan: auto on transformers' llama-2-7b and two alternatives (results/2026-11-30-s9-h200x2/preregistered/choice_hf7b)
CHOICE_HF7B = [f"results/2026-11-30-s9-h200x2/call5/choice_hf7b/{n}" for n in ("auto", "z2_mb2x4_ov", "z3_mb4x2")]
# plan: auto on opt-2.7b on one GPU of the 1 x H200 kind and two alternatives
# (results/2026-12-01-s10-h200x1/preregistered/choice_one)
CHOICE_ONE = [f"results/2026-12-01-s10-h200x1/call4_choice_one/{n}" for n in ("auto", "z1_mb8x2", "z0_mb4x4")]
# plan: auto on llama-2-7b on one GPU of the same kind and three alternatives
# (results/2026-12-01-s13-h200x1/preregistered/call1)
CHOICE_7B_ONE = [f"results/2026-12-01-s13-h200x1/call1/choice/{n}"
                 for n in ("auto", "z3_mb16x1_ckpt", "z3_mb4x4_ckpt", "z3offp_mb16x1_ckpt")]
# and on opt-6.7b, predicted with the constants after the copy back of parameter offload (preregistered/call3)
CHOICE_OPT67_ONE = [f"results/2026-12-01-s13-h200x1/call3_choice/{n}" for n in ("auto", "z3_mb4x4_ckpt", "z3_mb2x8")]
RUN_DIRS = ["results/2026-11-29-h200x2/run_z2", "results/2026-11-29-h200x2/run_z2_off",
            "results/2026-11-29-h200x2/run_z3", "results/2026-11-29-s2-h200x2/z3knobs/meshpilot",
            "results/2026-11-29-s2-h200x2/z3knobs/ds_defaults", "results/2026-11-29-s2-h200x2/z3knobs/overlap",
            "results/2026-11-29-s2-h200x2/edge13b/mb1_noac", "results/2026-11-29-s2-h200x2/edge13b/mb8_ac",
            "results/2026-11-29-s2-h200x2/hf7b_z3/zero3_random",
            "results/2026-11-30-h200x2/host2/zo2_opt13b",
            # 2026-11-30-s2: the runs in torch's default allocator mode (the expandable-segments runs beside them are
            # not the mode the model describes); not alloc/z2_7b_lean_std, the twin of trace_std, which the allocator
            # phases of sim/memory.py were read from, nor alloc3/z1_opt27b_mb4_std, which led to opt's ReLU count
            "results/2026-11-30-s2-h200x2/alloc/z2_7b_overlap_std", "results/2026-11-30-s2-h200x2/alloc3/z1_7b_mb4_std",
            "results/2026-11-30-s2-h200x2/alloc3/tp2_7b_std", "results/2026-11-30-s2-h200x2/alloc3/ep2_moe_std",
            # plan: auto's choice for llama-2-13b and the plans it passed over (benchmarks/plan_choice_runs.py)
            *(f"results/2026-11-30-s2-h200x2/choice/{n}" for n in ("auto", "z3_mb8x1_ckpt", "z3_mb2x4_ckpt",
                                                                    "z3_tp2_mb8x2_sp")),
            # 2026-11-30-s3: the ZeRO-3 step-time set (benchmarks/zero3_time_runs.py; its fit set fitted time constants
            # only, so for memory it is held out) and the runs of other shapes made after that fit; not z3time/1b_mb1,
            # the twin of trace/tr1b, from which the kept parameters of sim/memory.py were read
            *(f"results/2026-11-30-s3-h200x2/z3time/{n}" for n in ("1b_mb8", "1b32l_mb1", "1b32l_mb8",
                                                                    "7b8l_mb1", "7b8l_mb8", "7b_mb1", "7b_mb2_ckpt",
                                                                    "7b_mb8_ckpt")),
            *(f"results/2026-11-30-s3-h200x2/z3new/{n}" for n in ("l3_8b_mb1", "l3_8b_mb4_ckpt", "opt67_mb1",
                                                                   "opt67_mb8_ckpt")),
            # plan: auto's llama-2-13b choice after those changes, and two plans it passed over (plan_choice_runs.py)
            *(f"results/2026-11-30-s3-h200x2/choice2/{n}" for n in ("auto", "z3_mb4x2_ckpt", "z3_tp2_mb8x2_sp")),
            # 2026-11-30-s4: ZeRO-3 with parameter and optimizer offload after the dtype fix (the model's parameter-offload
            # memory unchanged since before it ran)
            "results/2026-11-30-s4-h200x2/offfix/run",
            # 2026-11-30-s6: llama-3-8b's plan: auto and two plans it passed over (plan_choice_runs.py --job llama-3-8b)
            *CHOICE_8B, *CHOICE_8B2, *CHOICE_8B3, *CHOICE_HF7B, *CHOICE_ONE, *CHOICE_7B_ONE,
            *CHOICE_OPT67_ONE]
# not held out for step time: the runs after which the ZeRO 1-2 gradient copies were added (sim/step_time.py), and
# the parameter-offload run of CHOICE_7B_ONE whose optimizer phase (19.8 s against 1.0 predicted) and host peak led to
# the copy back of parameter offload with the optimizer on the GPU (sim/step_time.py, sim/host_memory.py)
CHOICE_7B_ONE_OFFP = "results/2026-12-01-s13-h200x1/call1/choice/z3offp_mb16x1_ckpt"
STEP_NOT_HELD_OUT = {*CHOICE_8B, CHOICE_7B_ONE_OFFP}
# not held out for GPU memory: the same plan as regimes7:z2_l3_8b_mb8, whose allocator history set ZeRO-2's
# gradient phases (SUPERSEDED)
GPU_NOT_HELD_OUT = {"results/2026-11-30-s6-h200x2/choice8b/z2_mb8x1_ckpt"}
# not held out: results/2026-11-30-h200x2/host2/z2off_7b_mb2 (its GPU peak led to the ZeRO 1-2 engine-build term)
# runs of the built-in model with meshpilot's DeepSpeed config through benchmarks/autotune_train.py's loop (the
# same model build and engine as the worker): (result JSON, run name, the plan's overrides beyond the job's)
# (not overlap/lean0: the same DeepSpeed config and loop as the trace the allocator phases were read from)
LOOP_RUNS = [("results/2026-11-30-h200x2/overlap/overlap_choice.json", "overlap0", ["plan.comm_overlap=true"]),
             ("results/2026-11-30-h200x2/autotune/autotuner_vs_plan.json", "meshpilot", None)]
JOB = "configs/h200x2_check.yaml"
# benchmarks/regime_runs.py: the regimes with the fewest runs, each predicted before it ran (all held out); runs that
# ran out of GPU memory count as (the card, predicted) where predicted to fit and are left out where not
REGIME_RUNS = ["results/2026-11-30-s4-h200x2/regimes1/regime_runs.json",
               "results/2026-11-30-s4-h200x2/regimes2/regime_runs.json",
               "results/2026-11-30-s4-h200x2/regimes3/regime_runs.json",
               "results/2026-11-30-s5-h200x2/regimes4/regime_runs.json",
               "results/2026-11-30-s5-h200x2/regimes5/regime_runs.json",
               "results/2026-11-30-s5-h200x2/regimes6/regime_runs.json",
               "results/2026-11-30-s6-h200x2/regimes7/regime_runs.json",
               "results/2026-11-30-s6-h200x2/regimes8/regime_runs.json",
               "results/2026-11-30-s6-h200x2/regimes9/regime_runs.json",
               "results/2026-11-30-s8-h200x2/regimes10/regime_runs.json",
               # host_memory_runs.py cases that ran, each predicted before it ran (host4 by the model before the
               # step's host copy was counted, host5 after it; results/2026-11-30-s8-h200x2/preregistered)
               "results/2026-11-30-s8-h200x2/host4/host_memory_runs.json",
               "results/2026-11-30-s8-h200x2/host5/host_memory_runs.json",
               # transformers' model class through the worker (model.implementation: hf) and ZeRO-3 with DeepSpeed's
               # defaults, each predicted before it ran (results/2026-11-30-s9-h200x2/preregistered; no term was read
               # off the two allocator histories of call3/tr)
               "results/2026-11-30-s9-h200x2/call1/hf/regime_runs.json",
               "results/2026-11-30-s9-h200x2/call2/hf2/regime_runs.json",
               "results/2026-11-30-s9-h200x2/call3/tr/regime_runs.json",
               "results/2026-11-30-s9-h200x2/call3/hfov/regime_runs.json",
               "results/2026-11-30-s9-h200x2/call4/edge/regime_runs.json",
               # the 1 x H200 kind (16 cores, 128 GiB host), a machine no constant was fitted on: host and card edges,
               # each predicted before it ran (results/2026-12-01-s10-h200x1/preregistered)
               "results/2026-12-01-s10-h200x1/call1/regime_runs.json",
               "results/2026-12-01-s10-h200x1/call2/regime_runs.json",
               "results/2026-12-01-s10-h200x1/call3/regime_runs.json",
               # the same kind, the next session: plans at the card, a ZeRO-1 offload plan with accumulation, zeroth
               # order, ZeRO-3 on one rank and offload at small micro-batches (results/2026-12-01-s11-h200x1/preregistered)
               "results/2026-12-01-s11-h200x1/call1/regime_runs.json",
               "results/2026-12-01-s11-h200x1/call2/regime_runs.json",
               "results/2026-12-01-s11-h200x1/call3/regime_runs.json",
               "results/2026-12-01-s11-h200x1/call4/regime_runs.json",
               # 2026-12-01-s12: offload on one H200, the step's host passes beside CPUAdam (call 3: derivation
               # runs with DeepSpeed's timers, not scored)
               "results/2026-12-01-s12-h200x1/call1/regime_runs.json",
               "results/2026-12-01-s12-h200x1/call2/regime_runs.json",
               "results/2026-12-01-s12-h200x1/call4/regime_runs.json",
               # 2026-12-01-s13: ZeRO-3's cast copies probed on a rank's threads, parameter offload's copy back
               "results/2026-12-01-s13-h200x1/call2/regime_runs.json",
               "results/2026-12-01-s13-h200x1/call3/regime_runs.json",
               "results/2026-12-01-s13-h200x1/call4/regime_runs.json"]
# rows of MEASUREMENTS that measured a configuration meshpilot does not run, listed by the report but not scored
# (kind "zo"): measure_zo's MeZO loop on transformers' LlamaForCausalLM, whose loss forms every token's logits at once
# (10 bytes per logit: benchmarks/hf_forward_only_loss_bytes.py, results/2026-11-30-s7-cpu/hf_loss). meshpilot's
# zeroth order runs the built-in model only, which forms them 1,024 tokens at a time (Plan.check refuses
# model.implementation=hf under zeroth order), so no plan meshpilot can run is predicted for these rows.
NOT_MESHPILOT_KINDS = ("zo",)
# host memory at its edge (benchmarks/host_memory_runs.py): scored for fits and outcomes only (fit_outcomes)
HOST_EDGE_RUNS = ["results/2026-11-30-h200x2/host/host_memory_runs.json",
                  "results/2026-11-30-h200x2/host2/host_memory_runs.json",
                  "results/2026-11-30-s8-h200x2/host3/host_memory_runs.json"]
# not scored for host memory: the runs whose host peaks set estimate.cpu_process_gib and cpu_after_build_gib (z1_mb1x8
# and 7b_mb1; l3_8b_mb1 and choice2/auto set the constant's earlier value), and the ZO2 run whose host peak was set by
# the closing checksum's copy of the model (changed in commit f8c9396; sim/host_memory.py host_memory_terms)
HOST_NOT_HELD_OUT = {"results/2026-11-30-s3-h200x2/z3time/7b_mb1", "results/2026-11-30-s3-h200x2/z3new/l3_8b_mb1",
                     "results/2026-11-30-s3-h200x2/choice2/auto", "results/2026-11-30-h200x2/host2/zo2_opt13b",
                     "results/2026-11-30-s6-h200x2/choice8b/z1_mb1x8", CHOICE_7B_ONE_OFFP}
# cases that ran a runtime since corrected, not scored (listed by the report): the parameter-offload runs were built in
# fp32 under zero.Init, so every pass ran in fp32 (2026-11-30-s4-h200x2/trace; engine_deepspeed._default_model_factory)
_NO_LONGER_HELD_OUT = "so it is no longer held out"
SUPERSEDED = {
    "2026-11-30-s4-h200x2/regimes1:z3offall_7b_mb1": "ran its passes in fp32 (parameter offload before the dtype fix)",
    "2026-11-30-s4-h200x2/regimes1:z3offall_7b_mb10": "ran its passes in fp32 (parameter offload before the dtype fix)",
    # the activation count and ZeRO-2's gradient phases were read off these plans' allocator histories
    # (2026-11-30-s8-h200x2/hist4, allocator_peak.txt): no longer held out
    "2026-11-30-s8-h200x2/regimes10:z2_opt67_mb8":
        f"its allocator history set ZeRO-2's gradient phases and the attention count (sim/memory.py), "
        f"{_NO_LONGER_HELD_OUT}",
    "2026-11-30-s6-h200x2/regimes7:z2_l3_8b_mb8":
        f"its allocator history set ZeRO-2's gradient phases (sim/memory.py), {_NO_LONGER_HELD_OUT}",
    # a term was read off this plan's allocator history (2026-11-30-s6-h200x2/hist): no longer held out
    "2026-11-30-s5-h200x2/regimes6:tp2_opt67_mb4":
        f"its allocator history set the masked gradient norm of ZeRO-0 under tp (sim/memory.py), {_NO_LONGER_HELD_OUT}",
    # plans with activation checkpointing that ran without it: the worker did not switch transformers'
    # checkpointing on (fixed in strategies/hf_adapter.py; run again in call2)
    **{f"2026-11-30-s9-h200x2/call1/hf:{c}":
       "ran without the checkpointing its plan names (model.implementation: hf, before the fix)"
       for c in ("hf_m1b_z2_mb8_ac", "hf_m7b_z3_mb1_ac", "hf_m7b_z3offall_mb1_ac")},
    # its reserve, with hf_m7b_z3_mb1_ac's, led to dropping the loaded-model hole at ZeRO-3 (sim/memory.py)
    "2026-11-30-s9-h200x2/call1/hf:hf_m04_z3_mb4":
        f"its reserve led to dropping the loaded-model hole at ZeRO-3 (sim/memory.py), {_NO_LONGER_HELD_OUT}",
    # its allocated peak led to counting ZeRO-3's window and kept parameters on one rank with parameter
    # offload (sim/memory.py gathers); its host peak had been predicted before it ran (110.7 against 112.0)
    "2026-12-01-s10-h200x1/call1:z3offall_7b20l_one_mb8":
        "its allocated peak led to counting the fetched window and kept parameters of one rank with parameter "
        f"offload (sim/memory.py gathers), {_NO_LONGER_HELD_OUT}",
    # the two plans over the card as modelled, live tensors within it, that ran: they led to predicting such plans at
    # the card (sim/memory.py at_card); ten new cases tested the rule (2026-12-01-s11-h200x1/call1)
    **{k: f"it ran over the card as modelled, which led to predicting such plans at the card (sim/memory.py at_card), "
          f"{_NO_LONGER_HELD_OUT}"
       for k in ("2026-11-30-s6-h200x2/regimes8:tp2_7b_mb8", "2026-12-01-s10-h200x1/call1:z0_opt27b_one_mb16")}}


# runs whose host reading led to a change of the host model: their host memory is no longer held out (their GPU peak,
# step and outcome still are)
HOST_SUPERSEDED = {
    "2026-12-01-s10-h200x1/call2:z1off_13b10l_one_mb4":
        "its host memory led to dropping the host accumulation buffers at ZeRO-1 (sim/host_memory.py host_memory_terms)"}

# runs whose step time led to a change of the step-time model: their step is no longer held out (their GPU and host
# peaks and outcome still are). The probed offload runs of 2026-12-01-s10 and -s11, whose optimizer phase took
# 1.35-2.35x the probed CPUAdam time, led to the offloaded step's host passes (sim/step_time.py host_step_passes)
STEP_SUPERSEDED = {f"2026-12-01-{k}": "its optimizer phase led to the offloaded step's host passes beside CPUAdam "
                   "(sim/step_time.py host_step_passes)"
                   for k in ("s10-h200x1/call2:z3offall_13b10l_one_mb8", "s10-h200x1/call2:z3offall_opt67_16l_one_mb8",
                             "s10-h200x1/call2:z2off_opt67_16l_one_mb8_ac", "s10-h200x1/call2:z1off_13b10l_one_mb4",
                             "s10-h200x1/call2:z2off_7b16l_one_mb4x2", "s10-h200x1/call3:z3offopt_7b24l_one_mb8",
                             "s10-h200x1/call3:z2off_7b16l_one_mb17", "s10-h200x1/call3:z2off_opt67_16l_one_mb24",
                             "s11-h200x1/call1:z1off_7b16l_one_mb4x2", "s11-h200x1/call3:z3offall_7b16l_one_mb1x8",
                             "s11-h200x1/call3:z3offopt_7b16l_one_mb8", "s11-h200x1/call3:z2off_7b12l_one_mb1x8",
                             "s11-h200x1/call4:z3offall_7b8l_one_mb1x4")}
# its optimizer phase, about a second over the model, led to probing ZeRO-3's blocking cast copy on a rank's threads
# at a sub-group's size (comm/probe.py time_cast_copies; 2026-12-01-s13 call 1 measured that copy 1.45x slower than the
# probe's own process did)
STEP_SUPERSEDED["2026-12-01-s12-h200x1/call2:z3offopt_13b8l_one_mb8"] = (
    "its optimizer phase led to probing ZeRO-3's cast copy on a rank's threads at a sub-group's size (comm/probe.py)")


def loop_rows() -> tuple[list[dict[str, Any]], list[str]]:
    """Held-out rows of :data:`LOOP_RUNS`: the NVML peak its benchmark sampled against the prediction for
    the job's overrides and the run's plan (the autotuner comparison: the plan meshpilot chose)."""
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.sim.error_bands import regime_of
    from meshpilot.orchestrator.sim.simulator import simulate
    rows, used = [], []
    for path, name, plan_sets in LOOP_RUNS:
        f = HERE / path
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        run = next((r for r in d.get("runs", []) if r.get("name") == name and r.get("status") == "ok"), None)
        peaks = ((run or {}).get("nvml") or {}).get("nvml_peak_all_gib") or []
        if not peaks:
            continue
        sets = list(d["job"]["overrides"])
        if plan_sets is None:                          # the plan meshpilot chose: its plan section, key by key
            pc = d["meshpilot"]["chosen"]["plan_config"]
            zo = pc.pop("zo")
            sets += [f"plan.{k}={v}" for k, v in pc.items()] + [f"plan.zo.{k}={v}" for k, v in zo.items()]
        else:
            sets += plan_sets
        job = load_job(str(HERE / JOB), sets)
        plan = resolve_plan(job)
        e = simulate(job, plan)
        rows.append(dict(name=f"{f.parent.name}/{name}", regime=regime_of(plan, job.cluster.gpus_per_node, job),
                         status="ok", measured_gib=max(peaks), predicted_gib=e.peak_memory_gib, source=path))
        used.append(str(f))
    return rows, used


def metrics_log(run_dir: Path) -> tuple[float | None, float | None]:
    """(largest NVML reading in GiB, median step in s as run summaries take it) from a run's metrics.jsonl: for a run
    whose steps all ended but which was cut before it wrote its summary."""
    from meshpilot.orchestrator.sim.calibration import median_step_time
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return None, None
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    nvml = [m.get("nvml_used") for r in recs for m in (r.get("memory") or []) if m and m.get("nvml_used")]
    return (max(nvml) / 2**30 if nvml else None), median_step_time([r.get("step_time_s") for r in recs])


def built_an_op(run_dir: Path) -> bool:
    """Whether the run compiled a DeepSpeed op while it ran (the first use on a fresh node; rank 0 logs it,
    engine_deepspeed.announce_op_builds): the compiler's memory is on the node beside the workers' (about 1 GiB on
    the 2 x H200 host, read off these rows: the node's peak less the workers' own), which no plan term models."""
    logs = [run_dir / "logs" / "rank0.log", run_dir / "controller.log", run_dir.with_suffix(".log")]
    return any(f.exists() and "building DeepSpeed op" in f.read_text(errors="replace") for f in logs)


def case_key(results_file: Path, case: str) -> str:
    """``<the results file's folder under results/>:<case>``: how SUPERSEDED and HOST_SUPERSEDED name a case."""
    return f"{results_file.parent.relative_to(HERE / 'results')}:{case}"


def ended(row: dict[str, Any], log: Path) -> str:
    """How a case ended: its recorded outcome, except a run that exited 1 with Ray's memory monitor's
    OutOfMemoryError in its log, which is a host out-of-memory the run did not classify (the unhandled traceback of
    a kill inside a progress probe, launch/group.py before 2026-12-01)."""
    out = row["outcome"]
    if out == "exit 1" and log.exists() and "ray.exceptions.OutOfMemoryError" in log.read_text(errors="replace"):
        return "out of memory (host_oom, unclassified by the run)"
    return out


def fit_outcomes() -> dict[str, list[str]]:
    """Every case of :data:`REGIME_RUNS` and :data:`HOST_EDGE_RUNS` that ended (ran, or ran out of GPU or host
    memory; not those cut at the time limit), by what the simulator at hand says of its plan (fits or not) and what
    happened (a risky plan fits, without the margin of its regime's band or room for its largest request): the
    issue's first target is that no plan said to fit runs out of memory and none said not to fit runs."""
    out: dict[str, list[str]] = {f"{a}, {b}": [] for a in ("fits with margin", "risky", "does not fit")
                                 for b in ("ran", "out of memory")}
    for f, r, _, _, e in simulated_cases([*REGIME_RUNS, *HOST_EDGE_RUNS]):
        end = ended(r, f.parent / f"{r['case']}.log")
        oom = end.startswith("out of memory")
        if not oom and end != "ran":
            continue
        kind = end.split("(")[-1].rstrip(")") if oom else ""
        said = "fits with margin" if e.fits_with_margin else "risky" if e.fits else "does not fit"
        # a plan whose modelled reserve reaches the card, its live tensors within it (simulator.estimate_at's note)
        tags = [t for t in (kind, "at the card" if e.at_card else "") if t]
        label = r["case"] + (" (" + ", ".join(tags) + ")" if tags else "")
        out[f"{said}, {'out of memory' if oom else 'ran'}"].append(label)
    return out


def simulated_cases(paths: list[str]) -> Iterator[tuple[Path, dict[str, Any], Any, Any, Any]]:
    """(results file, row, job, plan, the simulator's estimate at hand) of every case in the ``regime_runs.py`` /
    ``host_memory_runs.py`` result files ``paths`` that exist, less the :data:`SUPERSEDED` ones."""
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.sim.simulator import simulate
    for path in paths:
        f = HERE / path
        if not f.exists():
            continue
        for r in json.loads(f.read_text())["rows"]:
            if case_key(f, r["case"]) in SUPERSEDED:
                continue
            job = load_job(str(HERE / JOB), r["overrides"])
            plan = resolve_plan(job)
            yield f, r, job, plan, simulate(job, plan)


def regime_rows() -> tuple[list[dict[str, Any]], list[str]]:
    """Held-out rows of :data:`REGIME_RUNS`, predicted by the simulator at hand for each case's overrides."""
    from meshpilot.orchestrator.sim.error_bands import regime_of
    rows = []
    for f, r, job, plan, e in simulated_cases(REGIME_RUNS):
        m = r.get("measured") or {}
        peak, step = m.get("nvml_peak_gib"), m.get("step_time_s")
        if r["outcome"] == "timed out":              # cut at the limit: what its steps logged, if all ended
            peak, step = metrics_log(f.parent / r["case"])
        elif r["outcome"].startswith("out of memory"):
            if not e.fits:
                continue                              # predicted not to fit, and it did not: no peak to score
            peak, step = job.cluster.gpu.memory_gib, None
        if peak is None:
            continue
        host = next(iter((m.get("host_node") or {}).values()), None) or {}
        key, then = case_key(f, r["case"]), r.get("predicted") or {}
        rows.append(dict(name=r["case"], regime=regime_of(plan, job.cluster.gpus_per_node, job), status=r["outcome"],
                         measured_gib=peak, predicted_gib=e.peak_memory_gib,
                         source=f"{f.relative_to(HERE)}:{r['case']}",
                         measured_step_s=None if key in STEP_SUPERSEDED else step,
                         predicted_step_s=e.step_time_s,
                         superseded_step=(step, then.get("step_time_s")) if key in STEP_SUPERSEDED else None,
                         fits_with_margin=bool(e.fits_with_margin),
                         fits_with_margin_then=then.get("fits_with_margin"),
                         request_beyond_room=not e.largest_request_has_room,
                         measured_host_gib=None if key in HOST_SUPERSEDED else host.get("measured"),
                         predicted_host_gib=e.cpu_memory_gib_per_node,
                         op_built_in_run=built_an_op(f.parent / r["case"])))
    return rows, [str(HERE / p) for p in REGIME_RUNS if (HERE / p).exists()]


def measured_rows() -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Held-out rows: name, regime, measured and predicted peak (GiB), status, source; the files read; and the
    held-out rows of :data:`NOT_MESHPILOT_KINDS`, described, which are not scored."""
    from accuracy_report import load_cases, split

    from meshpilot.orchestrator.sim.calibration import load_run
    from meshpilot.orchestrator.sim.error_bands import regime_of
    from meshpilot.orchestrator.sim.simulator import simulate

    paths = [str(HERE / p) for p in MEASUREMENTS if (HERE / p).exists()]
    cases, _ = load_cases(paths)
    _, hold = split(cases)
    rows, not_meshpilot = [], []
    for c in hold:
        e = simulate(c.job, c.plan)
        if c.kind in NOT_MESHPILOT_KINDS:
            not_meshpilot.append(f"{c.name} (measured {c.peak_gib:.2f} GiB, predicted {e.peak_memory_gib:.2f} for the "
                                 f"built-in model)")
            continue
        measured = c.peak_gib if c.status == "ok" else (c.job.cluster.gpu.memory_gib if e.fits else None)
        if measured is None:
            continue
        rows.append(dict(name=c.name, regime=regime_of(c.plan, c.job.cluster.gpus_per_node, c.job), status=c.status,
                         measured_gib=measured, predicted_gib=e.peak_memory_gib, source=Path(c.source).name,
                         measured_step_s=c.step_s if c.has_step else None, predicted_step_s=e.step_time_s))
    used = list(paths)
    for d in RUN_DIRS:
        run = HERE / d
        if not (run / "summary.json").exists() or d in GPU_NOT_HELD_OUT:
            continue
        rec = load_run(run)                  # the plan that ran (plan: auto's choice, a fallback)
        s, job, plan = rec.summary, rec.job, rec.plan
        peaks = [v.get("nvml") for v in (s.get("memory_peaks_gib") or {}).values() if v.get("nvml")]
        if not peaks:
            continue
        e = simulate(job, plan)
        node = ((s.get("predicted_vs_measured") or {}).get("per_node") or {}).get("0") or {}
        # host peaks as Ray's memory monitor counts them (the node's MemTotal - MemAvailable), which the prediction is
        # compared with; older summaries summed the workers' peak RSS instead
        monitor = "MemAvailable" in str(node.get("source", ""))
        host = (node.get("host_peak_gib") or {}).get("measured") if monitor and d not in HOST_NOT_HELD_OUT else None
        rows.append(dict(name=run.name, regime=regime_of(plan, job.cluster.gpus_per_node, job), status=s.get("status"),
                         measured_gib=max(peaks), predicted_gib=e.peak_memory_gib, source=d,
                         measured_step_s=rec.measured.get("step_time_s"), predicted_step_s=e.step_time_s,
                         measured_host_gib=host, predicted_host_gib=e.cpu_memory_gib_per_node,
                         request_beyond_room=not e.largest_request_has_room, op_built_in_run=built_an_op(run)))
        used.append(str(run))
    return rows, used, not_meshpilot


def node_beside_workers() -> list[tuple[str, float, float]]:
    """(case, the node's used memory before `meshpilot run` started, what Ray's processes and the driver added to it
    by the time the workers started) of every REGIME_RUNS / HOST_EDGE_RUNS case whose workers recorded the node's
    used memory at their start: estimate.SimulatorConstants.node_base_gib and ray_node_gib. Cases whose run started
    while the previous one's memory was still being freed (more than 2.5 GiB in use before it) are left out."""
    out = []
    for path in [*REGIME_RUNS, *HOST_EDGE_RUNS]:
        f = HERE / path
        if not f.exists():
            continue
        for r in json.loads(f.read_text())["rows"]:
            before = r.get("node_used_before_gib")
            starts = [v for v in ((r.get("measured") or {}).get("host_memory_gib") or {}).values() if v]
            if before is None or before > 2.5 or not starts:
                continue
            ray = starts[0]["node_used_start"] - before - sum(v["host_start"] for v in starts)
            out.append((f"{f.parent.name}:{r['case']}", before, ray))
    return out


def allocated_rows() -> list[tuple[str, float, float, float, float]]:
    """(case, torch's max_memory_allocated predicted and measured, max_memory_reserved predicted and measured, GiB) of
    every REGIME_RUNS case that ran and recorded them: the count of live tensors apart from the allocator's reserve."""
    from meshpilot.orchestrator.sim.calibration import predict
    out = []
    for _, r, job, plan, _ in simulated_cases(REGIME_RUNS):
        m = r.get("measured") or {}
        if r["outcome"] == "ran" and m.get("allocated_gib") and m.get("reserved_gib"):
            p = predict(job, plan)
            out.append((r["case"], p["allocated_gib"], m["allocated_gib"], p["reserved_gib"], m["reserved_gib"]))
    return out


def _then_and_now(row: dict[str, Any]) -> str:
    """How a regime run was ranked when it ran (its recorded prediction) and how the simulator at hand ranks it."""
    then = "predicted to fit with margin before it ran" if row.get("fits_with_margin_then") else "risky when it ran"
    return f"{then}; {'fits with margin' if row['fits_with_margin'] else 'risky'} now"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write orchestrator/sim/error_bands.json")
    a = ap.parse_args()
    from meshpilot.orchestrator.sim.error_bands import BANDS_FILE, REGIMES, bands_from_rows
    from meshpilot.orchestrator.config.schema import CalibrationConfig
    from meshpilot.orchestrator.sim.calibration import constants_fingerprint
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants

    rows, used, not_meshpilot = measured_rows()
    more, more_used = loop_rows()
    regime, regime_used = regime_rows()
    rows, used = rows + more + regime, used + more_used + regime_used
    print(f"{'run':34s} {'regime':18s} {'measured':>9s} {'predicted':>9s} {'under %':>8s}")
    for r in sorted(rows, key=lambda r: (REGIMES.index(r["regime"]), r["name"])):
        under = 100.0 * (r["measured_gib"] - r["predicted_gib"]) / r["predicted_gib"]
        print(f"{r['name']:34s} {r['regime']:18s} {r['measured_gib']:9.2f} {r['predicted_gib']:9.2f} {under:+8.1f}")
    source = dict(written=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  command="python benchmarks/error_bands.py --write",
                  measurements=[str(Path(u).relative_to(HERE.parent)) for u in used],
                  # as run summaries record it for an uncalibrated cluster
                  constants_fingerprint=constants_fingerprint(SimulatorConstants(), CalibrationConfig()),
                  rows=[{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                         if k != "superseded_step"} for r in rows])
    host_rows = [(r["measured_host_gib"], r["predicted_host_gib"]) for r in rows if r.get("measured_host_gib")]
    bands = bands_from_rows([(r["regime"], r["measured_gib"], r["predicted_gib"]) for r in rows], source, host_rows)
    print(f"\n{'regime':18s} {'runs':>4s} {'band':>6s} {'MAPE %':>7s}  evidence")
    for reg in REGIMES:
        b = bands.of(reg)
        print(f"{reg:18s} {b.runs:4d} {b.band:6.1%} {b.mape_pct if b.mape_pct is not None else float('nan'):7.1f}  "
              f"{'measured' if b.measured else 'too few runs: largest measured band'}")
    print(f"{'host':18s} {bands.host.runs:4d} {bands.host.band:6.1%} {bands.host.mape_pct or float('nan'):7.1f}  "
          f"host peak per node, every regime, band {bands.host.band_gib:.1f} GiB "
          f"({'measured' if bands.host.measured else 'too few runs: GPU bands'})")
    for r in rows:
        if r.get("measured_host_gib"):
            print(f"  host {r['name']:28s} measured {r['measured_host_gib']:7.1f} predicted {r['predicted_host_gib']:7.1f} "
                  f"under {100.0 * (r['measured_host_gib'] - r['predicted_host_gib']) / r['predicted_host_gib']:+6.1f}%"
                  + ("  (compiled a DeepSpeed op in the run)" if r.get("op_built_in_run") else ""))
    rest = [abs(m - p) / p for r in rows if r.get("measured_host_gib") and not r.get("op_built_in_run")
            for m, p in [(r["measured_host_gib"], r["predicted_host_gib"])]]
    if rest:
        print(f"  host MAPE without the runs that compiled an op: {100.0 * sum(rest) / len(rest):.1f}% over {len(rest)}")
    hf = [r for r in rows if r["source"] in {Path(p).name for p in MEASUREMENTS} and r["status"] == "ok"]
    if hf:
        peak = [abs(r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"] for r in hf]
        st = [abs(r["predicted_step_s"] - r["measured_step_s"]) / r["measured_step_s"] for r in hf if r["measured_step_s"]]
        print(f"\n2026-11-27 Hugging Face sets (MEASUREMENTS), held-out half: {len(peak)} runs, peak MAPE "
              f"{100.0 * sum(peak) / len(peak):.1f}%; step MAPE {100.0 * sum(st) / max(len(st), 1):.1f}% over {len(st)}")
    runs = [abs(r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"] for r in rows if r["source"] in RUN_DIRS]
    if runs:
        print(f"\n`meshpilot run` directories (RUN_DIRS): {len(runs)} runs, peak MAPE "
              f"{100.0 * sum(runs) / len(runs):.1f}%, largest {100.0 * max(runs):.1f}%")
    # their step times too, except the ZeRO-3 step-time fit set (zero3_time_fit.FIT), which is not held out for time
    from zero3_time_fit import FIT
    steps = [(r["predicted_step_s"] - r["measured_step_s"]) / r["measured_step_s"] for r in rows
             if r["source"] in RUN_DIRS and r["source"] not in FIT and r["source"] not in STEP_NOT_HELD_OUT
             and r.get("measured_step_s")]
    if steps:
        worst = max(steps, key=abs)
        print(f"their step times (not the ZeRO-3 time fit set, nor STEP_NOT_HELD_OUT): {len(steps)} runs, MAPE "
              f"{100.0 * sum(map(abs, steps)) / len(steps):.1f}%, largest {100.0 * worst:+.1f}%")
    if SUPERSEDED:
        print("not scored: " + "; ".join(f"{k} {v}" for k, v in SUPERSEDED.items()))
    if HOST_SUPERSEDED:
        print("host memory not scored: " + "; ".join(f"{k} {v}" for k, v in HOST_SUPERSEDED.items()))
    if STEP_SUPERSEDED:
        print("step time not scored: " + "; ".join(f"{k} {v}" for k, v in STEP_SUPERSEDED.items()))
    if not_meshpilot:
        print("not scored, a configuration meshpilot does not run (Hugging Face MeZO, every token's logits at once): "
              + "; ".join(not_meshpilot))
    held = [r for r in regime if r.get("status") == "ran" or r.get("status") == "timed out"]
    if regime:
        errs = [abs(r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"] for r in held]
        false_fits = [f"{r['name']} ({_then_and_now(r)})" for r in regime if r["status"].startswith("out of memory")]
        print(f"regime_runs (REGIME_RUNS): {len(held)} runs that ran, peak MAPE "
              f"{100.0 * sum(errs) / max(len(errs), 1):.1f}%; predicted to fit but out of memory: "
              f"{', '.join(false_fits) or 'none'}")
        marked = [r for r in rows if r.get("request_beyond_room")]
        print("largest single request beyond the card's room above the predicted peak: out of memory: "
              + (", ".join(r["name"] for r in marked if r["status"].startswith("out of memory")) or "none")
              + "; ran: " + (", ".join(r["name"] for r in marked if not r["status"].startswith("out of memory"))
                             or "none"))
        st = [(r["predicted_step_s"] - r["measured_step_s"]) / r["measured_step_s"] for r in held if r.get("measured_step_s")]
        if st:
            print(f"their step times: {len(st)} runs, MAPE {100.0 * sum(map(abs, st)) / len(st):.1f}%, "
                  f"largest {100.0 * max(st, key=abs):+.1f}%")
        sup = [(r["predicted_step_s"], *r["superseded_step"]) for r in held if r.get("superseded_step")]
        if sup:   # not held out: how the model at hand and the one they were predicted with did on them
            print(f"the {len(sup)} runs of STEP_SUPERSEDED (not held out): step MAPE "
                  f"{100.0 * sum(abs(p - m) / m for p, m, _ in sup) / len(sup):.1f}% now, "
                  f"{100.0 * sum(abs(t - m) / m for _, m, t in sup) / len(sup):.1f}% as predicted before they ran")
    alloc = allocated_rows()
    if alloc:
        errs = sorted(((pa - ma) / ma, c) for c, pa, ma, _, _ in alloc)
        within = sum(abs(e) <= 0.025 for e, _ in errs)
        print(f"\ntorch's allocated peak, regime runs that ran: {len(alloc)} runs, MAPE "
              f"{100.0 * sum(abs(e) for e, _ in errs) / len(errs):.1f}%, {within} within 2.5% "
              f"(largest: {', '.join(f'{c} {100 * e:+.1f}%' for e, c in sorted(errs, key=lambda x: -abs(x[0]))[:3])}); "
              f"reserved above allocated predicted/measured: " + ", ".join(
                  f"{c} {pr - pa:.1f}/{mr - ma:.1f}" for c, pa, ma, pr, mr in alloc if abs((pr - pa) - (mr - ma)) > 5.0))
    beside = node_beside_workers()
    if beside:
        med = (lambda xs: sorted(xs)[len(xs) // 2])
        print(f"\nthe node beside the workers, {len(beside)} runs started on a settled node: before `meshpilot run` "
              f"{min(b for _, b, _ in beside):.2f}-{max(b for _, b, _ in beside):.2f} GiB (median "
              f"{med([b for _, b, _ in beside]):.2f}); Ray's processes and the driver "
              f"{min(x for _, _, x in beside):.2f}-{max(x for _, _, x in beside):.2f} GiB (median "
              f"{med([x for _, _, x in beside]):.2f})")
    outcomes = fit_outcomes()
    print("\nfits (simulator at hand) against what happened, regime and host-edge runs that ended:")
    for k, v in outcomes.items():
        print(f"  {k:28s} {len(v):3d}  {', '.join(v)}")
    if a.write:
        out = HERE.parent / "orchestrator" / "sim" / BANDS_FILE
        out.write_text(json.dumps(bands.to_dict(), indent=1) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
