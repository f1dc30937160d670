"""The loss's logit-sized tensors after a ZeRO 1-2 engine build with optimizer offload (sim/loss_blocks.py),
placed best-fit by hand."""
from __future__ import annotations

import numpy as np
import pytest

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.config.models import param_counts
from meshpilot.orchestrator.plan.codec import PlanArrays
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.sim.loss_blocks import loss_request_sequence, loss_segments, new_segment_bytes
from meshpilot.orchestrator.sim.memory import memory_terms, model_terms

MiB = 2**20


def test_second_step_adds_a_segment_by_hand():
    """Clone block 5000 MiB, 16-bit logits 1000 MiB, fp32 tensors 2000 MiB. Step 1: A, B, C fill the clone's block
    exactly, D takes a new 2000 MiB segment; E (backward) goes into the freed clone block. Step 2: A takes the smallest
    block that holds it, D's segment (1000 MiB left), B and C the clone's block (1000 left), so D finds no 2000 MiB
    block: a second segment. Step 3: A and B fill the two segments, C and D the clone's block: nothing new."""
    events = loss_request_sequence(1000 * MiB, 2000 * MiB)
    assert new_segment_bytes((5000 * MiB,), events, steps=1) == 2000 * MiB
    assert new_segment_bytes((5000 * MiB,), events, steps=2) == 4000 * MiB
    assert new_segment_bytes((5000 * MiB,), events, steps=3) == 4000 * MiB
    # a clone block that holds all four at once: nothing new, ever
    assert new_segment_bytes((7000 * MiB,), events, steps=3) == 0.0
    # no clone block: all four new at the first step, reused after it
    assert new_segment_bytes((), events, steps=3) == 7000 * MiB


def test_traced_opt_plan_gets_two_fp32_segments():
    """Built-in opt-6.7b with 16 layers, mb 8 x 2048 tokens (V = 50272): A = 2 T V = 1,647,312,896 B, the fp32
    tensors 3,294,625,792 B (1571 x 2 MiB). The clone's block (w P_s = 6.40 GiB) holds A and B; C and D take two new
    segments, which A and B use from the second step while C and D fit the clone's block (traced:
    benchmarks/results/2026-12-01-s10-h200x1/call3_trace, two new 3.07 GiB segments at the first step)."""
    T, V = 8 * 2048, 50272
    clone = 6.40 * 2**30
    got = float(loss_segments(True, clone, T, V, 4.0 * 50272 * 4096))
    assert got == 2 * 3_294_625_792
    # not where it does not apply, nor where the tensors fit a construction block (the largest parameter's fp32 draw)
    assert float(loss_segments(False, clone, T, V, 4.0 * 50272 * 4096)) == 0.0
    assert float(loss_segments(True, clone, T, V, 4.0e10)) == 0.0
    arr = loss_segments(np.array([True, False, True]), clone, np.array([T, T, T / 8]), V, 4.0 * 50272 * 4096)
    assert arr.shape == (3,) and arr[0] == got and arr[1] == 0.0 and arr[2] == 0.0


def test_memory_model_adds_the_loss_segments_to_the_build_reserve():
    """ZeRO-2 + optimizer offload on one GPU, 16 of opt-6.7b's layers, mb 8, checkpointing: reserved = the build's
    2 w P_r + w P_s (the clone, P_s = P_r) + the two fp32 segments; without checkpointing the rule does not apply."""
    job = load_job(None, ["model=opt-6.7b", "model.layers=16", "cluster=h200-sxm-4", "cluster.gpus_per_node=1",
                          "plan.dp=1", "train.global_batch=8", "train.expandable_segments=false"])
    P = param_counts(job.model).total
    C = SimulatorConstants()

    def reserved(ac):
        plan = Plan(dp=1, zero_stage=2, offload_optimizer="cpu", micro_batch=8, activation_checkpointing=ac)
        a = PlanArrays.from_plans([plan], 1)
        return float(memory_terms(model_terms(job.model), job, a, C)["reserved"][0])

    assert reserved("full") == pytest.approx(2 * 2.0 * P + 2.0 * P + 2 * 3_294_625_792)
    assert reserved("none") > 2 * 2.0 * P + 2.0 * P            # the run's own activations set it there
