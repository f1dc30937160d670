"""Host memory: what a rank measures (its RssAnon + RssShmem and the node's MemTotal - MemAvailable, read by
the worker's sampler thread), how a node's measurement is combined, and the simulator's host terms
against values computed by hand from the model's tensor shapes."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.sim.calibration import measured_from_results, node_host_memory_gib
from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.sim.host_memory import pow2_ceil
from meshpilot.orchestrator.sim.simulator import simulate
from meshpilot.orchestrator.train.memory_peaks import (GIB, PeakSampler, host_memory_gib, node_memory_bytes,
                                                       process_host_bytes)

C = SimulatorConstants()
MIB = 2**20
# an allocation's RssAnon delta differs from its bytes by its last partial page (4 KiB), glibc's mmap header
# and whatever the interpreter allocates meanwhile (a few pages); 8 MiB bounds all of that with room
TOLERANCE = 8 * MIB


def _settle(read, n=3, pause=0.01):
    """The smallest of a few readings (another thread's short-lived allocation does not count)."""
    values = []
    for _ in range(n):
        values.append(read())
        time.sleep(pause)
    return min(values)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_rss_anon_rises_by_the_bytes_of_a_touched_array(kind):
    nbytes = 256 * MIB
    before = _settle(process_host_bytes)
    if kind == "numpy":
        x = np.ones(nbytes, dtype=np.uint8)             # np.ones writes every page
    else:
        x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    after = _settle(process_host_bytes)
    assert abs((after - before) - nbytes) < TOLERANCE, (after - before) / MIB
    del x


def test_the_sampler_thread_sees_an_allocation_made_while_it_runs():
    nbytes = 192 * MIB
    sampler = PeakSampler.for_rank(torch.device("cpu"), interval_s=0.005).start()
    assert sampler.enabled and sampler.running and sampler.peak_bytes is None     # no NVML on a CPU device
    time.sleep(0.05)
    x = np.ones(nbytes, dtype=np.uint8)
    time.sleep(0.1)
    del x
    time.sleep(0.05)
    sampler.stop()
    assert sampler.samples >= 3
    rise = sampler.peaks["host"] - sampler.first["host"]
    assert rise > nbytes - TOLERANCE, rise / MIB
    h = host_memory_gib(sampler)
    assert h["host"] == pytest.approx(sampler.peaks["host"] / GIB)
    assert h["host_start"] == pytest.approx(sampler.first["host"] / GIB)
    assert 0 < h["node_used_start"] <= h["node_used_peak"] < h["node_total"]


def test_proc_readings_from_files(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  900000 kB\nRssAnon:\t  500000 kB\nRssFile:\t  390000 kB\n"
                      "RssShmem:\t   10000 kB\n")
    assert process_host_bytes(str(status)) == (500000 + 10000) * 1024          # file pages left out
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       263000000 kB\nMemFree:         1000000 kB\nMemAvailable:   13150000 kB\n"
                       "Cached:          20000000 kB\n")
    assert node_memory_bytes(str(meminfo), None) == (263000000 * 1024, (263000000 - 13150000) * 1024)
    # Ray's memory monitor kills above 0.95 x MemTotal: this node is at exactly 95% used
    total, used = node_memory_bytes(str(meminfo), None)
    assert used / total == pytest.approx(0.95)
    status.write_text("Name:\tpython\n")
    assert process_host_bytes(str(status)) is None
    assert process_host_bytes(str(tmp_path / "missing")) is None
    # the real files: MemTotal as the kernel reports it through sysconf as well (without a cgroup limit below it)
    import os
    total, used = node_memory_bytes(cgroup_root=None)
    assert total == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < used < total


