"""The plan object: validation messages and rank layouts against hand-written expectations."""
from __future__ import annotations

import pytest

from meshpilot.comm.layout import build_layout
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.orchestrator.config.loader import job_from_dict
from meshpilot.orchestrator.plan.plan import Plan, resolve_plan

JOB = {"model": "llama-2-7b", "cluster": "h100-sxm-4",
       "train": {"seq_len": 2048, "global_batch": 16},
       "plan": {"dp": 2, "tp": 2, "zero_stage": 2, "micro_batch": 4}}


def plan(*overrides, base=JOB):
    return resolve_plan(job_from_dict(base, list(overrides)))


def reject(*overrides, base=JOB):
    with pytest.raises(ConfigError) as e:
        plan(*overrides, base=base)
    return e.value


def test_resolves_and_derives_accumulation():
    p = plan()
    assert (p.dp, p.tp, p.micro_batch, p.grad_accum, p.world_size) == (2, 2, 4, 2, 4)
    assert p.global_batch() == 16


def test_defaults_fill_the_cluster():
    p = plan("plan={}", "plan.tp=2")
    assert (p.dp, p.tp, p.micro_batch, p.grad_accum) == (2, 2, 8, 1)


def test_job_may_use_fewer_gpus_than_the_cluster():
    p = plan("plan.dp=1", "plan.tp=2", "plan.micro_batch=16")
    assert p.world_size == 2


def test_plan_is_pure_and_hashable():
    p = plan()
    assert p == Plan(**{**p.__dict__}) and hash(p) == hash(p.replace())
    assert p.to_config()["zo"]["mode"] == "none"


@pytest.mark.parametrize("overrides, key, words", [
    (["plan.dp=4"], "plan.dp", ["needs 8 GPUs", "dp=4 x tp=2", "has 4"]),
    (["plan.tp=3", "plan.dp=1"], "plan.tp", ["must divide model.heads=32", "1, 2, 4"]),
    (["cluster=dgx-h100", "plan.tp=16", "plan.dp=1", "plan.micro_batch=16"], "plan.tp", ["span nodes", "1, 2, 4, 8"]),
    (["model.kv_heads=8", "plan.tp=4", "plan.dp=1", "model.ffn=11002"], "plan.tp", ["model.ffn=11002"]),
    (["plan.micro_batch=3"], "plan.micro_batch", ["global_batch=16", "1, 2, 4, 8"]),
    (["plan.offload_params=cpu"], "plan.offload_params", ["zero_stage=3"]),
    (["plan.zero_stage=0", "plan.offload_optimizer=cpu"], "plan.offload_optimizer", ["zero_stage>=1"]),
    (["plan.ep=2"], "plan.ep", ["MoE model"]),
    (["plan.sequence_parallel=true", "plan.tp=1", "plan.dp=4"], "plan.sequence_parallel", ["tp > 1"]),
    (["train.optimizer=zo-sgd"], "plan.zero_stage", ["zeroth-order", "plan.zero_stage=0"]),
    (["plan.zo.mode=mezo"], "train.optimizer", ["zo-sgd"]),
    (["train.optimizer=zo-sgd", "plan.zo.mode=mezo", "plan.zero_stage=0", "plan.tp=1"], "plan.dp",
     ["plan.zo.dp"]),
    (["train.optimizer=sgd", "plan.offload_optimizer=cpu"], "plan.offload_optimizer", ["CPUAdam"]),
])
def test_rejections_name_key_and_fix(overrides, key, words):
    e = reject(*overrides)
    assert e.key == key, str(e)
    for w in words:
        assert w in str(e), str(e)


def test_expert_parallel_degree_rules():
    moe = {**JOB, "model": "mixtral-8x7b", "plan": {"dp": 4, "tp": 1, "zero_stage": 2, "micro_batch": 4}}
    assert plan("plan.ep=4", base=moe).ep == 4
    assert "num_experts=8" in str(reject("plan.ep=3", base=moe))
    e = reject("plan.ep=4", "plan.dp=2", "plan.tp=2", "plan.micro_batch=8", base=moe)
    assert e.key == "plan.ep" and "plan.dp=2" in str(e)


