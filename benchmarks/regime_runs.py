"""The regimes with the fewest measured runs, through `meshpilot run`: parameter and optimizer offload, tp=2 at 13B,
ep=2, MeZO, ZO2 and DistZO2.

Issue #15's validation set asks for every regime, and the error bands of ``sim/error_bands.py`` give each regime
with fewer than ``MIN_RUNS`` (2) held-out runs the largest band measured anywhere, for want of evidence. Every case
here is held out: the simulator at hand predicts it (GPU peak, host per node, step time, fits) before it runs, and
nothing is fitted to it. The set gives the model an honest chance to fail: cases sit at the card's edge on either
side (``z3offall_7b_mb10`` predicted to fit at 126 GiB of 140, out of memory while its passes ran in fp32 before
the worker's dtype fix; ``z3offall_7b8l_mb34`` at 134 GiB, out of memory at its second step; ``tp2_13b_mb1``
predicted over the card at 152 GiB and run with ``--force``).
``benchmarks/error_bands.py`` scores the runs (results/2026-11-30-s4-h200x2).

Per case: the prediction, the outcome (`meshpilot run`'s exit status, the failure kind) and what the run
recorded (summary.json: NVML peak per rank, host memory per node, median step after the first, phases). Built-in
model, random weights, seq 2048, 4 steps, on the 2 x H200 device machine (256 GiB host, 32 cores); the 1-GPU
cases use one of its GPUs, except the ``_one`` cases of 2026-12-01, run on the 1 x H200 kind (``--cpu-cores 16``).

    python benchmarks/regime_runs.py --out $R/regimes --cases z3offall_7b_mb1 ... --budget-s 540
    python benchmarks/regime_runs.py --out /tmp/x --dry-run        # predictions and commands only
    python benchmarks/regime_runs.py --out /tmp/x --dry-run --cpu-cores 16 --host-gib 125 --cases z0_opt27b_one_mb12
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, precompile_ops, write_json  # noqa: E402
from host_memory_runs import DRY_RUN_HOST_GIB, JOB, fmt, host_total_gib, run_within_budget  # noqa: E402
from zero3_knobs import VARIANTS as ZERO3_VARIANTS  # noqa: E402

BASE = ["train.seq_len=2048", "train.steps=4", "train.checkpoint_final=false", "train.checkpoint_every=0",
        "train.eval_every=0"]
DP2 = ["cluster.gpus_per_node=2", "plan.dp=2"]
ONE = ["cluster.gpus_per_node=1", "plan.dp=1"]
TP2 = ["cluster.gpus_per_node=2", "plan.dp=1", "plan.tp=2"]
OFFALL = ["plan.zero_stage=3", "plan.offload_optimizer=cpu", "plan.offload_params=cpu"]
AC = ["plan.activation_checkpointing=full"]
ZO = ["train.optimizer=zo-sgd", "train.steps=6"]   # steps of a second or less: 6, so that the median skips warm-up
# DeepSpeed 0.19's own ZeRO-3 defaults over meshpilot's config, as zero3_knobs.py runs them
DS_DEFAULTS_Z3 = ZERO3_VARIANTS["ds_defaults"]
# transformers' LlamaForCausalLM of the 2026-11-27 set's shapes (benchmarks/configs/accuracy.yaml), random weights
HF = ["model=llama-2-7b", "model.implementation=hf"]
M04 = ["model.name=llama-0.4b", "model.layers=24", "model.hidden=1024", "model.heads=16", "model.kv_heads=16",
       "model.ffn=2816"]
M1B = ["model.name=llama-1b", "model.layers=16", "model.hidden=2048", "model.heads=16", "model.kv_heads=16",
       "model.ffn=5632"]
M3B = ["model.name=llama-3b", "model.layers=26", "model.hidden=3200", "model.heads=32", "model.kv_heads=32",
       "model.ffn=8640"]


def LAYERS(model: str, layers: int, name: str | None = None) -> list[str]:
    """``model``'s shapes with ``layers`` decoder layers, named ``name`` (default ``<model>-<layers>l``)."""
    return [f"model={model}", f"model.layers={layers}", f"model.name={name or f'{model}-{layers}l'}"]


def L7B(layers: int) -> list[str]:
    """llama-2-7b's shapes with ``layers`` decoder layers (named as the 2026-12-01 cases ran)."""
    return LAYERS("llama-2-7b", layers, f"llama-7b-{layers}l")


