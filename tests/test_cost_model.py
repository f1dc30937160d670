"""Alpha-beta collective costs: volumes, spans from the rank layout, hand-computed times."""
from __future__ import annotations

import numpy as np
import pytest

from meshpilot.comm.cost_model import (LinkRates, bus_factor, bytes_sent_per_rank, collective_time,
                                       group_collective_time, span_of)
from meshpilot.comm.layout import build_layout
from meshpilot.orchestrator.config.loader import load_job

GIB = 2**30


def _cluster(name="dgx-h100", *ov):
    return load_job(None, [f"cluster={name}", "model=tiny-llama", "plan=auto", *ov]).cluster


def test_collective_volumes():
    S = 1_000_000_000
    assert bytes_sent_per_rank("all_reduce", S, 4) == pytest.approx(1.5e9)      # 2(n-1)/n S
    assert bytes_sent_per_rank("all_gather", S, 4) == pytest.approx(0.75e9)     # (n-1)/n S
    assert bytes_sent_per_rank("reduce_scatter", S, 8) == pytest.approx(0.875e9)
    assert bytes_sent_per_rank("all_to_all", S, 2) == pytest.approx(0.5e9)
    assert bus_factor("all_reduce", 1) == 0.0
    with pytest.raises(ValueError):
        bus_factor("broadcast", 4)


def test_spans_from_layout():
    lay = build_layout(dp=16, tp=1, gpus_per_node=8)
    s = span_of(lay.groups_of(0).dp, 8)
    assert (s.n, s.nodes, s.per_node, s.kind) == (16, 2, 8, "hierarchical")
    lay = build_layout(dp=2, tp=8, gpus_per_node=8)
    assert span_of(lay.groups_of(3).dp, 8).kind == "inter"          # one rank per node
    assert span_of(lay.groups_of(3).tp, 8).kind == "intra"
    assert span_of((5,), 8).kind == "single"


def test_intra_node_time_hand_computed():
    c = _cluster("h100-sxm-4")
    r = LinkRates.from_cluster(c)
    t = collective_time("all_reduce", GIB, 4, 1, 4, r)
    assert t == pytest.approx(8e-6 + 1.5 * GIB / 355e9)
    t2 = collective_time("all_gather", GIB, 4, 1, 4, r)
    assert t2 == pytest.approx(8e-6 + 0.75 * GIB / 355e9)
    assert collective_time("all_reduce", GIB, 1, 1, 1, r) == 0.0


def test_intra_node_span_is_the_alpha_beta_time_of_the_measured_convention():
    """Inside a node a collective costs alpha + f(op, n) S / B_bus, and B_bus inverts that time."""
    from meshpilot.comm.cost_model import alpha_beta_time, bus_bandwidth_gbs
    c = _cluster("h100-sxm-4")
    r = LinkRates.from_cluster(c)
    for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        expect = alpha_beta_time(op, 3 * GIB, 4, 355.0, 8e-6)
        assert collective_time(op, 3 * GIB, 4, 1, 4, r) == pytest.approx(expect)
        assert bus_bandwidth_gbs(op, 4, 3 * GIB, expect - 8e-6) == pytest.approx(355.0)


def test_inter_and_hierarchical():
    c = _cluster()
    r = LinkRates.from_cluster(c)
    S = GIB
    inter = collective_time("all_reduce", S, 2, 2, 1, r)
    assert inter == pytest.approx(25e-6 + 1.0 * S / 45e9)
    intra = collective_time("all_reduce", S, 2, 1, 2, r)
    assert inter > 5 * intra
    # 16 ranks on 2 nodes: RS(8) intra + AR(2) inter of S/8 + AG(8) intra
    hier = collective_time("all_reduce", S, 16, 2, 8, r)
    expect = (8e-6 + 7 / 8 * S / 450e9) * 2 + 25e-6 + 1.0 * (S / 8) / 45e9
    assert hier == pytest.approx(expect)
    # flat inter-node ring over 16 ranks would be much slower than the hierarchical one
    assert hier < 25e-6 + 2 * 15 / 16 * S / 45e9


