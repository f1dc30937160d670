"""One FLOPs/MFU rule (sim.flops) for the simulator, the per-step metrics and the run summary."""
from __future__ import annotations

import pytest

from meshpilot.orchestrator.config.loader import job_from_dict
from meshpilot.orchestrator.plan.plan import resolve_plan
from meshpilot.orchestrator.sim import flops
from meshpilot.orchestrator.sim.simulator import simulate

TINY = dict(arch="llama", layers=2, hidden=64, heads=4, kv_heads=4, ffn=128, vocab=100)


def _job(**train):
    return job_from_dict({"model": dict(TINY), "cluster": "local", "train": dict(seq_len=16, global_batch=4, **train),
                          "plan": {"dp": 1}}, ["cluster.gpus_per_node=1"])


def test_forward_flops_by_hand():
    # llama block: q,k,v,o 4*64*64 + SwiGLU 3*64*128 = 16384 + 24576 = 40960 per layer; 2 layers = 81920;
    # untied head 100*64 = 6400 in products; embedding lookups excluded: P_mm = 88320
    job = _job()
    assert flops.matmul_params(job.model) == 88320
    assert flops.forward_flops(88320, 2, 16, 64) == 2 * 88320 + 4 * 2 * 16 * 64
    fwd = 2 * 88320 + 4 * 2 * 16 * 64
    assert flops.model_flops_per_token(job.model, 16, zeroth_order=False) == 3 * fwd
    assert flops.model_flops_per_token(job.model, 16, zeroth_order=True) == 2 * fwd


def test_zeroth_order_mfu_is_two_thirds_of_backprop_mfu_at_the_same_rate():
    job = _job()
    a = flops.mfu(job, 1000.0, 2, zeroth_order=False)
    z = flops.mfu(job, 1000.0, 2, zeroth_order=True)
    assert z == pytest.approx(a * 2.0 / 3.0, rel=1e-12)
    peak = job.cluster.gpu.bf16_tflops * 1e12
    assert a == pytest.approx(flops.model_flops_per_token(job.model, 16, zeroth_order=False) * 1000.0 / (2 * peak))


@pytest.mark.parametrize("optimizer,zo", [("adamw", False), ("zo-sgd", True)])
def test_simulator_mfu_is_the_metrics_rule_at_its_predicted_rate(optimizer, zo):
    job = _job(optimizer=optimizer)
    plan = resolve_plan(job)
    est = simulate(job, plan)
    assert est.mfu == pytest.approx(flops.mfu(job, est.tokens_per_s, plan.world_size, zeroth_order=zo), rel=1e-9)
