"""Planner: enumeration against a brute-force reference, ranking, constraints, rejection summary."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.config.loader import load_job
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan
from meshpilot.orchestrator.sim.planner import choose_plan, enumerate_plans, search
from meshpilot.orchestrator.sim.estimate import SimulatorConstants
from meshpilot.orchestrator.sim.simulator import simulate


def _job(*ov):
    return load_job(None, ["plan=auto", *ov])


def _brute_force(job):
    """Every Plan that Plan.check accepts, built one by one (independent of the planner's code)."""
    c, t = job.cluster, job.train
    G = c.nodes * c.gpus_per_node
    out = set()
    for dp, tp, ep, z, oo, op, sp, ac, ov in itertools.product(range(1, G + 1), range(1, G + 1), (1, 2, 4),
                                                               range(4), ("none", "cpu"), ("none", "cpu"),
                                                               (False, True), ("none", "full"), (False, True)):
        if dp * tp > G or G % (dp * tp) or t.global_batch % dp:
            continue
        for mb in range(1, t.global_batch // dp + 1):
            if (t.global_batch // dp) % mb:
                continue
            p = Plan(dp=dp, tp=tp, ep=ep, zero_stage=z, offload_optimizer=oo, offload_params=op, micro_batch=mb,
                     grad_accum=t.global_batch // (dp * mb), activation_checkpointing=ac, sequence_parallel=sp,
                     comm_overlap=ov)
            try:
                p.check(job.model, t, c)
            except ConfigError:
                continue
            out.add(p)
    return out


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_enumeration_matches_brute_force(model):
    job = _job(f"model={model}", "cluster=h100-sxm-4", "train.global_batch=8", "train.seq_len=64")
    arrays, _, _ = enumerate_plans(job)
    got = {arrays.plan(i) for i in range(arrays.n)}
    assert len(got) == arrays.n            # no duplicates
    assert got == _brute_force(job)


def test_zeroth_order_enumeration():
    job = _job("model=tiny-llama", "cluster=h100-sxm-4", "train.global_batch=4", "train.seq_len=64",
               "train.optimizer=zo-sgd")
    arrays, _, _ = enumerate_plans(job)
    plans = {arrays.plan(i) for i in range(arrays.n)}
    assert plans and all(p.zeroth_order for p in plans)
    assert {p.zo_mode for p in plans} == {"mezo", "zo2"}
    assert {p.zo_pertp for p in plans} == {1, 2}
    for p in plans:
        p.check(job.model, job.train, job.cluster)


def test_search_ranks_and_agrees_with_simulate():
    from meshpilot.orchestrator.sim.error_bands import load_error_bands
    job = _job("model=llama-2-7b", "cluster=h100-sxm-4", "train.global_batch=16")
    res = search(job, top=5)
    assert res.best is not None and len(res.top) == 5
    assert all(e.fits_with_margin for e in res.top)         # 7B on 8 x 80 GB: plenty of plans with margin
    tps = [e.tokens_per_s for e in res.top]
    assert tps == sorted(tps, reverse=True)
    margin_idx = np.flatnonzero(res.scores.fits_margin & res.scores.fits)
    assert res.top[0].tokens_per_s == pytest.approx(res.scores.tokens_per_s[margin_idx].max())
    for e in res.top:
        assert e.fits and e.peak_memory_gib + e.memory_margin_gib <= 79.6 * 0.95
        assert e.memory_margin_gib == pytest.approx(min(e.memory_band * e.peak_memory_gib,
                                                        load_error_bands().of(e.regime).band_gib))
    again = simulate(job, res.best, headroom=0.05)
    assert again.step_time_s == pytest.approx(res.top[0].step_time_s)
    assert again.peak_memory_gib == pytest.approx(res.top[0].peak_memory_gib)
    # memory objective: the smallest peak among fitting plans
    mem = search(job, objective="memory", top=3)
    assert mem.top[0].peak_memory_gib == pytest.approx(mem.scores.peak_gib[np.flatnonzero(mem.scores.fits)].min())
    # cost objective: the fewest GPU-seconds per step among plans with margin
    cost = search(job, objective="cost", top=1)
    f = np.flatnonzero(cost.scores.fits_margin & cost.scores.fits)
    gs = cost.scores.step_time_s[f] * cost.arrays.world[f]
    assert cost.top[0].step_time_s * cost.top[0].world_size == pytest.approx(gs.min())


def test_fixed_fields_constrain_the_search():
    job = _job("model=llama-2-7b", "cluster=h100-sxm-4", "train.global_batch=16", "plan.zero_stage=2",
               "plan.micro_batch=2")
    res = search(job)
    assert res.scored > 0
    assert set(res.arrays.zero.tolist()) == {2} and set(res.arrays.micro_batch.tolist()) == {2}


def test_fixed_plan_is_explained_against_the_best():
    job = load_job(None, ["model=llama-2-7b", "cluster=h100-sxm-4", "train.global_batch=16", "plan.dp=4",
                          "plan.zero_stage=2", "plan.micro_batch=1"])
    res = search(job)
    assert res.fixed is not None and res.fixed.plan.startswith("dp=4 tp=1 zero=2")
    assert res.fixed.fits           # a fitting fixed plan is never faster than the best fitting plan
    assert res.fixed.step_time_s >= res.top[0].step_time_s - 1e-12
    assert choose_plan(job) == resolve_plan(job)


def test_nothing_fits_summary_and_choose_plan_error():
    job = _job("model=llama-2-70b", "cluster=a100-40gb-pcie", "train.global_batch=4", "train.seq_len=4096",
               "train.optimizer=sgd", "cluster.cpu_memory_gib=64")
    res = search(job)
    assert res.best is None
    lines = res.rejected_lines()
    assert any("need more than" in s and "best of them" in s for s in lines)
    with pytest.raises(ConfigError, match="no plan fits"):
        choose_plan(job)


def test_tensor_parallel_stays_inside_nodes():
    job = _job("model=llama-2-13b", "cluster=dgx-h100", "cluster.nodes=2", "train.global_batch=32")
    res = search(job, top=20)
    for e in res.top:
        p = Plan(**{k: v for k, v in e.plan_config.items() if k != "zo"})
        lay = p.layout(job.cluster.gpus_per_node)
        assert not any(lay.spans_nodes(g) for g in lay.tp_groups)
    # a tp group across nodes is rejected before scoring
    with pytest.raises(ConfigError):
        Plan(dp=1, tp=16, micro_batch=1, grad_accum=32).check(job.model, job.train, job.cluster)


def test_fewer_gpus_when_the_batch_does_not_divide():
    job = _job("model=tiny-llama", "cluster=dgx-h100", "train.global_batch=6", "train.seq_len=64")
    res = search(job)
    assert res.best is not None
    assert (job.cluster.nodes * job.cluster.gpus_per_node) % res.best.world_size == 0


def test_bad_arguments():
    job = _job("model=tiny-llama", "cluster=h100-sxm-4", "train.global_batch=4", "train.seq_len=64")
    with pytest.raises(ConfigError, match="--objective"):
        search(job, objective="speed")
    with pytest.raises(ConfigError, match="--headroom"):
        search(job, headroom=1.5)


def test_plan_description_round_trip():
    from meshpilot.orchestrator.config.loader import job_from_dict, job_to_dict
    from meshpilot.orchestrator.plan import text
    job = _job("model=tiny-mixtral", "cluster=h100-sxm-4", "train.global_batch=8", "train.seq_len=64")
    arrays, _, _ = enumerate_plans(job)
    for i in range(0, arrays.n, 7):
        p = arrays.plan(i)
        raw = job_to_dict(job)
        raw["plan"] = {"auto": False}
        assert resolve_plan(job_from_dict(raw, text.parse(text.describe(p)))) == p
        assert p.describe() == text.describe(p)
    with pytest.raises(ConfigError, match="--explain"):
        text.parse("dp=4 banana")


def test_plans_that_fit_only_without_the_measured_band_rank_last_and_are_named_risky():
    """The band rule by hand: a plan is risky when peak <= cap < peak + min(band x peak, band GiB), or when the
    step's largest single allocation is more than cap - peak. With bands of 0 only the second remains; with the
    shipped bands every risky plan ranks after every plan with margin, and auto picks the fastest plan with margin."""
    from meshpilot.orchestrator.sim.error_bands import REGIMES, bands_from_rows, load_error_bands, regime_codes
    from meshpilot.orchestrator.sim.simulator import evaluate
    job = _job("model=llama-2-13b", "cluster=h100-sxm-4", "cluster.gpus_per_node=2", "train.global_batch=8",
               "train.seq_len=2048")
    res = search(job, top=3)
    s, cap = res.scores, 79.6 * 0.95
    bands = load_error_bands()
    band = bands.band_array(res.arrays)
    band_gib = bands.band_gib_of(regime_codes(res.arrays))
    assert np.array_equal(s.band, band)
    largest = s.memory["largest_request"] / 2**30
    expect_risky = ((s.peak_gib <= cap) & ((s.peak_gib + np.minimum(band * s.peak_gib, band_gib) >= cap)
                                           | (largest > cap - s.peak_gib)) & s.fits_cpu)
    assert np.array_equal(s.risky, expect_risky & s.fits) and s.risky.any()
    # an overlap_comm row no faster than its lean twin is not ranked (planner.dominated_overlap)
    from meshpilot.orchestrator.sim.planner import dominated_overlap
    margin = s.fits_margin & s.fits & ~dominated_overlap(res.arrays, s)
    n_margin = int(margin.sum())
    assert n_margin > 0 and set(res.ranked[:n_margin]) == set(np.flatnonzero(margin))
    # auto's choice is a plan with margin of the highest throughput among them (ties: the ranking's tie-break)
    top = int(res.ranked[0])
    assert res.best == res.arrays.plan(top) and margin[top]
    assert s.tokens_per_s[top] == np.max(s.tokens_per_s[margin])
    assert res.margin_note.startswith("margin: ") and "held-out run" in res.margin_note
    i = int(np.flatnonzero(s.risky)[0])
    est = simulate(job, res.arrays.plan(i), headroom=0.05)
    assert not est.fits_with_margin and est.fits and any(n.startswith("risky") for n in est.notes)
    assert est.regime == REGIMES[int(regime_codes(res.arrays)[i])]
    zero = bands_from_rows([(r, 1.0, 1.0) for r in REGIMES for _ in range(2)])
    flat = evaluate(job, res.arrays, headroom=0.05, bands=zero)
    assert np.array_equal(flat.risky, flat.fits & (largest > cap - flat.peak_gib))


def test_a_run_that_ran_out_of_memory_makes_its_plan_risky():
    """A held-out run predicted to fit that ran out of memory is scored as measured at the card; the band it sets
    reaches the card exactly from its own prediction, and the same plan must then be risky, not "fits with margin"
    (benchmarks/results/2026-11-30-s4-h200x2/regimes2, the ep=2 Mixtral that failed at its second step)."""
    from meshpilot.orchestrator.sim.error_bands import bands_from_rows
    job = load_job("benchmarks/configs/h200x2_check.yaml",
                   ["cluster.gpus_per_node=2", "plan.dp=2", "model=mixtral-8x7b", "model.layers=8",
                    "model.name=mixtral-8l", "plan.ep=2", "plan.zero_stage=1", "train.global_batch=16",
                    "plan.micro_batch=4", "plan.activation_checkpointing=full", "train.seq_len=2048"])
    plan = resolve_plan(job)
    e = simulate(job, plan)
    assert e.fits and e.regime == "expert_parallel"
    cap = job.cluster.gpu.memory_gib
    bands = bands_from_rows([("expert_parallel", cap, e.peak_memory_gib), ("expert_parallel", 80.0, 82.0)])
    from meshpilot.orchestrator.plan.codec import PlanArrays
    from meshpilot.orchestrator.sim.simulator import evaluate
    s = evaluate(job, PlanArrays.from_plans([plan], 2), bands=bands)
    assert s.margin_gib[0] == pytest.approx(cap - e.peak_memory_gib)      # the lesser of the two reaches the card
    assert s.fits[0] and not s.fits_margin[0] and s.risky[0]


def test_band_in_gib_and_relative_by_hand():
    """Two held-out ZeRO-3 rows: 20 GiB measured at 16 predicted (+25%, +4 GiB) and 125 at 124 (+0.8%, +1 GiB):
    the band is 25% or 4 GiB, whichever is less (a 100 GiB plan gets 4 GiB, a 10 GiB plan 2.5); a regime with
    one row takes the largest of each over the measured regimes."""
    from meshpilot.orchestrator.sim.error_bands import bands_from_rows
    b = bands_from_rows([("zero3", 20.0, 16.0), ("zero3", 125.0, 124.0), ("dense", 9.0, 10.0), ("dense", 10.5, 10.0),
                         ("tensor_parallel", 50.0, 40.0)])
    z = b.of("zero3")
    assert (z.band, z.band_gib, z.runs, z.measured) == (pytest.approx(0.25), pytest.approx(4.0), 2, True)
    assert z.margin_gib(100.0) == pytest.approx(4.0) and z.margin_gib(10.0) == pytest.approx(2.5)
    d = b.of("dense")
    assert (d.band, d.band_gib) == (pytest.approx(0.05), pytest.approx(0.5))
    tp = b.of("tensor_parallel")
    assert not tp.measured and (tp.band, tp.band_gib) == (pytest.approx(0.25), pytest.approx(4.0))


def test_host_band_from_measured_host_peaks_by_hand():
    """Host rows (measured, predicted) per node: 3.8 at 2.6 (+46%, +1.2 GiB) and 130 at 129 (+0.8%, +1 GiB): the host
    band is 46% or 1.2 GiB, whichever is less; a plan whose host peak plus that margin passes the node's usable
    memory is risky. Without host rows the host check takes the plan's relative GPU band."""
    from meshpilot.orchestrator.plan.codec import PlanArrays
    from meshpilot.orchestrator.sim.error_bands import bands_from_rows
    from meshpilot.orchestrator.sim.simulator import evaluate
    gpu_rows = [(r, 1.0, 1.0) for r in ("zero3", "optimizer_offload", "dense") for _ in range(2)]
    b = bands_from_rows(gpu_rows, host_rows=[(3.8, 2.6), (130.0, 129.0)])
    assert (b.host.runs, b.host.measured) == (2, True)
    assert (b.host.band, b.host.band_gib) == (pytest.approx(1.2 / 2.6), pytest.approx(1.2))
    codes = np.array([0, 0])
    assert b.host_margin_gib_of(codes, np.array([1.0, 200.0])) == pytest.approx([1.2 / 2.6, 1.2])
    # llama-2-7b ZeRO-2 + optimizer offload: the node's usable memory set just above its predicted host peak
    ov = ["cluster.gpus_per_node=2", "plan.dp=2", "model=llama-2-7b", "plan.zero_stage=2", "plan.offload_optimizer=cpu",
          "train.global_batch=16", "plan.micro_batch=8", "plan.activation_checkpointing=full", "train.seq_len=2048"]
    job = load_job("benchmarks/configs/h200x2_check.yaml", ov)
    host = simulate(job, resolve_plan(job)).cpu_memory_gib_per_node
    usable = host + 0.6                                  # 0.6 GiB above the prediction, below its 1.2 GiB margin
    c = SimulatorConstants()
    beside = c.node_base_gib + c.ray_node_gib            # what the node holds beside the workers
    tight = load_job("benchmarks/configs/h200x2_check.yaml",
                     [*ov, f"cluster.cpu_memory_gib={(usable + beside) / job.cluster.memory_usage_threshold}"])
    s = evaluate(tight, PlanArrays.from_plans([resolve_plan(tight)], 2), bands=b)
    assert s.fits[0] and s.risky[0] and s.host_margin_gib[0] == pytest.approx(1.2)
    roomy = bands_from_rows(gpu_rows, host_rows=[(1.0, 1.0), (2.0, 2.0)])
    assert not evaluate(tight, PlanArrays.from_plans([resolve_plan(tight)], 2), bands=roomy).risky[0]


def test_largest_request_beside_the_peak_by_hand():
    """The ep=2 Mixtral of 8 layers at ZeRO-1 (2026-11-30-s5 regimes6: ran its first step, failed at the second on a
    21.00 GiB request with 18.65 GiB cached in pieces). DeepSpeed keeps the experts in their own parameter group,
    not sharded by ZeRO at ep = dp = 2, so the step's fp32 copy of that group's gradients is 4 x 8 layers x 8 experts
    x 3 x 4096 x 14336 / 2 bytes = 21.0 GiB: more than the card's room above the predicted peak, so the plan is
    risky whatever its band."""
    from meshpilot.orchestrator.plan.codec import PlanArrays
    from meshpilot.orchestrator.sim.error_bands import REGIMES, bands_from_rows
    from meshpilot.orchestrator.sim.simulator import evaluate
    job = load_job("benchmarks/configs/h200x2_check.yaml",
                   ["cluster.gpus_per_node=2", "plan.dp=2", "model=mixtral-8x7b", "model.layers=8",
                    "model.name=mixtral-8l", "plan.ep=2", "plan.zero_stage=1", "train.global_batch=8",
                    "plan.micro_batch=2", "plan.activation_checkpointing=full", "train.seq_len=2048"])
    e = simulate(job, resolve_plan(job))
    experts = 8 * 8 * 3 * 4096 * 14336 // 2
    assert e.largest_request_gib == pytest.approx(4 * experts / 2**30, rel=1e-12)
    assert e.fits and e.largest_request_gib > job.cluster.gpu.memory_gib - e.peak_memory_gib
    assert not e.fits_with_margin and any(n.startswith("risky: its largest single allocation") for n in e.notes)
    # bands of zero would not rescue it
    zero = bands_from_rows([(r, 1.0, 1.0) for r in REGIMES for _ in range(2)])
    assert evaluate(job, PlanArrays.from_plans([resolve_plan(job)], 2), bands=zero).risky[0]
    # a 4-layer model of the same shapes has the room: its request (10.5 GiB) fits beside its peak
    small = load_job("benchmarks/configs/h200x2_check.yaml",
                     ["cluster.gpus_per_node=2", "plan.dp=2", "model=mixtral-8x7b", "model.layers=4",
                      "model.name=mixtral-4l", "plan.ep=2", "plan.zero_stage=1", "train.global_batch=8",
                      "plan.micro_batch=2", "plan.activation_checkpointing=full", "train.seq_len=2048"])
    s = simulate(small, resolve_plan(small))
    assert s.largest_request_gib == pytest.approx(e.largest_request_gib / 2, rel=1e-12)
    assert s.largest_request_gib <= small.cluster.gpu.memory_gib - s.peak_memory_gib


def test_dense_zero012_flat_copy_has_a_block_of_its_own():
    """A dense model's ZeRO 0-2 step copies its gradients to fp32 into the block DeepSpeed's optimizer-state
    initialisation left, of that exact size, each step (allocator histories, 2026-11-30-s6-h200x2): its largest
    request that may find no block is the loss's fp32 logits, 4 b s V. llama-3-8b ZeRO-2 at micro-batch 8 (ran at
    117.1 GiB, 126.4 predicted): 4 x 8 x 2048 x 128256 bytes, not its 15 GiB fp32 copy; ZeRO-3 keeps its sub-group."""
    base = ["cluster.gpus_per_node=2", "plan.dp=2", "model=llama-3-8b", "train.global_batch=16",
            "plan.micro_batch=8", "plan.activation_checkpointing=full", "train.seq_len=2048"]
    z2 = load_job("benchmarks/configs/h200x2_check.yaml", [*base, "plan.zero_stage=2"])
    e = simulate(z2, resolve_plan(z2))
    assert e.largest_request_gib == pytest.approx(4 * 8 * 2048 * 128256 / 2**30, rel=1e-12)
    assert not any(n.startswith("risky: its largest single allocation") for n in e.notes)
    # ZeRO-3 at micro-batch 1: its fp32 sub-group copy (4 min(P_s, sub_group_size)) is larger than the logits
    z3 = load_job("benchmarks/configs/h200x2_check.yaml", [*base, "plan.zero_stage=3", "plan.micro_batch=1"])
    assert simulate(z3, resolve_plan(z3)).largest_request_gib > 4 * 1 * 2048 * 128256 / 2**30


def test_zero3_with_overlap_comm_is_a_regime_of_its_own():
    """ZeRO-3 with overlap_comm gets its own band (sim/error_bands.py): the plan's comm_overlap or a
    ``train.deepspeed_extra`` overlap_comm puts a ZeRO-3 plan there, ZeRO-2 with overlap stays dense, offload takes
    precedence; the estimate's margin is that regime's shipped band."""
    from meshpilot.orchestrator.sim.error_bands import load_error_bands, regime_of
    base = ["model=llama-2-7b", "cluster=h100-sxm-4", "cluster.gpus_per_node=2", "train.global_batch=8",
            "plan.dp=2", "plan.micro_batch=1", "plan.activation_checkpointing=full"]
    cases = {("plan.zero_stage=3", "plan.comm_overlap=true"): "zero3_overlap",
             ("plan.zero_stage=3", "plan.comm_overlap=false"): "zero3",
             ("plan.zero_stage=3", "train.deepspeed_extra.zero_optimization.overlap_comm=true"): "zero3_overlap",
             ("plan.zero_stage=2", "plan.comm_overlap=true"): "dense",
             ("plan.zero_stage=3", "plan.comm_overlap=true", "plan.offload_optimizer=cpu"): "optimizer_offload"}
    bands = load_error_bands()
    for extra, want in cases.items():
        job = load_job(None, [*base, *extra])
        plan = resolve_plan(job)
        est = simulate(job, plan)
        assert regime_of(plan, 2, job) == est.regime == want, extra
        assert est.memory_margin_gib == pytest.approx(bands.of(want).margin_gib(est.peak_memory_gib)), extra
    assert regime_of(resolve_plan(load_job(None, [*base, "plan.zero_stage=3",
                                                   "train.deepspeed_extra.zero_optimization.overlap_comm=true"])), 2) == "zero3"
