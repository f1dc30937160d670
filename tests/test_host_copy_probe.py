"""benchmarks/host_copy_probe.py's measuring parts on the CPU: the sampled peak of RssAnon + RssShmem over a call."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from file_module import load_file

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_file(ROOT / "benchmarks" / "host_copy_probe.py")


def test_sampled_peak_sees_a_block_that_is_freed_before_the_call_returns():
    """A 256 MiB block touched and freed inside the call: the peak rises by it (within 16 MiB: the interpreter's own
    pages and the sampler's), though RssAnon is back where it started when the call returns."""
    p = _module()

    def transient():
        a = np.ones(256 * MIB // 8)                   # touched: 256 MiB resident
        time.sleep(0.05)                              # held for 50 samples of the 1 ms sampler
        del a

    start, peak = p.sampled_peak(transient)
    assert peak - start == pytest.approx(256 * MIB, abs=16 * MIB)
    assert abs(p.anon_shmem_bytes() - start) < 16 * MIB


def test_status_and_meminfo_fields_are_read():
    p = _module()
    assert p.status_kib("RssAnon") > 0 and p.meminfo_kib("MemTotal") > p.meminfo_kib("MemAvailable") > 0
    assert p.status_kib("NoSuchField") == 0
