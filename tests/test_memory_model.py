"""Memory model: published values (ZeRO Figure 1, Korthikanti Table 2), DeepSpeed's own estimators,
hand-counted activations, and invariants over many plans."""
from __future__ import annotations

import numpy as np
import pytest

from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.sim.memory import (korthikanti_layer_bytes, layer_activation_bytes, memory_terms,
                                                 model_terms, zero_model_states_paper)
from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.sim.simulator import simulate
from meshpilot.strategies.deepspeed_config import deepspeed_config, zero_settings

C = SimulatorConstants()


def _job(model="llama-2-7b", cluster="h100-sxm-4", **train):
    ov = [f"model={model}", f"cluster={cluster}", "plan=auto"] + [f"train.{k}={v}" for k, v in train.items()]
    return load_job(None, ov)


def _mem(job, plan: Plan) -> dict[str, float]:
    arr = PlanArrays.from_plans([plan], job.cluster.gpus_per_node)
    return {k: float(v[0]) for k, v in memory_terms(model_terms(job.model), job, arr, C).items()}


def _model_states(m):
    return m["weights"] + m["gradients"] + m["optimizer_states"]


@pytest.mark.parametrize("stage,gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure1(stage, gb):
    # Rajbhandari et al. 2019, Figure 1: 7.5B parameters, 64 GPUs, K = 12 (GB = 1e9 bytes)
    assert zero_model_states_paper(7.5e9, 64, stage, k=12) / 1e9 == pytest.approx(gb, abs=0.05)


def test_zero2_matches_deepspeed_estimator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    # two micro-batches a step: the 16-bit gradient partition lives from the first backward through the step (without
    # accumulation the step frees it and the next backward allocates it again: part of `temporary`, below)
    job = _job(global_batch=8)
    P = param_counts(job.model).total
    plan = Plan(dp=4, zero_stage=2, micro_batch=1, grad_accum=2)
    m = _mem(job, plan)
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=4, num_nodes=1, cpu_offload=False)
    # DeepSpeed: 2P (16-bit params) + 18P/d (16-bit grads 2, fp32 grads 4, fp32 params 4, Adam 8);
    # ours: the same terms, the fp32 gradient partition living at the step (part of `temporary`)
    fp32_grad_partition = 4.0 * P / 4
    assert _model_states(m) + fp32_grad_partition == pytest.approx(ds_gpu, rel=1e-6)
    one = _mem(_job(global_batch=4), plan.replace(grad_accum=1))
    assert one["gradients"] == 0.0 and one["communication_buffers"] < m["communication_buffers"]
    assert _model_states(one) + 2.0 * P / 4 + fp32_grad_partition == pytest.approx(ds_gpu, rel=1e-6)
    _, ds_off = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=4, num_nodes=1, cpu_offload=True)
    m_off = _mem(job, plan.replace(offload_optimizer="cpu"))
    # DeepSpeed's estimator: 2P. Ours adds the GPU staging buffer DeepSpeedZeroOptimizer allocates for the
    # offloaded gradients (temp_grad_buffer_for_gpu_offload, 16-bit, the largest parameter: llama-2-7b's
    # 32000 x 4096 embedding), which the estimator leaves out
    assert _model_states(m_off) == pytest.approx(ds_off + 2.0 * 32000 * 4096, rel=1e-6)


def test_zero3_matches_deepspeed_estimator_on_sharded_terms():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    job = _job(global_batch=4)
    mt = model_terms(job.model)
    P = mt.total
    d = 4
    m = _mem(job, Plan(dp=d, zero_stage=3, micro_batch=1))
    _, ds, _ = estimate_zero3_model_states_mem_needs(P, mt.largest_module, num_gpus_per_node=4, num_nodes=1,
                                                  cpu_offload=False)
    # DeepSpeed counts 18P/d (grads 16-bit, fp32 grads, fp32 params, Adam) + 4 x largest layer for the
    # gathered 16-bit parameters. Ours: gradients + optimizer states + the fp32 step partition = 18P/d;
    # the gathered window is 2 x (largest module + prefetch bucket), plus the 2P/d 16-bit partition
    # DeepSpeed's estimator leaves out.
    sharded = m["gradients"] + m["optimizer_states"] + 4.0 * P / d
    assert sharded == pytest.approx(ds - 4 * mt.largest_module, rel=1e-6)
    window = m["weights"] - 2.0 * P / d
    # the prefetch bucket of the config the worker runs (meshpilot's builder: DEFAULT_BUCKET / 4 = 5e7)
    prefetch = zero_settings(deepspeed_config(job, Plan(dp=d, zero_stage=3, micro_batch=1))).prefetch_bucket_size
    assert prefetch == 5e7
    assert window == pytest.approx(2.0 * (mt.largest_module + prefetch), rel=1e-6)
    # full parameter offload: the GPU keeps only the gathered window (+ persistent small params)
    off = _mem(job, Plan(dp=d, zero_stage=3, micro_batch=1, offload_optimizer="cpu", offload_params="cpu"))
    ds_gpu_off = estimate_zero3_model_states_mem_needs(P, mt.largest_module, 4, 1, True, True)[1]
    assert _model_states(off) == pytest.approx(2.0 * (mt.largest_module + prefetch + mt.replicated), rel=1e-6)
    assert _model_states(off) < 1.5 * ds_gpu_off