def test_tp_across_nodes_costs_more_than_inside():
    c = _cluster("dgx-h100", "cluster.gpus_per_node=4")
    r = LinkRates.from_cluster(c)
    inside = build_layout(dp=1, tp=4, gpus_per_node=4).groups_of(0).tp
    across = (0, 1, 4, 5)   # the same 4 ranks of a tp group, two per node
    S = 64 * 2**20
    t_across = group_collective_time("all_reduce", S, across, 4, r)
    assert t_across > 2 * group_collective_time("all_reduce", S, inside, 4, r)


def test_calibration_replaces_intra_bandwidth():
    base = _cluster("h100-sxm-4")
    cal = _cluster("h100-sxm-4", "cluster.calibration.allreduce_busbw_gbs=100",
                   "cluster.calibration.collective_latency_us=20")
    t0 = collective_time("all_reduce", GIB, 4, 1, 4, LinkRates.from_cluster(base))
    t1 = collective_time("all_reduce", GIB, 4, 1, 4, LinkRates.from_cluster(cal))
    assert t1 == pytest.approx(20e-6 + 1.5 * GIB / 100e9)
    assert t1 > 3 * t0
    # other collectives keep the profile's intra-node bandwidth
    assert LinkRates.from_cluster(cal).intra_busbw_gbs["all_gather"] == 355.0


def test_vectorised_equals_scalar():
    r = LinkRates.from_cluster(_cluster())
    n = np.array([1, 2, 8, 2, 16, 64])
    nodes = np.array([1, 1, 1, 2, 2, 8])
    g = np.array([1, 2, 8, 1, 8, 8])
    S = np.array([1e6, 1e8, 1e9, 1e9, 3e9, 1e9])
    for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        vec = collective_time(op, S, n, nodes, g, r)
        for i in range(len(n)):
            assert vec[i] == pytest.approx(collective_time(op, S[i], int(n[i]), int(nodes[i]), int(g[i]), r))


def test_step_time_terms_hand_computed():
    """Forward/backward/TP/DP terms of the time model against the formulas evaluated by hand."""
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.config.models import param_counts
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.sim.simulator import simulate

    job = load_job(None, ["model=llama-2-7b", "cluster=h100-sxm-4", "plan=auto", "train.global_batch=16",
                          "train.seq_len=2048", "cluster.calibration.matmul_tflops=700"])
    c = SimulatorConstants(layer_overhead_s=0.0, step_overhead_s=0.0, loss_bytes_per_logit=24.0, hbm_efficiency=0.7,
                           grad_hook_s=5e-5, step_tensor_s=0.0)
    pc = param_counts(job.model)
    L, h, s, V = 32, 4096, 2048, 32000
    norms = (2 * L + 1) * h                               # RMSNorm weights: element-wise, not matmuls
    mp = pc.total - pc.embedding - pc.head - norms + V * h   # matrix-product parameters per token
    per_token_fwd = 2 * mp + 4 * L * s * h
    # tp=2, dp=2, micro-batch 4, 2 accumulation steps. Shape factor (normalised at h=4096, 4096 tokens):
    # hidden shard 2048 -> (2048/2560)/(4096/4608) = 0.9; 8192 tokens -> (8192/8448)/(4096/4352)
    e = simulate(job, Plan(dp=2, tp=2, zero_stage=0, micro_batch=4, grad_accum=2), constants=c)
    tokens = 4 * s
    shape = 0.9 * (8192 / 8448) / (4096 / 4352)
    fwd = 2 * tokens * per_token_fwd / 2 / (700e12 * shape)
    # fp32 loss over the logits (vocab shard V/2): 24 bytes per logit at 3350 GB/s x 0.7, half in forward,
    # half in backward, per micro-batch (x 2 accumulation steps)
    loss = 2 * 0.5 * tokens * (V / 2) * 24 / (3350e9 * 0.7)
    # host time per micro-batch (291 tensors x 50 us = 15 ms) is far below the GPU's ~0.27 s: GPU bound
    assert e.time_breakdown_s["forward"] == pytest.approx(fwd + loss, rel=1e-9)
    assert e.time_breakdown_s["backward"] == pytest.approx(2 * fwd + loss, rel=1e-9)
    assert e.time_breakdown_s["recompute"] == 0.0
    ar_tp = 8e-6 + 1.0 * (tokens * h * 2) / 355e9          # all-reduce over 2 ranks: 2(n-1)/n = 1
    assert e.time_breakdown_s["tp_communication"] == pytest.approx(2 * L * 4 * ar_tp, rel=1e-9)
    # stage 0: one all-reduce of the 16-bit gradients of a tp shard over dp=2, not overlapped
    repl = L * 2 * h + h
    p_rank = (pc.total - repl) / 2 + repl
    assert e.time_breakdown_s["dp_reduction_exposed"] == pytest.approx(8e-6 + 2 * p_rank / 355e9, rel=1e-9)
    assert e.mfu == pytest.approx(16 * s * 3 * per_token_fwd / (e.step_time_s * 4 * 989.4e12), rel=1e-9)


