"""The out-of-memory message suggests the allocator's max_split_size_mb where PyTorch says the cache held the free
memory in pieces (the message of benchmarks/results/2026-11-30-s5-h200x2/regimes6/ep2_moe8l_mb2)."""
from __future__ import annotations

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.plan.plan import resolve_plan
from meshpilot.orchestrator.run.protocol import Failure, FailureKind
from meshpilot.orchestrator.run.session import fragmentation_tip, oom_message

MESSAGE = ("OutOfMemoryError: CUDA out of memory. Tried to allocate 21.00 GiB. GPU 0 has a total capacity of 139.80 GiB "
           "of which 19.18 GiB is free. Including non-PyTorch memory, this process has 120.61 GiB memory in use. Of the "
           "allocated memory 99.58 GiB is allocated by PyTorch, and 18.65 GiB is reserved by PyTorch but unallocated.")
SETS = ["model=llama-1b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan.dp=2", "plan.zero_stage=1"]


def test_fragmented_cache_suggests_max_split_size_first():
    job = load_job(None, SETS)
    tip = fragmentation_tip(MESSAGE, job)
    assert tip.startswith("train.max_split_size_mb=512") and "18.6 GiB" in tip and "21.0 GiB" in tip
    failure = Failure(kind=FailureKind.GPU_OOM, rank=0, message=MESSAGE)
    text = oom_message(failure, job, resolve_plan(job), None)
    assert "Suggestions: train.max_split_size_mb=512" in text


def test_no_tip_without_fragmentation_or_when_the_job_sets_the_allocator():
    small = MESSAGE.replace("18.65 GiB is reserved", "2.00 GiB is reserved")
    assert fragmentation_tip(small, load_job(None, SETS)) is None                # the cache could not have served it
    assert fragmentation_tip(MESSAGE, load_job(None, [*SETS, "train.max_split_size_mb=256"])) is None
    assert fragmentation_tip(MESSAGE, load_job(None, [*SETS, "train.expandable_segments=true"])) is None
    assert fragmentation_tip("killed by the memory monitor", load_job(None, SETS)) is None
