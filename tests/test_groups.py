"""Rank layouts checked rank by rank against hand-written groups, and the real gloo process
groups built from them (collectives over each group reach exactly the expected ranks)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_utils import DistributedWorkerError, run_distributed
from meshpilot.comm.groups import LayoutMismatchError, build_process_groups, check_layout_agreement
from meshpilot.comm.layout import build_layout

# (degrees, {kind: groups}) written out by hand from the layout rules:
# rank = d*tp + t; ep chunks each dp column into contiguous runs of ep; edp = same position in each chunk.
EXPECTED = {
    "dp2_tp2": (dict(dp=2, tp=2), dict(
        tp=[(0, 1), (2, 3)], dp=[(0, 2), (1, 3)], ep=[(0,), (1,), (2,), (3,)], edp=[(0, 2), (1, 3)])),
    "dp4_ep2": (dict(dp=4, tp=1, ep=2), dict(
        tp=[(0,), (1,), (2,), (3,)], dp=[(0, 1, 2, 3)], ep=[(0, 1), (2, 3)], edp=[(0, 2), (1, 3)])),
    "dp2_tp2_ep2": (dict(dp=2, tp=2, ep=2), dict(
        tp=[(0, 1), (2, 3)], dp=[(0, 2), (1, 3)], ep=[(0, 2), (1, 3)], edp=[(0,), (1,), (2,), (3,)])),
    "dp4_tp2_ep2": (dict(dp=4, tp=2, ep=2), dict(
        tp=[(0, 1), (2, 3), (4, 5), (6, 7)], dp=[(0, 2, 4, 6), (1, 3, 5, 7)],
        ep=[(0, 2), (1, 3), (4, 6), (5, 7)], edp=[(0, 4), (1, 5), (2, 6), (3, 7)])),
    "dp1_tp4": (dict(dp=1, tp=4), dict(
        tp=[(0, 1, 2, 3)], dp=[(0,), (1,), (2,), (3,)], ep=[(0,), (1,), (2,), (3,)], edp=[(0,), (1,), (2,), (3,)])),
}


def _mine(groups: list[tuple[int, ...]], rank: int) -> tuple[int, ...]:
    [g] = [g for g in groups if rank in g]
    return g


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layout_rank_by_rank(name):
    degrees, exp = EXPECTED[name]
    lay = build_layout(gpus_per_node=8, **degrees)
    world = degrees["dp"] * degrees["tp"]
    assert lay.world_size == world
    for kind in ("tp", "dp", "ep", "edp"):
        assert sorted(getattr(lay, f"{kind}_groups")) == sorted(exp[kind]), kind
    for r in range(world):
        rg = lay.groups_of(r)
        for kind in ("tp", "dp", "ep", "edp"):
            assert getattr(rg, kind) == _mine(exp[kind], r), (name, r, kind)
        assert rg.tp_rank == r % degrees["tp"]
        assert rg.dp_rank == r // degrees["tp"]
        assert rg.ep_rank == _mine(exp["ep"], r).index(r)


def test_zeroth_order_layout_and_nodes():
    lay = build_layout(dp=1, pertp=2, zo_dp=2, zeroth_order=True, gpus_per_node=2)
    assert lay.zo_pert_groups == ((0, 1), (2, 3)) and lay.zo_dp_groups == ((0, 2), (1, 3))
    assert [lay.groups_of(r).zo_sign for r in range(4)] == [1, -1, 1, -1]
    assert [lay.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert not lay.spans_nodes((0, 1)) and lay.spans_nodes((0, 2))


def test_fingerprint_differs_between_layouts():
    a = build_layout(dp=2, tp=2, gpus_per_node=8)
    assert a.fingerprint() == build_layout(dp=2, tp=2, gpus_per_node=8).fingerprint()
    assert a.fingerprint() != build_layout(dp=4, tp=1, gpus_per_node=8).fingerprint()


def _groups_worker(rank: int, world: int, names: list[str]) -> dict:
    out: dict = {}
    # 1. a rank whose layout differs: every rank fails fast, naming rank 3
    wrong = dict(dp=4, tp=1) if rank == 3 else dict(dp=2, tp=2)
    try:
        check_layout_agreement(build_layout(gpus_per_node=8, **wrong))
        out["mismatch"] = None
    except LayoutMismatchError as e:
        out["mismatch"] = str(e)
    # 2. a layout for another world size
    try:
        build_process_groups(build_layout(dp=2, tp=1, gpus_per_node=8))
        out["world"] = None
    except LayoutMismatchError as e:
        out["world"] = str(e)
    # 3. real groups: sum of the ranks and count of members over each group
    for name in names:
        degrees, _ = EXPECTED[name]
        pg = build_process_groups(build_layout(gpus_per_node=8, **degrees))
        res = {}
        for kind in ("tp", "dp", "ep", "edp"):
            t = torch.tensor([float(rank), 1.0])
            dist.all_reduce(t, group=getattr(pg, kind))
            res[kind] = (int(t[0]), int(t[1]))
        res["sizes"] = (pg.tp_size, pg.dp_size, pg.ep_size, pg.edp_size)
        res["ranks"] = (pg.tp_rank, pg.dp_rank, pg.ep_rank)
        res["mpu"] = (pg.get_model_parallel_world_size(), pg.get_model_parallel_rank(),
                      pg.get_data_parallel_world_size(), pg.get_data_parallel_rank(),
                      pg.get_data_parallel_group() is pg.dp)
        out[name] = res
    return out


@pytest.mark.slow
def test_process_groups_on_gloo_world4():
    names = ["dp2_tp2", "dp4_ep2", "dp2_tp2_ep2", "dp1_tp4"]
    results = run_distributed(_groups_worker, 4, names, timeout=90)
    for rank, out in enumerate(results):
        assert out["mismatch"] is not None and "ranks [3]" in out["mismatch"], out["mismatch"]
        assert out["world"] is not None and "needs 2 ranks" in out["world"] and "initialised with 4" in out["world"]
        for name in names:
            degrees, exp = EXPECTED[name]
            res = out[name]
            for kind in ("tp", "dp", "ep", "edp"):
                g = _mine(exp[kind], rank)
                assert res[kind] == (sum(g), len(g)), (name, rank, kind)
            tp, dp = degrees["tp"], degrees["dp"]
            ep = degrees.get("ep", 1)
            assert res["sizes"] == (tp, dp, ep, len(_mine(exp["edp"], rank)))
            assert res["ranks"] == (rank % tp, rank // tp, _mine(exp["ep"], rank).index(rank))
            assert res["mpu"] == (tp, rank % tp, dp, rank // tp, True)


def _failing_worker(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("boom from the worker")
    dist.barrier()          # rank 0 waits for a partner that never comes: must be terminated
    return rank


@pytest.mark.slow
def test_run_distributed_reraises_worker_traceback():
    with pytest.raises(DistributedWorkerError) as info:
        run_distributed(_failing_worker, 2, timeout=60, grace=2.0)
    assert 1 in info.value.failures          # rank 0 fails too (its barrier partner is gone) or is terminated
    assert "boom from the worker" in info.value.failures[1] and "Traceback" in info.value.failures[1]
    assert "_failing_worker" in info.value.failures[1]