def test_element_wise_bytes_of_opt_layers_shorten_the_compute_hand_computed():
    """opt's layers move fewer element-wise bytes than Llama layers of the same dimensions (LayerNorm and ReLU against
    an fp32 RMSNorm, rotary embeddings and SwiGLU): the matrix rate, fitted on Llama, is credited the difference at the
    memory-bound rate (sim/elementwise.py), on tensor-parallel shards except the norms and residual additions."""
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.sim.elementwise import elementwise_bytes, elementwise_bytes_vs_llama
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.sim.flops import forward_flops, matmul_params
    from meshpilot.orchestrator.sim.simulator import simulate

    job = load_job(None, ["model=opt-6.7b", "cluster=h100-sxm-4", "plan=auto", "train.global_batch=16",
                          "train.seq_len=2048", "cluster.calibration.matmul_tflops=700"])
    m = job.model
    L, h, f, s = 32, 4096, 16384, 2048
    assert (m.layers, m.hidden, m.ffn) == (L, h, f)
    # built-in opt layer: 2 LayerNorms (8h), 2 residual additions (12h), the attention output's copy (4h), ReLU (4f)
    own = elementwise_bytes(m)
    assert (own.replicated, own.sharded) == (L * 20 * h, L * (4 * h + 4 * f))
    # Llama layer of these dimensions: 2 RMSNorms in fp32 (72h), residuals (12h), copy (4h), rotary on q and k
    # (20h each: kv width = h), SwiGLU (10f)
    d = elementwise_bytes_vs_llama(m)
    assert (d.replicated, d.sharded) == (-L * 64 * h, -L * (40 * h + 6 * f))
    llama = load_job(None, ["model=llama-2-7b", "cluster=h100-sxm-4", "plan=auto"]).model
    assert elementwise_bytes_vs_llama(llama).replicated == elementwise_bytes_vs_llama(llama).sharded == 0.0

    c = SimulatorConstants(layer_overhead_s=0.0, step_overhead_s=0.0, loss_bytes_per_logit=24.0, hbm_efficiency=0.7,
                           grad_hook_s=0.0, step_tensor_s=0.0)
    e = simulate(job, Plan(dp=2, tp=2, zero_stage=0, micro_batch=4, grad_accum=2), constants=c)
    tokens, hbm = 4 * s, 3350e9 * 0.7
    shape = 0.9 * (8192 / 8448) / (4096 / 4352)          # as in test_step_time_terms_hand_computed
    flops = tokens * forward_flops(matmul_params(m), L, s, h) / 2 / (700e12 * shape)
    ew = tokens * (-L * 64 * h - L * (40 * h + 6 * f) / 2) / hbm   # replicated part not sharded (no SP)
    loss = 0.5 * tokens * (m.vocab / 2) * 24 / hbm
    assert flops + ew > 0 > ew
    assert e.time_breakdown_s["forward"] == pytest.approx(2 * (flops + ew + loss), rel=1e-9)
    assert e.time_breakdown_s["backward"] == pytest.approx(2 * (2 * (flops + ew) + loss), rel=1e-9)