def test_korthikanti_table_hand_computed():
    # GPT-3 175B row of Korthikanti et al.: s=2048, b=1, h=12288, a=96, t=8. sbh = 25,165,824.
    # none: sbh (34 + 5*96*2048/12288 = 80) = 114 sbh; tp: 10 + 3 + 10 = 23 sbh;
    # tp+sp: 4.25 + 10 = 14.25 sbh; full: 2 sbh.
    args = dict(s=2048, b=1, h=12288, a=96, t=8)
    assert korthikanti_layer_bytes(mode="none", **args) == 2_868_903_936
    assert korthikanti_layer_bytes(mode="tp", **args) == 578_813_952
    assert korthikanti_layer_bytes(mode="tp+sp", **args) == 358_612_992
    assert korthikanti_layer_bytes(mode="full", **args) == 50_331_648


def test_gpt2_layer_count_close_to_korthikanti_without_scores():
    job = _job(model="gpt2-xl", global_batch=4, seq_len=1024)
    m = job.model
    m.implementation = "hf"                               # transformers' layers: trained with dropout
    acts = layer_activation_bytes(m)
    ours = acts.replicated + acts.attention + acts.mlp
    s, h, a = 1024, m.hidden, m.heads
    paper_no_scores = korthikanti_layer_bytes(s, 1, h, a, mode="none") / s - 5 * a * s / h * h
    assert acts.replicated == 10 * h                      # Korthikanti's replicated 10sbh
    assert ours == pytest.approx(paper_no_scores, rel=0.1)  # 36h + 4a vs 34h
    m.implementation = "builtin"                          # no dropout masks
    assert layer_activation_bytes(m).replicated == 8 * h


def test_opt_relu_mlp_saves_one_tensor():
    """opt's ReLU output is what its backward needs and what fc2 saves: 2f, where gpt2's GELU saves 4f."""
    opt = _job(model="opt-125m", global_batch=2, seq_len=64).model
    gpt2 = _job(model="gpt2", global_batch=2, seq_len=64).model
    assert layer_activation_bytes(opt).mlp == 2 * opt.ffn and layer_activation_bytes(gpt2).mlp == 4 * gpt2.ffn


def test_llama_layer_hand_count():
    m = _job(model="tiny-llama", global_batch=2, seq_len=64).model   # h=64, a=4, f=128
    acts = layer_activation_bytes(m)
    # two RMSNorms 2 x (4h fp32 input + 2h normalised + 2h weighted output) = 1024; attention 8h + 4a = 528 (the
    # output projection's input is a view of the SDPA output); SwiGLU 8f = 1024
    assert (acts.replicated, acts.attention, acts.mlp) == (1024, 528, 1024)


def test_activation_totals_and_logits():
    job = _job(model="tiny-llama", global_batch=4, seq_len=64)
    m = _mem(job, Plan(dp=1, micro_batch=2, grad_accum=2))
    h, V, L, tokens = 64, 256, 2, 2 * 64
    layer = 1024 + 528 + 1024
    expected = tokens * (L * layer + 6 * h + C.logits_saved_bytes * V)
    assert m["activations"] == pytest.approx(expected)
    ck = _mem(job, Plan(dp=1, micro_batch=2, grad_accum=2, activation_checkpointing="full"))
    head = 6 * h + C.logits_saved_bytes * V
    assert ck["activations"] == pytest.approx(tokens * (L * 2 * h + head))


def test_zero01_gradients_take_the_activations_place_without_accumulation():
    """Stages 0-1, one micro-batch per step: the peak is the larger of the activation phase and the full per-tensor
    gradients + the first block's backward; with accumulation the gradients are alive through the next forward."""
    from meshpilot.orchestrator.sim.memory import layer_backward_bytes
    job = _job(model="llama-2-7b", global_batch=16, seq_len=2048)
    mt = model_terms(job.model)
    G = 2.0 * param_counts(job.model).total
    for stage in (0, 1):
        one = _mem(job, Plan(dp=2, zero_stage=stage, micro_batch=8, grad_accum=1, activation_checkpointing="full"))
        acc = _mem(job, Plan(dp=2, zero_stage=stage, micro_batch=4, grad_accum=2, activation_checkpointing="full"))
        arr = PlanArrays.from_plans([Plan(dp=2, zero_stage=stage, micro_batch=8, activation_checkpointing="full")], 4)
        layer, working = (float(x[0]) for x in layer_backward_bytes(mt, 2048, arr, C))
        static = one["weights"] + one["optimizer_states"] + one["communication_buffers"] - (one["gradients"] - G)
        at_peak = one["activations"] + one["temporary"]
        # the gradients' phase (G + the first block's tensors and working set) is at most the peak it set
        assert one["allocated"] >= static + G + layer + working - 1e-3 * G
        assert at_peak < acc["activations"] + acc["temporary"] + G        # not the sum of both phases
        assert acc["activations"] > 0 and acc["gradients"] >= G


