"""benchmarks/allocator_history.py: which code made each held segment, and which segments served later requests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

MB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("allocator_history", ROOT / "benchmarks" / "allocator_history.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
