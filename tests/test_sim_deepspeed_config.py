"""The simulator scores the DeepSpeed config the worker runs: one builder (strategies.deepspeed_config),
its bucket sizes, persistence threshold and overlap read per plan; changes by hand."""
from __future__ import annotations

import pytest

import meshpilot.strategies.deepspeed_config as dsc
from meshpilot.comm.cost_model import LinkRates, collective_time
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.sim.deepspeed_settings import deepspeed_settings
from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.sim.memory import fetched_tensors, module_structure
from meshpilot.orchestrator.sim.planner import enumerate_plans
from meshpilot.orchestrator.sim.simulator import simulate

C = SimulatorConstants()
GIB = 2**30
Z2 = Plan(dp=4, zero_stage=2, micro_batch=1, grad_accum=4)
Z3 = Plan(dp=4, zero_stage=3, micro_batch=2, grad_accum=2)


def _job(*extra: str):
    return load_job(None, ["model=llama-2-7b", "cluster=h100-sxm-4", "plan=auto", "train.global_batch=16",
                           "train.seq_len=2048", *extra])


def test_settings_are_those_of_the_built_config_for_every_planned_plan():
    """Built once per (stage, offloads), the settings still equal the builder's for each plan."""
    job = _job()
    arrays, _, _ = enumerate_plans(job)
    ds = deepspeed_settings(job, arrays)
    assert set(arrays.zero.tolist()) == {0, 1, 2, 3}
    for i in range(0, arrays.n, 5):
        z = dsc.zero_settings(dsc.deepspeed_config(job, arrays.plan(i)))
        got = (ds.reduce_bucket_size[i], ds.prefetch_bucket_size[i], ds.max_live_parameters[i],
               ds.persistence_threshold[i], bool(ds.overlap_comm[i]))
        assert got == (z.reduce_bucket_size, z.prefetch_bucket_size, z.max_live_parameters,
                       z.persistence_threshold, z.overlap_comm), arrays.plan(i)


def test_reduce_bucket_from_deepspeed_extra_moves_memory_by_its_bytes():
    """Stage 2 keeps one bf16 staging buffer of reduce_bucket_size elements: 2e8 -> 1e8 frees 2 x 1e8 bytes
    of communication buffers, and the peak drops by that times (1 + fragmentation)."""
    job = _job()
    base = simulate(job, Z2)
    small = simulate(_job("train.deepspeed_extra.zero_optimization.reduce_bucket_size=100000000"), Z2)
    freed = 2 * (dsc.DEFAULT_BUCKET - 1e8)
    assert dsc.DEFAULT_BUCKET == 2e8
    comm = base.memory_breakdown_gib["communication_buffers"] - small.memory_breakdown_gib["communication_buffers"]
    assert comm * GIB == pytest.approx(freed, rel=1e-9)
    assert (base.peak_memory_gib - small.peak_memory_gib) * GIB == pytest.approx(freed * (1 + C.fragmentation),
                                                                                 rel=1e-9)
    assert base.step_time_s == small.step_time_s


def test_builder_constant_moves_the_stage3_window_and_bucket(monkeypatch):
    """DEFAULT_BUCKET 2e8 -> 1e8 in the builder: the reduce bucket halves (2e8 bytes in bf16) and the stage-3
    prefetch bucket (a quarter of it) goes from 5e7 to 2.5e7 elements, shrinking the gathered window by
    2 x 2.5e7 bytes; the peak drops by their sum times (1 + fragmentation)."""
    job = _job()
    base = simulate(job, Z3)
    monkeypatch.setattr(dsc, "DEFAULT_BUCKET", 100_000_000)
    smaller = simulate(job, Z3)
    bucket, window = 2 * 1e8, 2 * 2.5e7
    b, s = base.memory_breakdown_gib, smaller.memory_breakdown_gib
    assert (b["communication_buffers"] - s["communication_buffers"]) * GIB == pytest.approx(bucket, rel=1e-9)
    assert (b["weights"] - s["weights"]) * GIB == pytest.approx(window, rel=1e-9)
    assert (base.peak_memory_gib - smaller.peak_memory_gib) * GIB == pytest.approx(
        (bucket + window) * (1 + C.fragmentation), rel=1e-9)