@pytest.mark.parametrize("model,mb", [("tiny-llama", 2), ("llama-2-7b", 1), ("llama-2-7b", 8), ("llama-3-8b", 4)])
def test_checkpointed_activation_phase_is_the_larger_of_loss_and_recompute(model, mb):
    """With checkpointing the loss's backward ends before the last block is recomputed: the phase's peak is the
    layer inputs + max(head + loss backward, one layer + its working set), not their sum."""
    from meshpilot.orchestrator.sim.memory import activation_terms
    job = _job(model=model, global_batch=mb, seq_len=2048)
    m, mt = job.model, model_terms(job.model)
    h, f, V, L, tokens = m.hidden, m.ffn, m.vocab, m.layers, mb * 2048
    acts = layer_activation_bytes(m)
    one_layer = acts.replicated + acts.attention + acts.mlp
    head = 6 * h + C.logits_saved_bytes * V
    loss_phase = head + C.logits_backward_bytes * V
    layer_phase = one_layer + C.working_set_factor * 2 * (h + f)
    arr = PlanArrays.from_plans([Plan(dp=1, micro_batch=mb, activation_checkpointing="full")], 1)
    saved, working = activation_terms(mt, 2048, arr, C)
    assert saved[0] == pytest.approx(tokens * (L * 2 * h + head))
    assert saved[0] + working[0] == pytest.approx(tokens * (L * 2 * h + max(loss_phase, layer_phase)))
    # without checkpointing both are counted: every layer's tensors are alive through the loss's backward
    arr = PlanArrays.from_plans([Plan(dp=1, micro_batch=mb)], 1)
    saved, working = activation_terms(mt, 2048, arr, C)
    assert saved[0] + working[0] == pytest.approx(tokens * (L * one_layer + loss_phase + C.working_set_factor * 2 * (h + f)))