def test_zero3_optimizer_offload_transfers_hand_computed():
    """ZeRO-3 + optimizer offload (DeepSpeed 0.19 stage3.py): per micro-batch the 16-bit gradient partition goes down,
    after the first its host sum comes up to be added on the GPU; at the boundary it comes up once more and goes down
    in fp32; the updated parameters come back through a blocking copy cast on the host (host_cast_copy_gparams_per_s).
    With parameter offload too, the 16-bit partition is on the host: no cast copy over PCIe."""
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.sim.memory import model_terms, rank_params
    from meshpilot.orchestrator.sim.simulator import simulate

    job = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan=auto",
                          "train.global_batch=16", "train.seq_len=2048", "cluster.calibration.h2d_gbs=50",
                          "cluster.calibration.d2h_gbs=40"])
    c = SimulatorConstants(host_cast_copy_gparams_per_s=2.0)
    mt = model_terms(job.model)
    _, ps, _, _ = rank_params(mt, 1, 1, 2)
    for ga in (1, 4):
        e = simulate(job, Plan(dp=2, zero_stage=3, micro_batch=8 // ga, grad_accum=ga, offload_optimizer="cpu",
                               activation_checkpointing="full"), constants=c)
        down = ga * 2 * ps + 4 * ps                  # each micro-batch's bf16 partition, the fp32 one at the boundary
        up = (ga - 1) * 2 * ps + 2 * ps              # the host sums brought back to add, the boundary's fetch
        expect = down / 40e9 + up / 50e9 + ps / 2e9
        assert e.time_breakdown_s["offload_transfers"] == pytest.approx(float(expect), rel=1e-9)
    # a probed rate (cluster.calibration.host_cast_copy_gparams_per_s) replaces the constant
    probed = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan=auto",
                             "train.global_batch=16", "train.seq_len=2048", "cluster.calibration.h2d_gbs=50",
                             "cluster.calibration.d2h_gbs=40", "cluster.calibration.host_cast_copy_gparams_per_s=4"])
    e = simulate(probed, Plan(dp=2, zero_stage=3, micro_batch=8, grad_accum=1, offload_optimizer="cpu",
                              activation_checkpointing="full"), constants=c)
    assert e.time_breakdown_s["offload_transfers"] == pytest.approx(
        float((2 * ps + 4 * ps) / 40e9 + 2 * ps / 50e9 + ps / 4e9), rel=1e-9)
    both = simulate(job, Plan(dp=2, zero_stage=3, micro_batch=8, grad_accum=1, offload_optimizer="cpu",
                              offload_params="cpu", activation_checkpointing="full"), constants=c)
    uploads = (2 + 1) * 2 * ps / 50e9                # forward, backward and recompute each upload the partition
    assert both.time_breakdown_s["offload_transfers"] == pytest.approx(
        float((2 * ps + 4 * ps) / 40e9 + 2 * ps / 50e9 + uploads), rel=1e-9)
    # parameter offload with the optimizer on the GPU: the uploads, and the updated fp32 partition comes down through
    # a blocking copy cast on the host (host_cast_copy_d2h_gparams_per_s; probed where set)
    params_only = Plan(dp=2, zero_stage=3, micro_batch=8, grad_accum=1, offload_params="cpu",
                       activation_checkpointing="full")
    e = simulate(job, params_only, constants=SimulatorConstants(host_cast_copy_d2h_gparams_per_s=0.5))
    assert e.time_breakdown_s["offload_transfers"] == pytest.approx(float(uploads + ps / 0.5e9), rel=1e-9)
    assert e.time_breakdown_s["cpu_optimizer"] == 0.0
    probed_back = load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan=auto",
                                  "train.global_batch=16", "train.seq_len=2048", "cluster.calibration.h2d_gbs=50",
                                  "cluster.calibration.host_cast_copy_d2h_gparams_per_s=0.25"])
    e = simulate(probed_back, params_only, constants=SimulatorConstants(host_cast_copy_d2h_gparams_per_s=0.5))
    assert e.time_breakdown_s["offload_transfers"] == pytest.approx(float(uploads + ps / 0.25e9), rel=1e-9)
    # the estimate says where those seconds go, and whether the rate was probed
    assert any("probed on this machine" in n and "GPU's fp32 partition" in n for n in e.notes)
    assert not any("GPU's fp32 partition" in n for n in both.notes)