def test_node_measurement_combines_the_ranks_of_a_node():
    """Node host memory = max peak of MemTotal - MemAvailable - min value at a rank's start + the ranks'
    RssAnon + RssShmem at their start (GiB), by hand for two nodes of two ranks each."""
    def res(rank, peak, start, host_start):
        return {"rank": rank, "memory_peaks_gib": {"nvml": 1.0, "allocated": 0.5, "reserved": 0.6, "host_rss": 9.0},
                "host_memory_gib": {"host": host_start + 50.0, "host_start": host_start, "node_used_peak": peak,
                                    "node_used_start": start, "node_total": 251.0}}
    results = [res(0, 200.0, 12.0, 2.5), res(1, 201.0, 12.5, 2.0), res(2, 150.0, 10.0, 2.0), res(3, 149.0, 11.0, 2.0)]
    assert node_host_memory_gib(results, 2) == {0: 201.0 - 12.0 + 4.5, 1: 150.0 - 10.0 + 4.0}
    # a node with a rank lacking the readings is left out
    partial = [dict(results[0]), dict(results[1], host_memory_gib={})]
    assert node_host_memory_gib(partial, 2) == {}
    job = load_job(None, ["model=tiny-llama", "cluster=h100-sxm-4", "cluster.gpus_per_node=2", "cluster.nodes=2",
                          "train.global_batch=4", "plan.dp=4", "plan.zero_stage=2", "plan.micro_batch=1"])
    from meshpilot.orchestrator.plan.plan import resolve_plan
    m = measured_from_results(job, resolve_plan(job), results)
    assert m["host_node_gib"] == {0: pytest.approx(193.5), 1: pytest.approx(144.0)}
    assert m["host_node_peak_gib"] == pytest.approx(193.5)
    assert m["per_rank"][0]["host"] == 52.5
    # older results (no host readings): the sum of the workers' ru_maxrss, as before
    old = [{k: v for k, v in r.items() if k != "host_memory_gib"} for r in results]
    assert measured_from_results(job, resolve_plan(job), old)["host_node_gib"] == {0: 18.0, 1: 18.0}


def test_pow2_ceil():
    assert list(pow2_ceil([0, 1, 3, 4, 5, 2**30 + 1, 26_031_728_640])) == [0, 1, 4, 4, 8, 2**31, 2**35]


def _llama13b(*ov):
    return load_job(None, ["model=llama-2-13b", "cluster=h200-sxm-4", "cluster.gpus_per_node=2",
                           "cluster.cpu_memory_gib=256", "cluster.cpu_cores=32", "train.global_batch=16",
                           "train.seq_len=2048", *ov])


def test_zero3_without_offload_holds_its_partition_on_the_host_while_the_engine_is_built():
    """ZeRO-3 with the partitions on the GPU moves them into one flat buffer through a pageable host copy
    (DeepSpeed's zero/utils.py defragment): w P_s per rank at its peak, on the process baseline less what the
    process allocates after the engine build (cpu_after_build_gib); no offload buffers. With optimizer offload the
    copy is freed before the offload buffers exist: the larger of the two counts."""
    h, f, V, L = 5120, 13824, 32000, 40
    P = L * (4 * h * h + 2 * h + 3 * h * f) + 2 * V * h + h
    e = simulate(_llama13b("plan.dp=2", "plan.zero_stage=3", "plan.micro_batch=8",
                           "plan.activation_checkpointing=full"))
    assert e.memory_breakdown_gib["cpu_offload"] == 0.0
    copy = 2 * P / 2                                              # bf16, half of the model on each rank
    after = C.cpu_after_build_gib * 2**30
    assert e.cpu_memory_gib_per_node * 2**30 == pytest.approx(2 * (copy - after + C.cpu_process_gib * 2**30),
                                                              rel=1e-12)
    off = simulate(_llama13b("plan.dp=2", "plan.zero_stage=3", "plan.offload_optimizer=cpu", "plan.micro_batch=8",
                             "plan.activation_checkpointing=full"))
    assert off.memory_breakdown_gib["cpu_offload"] * 2**30 > 2 * (2 * P / 2)
    # the page-locked part (sub-group gradients six of 4 GiB and one of 2 GiB, the 16 GiB bf16 gradient partition)
    # costs the node pinned_node_overhead more
    pinned = 6 * 2**32 + 2**31 + 2**34
    assert off.cpu_memory_gib_per_node * 2**30 == pytest.approx(
        off.memory_breakdown_gib["cpu_offload"] * 2**30 + 2 * C.pinned_node_overhead * pinned
        + 2 * C.cpu_process_gib * 2**30, rel=1e-12)
    # stage 2 keeps its 16-bit parameters on the GPU in place: no such copy
    z2 = simulate(_llama13b("plan.dp=2", "plan.zero_stage=2", "plan.micro_batch=1",
                            "plan.activation_checkpointing=full"))
    assert z2.cpu_memory_gib_per_node == pytest.approx(2 * C.cpu_process_gib, rel=1e-12)
    # a copy smaller than what the process allocates after the build never shows: the steady process is the peak
    # (tiny-llama: 106,816 bf16 parameters, 104 KiB on each of the 2 ranks)
    tiny = simulate(load_job(None, ["model=tiny-llama", "cluster=h200-sxm-4", "cluster.gpus_per_node=2",
                                    "train.global_batch=8", "train.seq_len=128", "plan.dp=2", "plan.zero_stage=3",
                                    "plan.micro_batch=4"]))
    assert tiny.cpu_memory_gib_per_node == pytest.approx(2 * C.cpu_process_gib, rel=1e-12)


