"""Per-step work of meshpilot's worker equals a plain DeepSpeed loop's (CPU/gloo, counts, no timing).

The GPU benchmark (benchmarks/train_bench.py) compares the worker with ``_run_direct``, the
minimal loop a user writes with DeepSpeed alone. A per-step parameter gather (a checksum, a
metric reading partitioned parameters), an extra collective or host read is cheap on CPU
but costs milliseconds per step on GPUs under ZeRO-3, so this test counts instead of timing:
every torch.distributed collective (op, elements, group size), every ZeRO-3 sub-module
fetch/release (PartitionedParameterCoordinator) and every host read of a tensor (.item,
.tolist, .cpu, float/int/bool) in each steady-state step of both loops on the same tiny
job. The worker may add exactly its logging all-reduce (2 elements: loss sum and stop flag)
and two scalar reads (that pair, and the gradient norm DeepSpeed already computed).
Measured on 2 gloo ranks, tiny-llama, ZeRO-3: 25 collectives per step in the direct loop
(19 all-gathers, 1 reduce-scatter, 2 scalar all-reduces ...), 54 fetches, 52 releases.
"""
from __future__ import annotations

import collections
import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dist_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 5
# what the worker may add to each step: its one logging all-reduce and two host reads
ALLOWED_EXTRA = {("coll", "all_reduce", 2, 2): 1, ("sync", "tolist"): 1, ("sync", "__float__"): 1}


def _count(rank: int, world: int, mode: str, stage: int) -> list[dict]:
    sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import train_bench as tb
    from step_counter import StepCounter

    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.train.worker import env_rank_info
    cfg = tb.BenchConfig("step_counts", "tiny-llama", {"zero_stage": stage}, seq_len=32, micro_batch=2,
                         steps=STEPS, warmup=1)
    job = tb.job_for(cfg, world, cpu=True)
    plan = resolve_plan(job)
    counter = StepCounter().install()
    try:
        if mode == "meshpilot":
            tb._run_meshpilot(job, plan, env_rank_info(), cfg, on_step=counter.mark)
        else:
            tb._run_direct(job, plan, env_rank_info(), cfg, cpu=True, on_step=counter.mark)
    finally:
        counter.uninstall()
    return [dict(c) for c in counter.steps]


@pytest.mark.parametrize("stage", [3, 1])
def test_worker_step_does_what_a_plain_deepspeed_loop_does(stage):
    mine = run_distributed(_count, 2, "meshpilot", stage, timeout=600)
    direct = run_distributed(_count, 2, "direct", stage, timeout=600)
    for rank in range(2):
        assert len(mine[rank]) == len(direct[rank]) == STEPS
        # step 0 holds the set-up, the last step the final memory gather: compare the ones between
        for s in range(1, STEPS - 1):
            m, d = collections.Counter(mine[rank][s]), collections.Counter(direct[rank][s])
            if stage == 3:
                assert d[("zero3", "fetch_sub_module")] > 0, "the direct loop did not run under ZeRO-3"
            extra = dict(m - d)
            missing = dict(d - m)
            assert not missing and extra == ALLOWED_EXTRA, (
                f"ZeRO-{stage} rank {rank} step {s}: the worker does {extra} more and {missing} less than the "
                f"direct DeepSpeed loop (allowed extra: {ALLOWED_EXTRA})")