def test_zero12_gradient_copies_by_hand():
    """ZeRO 1-2 without optimizer offload move the gradients through memory on their way to the reduction
    (DeepSpeed 0.19 stage_1_and_2.py, contiguous_gradients): each gradient is copied into the reduce bucket (read and
    write w P_r) and the rank's share into the partition buffer (w P_s both ways), every micro-batch at stage 2, once
    a step at stage 1. With overlap_comm and a fraction that hides every reduction, that memory-bound time is what
    stays exposed (stage 2 adds the parameter all-gather, the same for both accumulation counts)."""
    from meshpilot.orchestrator.config.models import param_counts
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.sim.estimate import SimulatorConstants
    from meshpilot.orchestrator.sim.simulator import simulate

    job = load_job(None, ["model=llama-2-7b", "cluster=h100-sxm-4", "plan=auto", "train.global_batch=16",
                          "train.seq_len=2048"])
    c = SimulatorConstants(overlap_comm_fraction=1e6, hbm_efficiency=0.7)
    P = param_counts(job.model).total
    copies = 2 * 2 * (P + P / 2) / (3350e9 * 0.7)           # bf16, dp=2: P_r = P, P_s = P/2, at 3350 GB/s x 0.7
    z1 = simulate(job, Plan(dp=2, zero_stage=1, micro_batch=1, grad_accum=8, comm_overlap=True), constants=c)
    assert z1.time_breakdown_s["dp_reduction_exposed"] == pytest.approx(copies, rel=1e-9)
    z2_8 = simulate(job, Plan(dp=2, zero_stage=2, micro_batch=1, grad_accum=8, comm_overlap=True), constants=c)
    z2_4 = simulate(job, Plan(dp=2, zero_stage=2, micro_batch=2, grad_accum=4, comm_overlap=True), constants=c)
    assert (z2_8.time_breakdown_s["dp_reduction_exposed"] - z2_4.time_breakdown_s["dp_reduction_exposed"]
            == pytest.approx(4 * copies, rel=1e-9))
    off = simulate(job, Plan(dp=2, zero_stage=2, micro_batch=1, grad_accum=8, comm_overlap=True,
                             offload_optimizer="cpu"), constants=c)
    # the offload path copies to the host instead (its transfers are offload time): the all-gather alone is left
    assert off.time_breakdown_s["dp_reduction_exposed"] == pytest.approx(
        z2_8.time_breakdown_s["dp_reduction_exposed"] - 8 * copies, rel=1e-9)


