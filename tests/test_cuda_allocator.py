"""The worker's caching-allocator mode (train.expandable_segments): the environment's setting wins, the job's
applies otherwise, and on a GPU the segments it creates are expandable (the GPU test)."""
from __future__ import annotations

import pytest
import torch

from meshpilot.orchestrator.train import cuda_allocator as ca


@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, None),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, True),
    ({"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6, expandable_segments:False"}, False),
    # torch reads PYTORCH_ALLOC_CONF first: the older name is not looked at when it is set
    ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, None),
])
def test_environment_reading(env, want):
    assert ca.expandable_from_environment(env) is want


def test_environment_wins_and_nothing_is_set(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    with caplog.at_level("WARNING"):
        assert ca.configure_allocator(True, env) is False
    assert calls == [] and "environment's value runs" in caplog.text
    assert ca.configure_allocator(False, env) is False and calls == []


@pytest.mark.parametrize("expandable", [True, False])
def test_job_setting_is_applied(monkeypatch, expandable):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert ca.configure_allocator(expandable, {}) is expandable
    assert calls == [f"expandable_segments:{expandable}"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_segments_are_expandable_on_gpu(monkeypatch):
    for n in ca.ENV_NAMES:
        monkeypatch.delenv(n, raising=False)
    try:
        assert ca.configure_allocator(True) is True
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        ptr = x.data_ptr()
        segs = [s for s in torch.cuda.memory_snapshot() if s["address"] <= ptr < s["address"] + s["total_size"]]
        assert len(segs) == 1 and segs[0].get("is_expandable") is True
        del x
    finally:
        ca.configure_allocator(False)
        torch.cuda.empty_cache()


def test_simulator_says_its_reserve_model_is_the_default_modes():
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.simulator import simulate
    sets = ["model=llama-1b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan.dp=2", "plan.zero_stage=2"]
    default = simulate(load_job(None, sets))
    exp = simulate(load_job(None, [*sets, "train.expandable_segments=true"]))
    assert not any("expandable" in n for n in default.notes)
    assert any(n.startswith("train.expandable_segments") for n in exp.notes)
    assert exp.peak_memory_gib == default.peak_memory_gib        # one reserve model for both modes


def test_max_split_size_is_applied_with_the_mode_unless_the_environment_names_it(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert ca.configure_allocator(False, {}, max_split_size_mb=512) is False
    assert calls == ["expandable_segments:False,max_split_size_mb:512"]
    calls.clear()
    with caplog.at_level("WARNING"):
        assert ca.configure_allocator(False, {"PYTORCH_ALLOC_CONF": "max_split_size_mb:256"}, max_split_size_mb=512) \
            is False
    assert calls == ["expandable_segments:False"] and "environment's value runs" in caplog.text


def test_max_split_size_below_torchs_floor_is_a_config_error():
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.errors import ConfigError
    with pytest.raises(ConfigError, match="train.max_split_size_mb"):
        load_job(None, ["model=tiny-llama", "cluster=dgx-h100", "train.max_split_size_mb=16"])
    assert load_job(None, ["model=tiny-llama", "cluster=dgx-h100", "train.max_split_size_mb=512"]).train.max_split_size_mb == 512


def test_simulator_notes_that_max_split_size_is_not_its_model():
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.sim.simulator import simulate
    sets = ["model=llama-1b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2", "plan.dp=2", "plan.zero_stage=2"]
    split = simulate(load_job(None, [*sets, "train.max_split_size_mb=512"]))
    default = simulate(load_job(None, sets))
    assert any(n.startswith("train.max_split_size_mb=512") for n in split.notes)
    assert not any("max_split_size_mb" in n for n in default.notes)
    assert split.peak_memory_gib == default.peak_memory_gib
