"""ZeRO-3 step time per pass: max(compute, fetch floor) + (1 - overlap) min(...) (sim/step_time.py), by hand."""
from __future__ import annotations

import pytest

from meshpilot.comm.cost_model import LinkRates, collective_time
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.sim.memory import fetched_tensors, module_structure
from meshpilot.orchestrator.sim.simulator import simulate
from meshpilot.orchestrator.sim.step_time import zero3_pass_excess

C = SimulatorConstants()


def _job():
    return load_job(None, ["model=llama-2-7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "train.global_batch=16",
                           "train.seq_len=2048"])


@pytest.mark.parametrize("compute, floor, overlap, excess", [
    (1.0, 3.0, 1.0, 2.0),       # host-bound: the pass takes the floor
    (1.0, 3.0, 0.0, 3.0),       # no overlap: compute + floor
    (3.0, 1.0, 1.0, 0.0),       # compute-bound: the floor hides under the compute
    (3.0, 1.0, 0.5, 0.5),       # half of the shorter one exposed
])
def test_pass_excess_by_hand(compute, floor, overlap, excess):
    assert float(zero3_pass_excess(compute, floor, overlap)) == pytest.approx(excess, abs=1e-12)


def _floor(job, plan, c: SimulatorConstants) -> float:
    """One pass's fetch floor by hand: llama-2-7b at the builder's persistence threshold (1e4: 226 fetched
    tensors), every module's hooks, and the all-gather of the 16-bit parameters over the 2 ranks."""
    fetched, _ = fetched_tensors(job.model, 1e4)
    assert fetched == 226.0
    host = fetched * c.zero3_fetch_s + module_structure(job.model)["modules"] * c.zero3_module_hook_s
    cl = job.cluster
    ag = collective_time("all_gather", 2.0 * param_counts(job.model).total, plan.dp, 1, plan.dp,
                         LinkRates.from_cluster(cl))
    return host + ag


def test_host_bound_micro_batches_pay_the_floor_per_pass():
    """Micro-batch 1 x 8, no checkpointing: forward and backward each take the floor where it exceeds their
    compute, so zero3_gathers = ga x sum over the two passes of (floor - compute)."""
    job, plan = _job(), Plan(dp=2, zero_stage=3, micro_batch=1, grad_accum=8)
    e = simulate(job, plan)
    t, ga = e.time_breakdown_s, plan.grad_accum
    floor = _floor(job, plan, C)
    fwd, bwd = t["forward"] / ga, t["backward"] / ga
    assert fwd < floor and bwd < floor
    assert t["zero3_gathers"] == pytest.approx(ga * ((floor - fwd) + (floor - bwd)), rel=1e-9)
    # with no overlap the floor adds to every pass instead
    e0 = simulate(job, plan, constants=C.replace(zero3_pass_overlap=0.0))
    assert e0.time_breakdown_s["zero3_gathers"] == pytest.approx(ga * 2 * floor, rel=1e-9)
    # the floor grows with the fetched tensors: 2 passes x 8 micro-batches x the extra host time per tensor
    e2 = simulate(job, plan, constants=C.replace(zero3_fetch_s=2 * C.zero3_fetch_s))
    assert e2.step_time_s - e.step_time_s == pytest.approx(ga * 2 * 226 * C.zero3_fetch_s, rel=1e-6)


def test_compute_bound_micro_batches_hide_the_floor():
    """Micro-batch 8 x 1 with checkpointing: every pass computes longer than its floor, nothing is exposed."""
    job, plan = _job(), Plan(dp=2, zero_stage=3, micro_batch=8, grad_accum=1, activation_checkpointing="full")
    e = simulate(job, plan)
    t = e.time_breakdown_s
    assert t["recompute"] > _floor(job, plan, C)
    assert t["zero3_gathers"] == 0.0
    assert simulate(job, plan, constants=C.replace(zero3_pass_overlap=0.0)).step_time_s > e.step_time_s