def _all_plans(job, world_max):
    plans = []
    gb = job.train.global_batch
    for tp in (1, 2, 4):
        for dp in (1, 2, 4):
            if dp * tp > world_max or gb % dp:
                continue
            for z in range(4):
                for oo in ("none", "cpu"):
                    for op in ("none", "cpu"):
                        for mb in [d for d in range(1, gb // dp + 1) if (gb // dp) % d == 0]:
                            for ac in ("none", "full"):
                                p = Plan(dp=dp, tp=tp, zero_stage=z, offload_optimizer=oo, offload_params=op,
                                         micro_batch=mb, grad_accum=gb // (dp * mb), activation_checkpointing=ac)
                                try:
                                    p.check(job.model, job.train, job.cluster)
                                except ValueError:
                                    continue
                                plans.append(p)
    return plans


@pytest.mark.parametrize("model", ["llama-2-7b", "gpt2-xl", "opt-1.3b"])
def test_invariants(model):
    job = _job(model=model, global_batch=8, seq_len=1024)
    plans = _all_plans(job, 4)
    arr = PlanArrays.from_plans(plans, job.cluster.gpus_per_node)
    mem = memory_terms(model_terms(job.model), job, arr, C)
    states = mem["weights"] + mem["gradients"] + mem["optimizer_states"]
    by = {p: i for i, p in enumerate(plans)}
    checked = 0
    for p, i in by.items():
        # a higher ZeRO stage never raises model-state memory
        # (at stage 2 without accumulation the gradient partition is a phase's, not a state: sim/memory.py)
        if (p.offload_optimizer == "none" and p.offload_params == "none" and p.zero_stage < 3
                and not (p.zero_stage == 2 and p.grad_accum == 1)):
            j = by.get(p.replace(zero_stage=p.zero_stage + 1))
            if j is not None:
                assert states[j] <= states[i] + 1e-6, (p, states[i], states[j])
                checked += 1
        # a larger micro-batch never lowers activation memory, except where it ends accumulation at ZeRO 0-2: there
        # the gradients no longer outlive a micro-batch (stages 0-1: the per-tensor gradients take the activations'
        # place in the backward; stage 2: the partition and buckets are allocated in each backward)
        for q, j in by.items():
            ends_accumulation = q.grad_accum == 1 and (q.zero_stage <= 1 or (
                q.zero_stage == 2 and q.offload_optimizer == "none")) and not q.zeroth_order
            if (q.replace(micro_batch=p.micro_batch, grad_accum=p.grad_accum) == p and q.micro_batch > p.micro_batch
                    and not ends_accumulation):
                assert mem["activations"][j] >= mem["activations"][i]
                assert mem["peak"][j] >= mem["peak"][i] - 1e-6
        # offload never raises GPU memory
        for change in (dict(offload_optimizer="cpu"), dict(offload_params="cpu")):
            j = by.get(p.replace(**change))
            if j is not None and j != i:
                assert mem["peak"][j] <= mem["peak"][i] + 1e-6, (p, change)
                assert mem["cpu_node"][j] >= mem["cpu_node"][i]
        # checkpointing never raises activations
        j = by.get(p.replace(activation_checkpointing="full"))
        if j is not None:
            assert mem["activations"][j] <= mem["activations"][i]
    assert checked > 10


def test_zeroth_order_memory():
    job = load_job(None, ["model=opt-1.3b", "cluster=h100-sxm-4", "plan=auto", "train.optimizer=zo-sgd",
                          "train.global_batch=4", "train.seq_len=512"])
    P = param_counts(job.model).total
    mezo = simulate(job, Plan(zo_mode="mezo", micro_batch=4, grad_accum=1))
    zo2 = simulate(job, Plan(zo_mode="zo2", micro_batch=4, grad_accum=1))
    assert mezo.memory_breakdown_gib["weights"] * 2**30 == pytest.approx(2 * P)
    assert mezo.memory_breakdown_gib["gradients"] == mezo.memory_breakdown_gib["optimizer_states"] == 0
    assert mezo.memory_breakdown_gib["activations"] == 0      # inference: nothing saved for backward
    assert zo2.memory_breakdown_gib["weights"] < mezo.memory_breakdown_gib["weights"] / 2
    mt = model_terms(job.model)
    assert zo2.memory_breakdown_gib["cpu_offload"] * 2**30 >= 2 * mt.blocks_total
    assert zo2.peak_memory_gib < mezo.peak_memory_gib
    # pertp=2 halves each rank's forwards
    pert = simulate(job, Plan(zo_mode="mezo", zo_pertp=2, micro_batch=4, grad_accum=1))
    assert pert.time_breakdown_s["forward"] == pytest.approx(mezo.time_breakdown_s["forward"] / 2)


def test_offload_cpu_memory_bytes_per_param():
    job = _job(global_batch=4)
    P = param_counts(job.model).total
    e = simulate(job, Plan(dp=4, zero_stage=2, offload_optimizer="cpu", micro_batch=1))
    # per rank (P_s = P/4 = 1,684,603,904; pinned blocks rounded up to powers of two by torch's host
    # allocator): fp32 master 4 P_s = 6.27 GiB -> 8 GiB, bf16 copy-back buffer 2 P_s -> 4 GiB, fp32
    # gradients -> 8 GiB, Adam moments 8 P_s (pageable, exact), staging buffer of the largest tensor
    # (the 32000 x 4096 embedding, bf16: 250 MiB) -> 256 MiB; no accumulation buffers (grad_accum 1)
    assert P == 6_738_415_616
    ps = P // 4
    per_rank = 2**33 + 2**32 + 2**33 + 8 * ps + 2**28
    per_node = e.memory_breakdown_gib["cpu_offload"] * 2**30
    assert per_node == pytest.approx(4 * per_rank, rel=1e-9)
    assert np.isfinite(e.step_time_s) and e.time_breakdown_s["cpu_optimizer"] > 0


def test_cpu_adam_is_thread_bound_until_the_node_is_memory_bound():
    """ZeRO-Offload's CPU step by hand: a rank steps its P/dp parameters at
    min(threads x r_thread, R_node / ranks on the node), threads = the node's cores per GPU, at most 8
    (h100-sxm-4 preset: 4 GPUs). One and two ranks are thread-bound; four share the node's ceiling
    when it is below 4 x 8 x r_thread."""
    from meshpilot.orchestrator.config.clusters import cpu_threads_per_gpu_rank
    job = _job(global_batch=4)
    cl, P = job.cluster, param_counts(job.model).total
    threads = cpu_threads_per_gpu_rank(cl.cpu_cores, cl.gpus_per_node)
    assert threads == min(8, cl.cpu_cores // cl.gpus_per_node)
    rank = threads * C.cpu_adam_gparams_per_core * 1e9
    node = C.cpu_adam_node_gparams_per_s * 1e9                # a property of the node's memory, not its cores
    assert node / 4 < rank < node / 2                      # the regimes the docstring names
    for dp in (1, 2, 4):
        e = simulate(job, Plan(dp=dp, zero_stage=2, offload_optimizer="cpu", micro_batch=4 // dp))
        ps = P / dp
        assert e.time_breakdown_s["cpu_optimizer"] == pytest.approx(ps / min(rank, node / dp), rel=1e-3), dp
    tight = job.cluster.calibration.__class__(cpu_adam_gparams_per_s=0.5)      # a probed node rate wins
    job.cluster.calibration = tight
    e = simulate(job, Plan(dp=4, zero_stage=2, offload_optimizer="cpu", micro_batch=1))
    assert e.time_breakdown_s["cpu_optimizer"] == pytest.approx((P / 4) / (0.5e9 / 4), rel=1e-3)


def test_cpu_threads_per_rank_is_what_the_simulator_and_the_gang_read():
    """``cluster.cpu_threads_per_rank`` (e.g. 1, as a torchrun start of an exported config gives
    a rank) replaces the gang's default in the CPU Adam time and in the gang's bundles."""
    from meshpilot.launch.gang import gang_spec
    job = _job(global_batch=4)
    P = param_counts(job.model).total
    plan = Plan(dp=1, zero_stage=2, offload_optimizer="cpu", micro_batch=4)
    default = simulate(job, plan).time_breakdown_s["cpu_optimizer"]
    job.cluster.cpu_threads_per_rank = 1
    one = simulate(job, plan).time_breakdown_s["cpu_optimizer"]
    assert one == pytest.approx(P / (1 * C.cpu_adam_gparams_per_core * 1e9), rel=1e-3)
    assert one > default * 4                                       # the default gives this preset 8 threads
    cl = job.cluster
    assert gang_spec(4, 1, accelerator="gpu", gpus_per_node=cl.gpus_per_node, cpu_cores=cl.cpu_cores,
                     cpu_threads_per_rank=3).bundles == [{"CPU": 3, "GPU": 1}] * 4
    with pytest.raises(ConfigError, match="cluster.cpu_threads_per_rank"):
        load_job(None, ["model=tiny-llama", "cluster=h100-sxm-4", f"cluster.cpu_threads_per_rank={cl.cpu_cores + 1}"])


def test_zo2_transfers_duplex_and_sliced_over_one_node():
    """ZO2 block traffic by hand (opt-1.3b, bf16, h100-sxm-4 preset, one micro-batch): up and down
    run at once, so a rank's transfer time is max(up, down) = 2 B / bw; four ranks of one node
    each move a quarter and all-gather the blocks over NVLink. (offload_transfers is what the
    forwards do not hide: transfer - zo2_overlap * forward, at least 0.)"""
    from meshpilot.comm.cost_model import collective_time
    job = load_job(None, ["model=opt-1.3b", "cluster=h100-sxm-4", "plan=auto", "train.optimizer=zo-sgd",
                          "train.global_batch=4", "train.seq_len=512"])
    cl, B = job.cluster, model_terms(job.model).blocks_total
    h2d = (cl.calibration.h2d_gbs or cl.pcie_bandwidth_gbs * C.pcie_efficiency) * 1e9
    d2h = (cl.calibration.d2h_gbs or cl.pcie_bandwidth_gbs * C.pcie_efficiency) * 1e9
    one = simulate(job, Plan(zo_mode="zo2", micro_batch=4, grad_accum=1))
    four = simulate(job, Plan(zo_mode="zo2", zo_dp=4, micro_batch=1, grad_accum=1))

    def hidden(e, transfer):
        return max(transfer - C.zo2_overlap * e.time_breakdown_s["forward"], 0.0)
    assert one.time_breakdown_s["offload_transfers"] == pytest.approx(hidden(one, max(2 * B / h2d, 2 * B / d2h)))
    from meshpilot.comm.cost_model import LinkRates
    gather = collective_time("all_gather", 2.0 * B, 4, 1, 4, LinkRates.from_cluster(cl))
    assert four.time_breakdown_s["offload_transfers"] == pytest.approx(
        hidden(four, max(2 * B / (4 * h2d), 2 * B / (4 * d2h)) + gather))
    # host: one pinned store per block (opt-1.3b: 24 blocks of 50,358,272 parameters, bf16 96 MiB -> 128 MiB
    # pinned), four ranks of a node a quarter of each (24 MiB -> 32 MiB), plus a pinned stash of the
    # resident parameters: embedding 50272 x 2048 (196 MiB -> 256 MiB), positions 2050 x 2048 (8 MiB -> 16 MiB),
    # final LayerNorm (8 KiB)
    assert B == 24 * 50_358_272
    stash = 2**28 + 2**24 + 2**13
    assert one.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(24 * 2**27 + stash)
    assert four.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(4 * (24 * 2**25 + stash))
    # host peak per node: each rank builds the whole bf16 model on the host first (2 P), alive while the stores
    # fill, on each of the four ranks (the closing checksum sums one block slot at a time: nothing on the host); the
    # stores and the stash are page-locked, which costs the node pinned_node_overhead more
    P, proc = model_terms(job.model).total, C.cpu_process_gib * 2**30
    locked = (1.0 + C.pinned_node_overhead) * (24 * 2**25 + stash)
    assert four.cpu_memory_gib_per_node * 2**30 == pytest.approx(4 * (locked + 2 * P + proc))


def test_zo_loss_working_set_is_one_chunk_of_the_built_in_models_loss():
    """Without autograd the built-in model forms the logits FORWARD_ONLY_ROWS tokens at a time;
    the simulator's zeroth-order working set holds one such chunk, not every token's logits."""
    from meshpilot.strategies.model import Transformer
    assert C.forward_only_rows == Transformer.FORWARD_ONLY_ROWS
    job = load_job(None, ["model=opt-1.3b", "cluster=h100-sxm-4", "plan=auto", "train.optimizer=zo-sgd",
                          "train.global_batch=8", "train.seq_len=2048"])
    V = job.model.vocab
    small = simulate(job, Plan(zo_mode="mezo", micro_batch=4, grad_accum=2))     # 8192 tokens a forward
    big = simulate(job, Plan(zo_mode="mezo", micro_batch=8, grad_accum=1))       # 16384
    # doubling the tokens adds one layer's tensors for the extra tokens, the loss chunk stays
    per_token_layer = (big.memory_breakdown_gib["temporary"] - small.memory_breakdown_gib["temporary"]) * 2**30 / 8192
    chunk = C.forward_only_rows * C.logits_forward_only_bytes * V
    assert small.memory_breakdown_gib["temporary"] * 2**30 == pytest.approx(8192 * per_token_layer + chunk)


def test_zero3_step_holds_one_optimizer_sub_group_of_fp32_gradients():
    """Stage 3 steps its partition one sub-group at a time (DeepSpeed's sub_group_size, default 1e9
    elements): the step flattens the sub-group's gradients (16-bit) and copies them to fp32 while both live,
    (2 + 4) x min(P_s, sub_group_size) bytes, by hand: two sub-group sizes below P_s differ by 6 bytes per element
    of their difference."""
    from meshpilot.orchestrator.sim.deepspeed_settings import deepspeed_settings
    job = load_job(None, ["model=llama-2-13b", "cluster=h100-sxm-4", "train.global_batch=8", "plan.dp=4",
                          "plan.zero_stage=3", "plan.micro_batch=2", "plan.activation_checkpointing=full"])
    a = PlanArrays.from_plans([Plan(dp=4, zero_stage=3, micro_batch=2, activation_checkpointing="full")],
                              job.cluster.gpus_per_node)
    ps = param_counts(job.model).total / 4
    temp = {}
    for sub_group in (3e9, 2.5e9):
        job.train.deepspeed_extra = {"zero_optimization": {"sub_group_size": sub_group}}
        ds = deepspeed_settings(job, a)
        assert float(ds.sub_group_size[0]) == sub_group
        temp[sub_group] = float(memory_terms(model_terms(job.model), job, a, C, ds)["temporary"][0])
    assert ps > 3e9
    assert temp[3e9] - temp[2.5e9] == pytest.approx(6.0 * (3e9 - 2.5e9), rel=1e-9)
    job.train.deepspeed_extra = {}
    assert float(deepspeed_settings(job, a).sub_group_size[0]) == 1e9          # DeepSpeed's default


def test_zero12_engine_build_peak_by_hand():
    """DeepSpeedZeroOptimizer.__init__ holds the parameters and their flat copy at once (2 w P_r allocated), and
    the clone of the rank's partition (w P_s, before its fp32 master goes to the host) gets a segment of its own:
    reserved 2 w P_r + w P_s. Built-in llama-2-7b, ZeRO-2 + optimizer offload, dp=2 (measured on 2 x H200:
    allocated 25.10 GiB, reserved 31.97, NVML 34.62; benchmarks/results/2026-11-30-h200x2/host2/z2off_7b_mb2)."""
    job = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "plan=auto", "train.global_batch=16",
                          "train.expandable_segments=false"])         # the measured run: torch's default mode
    P = 6_738_415_616
    assert param_counts(job.model).total == P
    z2off = Plan(dp=2, zero_stage=2, offload_optimizer="cpu", micro_batch=2, activation_checkpointing="full")
    m = _mem(job, z2off)
    assert m["allocated"] == pytest.approx(4.0 * P)                          # 26,953,662,464 B = 25.10 GiB
    assert m["reserved"] == pytest.approx(4.0 * P + 2.0 * P / 2)             # 33,692,078,080 B = 31.38 GiB
    run = m["weights"] + m["gradients"] + m["optimizer_states"] + m["activations"] + m["temporary"] \
        + m["communication_buffers"]
    nccl = (C.nccl_base_gib + 2 * C.nccl_per_group_gib) * 2**30            # the world's and the engine's 2
    assert m["peak"] == pytest.approx(m["reserved"] + C.cuda_context_gib * 2**30 + nccl)
    assert run + m["framework_overhead"] == pytest.approx(m["peak"])
    # without offload the fp32 master is made on the GPU from the clone (4 P_s more), and the run's own
    # states outgrow the build: the run decides
    m_gpu = _mem(job, Plan(dp=2, zero_stage=2, micro_batch=2, activation_checkpointing="full"))
    assert m_gpu["reserved"] > 4.0 * P + 2.0 * P / 2 + 4.0 * P / 2
    assert m_gpu["allocated"] > 4.0 * P
    # a partition smaller than the largest parameter (dp=64: 105.3e6 < 131.1e6 elements of the embedding) fits
    # in that parameter's freed block: reserved 2 w P_r only
    big = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.nodes=16", "plan=auto",
                          "train.global_batch=64", "train.expandable_segments=false"])
    m64 = _mem(big, Plan(dp=64, zero_stage=2, offload_optimizer="cpu", micro_batch=1, activation_checkpointing="full"))
    assert P / 64 < 32000 * 4096
    assert m64["reserved"] == pytest.approx(4.0 * P)
    # ZeRO-3 (zero.Init partitions each parameter as it is built) and zeroth order: no such build
    m3 = _mem(job, Plan(dp=2, zero_stage=3, offload_optimizer="cpu", micro_batch=2, activation_checkpointing="full"))
    assert m3["allocated"] < 0.6 * 4.0 * P                    # far below a stage 1-2 build's 2 w P_r


def test_allocator_phases_by_hand():
    """Built-in llama-2-7b, dp=2, ZeRO-2, micro-batch 1 x 8, no checkpointing (bf16 AdamW). The step holds the
    flat 16-bit gradient partition and its fp32 copy at once: 6 P_s, which sets the allocated peak
    (measured 75.40 GiB, max_allocated rising by 18.8 GiB in the step; 2026-11-30-s2-h200x2/trace_std). The
    activation phase's per-tensor blocks do not serve those flat buffers: reserved = (static + 6 P_s +
    activation phase) x (1 + fragmentation) (measured 88.46 GiB). With checkpointing the activation phase is
    small and the reserve shrinks by the activations it no longer saves."""
    from meshpilot.orchestrator.sim.memory import activation_terms, model_terms
    job = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan=auto",
                          "train.global_batch=16"])
    P = 6_738_415_616
    Ps = P / 2
    plan = Plan(dp=2, zero_stage=2, micro_batch=1, grad_accum=8, activation_checkpointing="none")
    arr = PlanArrays.from_plans([plan], 2)
    acts, working = (float(x[0]) for x in activation_terms(model_terms(job.model), 2048, arr, C))
    static = 2 * P + 2 * Ps + 12 * Ps + 2 * 2e8              # weights, gradient partition, states, reduce bucket
    step = 6 * Ps
    assert step > acts + working                             # the step is the allocated peak here
    m = _mem(job, plan)
    assert m["allocated"] == pytest.approx(static + step, rel=1e-9)
    assert m["reserved"] == pytest.approx((static + step + acts + working) * (1 + C.fragmentation), rel=1e-9)
    assert 75.0 < m["allocated"] / 2**30 < 76.5 and 88.0 < m["reserved"] / 2**30 < 90.0
    ckpt = _mem(job, Plan(dp=2, zero_stage=2, micro_batch=1, grad_accum=8, activation_checkpointing="full"))
    a2, w2 = (float(x[0]) for x in activation_terms(model_terms(job.model), 2048,
                                                     PlanArrays.from_plans([Plan(dp=2, zero_stage=2, micro_batch=1,
                                                                                 grad_accum=8,
                                                                                 activation_checkpointing="full")], 2),
                                                     C))
    assert ckpt["reserved"] == pytest.approx((static + step + a2 + w2) * (1 + C.fragmentation), rel=1e-9)
    assert m["reserved"] - ckpt["reserved"] == pytest.approx((acts + working - a2 - w2) * (1 + C.fragmentation))