def test_zeroth_order_plan_world_size():
    zo = {**JOB, "train": {"seq_len": 2048, "global_batch": 16, "optimizer": "zo-sgd"},
          "plan": {"zo": {"mode": "zo2", "pertp": 2, "dp": 2}}}
    p = plan(base=zo)
    assert p.zeroth_order and p.world_size == 4 and p.data_parallel == 2 and p.micro_batch == 8
    e = reject("plan.zo.dp=4", base=zo)
    assert e.key == "plan.zo.dp" and "needs 8 GPUs" in str(e)


# --- rank layouts --------------------------------------------------------------------------

def test_layout_dp2_tp2():
    lay = build_layout(dp=2, tp=2, gpus_per_node=4)
    assert lay.tp_groups == ((0, 1), (2, 3))
    assert lay.dp_groups == ((0, 2), (1, 3))
    g = lay.groups_of(3)
    assert (g.tp, g.dp, g.tp_rank, g.dp_rank, g.node) == ((2, 3), (1, 3), 1, 1, 0)


def test_layout_tp4_dp4_across_two_nodes():
    lay = build_layout(dp=4, tp=4, gpus_per_node=8)
    assert lay.tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert lay.dp_groups[0] == (0, 4, 8, 12) and lay.dp_groups[3] == (3, 7, 11, 15)
    assert not any(lay.spans_nodes(g) for g in lay.tp_groups)
    assert all(lay.spans_nodes(g) for g in lay.dp_groups)
    assert [lay.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]


def test_layout_expert_parallel_dp4_ep2():
    lay = build_layout(dp=4, tp=1, ep=2, gpus_per_node=4)
    assert lay.ep_groups == ((0, 1), (2, 3))
    assert lay.edp_groups == ((0, 2), (1, 3))
    g = lay.groups_of(2)
    assert (g.ep, g.edp, g.ep_rank) == ((2, 3), (0, 2), 0)


def test_layout_expert_parallel_with_tp():
    lay = build_layout(dp=4, tp=2, ep=4, gpus_per_node=8)
    # dp columns are (0,2,4,6) and (1,3,5,7); ep re-divides each whole column; no expert replicas
    assert lay.ep_groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert lay.edp_groups == tuple((r,) for r in range(8))


def test_layout_zeroth_order_2d():
    lay = build_layout(dp=1, pertp=2, zo_dp=2, zeroth_order=True, gpus_per_node=4)
    assert lay.zo_pert_groups == ((0, 1), (2, 3))
    assert lay.zo_dp_groups == ((0, 2), (1, 3))
    assert [lay.groups_of(r).zo_sign for r in range(4)] == [1, -1, 1, -1]


def test_every_rank_in_exactly_one_group_of_each_kind():
    for dp, tp, ep in [(8, 1, 1), (4, 2, 2), (2, 4, 1), (8, 2, 4), (16, 1, 8)]:
        lay = build_layout(dp=dp, tp=tp, ep=ep, gpus_per_node=8)
        for kind, groups in lay.all_group_kinds().items():
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(dp * tp)), (dp, tp, ep, kind)


def test_fingerprint_differs_between_layouts():
    a = build_layout(dp=4, tp=2, gpus_per_node=8).fingerprint()
    assert a == build_layout(dp=4, tp=2, gpus_per_node=8).fingerprint()
    assert a != build_layout(dp=2, tp=4, gpus_per_node=8).fingerprint()


def test_moe_under_zero3_is_refused_before_deepspeed_asserts():
    e = reject("model=tiny-mixtral", "plan.tp=1", "plan.dp=4", "plan.zero_stage=3")
    assert e.key == "plan.zero_stage" and "MoE" in str(e) and "0, 1 or 2" in str(e)
    assert plan("model=tiny-mixtral", "plan.tp=1", "plan.dp=4", "plan.zero_stage=2").zero_stage == 2


