"""The fused Triton perturbation passes (strategies/zo/fused.py) against the PyTorch
composition of the same arithmetic, fed with the kernel's own directions.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the
flag is read when the kernel is defined), fp32 and fp16 only: the interpreter rounds
fp32 -> bf16 by truncation where the GPU rounds to nearest even. On a GPU (`gpu` mark): all
three dtypes, a MeZO step on the built-in model against the hand-computed update, the bf16
drift over 1,000 cycles, and ZO2 (streams, offloaded blocks) equal to MeZO bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from meshpilot.strategies.zo import fused

ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def check_passes(device: torch.device, dtypes) -> None:
    """Every pass kind on a 3-segment parameter (SEGMENT lowered) equals the PyTorch ops of
    mezo.py on z = fused.direction: plus/switch/restore bit for bit; the updates within one
    ulp of the dtype at the largest |theta| (the kernel may fuse a multiply-add)."""
    gen = torch.Generator().manual_seed(0)
    seed, eps, g, lr, wd = 2 ** 62 + 12345, 1e-3, 3.5, 0.01, 0.1
    for dtype in dtypes:
        x = (torch.randn(5003, generator=gen) * 0.02).to(dtype).to(device)
        z = fused.direction(seed, x.shape, x.device)
        assert z.dtype == torch.float32 and torch.equal(z, fused.direction(seed, x.shape, x.device))
        assert not torch.equal(z, fused.direction(seed + 1, x.shape, x.device))
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
        d = z * eps
        tol = ULP[dtype] * float(x.abs().max())    # one ulp at the largest |theta|
        ref = x.clone().add_(d)
        got = x.clone()
        fused.apply("plus", got, seed, eps)
        assert torch.equal(got, ref), dtype
        ref2 = ref.clone().add_(d, alpha=-1).add_(d, alpha=-1)
        fused.apply("switch", got, seed, eps)
        assert torch.equal(got, ref2), dtype
        ref3 = ref2.clone().add_(d)
        upd = (z * g).add_(ref3, alpha=wd)
        ref3.add_(upd, alpha=-lr)
        fused.apply("restore+update", got, seed, eps, g=g, lr=lr, wd=wd)
        torch.testing.assert_close(got.float(), ref3.float(), rtol=ULP[dtype], atol=tol)
        ref4 = x.clone().add_(z * g, alpha=-lr)
        got4 = x.clone()
        fused.apply("update", got4, seed, eps, g=g, lr=lr)
        torch.testing.assert_close(got4.float(), ref4.float(), rtol=ULP[dtype], atol=tol)


def check_segments(device: torch.device) -> None:
    """A parameter longer than SEGMENT is drawn in segments with their own keys: the first
    segment is the unsplit direction's prefix, the later ones differ from it."""
    old = fused.SEGMENT
    try:
        whole = fused.direction(77, (3000,), device)
        fused.SEGMENT = 1024
        split = fused.direction(77, (3000,), device)
    finally:
        fused.SEGMENT = old
    assert torch.equal(split[:1024], whole[:1024])
    assert not torch.equal(split[1024:2048], whole[1024:2048])
    assert [k for _, _, k in fused.segment_seeds(1, 3 * fused.SEGMENT + 5)] == [fused.SEGMENT] * 3 + [5]