def test_stage1_step_frees_the_gradients_outside_the_partition_and_loaded_model_blocks_hold_the_gradients():
    """transformers' llama-2-7b (model.implementation: hf), dp=4, ZeRO-1, micro-batch 1, checkpointing, DeepSpeed's
    reduce bucket 5e8. At the step DeepSpeed 0.19 drops the gradients of the parameters outside the rank's partition
    (``free_grad_in_param_list(params_not_in_partition)``) before it flattens the partition and makes its fp32 copy:
    the step's (2 + 4) P_s replace 2 (P - P_s). The per-tensor gradients (autograd's, of the parameters' shapes) sit
    in the blocks the loaded model's parameters left, so the load hole and the gradients are one phase, not two. One
    micro-batch per step: the gradients take the activations' place in the backward, so the allocated peak is the
    larger of the activation phase and the gradients + the first block's backward.
    Measured (2026-11-27 4 x H200, held out): allocated 47.19 GiB, reserved 59.63 GiB."""
    from meshpilot.orchestrator.sim.memory import activation_terms, layer_backward_bytes, model_terms
    job = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "plan=auto", "train.global_batch=4",
                          "model.implementation=hf",
                          "train.deepspeed_extra.zero_optimization.reduce_bucket_size=500000000"])
    P = 6_738_415_616
    Ps = P / 4
    plan = Plan(dp=4, zero_stage=1, micro_batch=1, grad_accum=1, activation_checkpointing="full")
    acts, working = (float(x[0]) for x in activation_terms(model_terms(job.model), 2048,
                                                            PlanArrays.from_plans([plan], 4), C, hf=True))
    g = 2 * P                                                # per-tensor 16-bit gradients
    flat = 2 * P + 12 * Ps + 2 * 5e8                         # weights, states, reduce bucket
    step = 6 * Ps - 2 * (P - Ps)                             # beyond the partition's gradients, which stay
    assert acts + working > step                             # the step is not the allocated peak
    layer, lw = (float(x[0]) for x in layer_backward_bytes(model_terms(job.model), 2048,
                                                         PlanArrays.from_plans([plan], 4), C))
    m = _mem(job, plan)
    assert m["allocated"] == pytest.approx(flat + max(acts + working, g + layer + lw), rel=1e-9)
    hole = C.model_load_fragmentation * 2 * P
    expect = max(flat + max(acts + working, g + layer + lw) + hole, flat + 6 * Ps + max(acts + working + g, hole))
    assert m["reserved"] == pytest.approx(expect * (1 + C.fragmentation), rel=1e-9)
    assert 45.0 < m["allocated"] / 2**30 < 49.0 and 57.0 < m["reserved"] / 2**30 < 62.0


