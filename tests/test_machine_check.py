"""An embedded run's plan against the machine it starts on (orchestrator/run/machine_check.py): a cluster that
describes more host memory or a larger card than the machine has. The machine's numbers are given by hand (what
node_limits and NVML would read), so the rule is checked on any machine."""
from __future__ import annotations

import pytest

from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.run.machine_check import check_machine
from meshpilot.orchestrator.sim.simulator import host_usable_gib, simulate

# one GPU, ZeRO-2 with optimizer offload of 16 of llama-2-7b's layers: about 69 GiB of host memory per node
OFFLOAD = ["model=llama-2-7b", "model.layers=16", "model.name=l16", "cluster=h200-sxm-4", "cluster.gpus_per_node=1",
           "train.seq_len=2048", "train.global_batch=8", "plan.dp=1", "plan.zero_stage=2",
           "plan.offload_optimizer=cpu", "plan.micro_batch=8", "plan.activation_checkpointing=full"]


def test_a_cluster_with_more_host_memory_than_the_machine_is_refused_where_the_plan_needs_it():
    job = load_job(None, [*OFFLOAD, "cluster.cpu_memory_gib=256"])
    e = simulate(job)
    assert e.fits and 60 < e.cpu_memory_gib_per_node < 80
    # 64 GiB on this machine: 0.95 x 64 less the node's own use is below the plan's host memory
    job64 = load_job(None, [*OFFLOAD, "cluster.cpu_memory_gib=64"])
    assert host_usable_gib(job64.cluster) < e.cpu_memory_gib_per_node
    with pytest.raises(ConfigError) as err:
        check_machine(job, e, host_gib=64.0, gpu_gib=None)
    msg = str(err.value)
    assert "cluster.cpu_memory_gib" in msg and "256" in msg and "64.0" in msg and "--force" in msg
    # forced: a warning, no refusal
    assert any("(--force)" in w for w in check_machine(job, e, host_gib=64.0, gpu_gib=None, force=True))
    # 125.8 GiB (the 1 x H200 kind): it fits there, with a warning that the cluster overstates the machine
    w = check_machine(job, e, host_gib=125.8, gpu_gib=None)
    assert len(w) == 1 and "fits it" in w[0] and "cluster.cpu_memory_gib=125.8" in w[0]
    # the machine as described (within 2%): nothing to say
    assert check_machine(job, e, host_gib=252.0, gpu_gib=None) == []


def test_a_cluster_with_a_larger_card_than_the_machine_is_refused_where_the_peak_exceeds_it():
    job = load_job(None, ["model=opt-2.7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=1", "train.seq_len=2048",
                          "train.global_batch=12", "plan.dp=1", "plan.zero_stage=0", "plan.micro_batch=12"])
    e = simulate(job)
    assert e.fits and 100 < e.peak_memory_gib < job.cluster.gpu.memory_gib
    with pytest.raises(ConfigError) as err:             # an 80 GB card
        check_machine(job, e, host_gib=None, gpu_gib=79.6)
    assert "cluster.gpu.memory_gib" in str(err.value) and "79.6" in str(err.value)
    small = load_job(None, ["model=opt-2.7b", "cluster=h200-sxm-4", "cluster.gpus_per_node=1", "train.seq_len=2048",
                            "train.global_batch=2", "plan.dp=1", "plan.zero_stage=0", "plan.micro_batch=2"])
    es = simulate(small)
    assert es.peak_memory_gib < 79.6
    w = check_machine(small, es, host_gib=None, gpu_gib=79.6)
    assert len(w) == 1 and "fits them" in w[0]
    assert check_machine(job, e, host_gib=None, gpu_gib=None) == []     # not a GPU run, or unknown