def test_zero2_offload_host_terms_by_hand():
    """llama-2-13b, ZeRO-2 + optimizer offload, dp=2, micro-batch 4 (2 accumulation steps), bf16 AdamW.
    h=5120, 40 layers, ffn 13824, vocab 32000 (untied head): P = 40 x (4h^2 + 2h + 3 h ffn) + 2 x 32000 h + h."""
    h, f, V, L = 5120, 13824, 32000, 40
    P = L * (4 * h * h + 2 * h + 3 * h * f) + 2 * V * h + h
    assert P == 13_015_864_320
    ps = P // 2                                                   # 6,507,932,160 per rank
    master = 2**35          # fp32 4 ps = 26.0e9 B (24.2 GiB) -> 32 GiB pinned block
    copy_back = 2**34       # bf16 2 ps = 13.0e9 B -> 16 GiB
    grads = 2**35           # fp32 gradient partition, as the master
    moments = 8 * ps        # Adam m and v, pageable
    staging = 2**29         # largest tensor bf16: 32000 x 5120 x 2 = 327.7e6 B -> 512 MiB
    # accumulation (grad_accum 2): one pinned bf16 buffer per whole parameter of the partition
    # q, k, v, o 5120^2 x 2 = 52.4e6 B -> 64 MiB; gate, up, down 5120 x 13824 x 2 = 141.6e6 B -> 256 MiB;
    # norms 10 KiB -> 16 KiB; embedding and head 512 MiB each; half of them on each of the two ranks
    per_layer = 4 * 2**26 + 3 * 2**28 + 2 * 2**14
    accum = (L * per_layer + 2 * 2**29 + 2**14) / 2
    per_rank = master + copy_back + grads + moments + staging + accum
    pinned = master + copy_back + grads + staging + accum           # all but the moments are page-locked
    e = simulate(_llama13b("plan.dp=2", "plan.zero_stage=2", "plan.offload_optimizer=cpu", "plan.micro_batch=4"))
    assert e.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(2 * per_rank, rel=1e-12)
    node = 2 * (per_rank + C.pinned_node_overhead * pinned + C.cpu_process_gib * 2**30)
    assert e.cpu_memory_gib_per_node * 2**30 == pytest.approx(node, rel=1e-12)
    assert e.cpu_memory_gib_per_node == pytest.approx(308.2, abs=0.05)
    # Ray's memory monitor kills above 0.95 x 256 GiB of the node's used memory, which holds the system's own use and
    # Ray's processes beside the workers: the plan does not fit the host (issue #15's run was killed at 242 of
    # 252 GB), and the reason names the usable memory
    assert not e.fits and e.cpu_memory_available_gib == pytest.approx(0.95 * 256 - C.node_base_gib - C.ray_node_gib)
    assert any("usable (95% of 256" in r for r in e.reasons)
    # no accumulation (micro-batch 8, one step): the per-parameter buffers go
    one = simulate(_llama13b("plan.dp=2", "plan.zero_stage=2", "plan.offload_optimizer=cpu", "plan.micro_batch=8"))
    assert one.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(2 * (per_rank - accum), rel=1e-12)
    # ZeRO-1 with the same accumulation reduces once, at the boundary, from the gradients autograd summed on the GPU:
    # no per-parameter host buffers (measured on one H200, benchmarks/results/2026-12-01-s10-h200x1/call2)
    z1 = simulate(_llama13b("plan.dp=2", "plan.zero_stage=1", "plan.offload_optimizer=cpu", "plan.micro_batch=4"))
    assert z1.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(2 * (per_rank - accum), rel=1e-12)