# --- text forms and the columnar codec --------------------------------------------------------

def test_checkpoint_fingerprints_and_summaries_are_unchanged():
    """Values computed by the checkpoint module before choices became enums: checkpoints written then resume."""
    from meshpilot.orchestrator.plan import text
    p = Plan(dp=2, zero_stage=3, offload_optimizer="cpu", offload_params="cpu", micro_batch=2, grad_accum=2,
             activation_checkpointing="full")
    assert text.fingerprint(p) == "3835cbbbc394"
    assert text.summary(p) == ("dp=2 tp=1 ep=1 zero_stage=3 offload_optimizer=cpu offload_params=cpu micro_batch=2 "
                               "activation_checkpointing=full sequence_parallel=False grad_accum=2 zo=none")
    assert text.fingerprint(Plan(zo_mode="zo2", zo_pertp=2, zo_dp=2, micro_batch=4)) == "3d907c23df5a"
    loaded = resolve_plan(job_from_dict({"model": "tiny-llama", "cluster": "h100-sxm-4",
                                         "train": {"seq_len": 64, "global_batch": 8}, "plan": {"dp": 2}}))
    assert text.fingerprint(loaded) == "83ce816779d7"
    from meshpilot.orchestrator.train.checkpoint import plan_fingerprint, plan_summary
    assert (plan_fingerprint, plan_summary) == (text.fingerprint, text.summary)


def test_choices_given_as_strings_become_members():
    from meshpilot.orchestrator.config.schema import Offload, ZOMode
    p = Plan(offload_optimizer="cpu", zo_mode="none")
    assert p.offload_optimizer is Offload.CPU and p.zo_mode is ZOMode.NONE and p == Plan(offload_optimizer=Offload.CPU)
    assert p.to_config()["offload_optimizer"] == "cpu" and type(p.to_config()["offload_optimizer"]) is str
    with pytest.raises(ValueError):
        Plan(offload_params="nvme")


def test_codec_round_trip_and_rules_shared_with_plan():
    from meshpilot.orchestrator.plan.codec import PlanArrays, PlanColumns, encode
    plans = [Plan(dp=2, tp=2, zero_stage=3, offload_params="cpu", micro_batch=2, grad_accum=2, sequence_parallel=True),
             Plan(dp=8, ep=2, zero_stage=1, offload_optimizer="cpu", activation_checkpointing="full"),
             Plan(zo_mode="mezo", zo_pertp=2, zo_dp=2), Plan(zo_mode="zo2", zo_dp=4), Plan(zo_mode="zo2", zo_dp=8),
             Plan(zo_mode="zo2")]
    a = PlanArrays.from_plans(plans, gpus_per_node=4)
    for i, p in enumerate(plans):
        assert a.plan(i) == p and a.find(p) == i
        assert a.world[i] == p.world_size and a.zo2_slices[i] == p.zo2_upload_slices(4)
        assert (a.zeroth_order[i], a.zo2[i], a.offloads_optimizer[i], a.offloads_params[i],
                a.checkpoints_activations[i]) == (p.zeroth_order, p.zo2, p.offloads_optimizer, p.offloads_params,
                                                  p.checkpoints_activations)
    assert [int(x) for x in a.zo2_slices] == [1, 1, 1, 4, 1, 1]       # 8 ranks span two nodes; one rank: whole
    # variants appended without a Plan per row equal the explicit plans
    cols = PlanColumns()
    cols.append_variants(plans[0], [(1, 4), (2, 2)], [False, True])
    b = cols.build(4)
    explicit = [plans[0].replace(micro_batch=mb, grad_accum=ga, activation_checkpointing="full" if ac else "none")
                for (mb, ga) in [(1, 4), (2, 2)] for ac in (False, True)]
    assert [b.plan(i) for i in range(b.n)] == explicit
    assert [encode(p) for p in explicit] == [encode(b.plan(i)) for i in range(b.n)]