def test_stage0_tensor_parallel_masked_gradient_norm_by_hand():
    """ZeRO-0 under tp=2 with bf16: DeepSpeed's fused 16-bit optimizer masks, on tensor-parallel ranks > 0, the
    gradient norm of a parameter group that holds a matrix replicated over the tp ranks (opt's positional embedding):
    zeros(P_g + 1) in fp32, its cumsum and a bool mask (9 P_g bytes) beside the flat fp32 gradients (4 P), after the
    16-bit gradients are freed, so the step peaks at 13 P_r bytes of temporaries on that rank instead of 10 P_r (the
    16-bit gradients, their per-tensor fp32 copies and the flat copy). Llama has no replicated matrix (its embedding
    and head are vocabulary-sharded), nor does tp=1. Measured: opt-6.7b tp=2 mb 4 x 2, rank 1 allocated 83.88 GiB
    against rank 0's 74.57 (2026-11-30-s6-h200x2/hist)."""
    job = load_job(None, ["model=opt-6.7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan=auto",
                          "train.global_batch=8"])
    plan = Plan(dp=1, tp=2, zero_stage=0, micro_batch=4, grad_accum=2, activation_checkpointing="none")
    mt = model_terms(job.model)
    assert mt.replicated_matrices == (2048 + 2) * 4096
    pr = mt.sharded_dense / 2 + mt.replicated              # P_r at tp=2, no experts
    m = _mem(job, plan)
    static = 2 * pr + 4 * pr + 8 * pr                      # 16-bit weights, fp32 master, Adam moments
    assert m["allocated"] == pytest.approx(static + 13 * pr, rel=1e-6)
    assert 83.0 < m["allocated"] / 2**30 < 84.5            # measured 83.88 on rank 1
    llama = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan=auto",
                            "train.global_batch=8"])
    assert model_terms(llama.model).replicated_matrices == 0
    lp = _mem(llama, plan)
    lpr = model_terms(llama.model).sharded_dense / 2 + model_terms(llama.model).replicated
    assert lp["allocated"] < (14 + 13) * lpr                # no masked norm: below static + 13 P_r
    opt_tp1 = _mem(job, Plan(dp=1, tp=1, zero_stage=0, micro_batch=1, grad_accum=8, activation_checkpointing="full"))
    assert opt_tp1["allocated"] < (14 + 13) * mt.total
    # a Mixtral's routers are replicated too, but its experts sit in groups of their own (strategies/zero.py), whose
    # norm DeepSpeed takes unmasked: the mask covers the rank's non-expert parameters P_n, (4 - w) P_r + 9 P_n, which
    # at 4 layers stays under the 8 P_r of the per-tensor fp32 copies and their flat copy (measured: both ranks
    # 66.67 GiB, 2026-11-30-s9-h200x2/call6; 76.3 predicted with the mask over P_r)
    moe = load_job(None, ["model=mixtral-8x7b", "model.layers=4", "cluster=h200-sxm-4", "cluster.gpus_per_node=2",
                          "plan=auto", "train.global_batch=8"])
    mm = model_terms(moe.model)
    assert mm.replicated_matrices > 0 and mm.experts_total > 0
    mpr = mm.sharded_dense / 2 + mm.replicated + mm.experts_total / 2
    mpn = mm.sharded_dense / 2 + mm.replicated
    assert (4 - 2) * mpr + 9 * mpn < 8 * mpr < 11 * mpr
    mp = Plan(dp=1, tp=2, zero_stage=0, micro_batch=2, grad_accum=4, activation_checkpointing="none")
    assert 66.0 < _mem(moe, mp)["allocated"] / 2**30 < 69.0