def test_zero3_offload_host_terms_by_hand():
    """The same model under ZeRO-3 + optimizer and parameter offload, dp=2, micro-batch 1 (sub-groups of 1e9)."""
    L = 40
    ps = 13_015_864_320 // 2
    fp32 = 4 * ps + 8 * ps                                        # master and moments, pageable
    sub_grads = 6 * 2**32 + 2**31       # six sub-groups of 1e9 fp32 (4e9 B -> 4 GiB), the rest 0.508e9 -> 2 GiB
    grad16 = 2**34                      # bf16 gradient partition 13.0e9 B -> 16 GiB
    flat16 = 2**34                      # the offloaded bf16 parameter partition (the step's fp32 -> bf16 copy lands
    #                                     in it on the host: no temporary)
    # zero.Init's pinned partition of every parameter (half of each): q, k, v, o 26.2e6 B -> 32 MiB; gate,
    # up, down 70.8e6 B -> 128 MiB; norms 5 KiB -> 8 KiB; embedding and head 163.8e6 B -> 256 MiB
    init_parts = L * (4 * 2**25 + 3 * 2**27 + 2 * 2**13) + 2 * 2**28 + 2**13
    per_rank = fp32 + sub_grads + grad16 + flat16 + init_parts
    e = simulate(_llama13b("plan.dp=2", "plan.zero_stage=3", "plan.offload_optimizer=cpu", "plan.offload_params=cpu",
                           "plan.micro_batch=1"))
    assert e.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(2 * per_rank, rel=1e-12)
    # with the parameters on the GPU the step converts each sub-group to bf16 on the host before the transfer: the
    # largest sub-group's w x 1e9 bytes instead of the flat and zero.Init partitions
    opt = simulate(_llama13b("plan.dp=2", "plan.zero_stage=3", "plan.offload_optimizer=cpu", "plan.micro_batch=1"))
    assert opt.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(
        2 * (fp32 + sub_grads + grad16 + 2 * 10**9), rel=1e-12)
    # parameter offload with the optimizer on the GPU: the step's copy comes down from the GPU's fp32 partition into
    # a pageable fp32 host tensor before torch converts it into the flat bf16 partition: 4 x 1e9 bytes beside it
    par = simulate(_llama13b("plan.dp=2", "plan.zero_stage=3", "plan.offload_params=cpu", "plan.micro_batch=1"))
    assert par.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(
        2 * (flat16 + init_parts + 4 * 10**9), rel=1e-12)


def test_zo2_host_terms_by_hand():
    """opt-13b ZO2 on one GPU, bf16: h=5120, 40 layers, ffn 20480, vocab 50272, 2050 positions, tied head."""
    h, f, V, L = 5120, 20480, 50272, 40
    block = 4 * h * h + 8 * h + 2 * h * f + f + h                 # 314,639,360 parameters
    stores = L * 2**30                  # 629.3e6 B per block -> 1 GiB pinned store each
    stash = 2**29 + 2**25 + 2**15       # embedding 514.8e6 B -> 512 MiB, positions 21.0e6 B -> 32 MiB, final LN
    P = L * block + V * h + 2050 * h + 2 * h
    job = load_job(None, ["model=opt-13b", "cluster=h200-sxm-4", "cluster.gpus_per_node=1", "cluster.cpu_memory_gib=256",
                          "train.optimizer=zo-sgd", "train.global_batch=1", "train.seq_len=2048",
                          "plan.zo.mode=zo2", "plan.micro_batch=1"])
    e = simulate(job)
    assert e.memory_breakdown_gib["cpu_offload"] * 2**30 == pytest.approx(stores + stash, rel=1e-12)
    # the model is built whole on the host (bf16) before the stores are filled: both at once (2 P = 25.7e9 B);
    # the closing checksum sums one block slot at a time and adds nothing on the host
    build = 2 * P
    locked = C.pinned_node_overhead * (stores + stash)                  # the stores and the stash are page-locked
    assert e.cpu_memory_gib_per_node * 2**30 == pytest.approx(stores + stash + locked + build
                                                              + C.cpu_process_gib * 2**30, rel=1e-12)


