"""MoE layer: router math, capacity/drops, and expert parallelism against the single-process layer.

Single-process tests check the layer against a per-token loop written from the formulas
(softmax router, top-k, renormalised gates, SwiGLU/GELU experts) and the router losses and
drop counts against hand-computed values on inputs whose routing is forced. Multi-process
tests (gloo, 2 and 4 ranks) run ep = 2 and 4, ep=2 with tp=2 (with and without sequence
parallelism) and ep=2 with expert-data-parallel replicas, and compare outputs and every
gradient (input, router, each expert, gathered over ep and tp) with the ep=1 layer run on
the concatenated batch.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from meshpilot.comm.groups import build_process_groups
from meshpilot.comm.layout import build_layout
from meshpilot.orchestrator.config.schema import ModelConfig
from meshpilot.orchestrator.errors import ConfigError
from meshpilot.strategies.init_utils import full_normal
from meshpilot.strategies.moe import MoEFeedForward
from meshpilot.strategies.router import expert_capacity
from meshpilot.strategies.weights import RandomWeights

SEED = 11
PREFIX = "layers.1.mlp"
STD = dict(init_std=0.5, out_init_std=0.5)     # O(1) outputs, so 1e-5 is a strict tolerance


def cfg(arch: str = "mixtral", experts: int = 4, k: int = 2, hidden: int = 16, ffn: int = 24,
        cf: float = 1.25) -> ModelConfig:
    return ModelConfig(name="t", arch=arch, layers=2, hidden=hidden, heads=2, ffn=ffn, vocab=32,
                       num_experts=experts, top_k=k, capacity_factor=cf)


def layer(m: ModelConfig, **kw) -> MoEFeedForward:
    kw.setdefault("ep_group", None)
    return MoEFeedForward(m, name_prefix=PREFIX, weights=RandomWeights(SEED), **STD, **kw)


# ---------------------------------------------------------------------------------------------
# single process

def naive(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop from the formulas, using the ep=1 layer's full weights (no capacity)."""
    out = []
    for tok in x.reshape(-1, moe.hidden):
        p = torch.softmax(tok.float() @ moe.router.weight.float().t(), -1)
        top_p, top_e = p.topk(moe.top_k)
        g = top_p / top_p.sum() if moe.normalize_top_k else top_p
        y = torch.zeros_like(tok)
        for gi, e in zip(g, top_e.tolist()):
            if moe.gated:
                a = F.silu(moe.w1[e] @ tok) * (moe.w3[e] @ tok)
                y = y + gi * (moe.w2[e] @ a)
            else:
                u = moe.fc1[e] @ tok + moe.fc1_bias[e]
                a = torch.relu(u) if moe.arch == "opt" else F.gelu(u, approximate="tanh")
                y = y + gi * (moe.fc2[e] @ a + moe.fc2_bias[e])
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("arch,k,compute", [("mixtral", 2, "loop"), ("llama", 2, "grouped"),
                                            ("gpt2", 1, "loop"), ("opt", 2, "grouped")])
def test_matches_per_token_reference(arch, k, compute):
    m = cfg(arch=arch, k=k, cf=8.0)
    moe = layer(m, expert_compute=compute)
    with torch.no_grad():                                  # non-zero biases, so they are exercised
        for n, p in moe.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, m.hidden, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 5, m.hidden, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (moe(x1) * w).sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters()}
    y = moe(x1.detach())
    moe.zero_grad()
    yr = naive(moe, x2)
    (yr * w).sum().backward()
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)
    assert moe.last_stats["dropped"].item() == 0
    assert moe.last_stats["tokens_per_expert"].sum().item() == 10 * k


def forced_input(m: ModelConfig, first: list[int], second: list[int], c1: float = 3.0, c2: float = 2.0):
    """Tokens whose router logits are c1 at expert first[t], c2 at second[t], 0 elsewhere."""
    x = torch.zeros(1, len(first), m.hidden)
    for t, (a, b) in enumerate(zip(first, second)):
        x[0, t, a] = c1
        x[0, t, b] = c2
    return x


def force_router(moe: MoEFeedForward) -> None:
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :moe.num_experts] = torch.eye(moe.num_experts)


# 8 tokens, 4 experts, top-2, capacity factor 1: C = ceil(1 * 8 * 2 / 4) = 4 per expert.
# First choices: tokens 0-5 -> e0, 6-7 -> e2; second choices: all -> e1.
# e0: 6 first choices, keeps tokens 0-3, drops 4,5; e1: 8 second choices (queued after
# first choices), keeps tokens 0-3, drops 4-7; e2: 2. Dropped 2 + 4 = 6, kept [4, 4, 2, 0].
FIRST, SECOND = [0, 0, 0, 0, 0, 0, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]
KEPT, DROPPED = [4, 4, 2, 0], 6


