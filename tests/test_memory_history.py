"""train.memory_history: the allocator history's JSON summary (orchestrator/train/memory_history.py)."""
from __future__ import annotations

import json

import pytest
import torch

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.train import memory_history

MB = 2**20


def frame(filename: str, line: int, name: str) -> dict:
    return dict(filename=filename, line=line, name=name)


def test_code_frames_keep_deepspeed_meshpilot_and_torch_innermost_first():
    frames = [frame("/usr/lib/python3.11/threading.py", 1, "run"),
              frame("/x/site-packages/deepspeed/runtime/zero/stage_1_and_2.py", 1900, "step"),
              frame("/work/main/orchestrator/train/engine_deepspeed.py", 210, "step"),
              frame("/x/site-packages/torch/nn/modules/module.py", 1750, "_call_impl"),
              frame("/home/u/my_script.py", 3, "main")]
    assert memory_history.code_frames(frames) == [
        "deepspeed/runtime/zero/stage_1_and_2.py:1900:step", "orchestrator/train/engine_deepspeed.py:210:step",
        "torch/nn/modules/module.py:1750:_call_impl"]
    assert memory_history.code_frames(frames, keep=1) == ["deepspeed/runtime/zero/stage_1_and_2.py:1900:step"]


def test_summary_keeps_large_events_and_this_device_and_sums_blocks():
    snapshot = dict(
        segments=[dict(device=0, address=0, total_size=64 * MB, stream=0, segment_type="large",
                       blocks=[dict(size=40 * MB, state="active_allocated"), dict(size=24 * MB, state="inactive")]),
                  dict(device=1, address=1 << 40, total_size=2 * MB, stream=0, segment_type="small",
                       blocks=[dict(size=2 * MB, state="inactive")])],
        device_traces=[[dict(action="segment_alloc", size=64 * MB, addr=0, stream=0, time_us=1.0, frames=[]),
                        dict(action="alloc", size=40 * MB, addr=0, stream=0, time_us=2.0,
                             frames=[frame("/d/deepspeed/runtime/engine.py", 5, "step")]),
                        dict(action="alloc", size=512, addr=99, stream=0, time_us=3.0, frames=[]),
                        dict(action="free_requested", size=40 * MB, addr=0, stream=0, time_us=4.0, frames=[]),
                        dict(action="oom", size=0, addr=0, stream=0, time_us=5.0, frames=[])],
                       []])
    s = memory_history.summarise(snapshot, 0, [10.0, 20.0])
    assert [e["action"] for e in s["events"]] == ["segment_alloc", "alloc", "oom"]   # small and free_requested out
    assert s["events"][1]["where"] == ["deepspeed/runtime/engine.py:5:step"]
    assert s["reserved"] == 64 * MB and s["allocated"] == 40 * MB        # device 1's segment left out
    assert s["segments"][0]["blocks"] == [[40 * MB, "active_allocated"], [24 * MB, "inactive"]]
    assert s["steps"] == [10.0, 20.0]
    json.dumps(s)                                                        # plain JSON


def test_memory_history_is_a_train_key_off_by_default():
    job = load_job(None, ["model=tiny-llama", "cluster=dgx-h100"])
    assert job.train.memory_history is False
    assert load_job(None, ["model=tiny-llama", "cluster=dgx-h100", "train.memory_history=true"]).train.memory_history is True


def test_not_recorded_off_cuda(tmp_path):
    cpu = torch.device("cpu")
    assert memory_history.start(cpu) is False
    assert memory_history.write(cpu, tmp_path, 0, []) is None


@pytest.mark.gpu
def test_a_new_segment_is_recorded_before_the_request_it_serves(tmp_path):
    dev = torch.device("cuda", 0)
    assert memory_history.start(dev)
    x = torch.empty(300 * MB, dtype=torch.uint8, device=dev)      # larger than any cached block: a new segment
    del x
    y = torch.empty(100 * MB, dtype=torch.uint8, device=dev)      # served by the freed block, no new segment
    path = memory_history.write(dev, tmp_path, 0, [memory_history.now_us()])
    s = json.loads(path.read_text())
    ev = [(e["action"], e["size"]) for e in s["events"] if e["size"] >= 100 * MB]
    i = ev.index(("alloc", 300 * MB))
    assert ev[i - 1][0] == "segment_alloc" and ev[i - 1][1] >= 300 * MB
    j = ev.index(("alloc", 100 * MB))
    assert ev[j - 1][0] != "segment_alloc"
    del y