def test_memory_usage_threshold_is_the_host_fit_limit():
    job = _llama13b("plan.dp=2", "plan.zero_stage=2", "plan.offload_optimizer=cpu", "plan.micro_batch=8")
    need = simulate(job).cpu_memory_gib_per_node + C.node_base_gib + C.ray_node_gib   # the node's use beside it
    for threshold, fits in ((need / 320 * 1.01, True), (need / 320 * 0.99, False)):
        j = _llama13b("plan.dp=2", "plan.zero_stage=2", "plan.offload_optimizer=cpu", "plan.micro_batch=8",
                      "cluster.cpu_memory_gib=320", f"cluster.memory_usage_threshold={threshold}")
        e = simulate(j)
        assert e.cpu_memory_available_gib == pytest.approx(320 * threshold - C.node_base_gib - C.ray_node_gib)
        assert (not any("host memory" in r for r in e.reasons)) is fits
    with pytest.raises(ConfigError) as err:
        _llama13b("cluster.memory_usage_threshold=1.5", "plan.dp=2")
    assert err.value.key == "cluster.memory_usage_threshold"


def test_embedded_ray_takes_the_jobs_memory_usage_threshold(monkeypatch):
    """The simulator's host limit and the memory monitor's are one number: an embedded Ray is started
    with the job's cluster.memory_usage_threshold as its raylet system config (read back from the node
    Ray started, the config it hands to the raylet)."""
    from ray._private import ray_constants, worker

    from meshpilot.launch import ray_cluster
    from meshpilot.launch.ray_cluster import connect_ray
    # connect_ray makes this process's Ray loopback-only (an environment variable its children inherit, and
    # a module constant): both are put back after the test, or later multi-node Ray tests would inherit them
    monkeypatch.setenv(ray_cluster.LOOPBACK_ENV, "1")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    s = connect_ray(None, accelerator="cpu", workers_per_node=1, memory_usage_threshold=0.77)
    try:
        assert worker._global_node._config["memory_usage_threshold"] == 0.77
    finally:
        s.close()


def test_cpu_workers_hold_their_modelled_peak_in_the_host_memory():
    """CPU workers (gloo) keep the model, its states and their runtime in the host's memory: the node holds two
    workers' modelled peaks (the device row, RSS-like), not two GPU processes' baselines (1.4 GiB each) beside them.
    The quickstart's two tiny-llama workers measured 0.38-0.65 GiB on this node's count (2026-11-30-s7-cpu README)."""
    e = simulate(load_job(str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"),
                          ["model=tiny-llama"]))
    assert e.peak_memory_gib < 1.0
    assert e.cpu_memory_gib_per_node == pytest.approx(2 * e.peak_memory_gib, rel=1e-12)
    assert e.memory_breakdown_gib["cpu_offload"] == 0.0
    # what a CPU worker offloads stays in the same host memory: the node holds it beside the workers' peaks
    off = simulate(load_job(str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"),
                            ["model=tiny-llama", "plan.zero_stage=2", "plan.offload_optimizer=cpu"]))
    assert off.memory_breakdown_gib["cpu_offload"] > 0
    assert off.cpu_memory_gib_per_node == pytest.approx(
        2 * off.peak_memory_gib + off.memory_breakdown_gib["cpu_offload"], rel=1e-12)


def test_cpu_workers_too_big_for_the_host_are_not_told_to_offload():
    """llama-2-7b on the quickstart's two CPU workers: refused for the host as well as the device, and neither
    reason suggests offloading to the CPU (it frees nothing where the device is the host)."""
    from meshpilot.orchestrator.plan.plan import resolve_plan
    from meshpilot.orchestrator.sim.simulator import suggestions
    job = load_job(str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"),
                   ["model=llama-2-7b", "cluster.cpu_memory_gib=100", "cluster.gpu.memory_gib=120"])
    e = simulate(job)
    assert not e.fits and len(e.reasons) == 1              # the device (120 GiB) holds it, the host (92.4) does not
    assert f"GiB of host memory per node, {95.0 - C.node_base_gib - C.ray_node_gib:.1f} usable" in e.reasons[0]
    assert "model memory is the host's" in e.reasons[0] and "offload" not in e.reasons[0]
    tips = suggestions(resolve_plan(job), job)
    assert tips and not any("offload" in t or "zo2" in t for t in tips)