# (name, overrides, time limit s, what it tests)
CASES = [
    ("z3offall_7b_mb1", [*DP2, "model=llama-2-7b", "train.global_batch=4", *OFFALL, "plan.micro_batch=1", *AC], 130,
     "ZeRO-3 with optimizer and parameter offload at micro-batch 1 x 2 (the HF row of 2026-11-27 was 71% over)"),
    ("z3offall_7b_mb10", [*DP2, "model=llama-2-7b", "train.global_batch=20", *OFFALL, "plan.micro_batch=10"], 130,
     "the same at the card's edge: no checkpointing, predicted 126 GiB of 140"),
    ("z3offall_7b8l_mb34", [*DP2, "model=llama-2-7b", "model.layers=8", "model.name=llama-7b-8l",
                            "train.global_batch=68", *OFFALL, "plan.micro_batch=34"], 170,
     "parameter offload after the dtype fix at the card's edge: 8 of llama-2-7b's layers, no checkpointing, "
     "predicted 134.2 GiB of 140 (fits with the parameter-offload margin)"),
    ("z3offopt_7b_mb4", [*DP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=3",
                         "plan.offload_optimizer=cpu", "plan.micro_batch=4", *AC], 120,
     "ZeRO-3 with optimizer offload only"),
    ("z1off_7b_mb8", [*DP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=1",
                      "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 120,
     "ZeRO-1 with optimizer offload"),
    ("z2off_7b_mb16", [*DP2, "model=llama-2-7b", "train.global_batch=32", "plan.zero_stage=2",
                       "plan.offload_optimizer=cpu", "plan.micro_batch=16", *AC], 130,
     "ZeRO-2 with optimizer offload at a large micro-batch (CPU Adam behind more compute)"),
    ("tp2_13b_mb1", [*TP2, "model=llama-2-13b", "train.global_batch=8",
                     "plan.micro_batch=1", *AC], 120,
     "tp=2 at 13B, predicted over the card (152 GiB): forced, it should run out of memory"),
    ("ep2_moe8l_mb4", [*DP2, "model=mixtral-8x7b", "model.layers=8", "model.name=mixtral-8l", "plan.ep=2",
                       "plan.zero_stage=1", "train.global_batch=16", "plan.micro_batch=4", *AC], 110,
     "ep=2 on a Mixtral of 8 layers, near the edge (137 GiB predicted)"),
    ("mezo_opt13b_mb16", [*ONE, "model=opt-13b", *ZO, "train.global_batch=16", "plan.zo.mode=mezo",
                          "plan.micro_batch=16"], 150, "MeZO on one GPU"),
    ("distzo2_opt13b", ["cluster.gpus_per_node=2", "plan.dp=1", "model=opt-13b", *ZO, "train.global_batch=8",
                        "plan.zo.mode=zo2", "plan.zo.dp=2", "plan.micro_batch=4"], 320,
     "DistZO2: ZO2 on two ranks of one node (blocks uploaded in slices and all-gathered)"),
    # 2026-11-30 (session 5): opt's compute after the element-wise change (sim/elementwise.py), the parameter-offload
    # edge after the dtype fix, ZeRO-3 optimizer offload at other accumulation counts
    ("z3_opt13b_mb4", [*DP2, "model=opt-13b", "train.global_batch=16", "plan.zero_stage=3", "plan.micro_batch=4", *AC],
     150, "ZeRO-3 training of opt-13b (opt's element-wise kernels: LayerNorm, ReLU)"),
    ("z1_opt27b_mb8", [*DP2, "model=opt-2.7b", "train.global_batch=16", "plan.zero_stage=1", "plan.micro_batch=8", *AC],
     100, "ZeRO-1 training of opt-2.7b, compute bound"),
    ("mezo_opt67_mb8", [*ONE, "model=opt-6.7b", *ZO, "train.global_batch=8", "plan.zo.mode=mezo",
                        "plan.micro_batch=8"], 110, "MeZO on opt-6.7b, one GPU"),
    ("z3offopt_7b_mb8", [*DP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=3",
                         "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-3 with optimizer offload, one micro-batch per step"),
    ("z3offopt_7b_mb2", [*DP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=3",
                         "plan.offload_optimizer=cpu", "plan.micro_batch=2", *AC], 150,
     "ZeRO-3 with optimizer offload, four micro-batches per step (the gradients' host round trips)"),
    # tensor parallel (one held-out run before these) and ep=2 one micro-batch size below the case that ran out
    ("tp2_l3_8b_mb2_sp", [*TP2, "model=llama-3-8b",
                          "train.global_batch=8", "plan.zero_stage=0", "plan.micro_batch=2",
                          "plan.sequence_parallel=true"], 120,
     "tp=2 with sequence parallelism on llama-3-8b (grouped-query attention), no checkpointing"),
    ("tp2_opt67_mb4", [*TP2, "model=opt-6.7b", "train.global_batch=8",
                       "plan.zero_stage=0", "plan.micro_batch=4"], 120, "tp=2 on opt-6.7b, no checkpointing"),
    ("ep2_moe8l_mb2", [*DP2, "model=mixtral-8x7b", "model.layers=8", "model.name=mixtral-8l", "plan.ep=2",
                       "plan.zero_stage=1", "train.global_batch=8", "plan.micro_batch=2", *AC], 120,
     "ep=2 on the Mixtral of 8 layers at micro-batch 2, predicted to fit with margin (130.7 GiB)"),
    # the default-mode reserve of ZeRO 0-2 (2026-11-30 session 6): the same plans as allocator_runs' z2_7b_lean_std
    # (reserve predicted within 1%) and z1_7b_mb4_std (8% over), for the allocator's history (train.memory_history)
    ("z2_7b_mb1_lean", [*DP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=2", "plan.micro_batch=1",
                        "plan.comm_overlap=false"], 110, "ZeRO-2 at micro-batch 1 x 8 without checkpointing"),
    ("z1_7b_mb4_ov", [*DP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=1", "plan.micro_batch=4",
                      "plan.comm_overlap=true"], 110, "ZeRO-1 at micro-batch 4 x 2 without checkpointing"),
    ("tp2_7b_mb4", [*TP2, "model=llama-2-7b", "train.global_batch=16",
                    "plan.zero_stage=0", "plan.micro_batch=4"], 110,
     "tp=2 ZeRO-0 at micro-batch 4 x 4 without checkpointing (allocator_runs' tp2_7b_std: reserve 9% over)"),
    # the largest-request rule (sim/memory.py largest_request) on runs made after it: each is predicted to fit within
    # its regime's band and shown as risky only because its step's largest request exceeds the room above its peak
    ("z2_l3_8b_mb8", [*DP2, "model=llama-3-8b", "train.global_batch=16", "plan.zero_stage=2", "plan.micro_batch=8",
                      *AC], 130, "ZeRO-2 llama-3-8b: 126.4 GiB predicted, its 15.0 GiB fp32 step copy beyond the room"),
    ("ep2_moe8l_mb1", [*DP2, "model=mixtral-8x7b", "model.layers=8", "model.name=mixtral-8l", "plan.ep=2",
                       "plan.zero_stage=1", "train.global_batch=8", "plan.micro_batch=1", *AC], 120,
     "ep=2 Mixtral of 8 layers at micro-batch 1: 129.5 GiB predicted, its 21.0 GiB expert fp32 copy beyond the room"),
    # 2026-11-30 session 6, after the masked gradient norm of ZeRO-0 under tp (sim/memory.py): tensor parallel on
    # models with a replicated matrix (opt's positional embedding, Mixtral's routers) and at the card's edge, and the
    # largest-request rule on plans it calls safe near the edge
    ("tp2_opt67_mb8_ac", [*TP2, "model=opt-6.7b", "train.global_batch=16", "plan.zero_stage=0",
                          "plan.micro_batch=8", *AC], 100, "tp=2 on opt-6.7b with checkpointing (masked norm on rank 1)"),
    ("tp2_moe4l_mb4", [*TP2, "model=mixtral-8x7b", "model.layers=4", "model.name=mixtral-4l",
                       "train.global_batch=16", "plan.zero_stage=0", "plan.micro_batch=4"], 100,
     "tp=2 on a Mixtral of 4 layers (routers replicated: masked norm on rank 1), no checkpointing"),
    ("tp2_7b_mb8", [*TP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=0", "plan.micro_batch=8"],
     100, "tp=2 on llama-2-7b at micro-batch 8 without checkpointing: predicted 140.1 GiB, at the card"),
    ("tp2_l3_8b_mb4_sp", [*TP2, "model=llama-3-8b", "train.global_batch=8", "plan.zero_stage=0",
                          "plan.micro_batch=4", "plan.sequence_parallel=true"], 100,
     "tp=2 + SP on llama-3-8b at micro-batch 4: its 15.0 GiB fp32 step copy beyond the room (risky)"),
    ("z2_7b_mb4", [*DP2, "model=llama-2-7b", "train.global_batch=16", "plan.zero_stage=2", "plan.micro_batch=4"], 100,
     "ZeRO-2 llama-2-7b at micro-batch 4 x 2 without checkpointing: its 12.6 GiB step copy just within the room"),
    ("ep2_moe7l_mb2", [*DP2, "model=mixtral-8x7b", "model.layers=7", "model.name=mixtral-7l", "plan.ep=2",
                       "plan.zero_stage=1", "train.global_batch=8", "plan.micro_batch=2", *AC], 110,
     "ep=2 on a Mixtral of 7 layers: its 18.4 GiB expert fp32 copy within the room (safe by the rule)"),
    ("z1_l3_8b_mb6", [*DP2, "model=llama-3-8b", "train.global_batch=12", "plan.zero_stage=1", "plan.micro_batch=6",
                      *AC], 110, "ZeRO-1 llama-3-8b: its 15.0 GiB fp32 step copy beyond the room (risky)"),
    ("zo2_opt30b", [*ONE, "model=opt-30b", *ZO, "train.global_batch=1", "plan.zo.mode=zo2", "plan.micro_batch=1"], 440,
     "ZO2 at 30B on one GPU (issue #15 names opt-30b)"),
    # 2026-11-30 session 7 (no device time; predictions recorded before any run, results/2026-11-30-s7-cpu): the
    # sharpened largest-request rule at the edge on dense plans, a plan predicted over the card (forced), and the
    # host baseline of one process (cpu_process_gib, now in the node's count)
    ("z1_l3_8b_mb2", [*DP2, "model=llama-3-8b", "train.global_batch=16", "plan.zero_stage=1", "plan.micro_batch=2"],
     110, "ZeRO-1 llama-3-8b at micro-batch 2 x 4 without checkpointing: 134.5 GiB predicted, fits with margin"),
    ("z2_l3_8b_mb2", [*DP2, "model=llama-3-8b", "train.global_batch=16", "plan.zero_stage=2", "plan.micro_batch=2"],
     110, "ZeRO-2 llama-3-8b at micro-batch 2 x 4 without checkpointing: 126.9 GiB predicted"),
    ("z2_opt67_mb8", [*DP2, "model=opt-6.7b", "train.global_batch=16", "plan.zero_stage=2", "plan.micro_batch=8"], 110,
     "ZeRO-2 opt-6.7b at micro-batch 8 without checkpointing: 144.0 GiB predicted, over the card (forced)"),
    ("z0_opt27b_one_mb8", [*ONE, "model=opt-2.7b", "train.global_batch=8", "plan.zero_stage=0", "plan.micro_batch=8",
                           *AC], 100, "one rank on one GPU: the host baseline of a single process (1.4 GiB)"),
    # 2026-11-30 session 9: transformers' model class through `meshpilot run` (model.implementation: hf, random weights
    # from the config), on the shapes and plans of the 2026-11-27 Hugging Face set's dp=2 rows, which that set measured
    # in its own loop (benchmarks/measure_deepspeed.py), not through the worker
    ("hf_m04_z3_mb4", [*DP2, *HF, *M04, "train.global_batch=8", "plan.zero_stage=3", "plan.micro_batch=4"], 90,
     "HF llama 0.4B ZeRO-3 (the set's m04-z3-dp2-mb4)"),
    ("hf_m1b_z2_mb8_ac", [*DP2, *HF, *M1B, "train.global_batch=16", "plan.zero_stage=2", "plan.micro_batch=8", *AC],
     90, "HF llama 1B ZeRO-2 with checkpointing (the set's m1b-z2-dp2-mb8-ac)"),
    ("hf_m1b_z0_mb16", [*DP2, *HF, *M1B, "train.global_batch=32", "plan.zero_stage=0", "plan.micro_batch=16"], 90,
     "HF llama 1B ZeRO-0 at micro-batch 16 (the set's m1b-z0-dp2-mb16)"),
    ("hf_m7b_z3_mb1_ac", [*DP2, *HF, "train.global_batch=2", "plan.zero_stage=3", "plan.micro_batch=1", *AC], 120,
     "HF llama 7B ZeRO-3 with checkpointing (the set's m7b-z3-dp2-mb1-ac: 72.0 GiB there, 12.9 above allocated)"),
    ("hf_m7b_z3offall_mb1_ac", [*DP2, *HF, "train.global_batch=2", *OFFALL, "plan.micro_batch=1", *AC], 150,
     "HF llama 7B ZeRO-3 with optimizer and parameter offload (the set's m7b-z3-offall-dp2-mb1-ac: 13.1 GiB there)"),
    # the reserve above allocated of ZeRO-3 with optimizer offload, which grows with the micro-batch (0.7, 1.2, 2.1 GiB
    # at 2, 4, 8 on llama-2-7b, 0.2 predicted): eight of its layers, for the allocator's history (train.memory_history)
    ("z3offopt_7b8l_mb8", [*DP2, "model=llama-2-7b", "model.layers=8", "model.name=llama-7b-8l",
                           "train.global_batch=16", "plan.zero_stage=3", "plan.offload_optimizer=cpu",
                           "plan.micro_batch=8", *AC], 90, "ZeRO-3 + optimizer offload, 8 layers, micro-batch 8 x 1"),
    # after the loaded model's hole was dropped at ZeRO-3 (zero.Init builds partitioned; sim/memory.py), ZeRO-3 plans
    # of transformers' model not run before, without checkpointing
    ("hf_m7b_z3_mb2", [*DP2, *HF, "train.global_batch=4", "plan.zero_stage=3", "plan.micro_batch=2"], 110,
     "HF llama 7B ZeRO-3 at micro-batch 2 x 1, no checkpointing"),
    ("hf_m3b_z3_mb4", [*DP2, *HF, *M3B, "train.global_batch=8", "plan.zero_stage=3", "plan.micro_batch=4"], 100,
     "HF llama 3B ZeRO-3 at micro-batch 4 x 1, no checkpointing"),
    # ZeRO-3 with DeepSpeed's own defaults (overlap_comm on: the all-gather and reduce-scatter streams' pools), whose
    # reserve the model under-counts (+3.5 to +4.9 GiB measured at 13B, +0.3 to +1.5 modelled; 2026-11-29-s2 z3knobs)
    # and which the 2026-11-27 Hugging Face set ran: for the allocator's history (train.memory_history), without and
    # with checkpointing (the recording failed once in a checkpointed ZeRO-3 block's recomputation)
    ("z3ov_7b_mb1", [*DP2, "model=llama-2-7b", "train.global_batch=2", "plan.zero_stage=3", "plan.micro_batch=1",
                     *DS_DEFAULTS_Z3], 100, "ZeRO-3, DeepSpeed's defaults, micro-batch 1, no checkpointing"),
    ("z3ov_7b_mb1_ac", [*DP2, "model=llama-2-7b", "train.global_batch=2", "plan.zero_stage=3", "plan.micro_batch=1",
                        *DS_DEFAULTS_Z3, *AC], 100, "ZeRO-3, DeepSpeed's defaults, micro-batch 1, checkpointing"),
    ("z3offopt_7b8l_mb2", [*DP2, "model=llama-2-7b", "model.layers=8", "model.name=llama-7b-8l",
                           "train.global_batch=4", "plan.zero_stage=3", "plan.offload_optimizer=cpu",
                           "plan.micro_batch=2"], 90, "ZeRO-3 + optimizer offload, 8 layers, micro-batch 2, no checkpointing"),
    ("hf_m7b_z3ov_mb1_ac", [*DP2, *HF, "train.global_batch=2", "plan.zero_stage=3", "plan.micro_batch=1", *AC,
                            *DS_DEFAULTS_Z3], 120,
     "HF llama 7B ZeRO-3 with checkpointing and DeepSpeed's defaults: the 2026-11-27 set's m7b-z3-dp2-mb1-ac as it ran"),
    # 2026-11-30 session 9, after the two changes above (no hole at ZeRO-3 for transformers' model; ZeRO-3 with
    # overlap_comm a regime with its own band): their edges. A plan the old bands called safe that the new one calls
    # risky, plans the new band calls safe, and transformers' model near the card with the hole gone
    ("z3ov_13b_mb14_ac", [*DP2, "model=llama-2-13b", "train.global_batch=28", "plan.zero_stage=3",
                          "plan.comm_overlap=true", "plan.micro_batch=14", *AC], 150,
     "llama-2-13b ZeRO-3 + overlap_comm 14 x 1: 133.9 GiB predicted, safe with the ZeRO-3 band, risky with its own"),
    ("z3ov_13b_mb10_ac", [*DP2, "model=llama-2-13b", "train.global_batch=20", "plan.zero_stage=3",
                          "plan.comm_overlap=true", "plan.micro_batch=10", *AC], 130,
     "llama-2-13b ZeRO-3 + overlap_comm 10 x 1: 127.0 GiB predicted, safe with its own band"),
    ("z3ov_7b_mb5", [*DP2, "model=llama-2-7b", "train.global_batch=10", "plan.zero_stage=3", "plan.comm_overlap=true",
                     "plan.micro_batch=5"], 110, "llama-2-7b ZeRO-3 + overlap_comm 5 x 1: 125.1 GiB predicted"),
    ("hf_13b_z3_mb1", [*DP2, "model=llama-2-13b", "model.implementation=hf", "train.global_batch=2",
                       "plan.zero_stage=3", "plan.micro_batch=1"], 150,
     "transformers' llama-2-13b ZeRO-3 1 x 1: 128.7 GiB predicted (the hole gone)"),
    ("hf_7b_z3_mb5", [*DP2, *HF, "train.global_batch=10", "plan.zero_stage=3", "plan.micro_batch=5"], 120,
     "transformers' llama-2-7b ZeRO-3 5 x 1: 124.1 GiB predicted (the hole gone)"),
    # tp=2 on a Mixtral of 4 layers, whose allocated peak the model puts 14% high (tp2_moe4l_mb4: 76.3 GiB against
    # 66.7): the allocator's history (train.memory_history) of the same model at micro-batch 2
    ("tp2_moe4l_mb2", [*TP2, "model=mixtral-8x7b", "model.layers=4", "model.name=mixtral-4l",
                       "train.global_batch=8", "plan.zero_stage=0", "plan.micro_batch=2"], 90,
     "tp=2 on a Mixtral of 4 layers at micro-batch 2 x 4, no checkpointing"),
    ("hf_m3b_z1_mb2", [*DP2, *HF, *M3B, "train.global_batch=4", "plan.zero_stage=1", "plan.micro_batch=2"], 100,
     "HF llama 3B ZeRO-1 (the set's m3b-z1-dp2-mb2, a calibration row there: the loaded model's hole)"),
    # 2026-12-01 session 10, on the 1 x H200 device machine (16 cores, 128 GiB host; run with --cpu-cores 16): a host
    # no constant was fitted on. Host memory at its edge on either side, where one GPU's offloaded partition is the
    # whole model and its pinned buffers round up to the next power of two (sim/host_memory.py host_memory_terms): llama-2-7b
    # cut to 18-22 layers jumps from 72 to 116-119 GiB of ZeRO-2 host memory between 18 and 20 layers. One GPU's
    # ZeRO-0 reserve at the card's edge on either side (the side-by-side reserve, 0-20% over on earlier plans)
    ("z3offall_7b20l_one_mb8", [*ONE, *L7B(20), "train.global_batch=8", *OFFALL, "plan.micro_batch=8", *AC], 170,
     "ZeRO-3 + both offloads on one GPU, 20 layers: host 112.0 GiB predicted of 116.1 usable (fits with margin)"),
    ("z3offall_7b22l_one_mb8", [*ONE, *L7B(22), "train.global_batch=8", *OFFALL, "plan.micro_batch=8", *AC], 150,
     "the same at 22 layers: host 119.6 GiB predicted, over the usable 116.1 (forced: host out of memory expected)"),
    ("z2off_7b18l_one_mb8", [*ONE, *L7B(18), "train.global_batch=8", "plan.zero_stage=2",
                             "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 150,
     "ZeRO-2 + optimizer offload on one GPU, 18 layers: host 72.0 GiB (pinned buffers still below 16 GiB each)"),
    ("z2off_7b22l_one_mb8", [*ONE, *L7B(22), "train.global_batch=8", "plan.zero_stage=2",
                             "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 150,
     "the same at 22 layers: host 119.3 GiB predicted (pinned buffers rounded up to 32 GiB), forced; without the "
     "rounding it would be about 88 GiB and run"),
    ("z0_opt27b_one_mb12", [*ONE, "model=opt-2.7b", "train.global_batch=12", "plan.zero_stage=0",
                            "plan.micro_batch=12"], 110,
     "ZeRO-0 on one GPU without checkpointing: 125.7 GiB predicted (fits with margin), 28.4 of it reserve"),
    ("z0_opt27b_one_mb16", [*ONE, "model=opt-2.7b", "train.global_batch=16", "plan.zero_stage=0",
                            "plan.micro_batch=16"], 110,
     "the same at micro-batch 16: 146.9 GiB predicted, over the card, noted \"may run\" (live tensors 120.0): forced"),
    ("z3offopt_7b_one_mb8", [*ONE, "model=llama-2-7b", "train.global_batch=8", "plan.zero_stage=3",
                             "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 170,
     "llama-2-7b ZeRO-3 + optimizer offload on one GPU: host 124.0 GiB predicted of 116.1 usable, forced"),
    # the same machine, second call: offload on one GPU at other widths (llama-2-13b's 5120, opt-6.7b's), after the
    # fetched window and kept parameters of one rank with parameter offload were counted (sim/memory.py gathers), and
    # with CPU Adam timed by `meshpilot probe` on that machine beforehand (call 1's offload steps ran 32-37% under the
    # constants' rate; the probe's calibration is passed with --extra)
    ("z3offall_13b10l_one_mb8", [*ONE, *LAYERS("llama-2-13b", 10), "train.global_batch=8", *OFFALL,
                                 "plan.micro_batch=8"], 150,
     "ZeRO-3 + both offloads on one GPU, llama-2-13b's width, no checkpointing"),
    ("z3offall_opt67_16l_one_mb8", [*ONE, *LAYERS("opt-6.7b", 16), "train.global_batch=8", *OFFALL,
                                    "plan.micro_batch=8"], 150, "the same on opt-6.7b's shapes"),
    ("z2off_opt67_16l_one_mb8_ac", [*ONE, *LAYERS("opt-6.7b", 16), "train.global_batch=8", "plan.zero_stage=2",
                                    "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-2 + optimizer offload on one GPU, opt-6.7b's shapes"),
    ("z1off_13b10l_one_mb4", [*ONE, *LAYERS("llama-2-13b", 10), "train.global_batch=8", "plan.zero_stage=1",
                              "plan.offload_optimizer=cpu", "plan.micro_batch=4"], 130,
     "ZeRO-1 + optimizer offload on one GPU, 2 micro-batches per step, no checkpointing"),
    ("z2off_7b16l_one_mb4x2", [*ONE, *L7B(16), "train.global_batch=8", "plan.zero_stage=2",
                               "plan.offload_optimizer=cpu", "plan.micro_batch=4", *AC], 130,
     "ZeRO-2 + optimizer offload on one GPU, 2 micro-batches per step (the gradients' host round trips)"),
    ("z3offopt_7b24l_one_mb8", [*ONE, *L7B(24), "train.global_batch=8", "plan.zero_stage=3",
                                "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 150,
     "ZeRO-3 + optimizer offload on one GPU, 24 layers: host 98.1 GiB"),
    # third call: optimizer offload on one GPU at the card's edge, without checkpointing, both called "fits with
    # margin" (call 2's opt-6.7b plan with checkpointing had reserved 6.3 GiB above allocated where 0.3 was predicted)
    ("z2off_7b16l_one_mb17", [*ONE, *L7B(16), "train.global_batch=17", "plan.zero_stage=2",
                              "plan.offload_optimizer=cpu", "plan.micro_batch=17"], 120,
     "ZeRO-2 + optimizer offload on one GPU, 16 of llama-2-7b's layers at micro-batch 17: 124.9 GiB predicted"),
    ("z2off_opt67_16l_one_mb24", [*ONE, *LAYERS("opt-6.7b", 16), "train.global_batch=24", "plan.zero_stage=2",
                                  "plan.offload_optimizer=cpu", "plan.micro_batch=24"], 120,
     "the same on 16 of opt-6.7b's layers at micro-batch 24: 120.0 GiB predicted"),
    # 2026-12-01, second session on the 1 x H200 kind: plans whose modelled reserve passes the card while their live
    # tensors fit (predicted at the card, risky: sim/memory.py at_card), live tensors from 112 to 139 GiB of 140.4;
    # two ZeRO 1-2 plans within the card; a held-out ZeRO-1 + optimizer offload plan with accumulation (host)
    ("z1_7b18l_one_mb8", [*ONE, *L7B(18), "train.global_batch=8", "plan.zero_stage=1", "plan.micro_batch=8"], 90,
     "ZeRO-1 on one GPU, 18 layers of llama-2-7b: modelled 143.7 GiB, live tensors 112.5: at the card"),
    ("z0_7b16l_one_mb10", [*ONE, *L7B(16), "train.global_batch=10", "plan.zero_stage=0", "plan.micro_batch=10"], 90,
     "ZeRO-0, 16 layers at micro-batch 10: modelled 149.4, live 114.5: at the card"),
    ("z2_7b20l_one_mb8", [*ONE, *L7B(20), "train.global_batch=8", "plan.zero_stage=2", "plan.micro_batch=8"], 90,
     "ZeRO-2, 20 layers at micro-batch 8: modelled 149.4, live 124.6: at the card"),
    ("z0_opt67_14l_one_mb20", [*ONE, *LAYERS("opt-6.7b", 14), "train.global_batch=20", "plan.zero_stage=0",
                               "plan.micro_batch=20"], 90,
     "ZeRO-0, 14 of opt-6.7b's layers at micro-batch 20: modelled 155.5, live 124.9: at the card"),
    ("z1_opt67_16l_one_mb16", [*ONE, *LAYERS("opt-6.7b", 16), "train.global_batch=16", "plan.zero_stage=1",
                               "plan.micro_batch=16"], 90,
     "ZeRO-1, 16 of opt-6.7b's layers at micro-batch 16: modelled 147.6, live 119.8: at the card"),
    ("z0_opt27b_one_mb18", [*ONE, "model=opt-2.7b", "train.global_batch=18", "plan.zero_stage=0",
                            "plan.micro_batch=18"], 90,
     "opt-2.7b ZeRO-0 at micro-batch 18: modelled 157.6, live 130.5: at the card"),
    ("z0_7b20l_one_mb10", [*ONE, *L7B(20), "train.global_batch=10", "plan.zero_stage=0", "plan.micro_batch=10"], 90,
     "ZeRO-0, 20 layers at micro-batch 10: live tensors 139.3 GiB of 140.4, at the card: a chance to fail"),
    ("z1_7b16l_one_mb6", [*ONE, *L7B(16), "train.global_batch=6", "plan.zero_stage=1", "plan.micro_batch=6"], 90,
     "ZeRO-1, 16 layers at micro-batch 6, within the card"),
    ("z2_7b16l_one_mb6", [*ONE, *L7B(16), "train.global_batch=6", "plan.zero_stage=2", "plan.micro_batch=6"], 90,
     "ZeRO-2, the same plan"),
    ("z1off_7b16l_one_mb4x2", [*ONE, *L7B(16), "train.global_batch=8", "plan.zero_stage=1",
                               "plan.offload_optimizer=cpu", "plan.micro_batch=4", *AC], 130,
     "ZeRO-1 + optimizer offload with 2 micro-batches per step, the ZeRO-1 twin of z2off_7b16l_one_mb4x2 (host 77.3 "
     "GiB measured): 69.0 predicted, without ZeRO-2's host accumulation buffers (held out)"),
    # the same session's second call: zeroth order, ZeRO-3 without offload and ZeRO-3 with both offloads at micro-batch
    # 1 with accumulation (the parameters fetched from the host every micro-batch) on this machine; and, for the
    # allocator's history (train.memory_history), ZeRO-3 + optimizer offload, whose reserve above the allocated peak
    # measured 0.7-2.1 GiB where 0.2-0.3 is modelled
    ("mezo_opt13b_one_mb8", [*ONE, "model=opt-13b", *ZO, "train.global_batch=8", "plan.zo.mode=mezo",
                             "plan.micro_batch=8"], 110, "MeZO on opt-13b, one GPU of this kind"),
    ("zo2_opt13b_one_mb4", [*ONE, "model=opt-13b", *ZO, "train.global_batch=4", "plan.zo.mode=zo2",
                            "plan.micro_batch=4"], 150, "ZO2 on opt-13b, one GPU of this kind"),
    ("z3_7b16l_one_mb4", [*ONE, *L7B(16), "train.global_batch=8", "plan.zero_stage=3", "plan.micro_batch=4"], 90,
     "ZeRO-3 on one rank (nothing gathered), 2 micro-batches per step"),
    ("z3offall_7b16l_one_mb1x8", [*ONE, *L7B(16), "train.global_batch=8", *OFFALL, "plan.micro_batch=1", *AC], 150,
     "ZeRO-3 with both offloads at micro-batch 1 x 8: every micro-batch fetches the parameters from the host"),
    ("z3offopt_7b16l_one_mb8", [*ONE, *L7B(16), "train.global_batch=8", "plan.zero_stage=3",
                                "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-3 + optimizer offload on one GPU, 16 layers (run with train.memory_history=true: a derivation run)"),
    # third call: accumulation over small micro-batches (ZeRO-2 + optimizer offload, whose gradients make a host round
    # trip every micro-batch; ZeRO-3 on one rank), and the trace case of call 2 without recording (which crashed)
    ("z2off_7b12l_one_mb1x8", [*ONE, *L7B(12), "train.global_batch=8", "plan.zero_stage=2",
                               "plan.offload_optimizer=cpu", "plan.micro_batch=1", *AC], 150,
     "ZeRO-2 + optimizer offload at micro-batch 1 x 8: host accumulation buffers, a gradient round trip per micro-batch"),
    ("z3_7b16l_one_mb1x8_ac", [*ONE, *L7B(16), "train.global_batch=8", "plan.zero_stage=3", "plan.micro_batch=1",
                               *AC], 100, "ZeRO-3 on one rank at micro-batch 1 x 8 with checkpointing"),
    # fourth call: ZeRO-3 passes bound by the host's fetch time (call 3's one-rank plan ran 31% faster than predicted
    # with the constants' 1.2 ms per fetched tensor), predicted with the fetch time `meshpilot probe` measures on the
    # machine first (comm/zero3_probe.py of commit 027fbaa, removed after this call: it measured 1.5x too little,
    # results/2026-12-01-s11-h200x1/README.md): other shapes, micro-batch 1 with accumulation
    ("z3_7b8l_one_mb1x4_ac", [*ONE, *L7B(8), "train.global_batch=4", "plan.zero_stage=3", "plan.micro_batch=1",
                              *AC], 90, "ZeRO-3 on one rank, 8 of llama-2-7b's layers, micro-batch 1 x 4"),
    ("z3_opt67_12l_one_mb1x4", [*ONE, *LAYERS("opt-6.7b", 12), "train.global_batch=4", "plan.zero_stage=3",
                                "plan.micro_batch=1"], 90, "ZeRO-3 on one rank, 12 of opt-6.7b's layers, 1 x 4"),
    ("z3_13b10l_one_mb2x2_ac", [*ONE, *LAYERS("llama-2-13b", 10), "train.global_batch=4", "plan.zero_stage=3",
                                "plan.micro_batch=2", *AC], 90, "ZeRO-3 on one rank, 10 of llama-2-13b's layers, 2 x 2"),
    ("z3offall_7b8l_one_mb1x4", [*ONE, *L7B(8), "train.global_batch=4", *OFFALL, "plan.micro_batch=1", *AC], 130,
     "ZeRO-3 with both offloads on one rank, 8 layers, micro-batch 1 x 4"),
    # 2026-12-01 session 12: the offloaded step's host passes beside CPUAdam (sim/step_time.py host_step_passes: the
    # fp32 gradient scaling and the fp32 -> 16-bit cast, at the rates `meshpilot probe` now times), on shapes no
    # offload case ran; the no-clip twin drops the scaling pass at ZeRO-2 (bf16 without clipping skips it)
    ("z2off_13b8l_one_mb8", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=8", "plan.zero_stage=2",
                             "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-2 + optimizer offload, 8 of llama-2-13b's layers, one GPU"),
    ("z2off_13b8l_one_mb8_noclip", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=8", "plan.zero_stage=2",
                                    "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC, "train.grad_clip=0"], 130,
     "the same without gradient clipping: no scaling pass in the step"),
    ("z3offall_opt67_12l_one_mb8", [*ONE, *LAYERS("opt-6.7b", 12), "train.global_batch=8", *OFFALL,
                                    "plan.micro_batch=8", *AC], 150,
     "ZeRO-3 with both offloads, 12 of opt-6.7b's layers: scaling and the cast into the host partition"),
    ("z1off_opt67_12l_one_mb4x2", [*ONE, *LAYERS("opt-6.7b", 12), "train.global_batch=8", "plan.zero_stage=1",
                                   "plan.offload_optimizer=cpu", "plan.micro_batch=4", *AC], 130,
     "ZeRO-1 + optimizer offload, 12 of opt-6.7b's layers, 2 micro-batches per step"),
    ("z3offopt_13b8l_one_mb8", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=8", "plan.zero_stage=3",
                                "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-3 + optimizer offload, 8 of llama-2-13b's layers: the scaling pass; the cast is the blocking copy"),
    # fourth call: the same model, CPU Adam probed on 2^28 page-locked parameters in a fresh process (comm/probe.py)
    ("z2off_opt67_10l_one_mb8", [*ONE, *LAYERS("opt-6.7b", 10), "train.global_batch=8", "plan.zero_stage=2",
                                 "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-2 + optimizer offload, 10 of opt-6.7b's layers"),
    ("z1off_13b8l_one_mb8", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=8", "plan.zero_stage=1",
                             "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-1 + optimizer offload, 8 of llama-2-13b's layers"),
    ("z3offall_13b8l_one_mb8", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=8", *OFFALL,
                                "plan.micro_batch=8", *AC], 150,
     "ZeRO-3 with both offloads, 8 of llama-2-13b's layers"),
    # 2026-12-01 session 13: ZeRO-3's blocking cast copies probed on a rank's threads at a sub-group's size, and the
    # copy back of parameter offload with the optimizer on the GPU (sim/step_time.py)
    ("z3offp_7b16l_one_mb8", [*ONE, *L7B(16), "train.global_batch=8", "plan.zero_stage=3", "plan.offload_params=cpu",
                              "plan.micro_batch=8", *AC], 160,
     "ZeRO-3 + parameter offload, the optimizer on the GPU, 16 of llama-2-7b's layers"),
    ("z3offp_opt67_12l_one_mb4x2", [*ONE, *LAYERS("opt-6.7b", 12), "train.global_batch=8", "plan.zero_stage=3",
                                    "plan.offload_params=cpu", "plan.micro_batch=4", *AC], 160,
     "ZeRO-3 + parameter offload, the optimizer on the GPU, 12 of opt-6.7b's layers, 2 micro-batches per step"),
    ("z3offopt_7b20l_one_mb8", [*ONE, *L7B(20), "train.global_batch=8", "plan.zero_stage=3",
                                "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 150,
     "ZeRO-3 + optimizer offload, 20 of llama-2-7b's layers: the cast copy on the rank's threads"),
    # third call: the constants' copy-back rate (set from call 2's offload_copy_probe.py), no probe
    ("z3offp_13b8l_one_mb4x2", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=8", "plan.zero_stage=3",
                                "plan.offload_params=cpu", "plan.micro_batch=4", *AC], 170,
     "ZeRO-3 + parameter offload, the optimizer on the GPU, 8 of llama-2-13b's layers, 2 micro-batches per step"),
    # fourth call: ZeRO-3 with optimizer offload and accumulation, the probe's cast copy on the rank's threads
    ("z3offopt_opt67_14l_one_mb4x2", [*ONE, *LAYERS("opt-6.7b", 14), "train.global_batch=8", "plan.zero_stage=3",
                                      "plan.offload_optimizer=cpu", "plan.micro_batch=4", *AC], 170,
     "ZeRO-3 + optimizer offload, 14 of opt-6.7b's layers, 2 micro-batches per step"),
    # 2026-12-01 session 14: the loss's logit-sized tensors in the engine build's clone block or segments of their
    # own (sim/loss_blocks.py), optimizer offload at ZeRO 1-2 with checkpointing, on shapes and micro-batches no case
    # ran: from no new segment (13B layers at 6) to one at the second step (opt-6.7b's 12 layers)
    ("z2off_13b8l_one_mb6", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=6", "plan.zero_stage=2",
                             "plan.offload_optimizer=cpu", "plan.micro_batch=6", *AC], 130,
     "ZeRO-2 + optimizer offload, 8 of llama-2-13b's layers at micro-batch 6: the loss fits the clone's block"),
    ("z2off_13b8l_one_mb7", [*ONE, *LAYERS("llama-2-13b", 8), "train.global_batch=7", "plan.zero_stage=2",
                             "plan.offload_optimizer=cpu", "plan.micro_batch=7", *AC], 130,
     "the same at micro-batch 7: one fp32 logit tensor in a segment of its own"),
    ("z2off_7b16l_one_mb12", [*ONE, *L7B(16), "train.global_batch=12", "plan.zero_stage=2",
                              "plan.offload_optimizer=cpu", "plan.micro_batch=12", *AC], 130,
     "ZeRO-2 + optimizer offload, 16 of llama-2-7b's layers at micro-batch 12: two fp32 logit tensors outside it"),
    ("z2off_opt67_12l_one_mb8", [*ONE, *LAYERS("opt-6.7b", 12), "train.global_batch=8", "plan.zero_stage=2",
                                 "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-2 + optimizer offload, 12 of opt-6.7b's layers: a third segment at the second step"),
    ("z1off_opt67_10l_one_mb8", [*ONE, *LAYERS("opt-6.7b", 10), "train.global_batch=8", "plan.zero_stage=1",
                                 "plan.offload_optimizer=cpu", "plan.micro_batch=8", *AC], 130,
     "ZeRO-1 + optimizer offload, 10 of opt-6.7b's layers: all three fp32 logit tensors outside the clone's block"),
]


def prediction(overrides: list[str]) -> dict:
    """The simulator's prediction for a case, in this process (no GPU touched)."""
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.simulator import simulate
    e = simulate(load_job(JOB, overrides))
    return dict(plan=e.plan, regime=e.regime, fits=e.fits, fits_with_margin=e.fits_with_margin, at_card=bool(e.at_card),
                peak_gpu_gib=round(e.peak_memory_gib, 2), memory_margin_gib=round(e.memory_margin_gib, 2),
                host_node_gib=round(e.cpu_memory_gib_per_node, 2), host_usable_gib=round(e.cpu_memory_available_gib, 2),
                step_time_s=round(e.step_time_s, 4), time_breakdown_s={k: round(v, 4) for k, v in e.time_breakdown_s.items()},
                memory_breakdown_gib={k: round(v, 3) for k, v in e.memory_breakdown_gib.items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", nargs="*", default=None, help=f"names among {', '.join(c[0] for c in CASES)}")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-time budget of the whole set (default 540)")
    ap.add_argument("--settle-s", type=float, default=3.0, help="pause between cases (the last run's memory returns)")
    ap.add_argument("--dry-run", action="store_true", help="predictions only; nothing is run")
    ap.add_argument("--no-precompile", action="store_true", help="do not build DeepSpeed's ops first")
    ap.add_argument("--ops", nargs="*", default=["cpu_adam"], choices=["cpu_adam", "fused_adam"],
                    help="DeepSpeed ops to build before the first case (default: cpu_adam)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every case (e.g. an allocator setting)")
    ap.add_argument("--cpu-cores", type=int, default=32,
                    help="cluster.cpu_cores of every case: the device machine's cores (default 32, the 2 x H200 kind)")
    ap.add_argument("--host-gib", type=float, default=DRY_RUN_HOST_GIB,
                    help=f"cluster.cpu_memory_gib of a dry run (default {DRY_RUN_HOST_GIB:.0f}); a run reads the node's")
    a = ap.parse_args()
    unknown = set(a.cases or []) - {c[0] for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {sorted(unknown)}; choose among {[c[0] for c in CASES]}")
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    host_gib = a.host_gib if a.dry_run else round(host_total_gib(), 1)
    if not a.dry_run:
        from meshpilot.orchestrator.config.node_limits import node_cpu_cores
        if node_cpu_cores() != a.cpu_cores:
            print(f"note: this node lets a job use {node_cpu_cores()} cores; the cases say --cpu-cores {a.cpu_cores}",
                  flush=True)
    built = None
    if not a.dry_run and not a.no_precompile:
        built = precompile_ops(dict(os.environ), 240.0, a.out, a.ops)
        print(f"ops built first: {built}", flush=True)
    rows, skipped = [], []
    for name, case_sets, limit, note in CASES:
        if a.cases is not None and name not in a.cases:
            continue
        overrides = [f"cluster.cpu_cores={a.cpu_cores}", f"cluster.cpu_memory_gib={host_gib}", *BASE, *case_sets,
                     *a.extra]
        pred = prediction(overrides)
        row = dict(case=name, note=note, overrides=overrides, predicted=pred, forced=not pred["fits"])
        ran = run_within_budget(overrides, not pred["fits"], a.out / name, limit, a.budget_s - (time.monotonic() - t0),
                                a.dry_run)
        if ran is None:
            skipped.append(name)
            continue
        row.update(ran)
        rows.append(row)
        if not a.dry_run:
            time.sleep(a.settle_s)
        m = row.get("measured") or {}
        print(f"{name:18s} {pred['plan']:44s} {row['outcome']:22s} GPU {pred['peak_gpu_gib']:.1f} -> "
              f"{fmt(m.get('nvml_peak_gib'))} GiB, step {pred['step_time_s']:.2f} -> {fmt(m.get('step_time_s'), '{:.2f}')} s",
              flush=True)
    print(f"\n{'case':18s} {'regime':18s} {'outcome':22s} {'GPU pred':>8s} {'meas':>6s} {'host pred':>9s} {'meas':>6s} "
          f"{'step pred':>9s} {'meas':>6s}")
    for r in rows:
        m, p = r.get("measured") or {}, r["predicted"]
        host = next(iter((m.get("host_node") or {}).values()), None) or {}
        print(f"{r['case']:18s} {p['regime']:18s} {r['outcome']:22s} {p['peak_gpu_gib']:8.1f} {fmt(m.get('nvml_peak_gib')):>6s} "
              f"{p['host_node_gib']:9.1f} {fmt(host.get('measured')):>6s} {p['step_time_s']:9.2f} "
              f"{fmt(m.get('step_time_s'), '{:.2f}'):>6s}")
    if skipped:
        print(f"skipped (over the {a.budget_s:.0f} s budget): {', '.join(skipped)}")
    write_json(a.out / "regime_runs.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                dry_run=a.dry_run, budget_s=a.budget_s, host_gib=host_gib,
                                                precompiled=built, rows=rows, skipped=skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