@pytest.mark.parametrize("preset,changes", [
    ("tiny-llama", dict(hidden=256, ffn=512, heads=4, kv_heads=4, layers=1, vocab=512)),
    ("tiny-llama", dict(hidden=256, ffn=512, heads=4, kv_heads=2, layers=1, vocab=512)),     # GQA: k, v expanded
    ("tiny-gpt2", dict(hidden=256, ffn=1024, heads=4, layers=1, vocab=512, arch="opt")),
    ("tiny-gpt2", dict(hidden=256, ffn=1024, heads=4, layers=1, vocab=512)),
])
def test_saved_activation_bytes_per_layer_counted_by_autograd(preset, changes):
    """The bytes autograd keeps per token for one more built-in layer (bf16, CPU: every storage its saved-tensor hook
    sees once, parameters left out) are layer_activation_bytes' replicated + attention + mlp, plus the layer's own
    rotary tables for llama (cos and sin, 2 x head_dim bf16 values a token: negligible at full size, 1h here), within
    16 bytes a token (the norms' fp32 per-token statistics)."""
    import dataclasses

    import torch

    from meshpilot.orchestrator.config.models import model_preset
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.strategies.model import build_model, resolved_model_config
    cfg = resolved_model_config(dataclasses.replace(ModelConfig(**model_preset(preset)), **changes))
    S = 128
    ids = torch.randint(0, cfg.vocab, (1, S), generator=torch.Generator().manual_seed(0))

    def saved_bytes(layers: int) -> int:
        model = build_model(dataclasses.replace(cfg, layers=layers), Plan(), None, seed=1, dtype=torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, ids)
        return sum(n for ptr, n in seen.items() if ptr not in params)

    per_token = (saved_bytes(2) - saved_bytes(1)) / S
    acts = layer_activation_bytes(cfg)
    rope = 2 * 2 * (cfg.hidden // cfg.heads) if cfg.arch == "llama" else 0
    assert per_token == pytest.approx(acts.replicated + acts.attention + acts.mlp + rope, abs=16)


def test_a_reserve_past_the_card_with_live_tensors_that_fit_puts_the_peak_at_the_card():
    """A plan whose modelled peak passes the card while its live tensors (torch's allocated peak, CUDA context, NCCL)
    fit is predicted at the card and fits, risky: the caching allocator releases its free cached segments before an
    out-of-memory error, so the reserve counted above the live tensors cannot take the card (sim/memory.py). The
    breakdown still sums to the peak; the note gives both numbers; ``meshpilot run`` lets it start; ``plan: auto``
    ranks it after the other risky plans. A plan whose live tensors alone pass the card keeps its modelled peak and
    does not fit."""
    from meshpilot.orchestrator.plan.codec import PlanArrays
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.run.session import fit_check
    from meshpilot.orchestrator.sim.simulator import evaluate, simulate
    base = ["cluster=h200-sxm-4", "cluster.gpus_per_node=2", "train.seq_len=2048", "plan.dp=1", "plan.tp=2",
            "plan.zero_stage=0"]
    job = load_job(None, [*base, "model=llama-2-7b", "train.global_batch=16", "plan.micro_batch=8"])
    plan = resolve_plan(job)
    m = evaluate(job, PlanArrays.from_plans([plan], 2)).memory
    card = job.cluster.gpu.memory_gib
    floor, modelled = m["live_floor"][0] / 2**30, m["modelled_peak"][0] / 2**30
    assert floor < card < modelled and m["at_card"][0] == 1.0
    e = simulate(job)
    assert e.peak_memory_gib == pytest.approx(card) and e.fits and not e.fits_with_margin
    assert sum(e.memory_breakdown_gib.values()) == pytest.approx(card)
    assert f"need {floor:.1f} GiB" in e.at_card and f"to {modelled:.1f} GiB" in e.at_card
    assert [n for n in e.notes if n.startswith("risky")] == ["risky, " + e.at_card]
    assert fit_check(job, plan).fits
    # with headroom asked for, the card is not what the plan may use: it does not fit
    assert not simulate(job, headroom=0.05).fits
    big_job = load_job(None, [*base, "model=llama-2-13b", "train.global_batch=8", "plan.micro_batch=1",
                              "plan.activation_checkpointing=full"])
    big = simulate(big_job)
    assert not big.fits and big.peak_memory_gib > card and not big.at_card
    with pytest.raises(ConfigError, match="does not fit"):
        fit_check(big_job, resolve_plan(big_job))


def test_plan_auto_ranks_plans_at_the_card_after_the_other_risky_ones():
    """Among the risky plans of a search, those whose modelled reserve reaches the card come last, whatever their
    speed (sim/planner.py)."""
    from meshpilot.orchestrator.sim.planner import search
    job = load_job(None, ["cluster=h200-sxm-4", "cluster.gpus_per_node=1", "model=opt-2.7b", "train.seq_len=2048",
                          "train.global_batch=16"])
    res = search(job, top=10_000, headroom=0.0)    # plan: auto keeps 5% free, where none fits at the card
    at_card = [bool(res.scores.memory["at_card"][i]) for i in res.ranked]
    risky = [bool(res.scores.risky[i]) for i in res.ranked]
    assert any(at_card), "the job should have plans at the card"
    first_at_card = at_card.index(True)
    assert all(r for r in risky[first_at_card:]) and all(at_card[first_at_card:])
