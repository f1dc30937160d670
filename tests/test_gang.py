"""The gang's arithmetic (meshpilot.launch.gang): pure functions, no Ray cluster is started."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from meshpilot.launch.gang import (FAIL_AT_ENV, assign_ranks, gang_spec, local_ranks, omp_threads_for, order_by_gpu,
                                   parse_fail_at)
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.orchestrator.run.protocol import FailureKind, GangError

GANG = Path(__file__).resolve().parents[1] / "launch" / "gang.py"


def test_gang_arithmetic_imports_no_ray_and_no_torch():
    tree = ast.parse(GANG.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in names if m.split(".")[0] in ("ray", "torch", "deepspeed")}, names


def test_gang_spec_bundles_and_missing_resources_message():
    g = gang_spec(8, 2, accelerator="gpu", gpus_per_node=4, cpu_cores=64)
    assert g.bundles == [{"CPU": 8, "GPU": 1}] * 8 and g.strategy == "PACK" and g.max_nodes == 2
    assert g.describe_need() == "needs 8 GPUs in bundles of 1 (+8 CPU each) on at most 2 nodes"
    c = gang_spec(4, 2, accelerator="cpu", gpus_per_node=4, cpu_cores=2)
    assert c.bundles == [{"CPU": 1}] * 4 and c.strategy == "STRICT_PACK"
    assert c.describe_need() == "needs 4 CPUs in bundles of 1 on at most 1 node"


def test_ranks_are_assigned_node_by_node_and_tp_groups_never_split():
    # bundles interleaved over two nodes: ranks are regrouped so each node holds contiguous ranks
    ranks = assign_ranks(["a", "b", "a", "b"], tp=2)
    assert ranks == [0, 2, 1, 3]
    nodes_by_rank = [n for _, n in sorted(zip(ranks, ["a", "b", "a", "b"]))]
    assert nodes_by_rank == ["a", "a", "b", "b"]
    assert assign_ranks(["a", "a", "a", "b"], tp=1) == [0, 1, 2, 3]
    with pytest.raises(GangError, match="tensor-parallel group of ranks 2..3") as e:
        assign_ranks(["a", "a", "a", "b"], tp=2)
    assert e.value.failure.kind is FailureKind.PLACEMENT and e.value.failure.retryable


def test_local_ranks_and_shared_visible_devices_per_node():
    where = [dict(node_id="n1", gpu_ids=["2"]), dict(node_id="n1", gpu_ids=["0"]),
             dict(node_id="n2", gpu_ids=["1"]), dict(node_id="n2", gpu_ids=["3"])]
    local, visible = local_ranks(where, use_gpus=True)
    assert local == [1, 0, 0, 1] and visible == ["0,2", "0,2", "1,3", "1,3"]
    local, visible = local_ranks(where, use_gpus=False)
    assert local == [0, 1, 0, 1] and visible == [None] * 4


def test_ranks_of_a_node_follow_its_gpu_ids_like_torchrun():
    # Ray gave rank 0..3 of node n1 the GPUs 2, 0, 10, 9 and node n2's two ranks 1 and 0
    where = [dict(node_id="n1", gpu_ids=["2"]), dict(node_id="n1", gpu_ids=["0"]),
             dict(node_id="n1", gpu_ids=["10"]), dict(node_id="n1", gpu_ids=["9"]),
             dict(node_id="n2", gpu_ids=["1"]), dict(node_id="n2", gpu_ids=["0"])]
    order = order_by_gpu(where)
    assert order == [1, 0, 3, 2, 5, 4]
    placed = [where[i] for i in order]
    assert [w["gpu_ids"][0] for w in placed] == ["0", "2", "9", "10", "0", "1"]
    assert [w["node_id"] for w in placed] == [w["node_id"] for w in where]      # nodes keep their ranks
    local, _ = local_ranks(placed, use_gpus=True)
    assert local == [0, 1, 2, 3, 0, 1]
    cpu = [dict(node_id="n1", gpu_ids=[]), dict(node_id="n1", gpu_ids=[])]
    assert order_by_gpu(cpu) == [0, 1]


def test_openmp_threads_of_a_gpu_rank():
    gpu_only = Plan(dp=2, zero_stage=2)
    assert omp_threads_for(gpu_only, 8, environ={}) == 1                                          # as torchrun
    assert omp_threads_for(Plan(zero_stage=2, offload_optimizer="cpu"), 8, environ={}) == 8       # CPU Adam
    assert omp_threads_for(Plan(zero_stage=3, offload_params="cpu"), 8, environ={}) == 8
    assert omp_threads_for(Plan(zo_mode="zo2"), 8, environ={}) == 8                               # host-side model
    assert omp_threads_for(Plan(zo_mode="mezo"), 8, environ={}) == 8
    assert omp_threads_for(gpu_only, 8, environ={"OMP_NUM_THREADS": "4"}) is None      # the user's value stays


def test_failure_injection_spec_is_parsed_strictly():
    assert FAIL_AT_ENV == "MESHPILOT_FAIL_AT_STEP"
    assert parse_fail_at(None) is None and parse_fail_at("") is None
    assert parse_fail_at("1:5") == (1, 5, "kill")
    assert parse_fail_at("3:16:hang") == (3, 16, "hang")
    assert parse_fail_at("1:12:stop") == (1, 12, "stop")
    for bad in ("1", "1:x", "1:5:freeze", "1:5:hang:2"):
        with pytest.raises(ConfigError, match="RANK:STEP"):
            parse_fail_at(bad)


def test_capacity_shortfall_names_what_is_missing():
    from meshpilot.launch.gang import capacity_shortfall
    g = gang_spec(4, 1, accelerator="gpu", gpus_per_node=4, cpu_cores=64)
    assert capacity_shortfall(g, {"GPU": 4.0, "CPU": 64.0}) is None
    assert capacity_shortfall(g, {"CPU": 2.0}, "this machine") == (
        "the plan needs 4 GPUs (one per rank), this machine has 0; "
        "the gang needs 32 CPUs (8 per rank), this machine has 2")
    c = gang_spec(4, 1, accelerator="cpu", gpus_per_node=2, cpu_cores=2)
    assert capacity_shortfall(c, {"CPU": 2.0}) == "the gang needs 4 CPUs (1 per rank), the Ray cluster has 2"
    assert capacity_shortfall(c, {"CPU": 4.0}) is None


def test_run_needing_gpus_on_a_machine_without_them_exits_2_at_once(tmp_path):
    """`meshpilot run examples/zo2_dp4.yaml` (4 GPUs) where Ray would count no GPU: exit 2 before Ray
    starts (not after the 60 s placement timeout), naming what is missing and the fix; no run directory."""
    import os
    import subprocess
    import sys
    import time

    from meshpilot.launch.ray_cluster import local_gpu_count
    if local_gpu_count() >= 4:
        pytest.skip("this machine has the GPUs")
    example = GANG.parents[1] / "examples" / "zo2_dp4.yaml"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "meshpilot.orchestrator.cli", "run", str(example),
                        f"train.output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in dict(os.environ, MESHPILOT_HOME=str(tmp_path / "home")).items()
                            if k != "RAY_ADDRESS"})
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"the plan needs 4 GPUs (one per rank), this machine has {local_gpu_count()}" in r.stderr
    assert "cluster=local" in r.stderr and "Traceback" not in r.stderr
    assert took < 30, took                      # the placement timeout alone was 60 s
    assert not (tmp_path / "runs").exists()


def test_rank_0_notices_reach_the_console_once(monkeypatch):
    """The actor collects what the worker logs to meshpilot.console; the group shows rank 0's new ones once."""
    import logging
    import threading

    from meshpilot.launch.actor import CONSOLE_LOGGER, NoticeHandler
    from meshpilot.launch.group import RayWorkerGroup

    sink, lock = [], threading.Lock()
    h = NoticeHandler(sink, lock)
    lg = logging.getLogger(CONSOLE_LOGGER)
    monkeypatch.setattr(lg, "level", logging.INFO)       # as the actor sets it
    lg.addHandler(h)
    try:
        lg.info("building DeepSpeed op %s (first use; cached afterwards)", "deepspeed_shm_comm")
        logging.getLogger("meshpilot.other").info("not for the console")
    finally:
        lg.removeHandler(h)
    assert sink == ["building DeepSpeed op deepspeed_shm_comm (first use; cached afterwards)"]
    shown = []
    g = RayWorkerGroup(None, None, "", spec=gang_spec(2, 1, accelerator="cpu", gpus_per_node=2, cpu_cores=2),
                       log_path=str, on_notice=shown.append)
    g._show_notices(sink)
    g._show_notices(sink + ["built DeepSpeed op deepspeed_shm_comm in 61.0 s"])
    assert shown == [sink[0], "built DeepSpeed op deepspeed_shm_comm in 61.0 s"]