def test_capacity_drops_and_losses_hand_computed():
    m = cfg(cf=1.0)
    moe = layer(m)
    force_router(moe)
    x = forced_input(m, FIRST, SECOND)
    y = moe(x)
    st = moe.last_stats
    assert st["capacity"] == 4 == expert_capacity(8, 4, 2, 1.0)
    assert st["tokens_per_expert"].tolist() == KEPT
    assert st["dropped"].item() == DROPPED
    assert sum(KEPT) == 8 * 2 - DROPPED
    # tokens 4, 5 lost both assignments: exactly zero output
    assert torch.equal(y[0, 4], torch.zeros(m.hidden)) and torch.equal(y[0, 5], torch.zeros(m.hidden))
    # token 6 keeps only expert 2, at its renormalised gate e^3 / (e^3 + e^2)
    g = math.exp(3) / (math.exp(3) + math.exp(2))
    tok = x[0, 6]
    e2 = moe.w2[2] @ (F.silu(moe.w1[2] @ tok) * (moe.w3[2] @ tok))
    torch.testing.assert_close(y[0, 6], g * e2, atol=1e-6, rtol=1e-6)
    # token 0 keeps both
    e0 = moe.w2[0] @ (F.silu(moe.w1[0] @ x[0, 0]) * (moe.w3[0] @ x[0, 0]))
    e1 = moe.w2[1] @ (F.silu(moe.w1[1] @ x[0, 0]) * (moe.w3[1] @ x[0, 0]))
    torch.testing.assert_close(y[0, 0], g * e0 + (1 - g) * e1, atol=1e-6, rtol=1e-6)
    # losses: Z = e^3 + e^2 + 2 for every token; P_e = mean prob; f_e = choices / 16
    Z = math.exp(3) + math.exp(2) + 2
    P = [6 / 8 * math.exp(3) / Z + 2 / 8 * 1 / Z, math.exp(2) / Z,
         6 / 8 * 1 / Z + 2 / 8 * math.exp(3) / Z, 1 / Z]
    f = [6 / 16, 8 / 16, 2 / 16, 0]
    aux = 4 * sum(fe * pe for fe, pe in zip(f, P))
    z = math.log(Z) ** 2
    assert st["aux_loss"].item() == pytest.approx(aux, rel=1e-6)
    assert st["z_loss"].item() == pytest.approx(z, rel=1e-6)
    assert moe.last_aux_loss.item() == pytest.approx(0.01 * aux + 0.001 * z, rel=1e-6)


def test_uniform_router_losses():
    """Zero router: p = 1/E, so aux = E * sum_e f_e / E = 1 and z = (log E)^2 whatever the tie-breaking."""
    m = cfg(experts=8)
    moe = layer(m, aux_loss_coef=1.0, z_loss_coef=0.0)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(2, 3, m.hidden))
    assert moe.last_aux_loss.item() == pytest.approx(1.0, rel=1e-6)
    assert moe.last_stats["z_loss"].item() == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_config_errors_before_allocation():
    with pytest.raises(ConfigError, match="model.top_k"):
        layer(cfg(k=5))
    with pytest.raises(ConfigError, match="model.num_experts"):
        layer(cfg(experts=0))
    with pytest.raises(ConfigError, match="model.capacity_factor"):
        layer(cfg(cf=0.0))


def test_init_draws_full_named_weights():
    """Each expert is the full-model tensor named {prefix}.experts.{e}.<w>; the router is replicated."""
    full = layer(cfg(experts=8))
    for name, shape in (("w1", (24, 16)), ("w3", (24, 16)), ("w2", (16, 24))):
        for e in range(8):
            want = full_normal(f"{PREFIX}.experts.{e}.{name}", shape, 0.5, SEED)
            assert torch.equal(getattr(full, name)[e], want), (name, e)
    assert all(getattr(p, "meshpilot_expert", False) for n, p in full.named_parameters() if n != "router.weight")
    assert not getattr(full.router.weight, "meshpilot_expert", False)


# ---------------------------------------------------------------------------------------------
# multi-process (gloo)