def test_stage3_overlap_is_the_worker_configs():
    """The builder's overlap_comm is the plan's comm_overlap (false unless chosen); deepspeed_extra overrides it
    and the simulator reads the merged value. With it off the stage-3 reduce-scatters run on the compute stream
    and hide only in the backward's idle GPU time (no host-bound stretch here, so the backward's share of the
    ZeRO-3 fetch/release host time); with it on also behind overlap_comm_fraction of the backward's GPU time.
    The prefetched all-gathers are NCCL's asynchronous work either way: hidden the same in both."""
    job = _job()
    assert dsc.deepspeed_config(job, Z3)["zero_optimization"]["overlap_comm"] is False
    assert dsc.deepspeed_config(job, Z3.replace(comm_overlap=True))["zero_optimization"]["overlap_comm"] is True
    assert not deepspeed_settings(job, PlanArrays.from_plans([Z3], 4)).overlap_comm[0]
    off = simulate(job, Z3)
    on = simulate(_job("train.deepspeed_extra.zero_optimization.overlap_comm=true"), Z3)
    assert simulate(job, Z3.replace(comm_overlap=True)).time_breakdown_s == on.time_breakdown_s
    P = param_counts(job.model).total
    rates = LinkRates.from_cluster(job.cluster)
    ga = Z3.grad_accum
    # a slow fabric (5 GB/s), so that the reduce-scatter (7B bf16 over 4 ranks of one node) outlasts the idle time
    slow = "cluster.intra_node_bandwidth_gbs=5"
    slow_off = simulate(_job(slow), Z3)
    slow_on = simulate(_job(slow, "train.deepspeed_extra.zero_optimization.overlap_comm=true"), Z3)
    rs = collective_time("reduce_scatter", 2.0 * P, 4, 1, 4, LinkRates.from_cluster(_job(slow).cluster))
    fetched, _ = fetched_tensors(job.model, 1e4)
    idle = fetched * C.zero3_fetch_s + module_structure(job.model)["modules"] * C.zero3_module_hook_s
    gpu_b = slow_on.time_breakdown_s["backward"] / ga
    f = C.overlap_comm_fraction
    t_off, t_on = slow_off.time_breakdown_s, slow_on.time_breakdown_s
    assert rs > idle
    assert t_off["dp_reduction_exposed"] == pytest.approx(ga * (rs - idle), rel=1e-9)
    assert t_on["dp_reduction_exposed"] == pytest.approx(ga * max(rs - idle - f * gpu_b, 0.0), rel=1e-9)
    assert t_off["zero3_gathers"] == pytest.approx(t_on["zero3_gathers"], rel=1e-12)
    assert slow_off.step_time_s > slow_on.step_time_s
    # the fast node: the reduce-scatter fits in the idle time, overlap_comm gains nothing
    rs = collective_time("reduce_scatter", 2.0 * P, 4, 1, 4, rates)
    assert rs < idle and off.step_time_s == on.step_time_s
    # stage 0 has no ZeRO optimizer: the engine all-reduces after backward whatever overlap_comm says
    z0 = Plan(dp=4, zero_stage=0, micro_batch=1, grad_accum=4)
    on_job = _job("train.deepspeed_extra.zero_optimization.overlap_comm=true")
    assert not deepspeed_settings(on_job, PlanArrays.from_plans([z0], 4)).overlap_comm[0]
    assert simulate(on_job, z0).time_breakdown_s == simulate(job, z0).time_breakdown_s


def test_persistence_threshold_decides_the_fetched_tensors():
    """llama-2-7b: the builder's threshold 1e4 keeps the 4096-element RMSNorm weights gathered (7 matrices per
    layer + embedding + head fetched: 226 tensors). At a threshold of 1000 the 2 norms per layer and the final
    norm (65 tensors) are fetched too: ZeRO-3 host time grows by ga x 2 passes x 65 x zero3_fetch_s and the step by
    65 x zero3_step_tensor_s."""
    job = _job()
    m = job.model
    assert dsc.zero_settings(dsc.deepspeed_config(job, Z3)).persistence_threshold == 1e4
    assert fetched_tensors(m, 1e4) == (226.0, 0.0)
    assert fetched_tensors(m, 1e3)[0] == 226.0 + 65.0
    base = simulate(job, Z3)
    low = simulate(_job("train.deepspeed_extra.zero_optimization.stage3_param_persistence_threshold=1000"), Z3)
    tb, tl = base.time_breakdown_s, low.time_breakdown_s
    assert tl["zero3_gathers"] - tb["zero3_gathers"] == pytest.approx(Z3.grad_accum * 2 * 65 * C.zero3_fetch_s,
                                                                      rel=1e-9)
    assert tl["optimizer_step"] - tb["optimizer_step"] == pytest.approx(65 * C.zero3_step_tensor_s, rel=1e-9)


def test_a_deepspeed_extra_stage_that_contradicts_the_plan_is_refused():
    from meshpilot.orchestrator.errors import ConfigError
    with pytest.raises(ConfigError, match="plan.zero_stage"):
        simulate(_job("train.deepspeed_extra.zero_optimization.stage=3"), Z2)
