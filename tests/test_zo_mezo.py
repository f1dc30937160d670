"""MeZO and ZO2 on one process: the step's arithmetic against hand-computed values,
perturb/restore numerics, tied weights, weight-decay rule, checkpoint state, and ZO2's
block-by-block path (CPU, no streams) against plain MeZO bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from meshpilot.orchestrator.config.schema import ModelConfig
from meshpilot.orchestrator.config.models import model_preset
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.strategies.model import build_model
from meshpilot.strategies.zo import MeZO, MeZOTrainer, ZO2, build_zo_trainer, direction, param_checksum, \
    step_seed, zo_parameters
from meshpilot.strategies.zo import mezo as mezo_mod
from meshpilot.strategies.zo.mezo import _add_, perturb_plus, perturb_restore, perturb_switch


class Quadratic(nn.Module):
    """L(theta) = 0.5 |w - c|^2 + 0.5 |b - e|^2 in float64: SPSA is exact for a quadratic,
    (L(theta + eps z) - L(theta - eps z)) / (2 eps) = z . grad L(theta)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
        self.c = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        self.e = torch.randn(4, generator=gen, dtype=torch.float64)

    def forward(self) -> torch.Tensor:
        return 0.5 * ((self.w - self.c) ** 2).sum() + 0.5 * ((self.bias - self.e) ** 2).sum()


def test_step_matches_hand_computed_update():
    m = Quadratic()
    w0, b0 = m.w.detach().clone(), m.bias.detach().clone()
    lr, wd, eps = 0.05, 0.1, 1e-3
    opt = MeZO(m, lr=lr, eps=eps, weight_decay=wd, seed=11)
    r = opt.step(m)
    params = opt.params
    assert [p.name for p in params] == ["w", "bias"] and params[0].decay and not params[1].decay
    zw, zb = (direction(r.seed, p).double() for p in params)
    g = float((zw * (w0 - m.c)).sum() + (zb * (b0 - m.e)).sum())
    assert r.g == pytest.approx(g, rel=1e-6)
    assert r.seed == step_seed(11, 0)
    # theta <- theta - lr (g z + wd theta), no decay on the bias
    torch.testing.assert_close(m.w.detach(), w0 - lr * (r.g * zw + wd * w0), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.bias.detach(), b0 - lr * r.g * zb, rtol=0, atol=1e-12)
    # L+ - L- = 2 eps z.grad, and (L+ + L-)/2 = L(theta) + eps^2 |z|^2 / 2
    L0 = 0.5 * float(((w0 - m.c) ** 2).sum() + ((b0 - m.e) ** 2).sum())
    assert r.loss == pytest.approx(L0 + 0.5 * eps ** 2 * float((zw ** 2).sum() + (zb ** 2).sum()), rel=1e-9)


def test_directions_regenerate_and_differ():
    m = Quadratic()
    p = zo_parameters(m)
    assert torch.equal(direction(5, p[0]), direction(5, p[0]))
    assert not torch.equal(direction(5, p[0]), direction(6, p[0]))
    assert direction(5, p[0]).dtype == torch.float32
    z = torch.cat([direction(s, p[0]).flatten() for s in range(200)])
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    assert len({step_seed(1, s) for s in range(1000)}) == 1000


def test_descends_a_quadratic():
    m = Quadratic()
    opt = MeZO(m, lr=0.02, eps=1e-3, seed=0)
    with torch.no_grad():
        start = float(m())
        for _ in range(300):
            opt.step(m)
        assert float(m()) < 0.2 * start


def test_tied_weight_is_perturbed_once():
    cfg = ModelConfig(**model_preset("tiny-gpt2"))
    model = build_model(cfg, Plan(zo_mode="mezo"), None, seed=0)
    names = [p.name for p in zo_parameters(model)]
    assert "tok_embed.weight" in names and not any("lm_head" in n for n in names)
    assert len(names) == len({id(p.param) for p in zo_parameters(model)})
    decay = {p.name: p.decay for p in zo_parameters(model)}
    assert decay["tok_embed.weight"] and decay["blocks.0.attn.q_proj.weight"]
    assert not decay["blocks.0.attn.q_proj.bias"] and not decay["final_norm.weight"]
    assert not decay["blocks.0.attn_norm.bias"]

    class TiedViews(nn.Module):        # two Parameter objects over one storage
        def __init__(self):
            super().__init__()
            base = torch.zeros(4, 4)
            self.a = nn.Parameter(base)
            self.b = nn.Parameter(base)
    assert [p.name for p in zo_parameters(TiedViews())] == ["a"]


