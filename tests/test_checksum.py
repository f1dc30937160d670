"""The run's closing parameter checksum: the same number as summing full float64 copies, without them."""
from __future__ import annotations

import pytest
import torch

from meshpilot.strategies.checksum import tensor_sum64


def test_tensor_sum64_equals_the_float64_sum_at_any_chunk():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1000, 37, generator=g).to(torch.bfloat16)
    ref = float(t.double().sum())                           # exact bf16 values, summed in float64
    for chunk in (1, 7, 1000, 37_000, 1 << 24):
        assert abs(tensor_sum64(t, chunk=chunk) - ref) <= 1e-9 * float(t.double().abs().sum())
    # hand-computed: 1.5 + 2.25 - 0.125 over a strided (non-contiguous) view
    x = torch.tensor([[1.5, 9.0], [2.25, 9.0], [-0.125, 9.0]], dtype=torch.bfloat16)[:, 0]
    assert tensor_sum64(x, chunk=2) == 3.625


@pytest.mark.parametrize("mode", ["mezo", "zo2"])
def test_zo_trainer_full_sum_matches_its_full_state(mode):
    """The zeroth-order checksum (MeZO in place, ZO2 block slot by block slot, after one step with its
    update still deferred) equals the float64 sum over the full state it no longer copies."""
    from meshpilot.orchestrator.config.models import model_preset
    from meshpilot.orchestrator.config.schema import ModelConfig
    from meshpilot.orchestrator.plan.plan import Plan
    from meshpilot.strategies.model import build_model
    from meshpilot.strategies.zo import build_zo_trainer
    cfg = ModelConfig(**model_preset("tiny-llama"))
    model = build_model(cfg, Plan(zo_mode="mezo"), None, seed=3)
    t = build_zo_trainer(model, Plan(zo_mode=mode), None, lr=0.05, seed=1, device="cpu")
    ids = torch.randint(0, cfg.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    t.step(ids, torch.roll(ids, -1, 1))
    got = t.full_sum()
    ref = sum(float(v.double().sum()) for v in t.full_state().values())
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-9)
    assert got != pytest.approx(sum(float(p.detach().double().sum()) for p in build_model(
        cfg, Plan(zo_mode="mezo"), None, seed=3).parameters()), rel=1e-9)          # the step's update is in it