def _gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = dist.get_world_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _summed(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _check_case(rank: int, world: int, case: dict) -> None:
    """One layout: the parallel layer on this rank's shard equals the ep=1 layer on the full batch."""
    dp, tp, ep, sp = case["dp"], case.get("tp", 1), case["ep"], case.get("sp", False)
    m = cfg(**case["model"])
    tag = f"rank {rank} case {case}"
    groups = build_process_groups(build_layout(dp=dp, tp=tp, ep=ep, gpus_per_node=world))
    per, seq = 2, 4
    g = torch.Generator().manual_seed(5)
    X = torch.randn(per * dp, seq, m.hidden, generator=g)
    W = torch.randn(per * dp, seq, m.hidden, generator=g)

    ref = layer(m)
    Xr = X.clone().requires_grad_()
    yr = ref(Xr)
    (yr * W).sum().backward()

    moe = layer(m, ep_group=groups.ep, tp_group=groups.tp, sequence_parallel=sp,
                expert_compute=case.get("compute", "auto"))
    rows = slice(groups.dp_rank * per, (groups.dp_rank + 1) * per)
    cols = slice(groups.tp_rank * seq // tp, (groups.tp_rank + 1) * seq // tp) if sp else slice(None)
    x = X[rows, cols].clone().requires_grad_()
    y = moe(x)
    (y * W[rows, cols]).sum().backward()

    torch.testing.assert_close(y, yr[rows, cols], atol=1e-5, rtol=1e-5, msg=f"{tag}: output")
    torch.testing.assert_close(x.grad, Xr.grad[rows, cols], atol=1e-5, rtol=1e-5, msg=f"{tag}: input grad")
    torch.testing.assert_close(_summed(moe.router.weight.grad, groups.dp), ref.router.weight.grad,
                               atol=1e-5, rtol=1e-5, msg=f"{tag}: router grad")
    for name, p in moe.named_parameters():
        if not getattr(p, "meshpilot_expert", False):
            continue
        grad = _summed(p.grad, groups.edp)                       # replicas saw different tokens
        grad = _gather_cat(grad, groups.ep, 0)                   # all experts
        if hasattr(p, "meshpilot_tp_dim"):
            grad = _gather_cat(grad, groups.tp, p.meshpilot_tp_dim)
        torch.testing.assert_close(grad, dict(ref.named_parameters())[name].grad, atol=1e-5, rtol=1e-5,
                                   msg=f"{tag}: grad of {name}")
    st = moe.last_stats
    counts = _summed(st["tokens_per_expert"], groups.edp)
    assert st["dropped"].item() == 0, tag
    assert counts.tolist() == ref.last_stats["tokens_per_expert"].tolist(), tag
    assert counts.sum().item() == X.shape[0] * X.shape[1] * m.top_k, tag     # conserved
    # the aux loss is over this rank's tokens: equal to the ep=1 layer's on the same tokens
    ref(X[rows].clone())
    assert moe.last_stats["aux_loss"].item() == pytest.approx(ref.last_stats["aux_loss"].item(), rel=1e-5)


def _check_drops(rank: int, world: int) -> None:
    """ep=2 with capacity exceeded: per-rank capacity, so each rank drops what ep=1 drops on its shard."""
    m = cfg(cf=1.0)
    groups = build_process_groups(build_layout(dp=world, ep=world, gpus_per_node=world))
    with pytest.raises(ConfigError, match="plan.ep"):           # 3 experts over 2 ranks
        layer(cfg(experts=3), ep_group=groups.ep)
    moe = layer(m, ep_group=groups.ep)
    ref = layer(m)
    force_router(moe)
    force_router(ref)
    # rank 1 swaps the roles of experts 0 and 3 and of 1 and 2 (its shard is the mirror image)
    mirror = (lambda e: e) if rank == 0 else (lambda e: 3 - e)
    x = forced_input(m, [mirror(e) for e in FIRST], [mirror(e) for e in SECOND])
    y = moe(x)
    yr = ref(x)
    torch.testing.assert_close(y, yr, atol=1e-6, rtol=1e-6)
    st = moe.last_stats
    assert st["capacity"] == 4
    assert st["dropped"].item() == 2 * DROPPED
    expected = [a + b for a, b in zip(KEPT, reversed(KEPT))]     # [4, 6, 6, 4]
    assert st["tokens_per_expert"].tolist() == expected
    assert sum(expected) == 2 * 8 * 2 - 2 * DROPPED


def _run_cases(rank: int, world: int, cases: list[dict]) -> None:
    for case in cases:
        _check_case(rank, world, case)


def _run_world2(rank: int, world: int) -> None:
    _run_cases(rank, world, [
        dict(dp=2, ep=2, model=dict(arch="mixtral", experts=4, k=2, cf=16.0)),
        dict(dp=2, ep=2, model=dict(arch="gpt2", experts=2, k=1, cf=16.0)),   # one expert per rank, GELU
    ])
    _check_drops(rank, world)


@pytest.mark.slow
def test_expert_parallel_two_ranks():
    run_distributed(_run_world2, 2, timeout=90)


WORLD4 = [
    dict(dp=4, ep=4, model=dict(arch="mixtral", experts=8, k=2, cf=32.0)),
    dict(dp=2, tp=2, ep=2, model=dict(arch="mixtral", experts=4, k=2, cf=16.0)),
    dict(dp=2, tp=2, ep=2, compute="grouped", model=dict(arch="mixtral", experts=4, k=2, cf=16.0)),
    dict(dp=2, tp=2, ep=2, sp=True, model=dict(arch="gpt2", experts=4, k=2, cf=16.0)),
    dict(dp=4, ep=2, model=dict(arch="llama", experts=4, k=2, cf=16.0)),     # edp replicas of 2
]


@pytest.mark.slow
def test_expert_parallel_four_ranks():
    run_distributed(_run_cases, 4, WORLD4, timeout=90)
