"""benchmarks/hf_forward_only_loss_bytes.py: the live-storage count behind the Hugging Face loss's bytes per logit."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from hf_forward_only_loss_bytes import peak_live_bytes  # noqa: E402


def test_peak_counts_what_is_alive_together_and_forgets_what_was_freed():
    def fn():
        a = torch.ones(1000)                  # 4,000 bytes
        b = torch.ones(500)                   # + 2,000 while a is alive: the peak
        del a, b
        c = torch.ones(1200)                  # 4,800 alone: below the peak
        return float(c.sum())
    assert peak_live_bytes(fn) == 6000


def test_a_view_adds_nothing():
    def fn():
        a = torch.ones(1000)
        v = a.view(10, 100)                   # the same storage
        return float(v.sum())
    assert peak_live_bytes(fn) == 4000 + 4   # the sum's 0-d fp32 result