def test_offloaded_step_host_passes_by_hand():
    """Beside CPUAdam the offloaded step scales the fp32 gradients in place and casts the updated parameters into a
    16-bit host tensor (DeepSpeed 0.19 stage_1_and_2.py / stage3.py step), at the rates the probe times on a rank's
    threads: ZeRO-2 both passes (no scaling in bf16 without clipping), ZeRO-3 the scaling and, with parameter offload,
    the cast (without it the cast is the blocking copy counted under offload_transfers). Without probed pass rates the
    passes' bytes (8 and 6) go at the host bandwidth of the probed Adam (28 bytes a parameter); without a probed Adam
    the constants' effective rate holds them."""
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.sim.memory import model_terms, rank_params
    from meshpilot.orchestrator.sim.simulator import simulate

    base = ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=1", "cluster.cpu_cores=16", "plan=auto",
            "train.global_batch=8", "train.seq_len=2048", "cluster.calibration.cpu_adam_gparams_per_thread=0.5",
            "cluster.calibration.cpu_adam_gparams_per_s=100"]                 # 8 threads x 0.5: 4 G/s, node not binding
    rates = ["cluster.calibration.host_grad_scale_gparams_per_s=2", "cluster.calibration.host_cast_gparams_per_s=5"]
    _, ps, _, _ = rank_params(model_terms(load_job(None, base).model), 1, 1, 1)

    def cpu(overrides, stage, params=None):
        plan = Plan(dp=1, zero_stage=stage, micro_batch=8, grad_accum=1, offload_optimizer="cpu",
                    offload_params=params or "none", activation_checkpointing="full")
        return simulate(load_job(None, base + overrides), plan).time_breakdown_s["cpu_optimizer"]

    adam, scale, cast = ps / 4e9, ps / 2e9, ps / 5e9
    assert cpu(rates, 2) == pytest.approx(adam + scale + cast, rel=1e-9)
    assert cpu(rates + ["train.grad_clip=0"], 2) == pytest.approx(adam + cast, rel=1e-9)
    assert cpu(rates, 3) == pytest.approx(adam + scale, rel=1e-9)
    assert cpu(rates, 3, "cpu") == pytest.approx(adam + scale + cast, rel=1e-9)
    assert cpu([], 2) == pytest.approx(adam + ps * (8 + 6) / (28 * 4e9), rel=1e-9)     # bytes at Adam's bandwidth
    plain = [o for o in base if "cpu_adam" not in o]
    job = load_job(None, plain)
    e = simulate(job, Plan(dp=1, zero_stage=2, micro_batch=8, grad_accum=1, offload_optimizer="cpu",
                           activation_checkpointing="full"))
    # the constants' effective rate holds the passes
    assert e.time_breakdown_s["cpu_optimizer"] == pytest.approx(ps / (8 * 0.14e9), rel=1e-9)


def test_an_offload_plan_says_how_far_its_host_step_may_be_off():
    """An optimizer-offload plan's note gives the host step's seconds and what the lent hosts showed: unprobed, that
    the constants' CPU Adam rate is used and `meshpilot probe` measures it; probed, how far training strayed from the
    probe. A rate fitted from the user's runs (calibrate) and a plan without offload carry no such note."""
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.orchestrator.sim.simulator import simulate

    base = ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=1", "plan=auto", "train.global_batch=8",
            "train.seq_len=2048"]
    off = Plan(dp=1, zero_stage=2, micro_batch=8, grad_accum=1, offload_optimizer="cpu",
               activation_checkpointing="full")

    def step_notes(overrides, plan=off):
        e = simulate(load_job(None, base + overrides), plan)
        return e, [n for n in e.notes if n.startswith("step time")]

    e, [n] = step_notes([])
    assert f"{e.time_breakdown_s['cpu_optimizer']:.2f} s" in n and "run `meshpilot probe`" in n
    _, [n] = step_notes(["cluster.calibration.cpu_adam_gparams_per_thread=0.4"])
    assert "0.86-1.4x the probe's rate" in n
    assert step_notes(["cluster.calibration.cpu_adam_rank_gparams_per_s=2.5"])[1] == []
    plain = Plan(dp=1, zero_stage=2, micro_batch=8, grad_accum=1, activation_checkpointing="full")
    assert step_notes([], plain)[1] == []