def _perturb_cycles(dtype: torch.dtype, n: int, numel: int = 20000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    th = (torch.randn(numel, generator=gen) * 0.02).to(dtype)
    th0 = th.clone()
    for _ in range(n):
        d = torch.randn(numel, generator=gen) * 1e-3
        perturb_plus(th, d)
        perturb_switch(th, d)
        perturb_restore(th, d)
    return (th.double() - th0.double()).abs()


def test_perturb_restore_fp32_single_cycle_mostly_exact():
    drift = _perturb_cycles(torch.float32, 1)
    assert (drift == 0).float().mean() > 0.8       # measured 0.89
    assert float(drift.max()) <= 2 * 2.0 ** -24 * 0.2   # <= 2 ulp at the largest |theta| ~ 0.1


def test_perturb_restore_drift_1000_cycles():
    """Stated bounds (module notes of mezo.py), weights N(0, 0.02^2), eps = 1e-3, 1,000 cycles."""
    f32 = _perturb_cycles(torch.float32, 1000)
    assert float(f32.max()) < 1e-6 and float(f32.mean()) < 1e-8
    bf = _perturb_cycles(torch.bfloat16, 1000)
    assert float(bf.mean()) < 2.5e-4 and float(bf.max()) < 8e-3
    assert (bf == 0).float().mean() > 0.4


def test_state_dict_resumes_the_same_trajectory():
    a, b = Quadratic(), Quadratic()
    oa = MeZO(a, lr=0.01, seed=3)
    for _ in range(5):
        oa.step(a)
    ob = MeZO(b, lr=0.01, seed=999)
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(oa.state_dict())
    ra, rb = oa.step(a), ob.step(b)
    assert (ra.seed, ra.g, ra.step) == (rb.seed, rb.g, 5)
    assert torch.equal(a.w, b.w)


def test_hf_style_output_and_lr_schedule():
    class HFStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Quadratic()

        def forward(self):
            return type("Out", (), {"loss": self.inner(), "logits": None})()

    m = HFStyle()
    opt = MeZO(m, lr=lambda step: 0.1 / (step + 1), seed=0)
    assert [opt.step(m).lr for _ in range(3)] == [0.1, 0.05, pytest.approx(0.1 / 3)]


def _tiny(preset: str, dtype=torch.float32):
    cfg = ModelConfig(**model_preset(preset))
    return build_model(cfg, Plan(zo_mode="mezo"), None, seed=3, dtype=dtype), cfg


def _batch(cfg, b=2, s=16, seed=0):
    ids = torch.randint(0, cfg.vocab, (b, s), generator=torch.Generator().manual_seed(seed))
    lab = torch.roll(ids, -1, 1)
    lab[:, -1] = -100
    return ids, lab


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-mixtral"])
def test_zo2_equals_mezo_bitwise(preset, monkeypatch):
    """Losses, g and final parameters of ZO2 (blocks offloaded, update deferred, CPU path)
    are exactly those of plain MeZO with the same seeds; the lr of the deferred update is
    the one of the step that computed g (a schedule that changes every step). Small
    generator chunks, so that parameters span several chunks of z; tiny-mixtral checks that
    the MoE auxiliary loss of each perturbed pass reaches its own head_loss."""
    monkeypatch.setattr(mezo_mod, "CHUNK", 1000)
    (m1, cfg), (m2, _) = _tiny(preset), _tiny(preset)
    sched = lambda s: 0.02 * (0.5 ** s)   # noqa: E731
    t1 = MeZOTrainer(m1, MeZO(m1, lr=sched, eps=1e-3, weight_decay=0.1, seed=7))
    t2 = ZO2(m2, lr=sched, eps=1e-3, weight_decay=0.1, seed=7, device="cpu")
    store_ptrs = {t2.stores[i].data_ptr() for i in range(len(t2.stores))}
    assert all(p.untyped_storage().data_ptr() in store_ptrs for p in m2.blocks.parameters())  # host store
    for s in range(4):
        ids, lab = _batch(cfg, seed=s)
        a, b = t1.step(ids, lab), t2.step(ids, lab)
        assert (a.loss_plus, a.loss_minus, a.g, a.seed) == (b.loss_plus, b.loss_minus, b.g, b.seed)
    ids, lab = _batch(cfg, seed=99)
    assert t2.evaluate(ids, lab) == t1.evaluate(ids, lab)    # evaluate flushes the last update
    sd1, sd2 = m1.state_dict(), m2.state_dict()               # host views: current after the flush
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    t2.materialize()
    assert param_checksum(zo_parameters(m1)) == param_checksum(zo_parameters(m2))


def test_zo2_flush_applies_the_last_update_once():
    (m1, cfg), (m2, _) = _tiny("tiny-gpt2"), _tiny("tiny-gpt2")
    ref = {n: p.detach().clone() for n, p in m1.named_parameters()}
    t2 = ZO2(m2, lr=0.05, eps=1e-3, seed=1, device="cpu")
    r = t2.step(*_batch(cfg))
    t2.flush()
    t2.flush()                                  # idempotent
    t2.materialize()
    got = dict(m2.named_parameters())
    p = next(zp for zp in t2.params if zp.name == "blocks.1.mlp.up_proj.weight")
    expect = ref[p.name] - 0.05 * r.g * direction(r.seed, p, ref[p.name])
    torch.testing.assert_close(got[p.name].detach(), expect, rtol=0, atol=2e-7)


def test_build_zo_trainer_single_process():
    m, cfg = _tiny("tiny-llama")
    t = build_zo_trainer(m, Plan(zo_mode="mezo"), None, lr=1e-3, seed=0)
    assert isinstance(t, MeZOTrainer) and math.isfinite(t.step(*_batch(cfg)).loss)
    m2, _ = _tiny("tiny-llama")
    t2 = build_zo_trainer(m2, Plan(zo_mode="zo2"), None, lr=1e-3, seed=0, device="cpu")
    assert isinstance(t2, ZO2) and t2.state_dict()["step"] == 0
    with pytest.raises(ValueError):
        build_zo_trainer(m, Plan(), None, lr=1e-3)


def test_zo2_full_state_round_trip():
    """full_state gathers the offloaded blocks (after the deferred update); load_full_state
    puts a checkpoint back into the host stores, and training continues bit-identically."""
    (m1, cfg), (m2, _), (m3, _) = _tiny("tiny-gpt2"), _tiny("tiny-gpt2"), _tiny("tiny-gpt2")
    t1 = ZO2(m1, lr=0.02, eps=1e-3, seed=4, device="cpu")
    for s in range(2):
        t1.step(*_batch(cfg, seed=s))
    state, opt_state = t1.full_state(), t1.state_dict()
    ref = MeZOTrainer(m3, MeZO(m3, lr=0.02, eps=1e-3, seed=4))
    for s in range(2):
        ref.step(*_batch(cfg, seed=s))
    assert set(state) == set(ref.full_state())
    assert all(torch.equal(state[k], v) for k, v in ref.full_state().items())
    t2 = ZO2(m2, lr=0.02, eps=1e-3, seed=0, device="cpu")
    t2.load_full_state(state)
    t2.load_state_dict(opt_state)
    a, b = t1.step(*_batch(cfg, seed=9)), t2.step(*_batch(cfg, seed=9))
    assert (a.loss_plus, a.loss_minus, a.g) == (b.loss_plus, b.loss_minus, b.g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtype_add_rounds_once_like_an_fp32_copy(dtype):
    """The passes add an fp32 d to a bf16/fp16 parameter in place; that must equal computing
    in fp32 and rounding once (the arithmetic the module docstring states)."""
    gen = torch.Generator().manual_seed(3)
    t = (torch.randn(100_003, generator=gen) * 0.02).to(dtype)
    d = torch.randn(100_003, generator=gen) * 1e-3
    for alpha in (1.0, -1.0, -0.37):
        fast = t.clone()
        _add_(fast, d, alpha)
        slow = t.clone()
        slow.copy_(slow.float().add_(d, alpha=alpha))
        assert torch.equal(fast, slow)