def check_groups(device: torch.device, dtypes) -> None:
    """One grouped launch over several tensors (one split into segments, decay on some)
    equals the per-tensor kernel bit for bit, for every pass kind; the cache rebuilds its
    tables when a tensor moves."""
    from meshpilot.strategies.zo.mezo import ZOParam, param_seed
    old = fused.SEGMENT
    fused.SEGMENT = 2048
    try:
        gen = torch.Generator().manual_seed(1)
        for dtype in dtypes:
            shapes = [(3, 1000), (7,), (5000,), (64, 33)]
            ts = [(torch.randn(sh, generator=gen) * 0.02).to(dtype).to(device) for sh in shapes]
            zps = [ZOParam(k, f"p{k}", torch.nn.Parameter(t, requires_grad=False), k % 2 == 0)
                   for k, t in zip((0, 5, 2, 9), ts)]
            cache = fused.GroupCache()
            idx, dec = [zp.index for zp in zps], [zp.decay for zp in zps]
            # the cache hands out groups only for tensors on the fused path (CUDA); the interpreter
            # run builds the group directly
            grp = cache.get(ts, idx, dec) if device.type == "cuda" else fused.FusedGroup(ts, idx, dec)
            assert grp.programs == sum(-(-t.numel() // fused.BLOCK) for t in ts)
            ref = [t.clone() for t in ts]
            for s, (kind, g, lr) in enumerate([("plus", 0, 0), ("switch", 0, 0), ("restore+update", 2.5, 0.01),
                                               ("update", -1.0, 0.1), ("restore", 0, 0)]):
                seed = 2 ** 61 + 977 * s
                grp.apply(kind, seed, 1e-3, g=g, lr=lr, wd=0.1)
                for zp, r in zip(zps, ref):
                    fused.apply(kind, r, param_seed(seed, zp.index), 1e-3, g=g, lr=lr, wd=0.1 if zp.decay else 0.0)
                assert all(torch.equal(a, b) for a, b in zip(ts, ref)), (dtype, kind)
            if device.type == "cuda":
                assert cache.get(ts, idx, dec) is grp
                moved = [t.clone() for t in ts]
                assert cache.get(moved, idx, dec) is not grp
            else:
                assert cache.get(ts, idx, dec) is None
    finally:
        fused.SEGMENT = old


def test_fused_passes_in_the_triton_interpreter():
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, __file__], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "interpreted passes ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_kernel_choice_from_the_environment(monkeypatch):
    t = torch.zeros(4)
    assert not fused.enabled(t)                       # a CPU tensor always takes the PyTorch passes
    monkeypatch.setenv(fused.ENV, "cuda")
    if fused.triton is not None and torch.cuda.is_available():
        with pytest.raises(ValueError, match="MESHPILOT_ZO_KERNEL"):
            fused.enabled(t.cuda())


@pytest.mark.gpu
def test_fused_passes_on_gpu():
    check_passes(torch.device("cuda"), (torch.float32, torch.bfloat16, torch.float16))
    check_segments(torch.device("cuda"))
    check_groups(torch.device("cuda"), (torch.float32, torch.bfloat16, torch.float16))


@pytest.mark.gpu
def test_fused_bf16_drift_over_1000_cycles():
    """The bounds stated in mezo.py for the PyTorch passes hold for the kernel (bf16, N(0, 0.02^2)
    weights, eps = 1e-3, a fresh seed per cycle)."""
    x = (torch.randn(20000, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16).cuda()
    x0 = x.clone()
    for s in range(1000):
        for kind in ("plus", "switch", "restore"):
            fused.apply(kind, x, 1000 + s, 1e-3)
    drift = (x.double() - x0.double()).abs()
    assert float(drift.mean()) < 2.5e-4 and float(drift.max()) < 8e-3 and (drift == 0).float().mean() > 0.4


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_zo2_equals_mezo_bitwise_on_gpu(preset):
    """On a GPU (fused kernel, three CUDA streams, pinned host stores) ZO2 reproduces plain
    MeZO's losses, g and final parameters exactly, and a step moves a weight by the
    hand-computed -lr g z."""
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.orchestrator.config.models import model_preset
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model
    from meshpilot.strategies.zo import MeZO, MeZOTrainer, ZO2, direction, param_checksum, zo_parameters

    cfg = ModelConfig(**model_preset(preset))
    m1 = build_model(cfg, Plan(zo_mode="mezo"), None, seed=3).cuda()
    m2 = build_model(cfg, Plan(zo_mode="mezo"), None, seed=3)
    t1 = MeZOTrainer(m1, MeZO(m1, lr=0.02, eps=1e-3, weight_decay=0.1, seed=7))
    t2 = ZO2(m2, lr=0.02, eps=1e-3, weight_decay=0.1, seed=7, device="cuda")
    p = next(zp for zp in t1.opt.params if zp.name.endswith("mlp.up_proj.weight"))
    before = p.param.detach().clone()
    gen = torch.Generator().manual_seed(0)
    for s in range(4):
        ids = torch.randint(0, cfg.vocab, (2, 16), generator=gen)
        lab = torch.roll(ids, -1, 1)
        a, b = t1.step(ids.cuda(), lab.cuda()), t2.step(ids, lab)
        assert (a.loss_plus, a.loss_minus, a.g, a.seed) == (b.loss_plus, b.loss_minus, b.g, b.seed)
        if s == 0:   # up_proj.weight decays: theta <- theta - lr (g z + wd theta)
            expect = before - 0.02 * (a.g * direction(a.seed, p) + 0.1 * before)
            torch.testing.assert_close(p.param.detach(), expect, rtol=0, atol=2e-7)
    t2.flush()
    t2.materialize()
    assert param_checksum(zo_parameters(m1)) == param_checksum(zo_parameters(m2))


if __name__ == "__main__":       # run by test_fused_passes_in_the_triton_interpreter
    check_passes(torch.device("cpu"), (torch.float32, torch.float16))
    check_segments(torch.device("cpu"))
    check_groups(torch.device("cpu"), (torch.float32, torch.float16))
    print("interpreted passes ok")
