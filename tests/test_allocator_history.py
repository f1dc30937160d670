"""benchmarks/allocator_history.py: which code made each held segment, and which segments served later requests."""
from __future__ import annotations

from pathlib import Path

from file_module import load_file

MB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_file(ROOT / "benchmarks" / "allocator_history.py")


def ev(action, size, addr, t, *where):
    return dict(action=action, size=size, addr=addr, stream=0, t_us=t, where=list(where))


def test_segments_by_origin_and_steady_state_reuse_by_hand():
    """Step 0 (up to t=10): the build's initialisation makes a 400 MB segment and frees its tensor, the step's copy
    takes it; a 100 MB activation makes a segment of its own. Step 1: the copy comes back to the initialisation's
    segment and a 50 MB request splits the activation's. At the end two segments are held: 400 MB made by the
    initialisation, 100 MB made by the activation."""
    a = _module()
    init = "deepspeed/runtime/zero/stage_1_and_2.py:937:init"
    copy = "deepspeed/runtime/zero/stage_1_and_2.py:3118:step"
    act = "strategies/layers.py:45:forward"
    history = dict(
        steps=[10.0, 20.0],
        events=[ev("segment_alloc", 400 * MB, 0, 1.0, init), ev("alloc", 400 * MB, 0, 1.0, init),
                ev("free_completed", 400 * MB, 0, 2.0, init),
                ev("segment_alloc", 100 * MB, 1 << 30, 3.0, act), ev("alloc", 100 * MB, 1 << 30, 3.0, act),
                ev("free_completed", 100 * MB, 1 << 30, 4.0, act),
                ev("alloc", 400 * MB, 0, 5.0, copy), ev("free_completed", 400 * MB, 0, 6.0, copy),
                ev("alloc", 400 * MB, 0, 15.0, copy), ev("alloc", 50 * MB, 1 << 30, 16.0, act)],
        segments=[dict(address=0, total_size=400 * MB, stream=0, blocks=[[400 * MB, "active_allocated"]]),
                  dict(address=1 << 30, total_size=100 * MB, stream=0,
                       blocks=[[50 * MB, "active_allocated"], [50 * MB, "inactive"]])])
    out = a.analyse(history, min_bytes=10 * MB)
    held = dict(out["held"])
    assert held == {(0, "deepspeed/runtime/zero/stage_1_and_2.py:937"): 400 * MB,
                    (0, "strategies/layers.py:45"): 100 * MB}
    served = dict(out["served"])
    assert served[("deepspeed/runtime/zero/stage_1_and_2.py:3118",
                   "deepspeed/runtime/zero/stage_1_and_2.py:937 (step 0)")] == [1, 400 * MB]
    assert served[("strategies/layers.py:45", "strategies/layers.py:45 (step 0)")] == [1, 50 * MB]
    assert len(served) == 2                    # step 0's requests are not steady state


def test_what_the_largest_allocated_total_is_made_of_by_hand():
    """Weights (300 MB) stay; step 0's activations (2 x 100 MB) and loss (250 MB) peak at 750 MB and are freed; step 1
    allocates a 200 MB gradient and one 100 MB activation (600 MB). The peak is step 0's, made of the weights, the two
    activations (one group, two tensors) and the loss."""
    a = _module()
    w, act, loss, grad = ("deepspeed/engine.py:10:init",), ("strategies/layers.py:64:forward", "strategies/model.py:125:f"), \
        ("strategies/tensor_parallel.py:183:forward",), ("deepspeed/stage_1_and_2.py:2192:copy",)
    history = dict(steps=[10.0, 20.0], events=[
        ev("alloc", 300 * MB, 0, 1.0, *w),
        ev("alloc", 100 * MB, 1, 2.0, *act), ev("alloc", 100 * MB, 2, 3.0, *act), ev("alloc", 250 * MB, 3, 4.0, *loss),
        ev("free_completed", 250 * MB, 3, 5.0, *loss), ev("free_completed", 100 * MB, 1, 6.0, *act),
        ev("free_completed", 100 * MB, 2, 7.0, *act),
        ev("alloc", 200 * MB, 4, 15.0, *grad), ev("alloc", 100 * MB, 5, 16.0, *act)])
    total, step, groups = a.at_peak(history)
    assert (total, step) == (750 * MB, 0)
    assert groups == {"deepspeed/engine.py:10": [1, 300 * MB],
                      "strategies/layers.py:64 <- strategies/model.py:125": [2, 200 * MB],
                      "strategies/tensor_parallel.py:183": [1, 250 * MB]}
