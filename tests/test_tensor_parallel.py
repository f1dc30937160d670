"""Tensor-parallel layers and communication on real gloo groups (tp = 2 and 4 in one world
of 4 processes), compared with the same layers built for a single process."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_distributed
from meshpilot.strategies.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                  vocab_parallel_cross_entropy)
from meshpilot.strategies.weights import RandomWeights
from meshpilot.strategies.tp_comm import (all_gather_no_grad, copy_to_tp_region, gather_from_sequence_region,
                                          gather_from_tp_region, reduce_from_tp_region,
                                          reduce_scatter_to_sequence_region, scatter_to_tp_region)

B, S, H, F_HID, OUT, V = 2, 8, 16, 24, 8, 250
SEED = 7


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(B, S, H, generator=g), c=torch.randn(B, S, OUT, generator=g),
                ids=torch.cat([torch.randint(0, V, (B, S - 2), generator=g), torch.tensor([[0, V - 1]] * B)], 1),
                logits=torch.randn(B, S, V, generator=g) * 3,
                labels=torch.randint(0, V, (B, S), generator=g).index_put_((torch.tensor([0, 1]),
                                                                           torch.tensor([3, 5])),
                                                                          torch.tensor(-100)),
                e=torch.randn(B, S, H, generator=g))


def _mlp(group, sp: bool):
    w = RandomWeights(SEED)
    col = ColumnParallelLinear(H, F_HID, name="t.col", weights=w, std=0.3, tp_group=group, bias=True,
                               sequence_parallel=sp)
    row = RowParallelLinear(F_HID, OUT, name="t.row", weights=w, std=0.3, tp_group=group, bias=True,
                            sequence_parallel=sp)
    return col, row


def _run_layers(group, inp, sp: bool):
    """Column -> GELU -> row, loss = sum(y * c); returns y, dL/dx and the reassembled weight grads."""
    t = 1 if group is None else dist.get_world_size(group)
    r = 0 if group is None else dist.get_rank(group)
    col, row = _mlp(group, sp)
    x = inp["x"].chunk(t, 1)[r] if sp else inp["x"]
    x = x.clone().requires_grad_(True)
    y = row(F.gelu(col(x)))
    c = inp["c"].chunk(t, 1)[r] if sp else inp["c"]
    (y * c).sum().backward()
    out = dict(y=y.detach(), dx=x.grad)
    if sp:   # reassemble the sequence shards
        out = {k: all_gather_no_grad(v, 1, group) for k, v in out.items()}
    for name, p, dim in (("col.w", col.weight, 0), ("col.b", col.bias, 0), ("row.w", row.weight, 1),
                         ("row.b", row.bias, None)):
        g = p.grad
        out[name] = g if dim is None or group is None else all_gather_no_grad(g, dim, group)
    return out


def _run_embedding_and_ce(group, inp):
    t = 1 if group is None else dist.get_world_size(group)
    emb = VocabParallelEmbedding(V, H, name="t.emb", weights=RandomWeights(SEED), std=1.0, tp_group=group)
    y = emb(inp["ids"])
    (y * inp["e"]).sum().backward()
    w_grad = emb.weight.grad if group is None else all_gather_no_grad(emb.weight.grad, 0, group)
    # cross-entropy from this rank's (padded) vocabulary slice
    logits = inp["logits"]
    v_pad = emb.vocab_padded
    padded = torch.cat([logits, torch.full((B, S, v_pad - V), 123.0)], -1)   # garbage in the padding
    local = padded.chunk(t, -1)[0 if group is None else dist.get_rank(group)].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, inp["labels"], tp_group=group, vocab_start=emb.vocab_start,
                                        vocab_size=V)
    (loss * torch.linspace(0.5, 1.5, S)).sum().backward()
    dlogits = local.grad if group is None else all_gather_no_grad(local.grad, -1, group)
    return dict(emb=y.detach(), emb_w=w_grad[:V], emb_pad_rows=w_grad[V:], v_pad=v_pad, ce=loss.detach(),
                dlogits=dlogits[..., :V], dlogits_pad=dlogits[..., V:])


def _run_comm(group, rank_in_group: int, t: int):
    """Hand-checkable forward/backward of each communication function."""
    out = {}
    x = torch.full((1, 2 * t, 3), float(rank_in_group + 1), requires_grad=True)
    y = gather_from_sequence_region(x, group)                      # [1, 2t*t, 3]
    w = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
    (y * w).sum().backward()
    out["gs"] = (y.detach(), x.grad.clone())
    x.grad = None
    z = reduce_scatter_to_sequence_region(x, group)                # [1, 2, 3]
    (z * (rank_in_group + 1)).sum().backward()
    out["rs"] = (z.detach(), x.grad.clone())
    x2 = torch.ones(2, 3, requires_grad=True)
    (copy_to_tp_region(x2, group) * (rank_in_group + 1)).sum().backward()
    out["copy"] = x2.grad.clone()
    x3 = torch.full((2, 3), float(rank_in_group + 1), requires_grad=True)
    r3 = reduce_from_tp_region(x3, group)
    (r3 * 2).sum().backward()
    out["reduce"] = (r3.detach(), x3.grad.clone())
    x4 = torch.arange(2.0 * t).repeat(2, 1).requires_grad_(True)
    s4 = scatter_to_tp_region(x4, group)
    g4 = gather_from_tp_region(s4 * (rank_in_group + 1), group)
    g4.sum().backward()
    out["scatter_gather"] = (s4.detach(), g4.detach(), x4.grad.clone())
    return out


def _worker(rank: int, world: int, inp: dict) -> dict:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2]}
    res = {}
    for t, g in groups.items():
        res[t] = dict(plain=_run_layers(g, inp, sp=False), sp=_run_layers(g, inp, sp=True),
                      emb_ce=_run_embedding_and_ce(g, inp), comm=_run_comm(g, dist.get_rank(g), t))
    return res


def _close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= 1e-5, f"{what}: max abs difference {err:.3g}"


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 4, _inputs(), timeout=90)


@pytest.mark.slow
@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_column_row_linear_match_single_process(results, t, sp):
    ref = _run_layers(None, _inputs(), sp=False)
    for rank in range(4):
        got = results[rank][t]["sp" if sp else "plain"]
        for k in ref:
            _close(got[k], ref[k], f"tp={t} sp={sp} rank={rank} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("t", [2, 4])
def test_vocab_parallel_embedding_and_cross_entropy(results, t):
    inp = _inputs()
    ref = _run_embedding_and_ce(None, inp)
    # the single-process reference itself against torch's cross-entropy
    logits = inp["logits"].clone().requires_grad_(True)
    ce = F.cross_entropy(logits.transpose(1, 2), inp["labels"], reduction="none", ignore_index=-100)
    (ce * torch.linspace(0.5, 1.5, S)).sum().backward()
    _close(ref["ce"], ce.detach(), "reference CE vs torch")
    _close(ref["dlogits"], logits.grad, "reference dCE vs torch")
    for rank in range(4):
        got = results[rank][t]["emb_ce"]
        assert got["v_pad"] == (252 if t == 4 else 250)          # 250 padded to a multiple of 4
        for k in ("emb", "emb_w", "ce", "dlogits"):
            _close(got[k], ref[k], f"tp={t} rank={rank} {k}")
        assert not got["emb_pad_rows"].any() and not got["dlogits_pad"].any()


@pytest.mark.slow
@pytest.mark.parametrize("t", [2, 4])
def test_communication_functions(results, t):
    for rank in range(4):
        r = rank % t
        c = results[rank][t]["comm"]
        # gather along the sequence: rank q's rows are filled with q+1; backward reduce-scatters
        # the weights w (equal on every rank): dx = t * w[rows of this rank]
        y, dx = c["gs"]
        expect = torch.cat([torch.full((1, 2 * t, 3), float(q + 1)) for q in range(t)], 1)
        _close(y, expect, "gather-seq fwd")
        w = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
        _close(dx, t * w.chunk(t, 1)[r], "gather-seq bwd")
        # reduce-scatter: sum over ranks = sum_q (q+1); backward all-gathers the upstream (q+1)
        z, dx = c["rs"]
        _close(z, torch.full((1, 2, 3), float(sum(q + 1 for q in range(t)))), "reduce-scatter fwd")
        _close(dx, torch.cat([torch.full((1, 2, 3), float(q + 1)) for q in range(t)], 1), "reduce-scatter bwd")
        # copy: identity forward, all-reduce backward
        _close(c["copy"], torch.full((2, 3), float(sum(q + 1 for q in range(t)))), "copy bwd")
        r3, d3 = c["reduce"]
        _close(r3, torch.full((2, 3), float(sum(q + 1 for q in range(t)))), "reduce fwd")
        _close(d3, torch.full((2, 3), 2.0), "reduce bwd")
        s4, g4, d4 = c["scatter_gather"]
        full = torch.arange(2.0 * t).repeat(2, 1)
        _close(s4, full[:, 2 * r:2 * r + 2], "scatter fwd")
        _close(g4, torch.cat([full[:, 2 * q:2 * q + 2] * (q + 1) for q in range(t)], 1), "gather fwd")
        # d(sum g4)/d s4 on rank r is (r+1) on its own columns; scatter's backward all-gathers them
        _close(d4, torch.cat([torch.full((2, 2), float(q + 1)) for q in range(t)], 1), "scatter/gather bwd")


def test_single_process_layers_are_plain_modules():
    col, row = _mlp(None, sp=False)
    assert isinstance(col, torch.nn.Linear) and isinstance(row, torch.nn.Linear)
    assert col.weight.shape == (F_HID, H) and row.weight.shape == (OUT, F_HID)
    assert col.weight.meshpilot_tp_dim == 0 and row.weight.meshpilot_tp_dim == 1
    x = _inputs()["x"]
    torch.testing.assert_close(row(col(x)), F.linear(F.linear(x, col.weight, col.bias), row.weight, row.bias))
