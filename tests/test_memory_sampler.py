"""The NVML peak sampler of the training worker (orchestrator/train/memory_peaks.py), on the CPU:
an injected read function stands in for NVML."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from meshpilot.orchestrator.train.memory_peaks import (GIB, NvmlDevice, PeakSampler, memory_peaks_gib,
                                                       nvml_used_bytes)


class Sequence:
    """Returns the given values in order, then the last one forever; counts the calls."""

    def __init__(self, values: list[int | None]):
        self.values, self.calls = values, 0
        self.done = threading.Event()

    def __call__(self) -> int | None:
        i = min(self.calls, len(self.values) - 1)
        self.calls += 1
        if self.calls >= len(self.values):
            self.done.set()
        return self.values[i]


def test_peak_is_the_maximum_of_the_readings_and_the_thread_stops():
    read = Sequence([3, None, 7 * GIB, 5, 2 * GIB, 1])
    sampler = PeakSampler(read, interval_s=0.001).start()
    assert sampler.enabled and sampler.running
    assert read.done.wait(10.0), "the sampler did not read the whole sequence"
    assert sampler.stop() == 7 * GIB
    assert not sampler.running and sampler.peak_bytes == 7 * GIB
    calls = read.calls
    time.sleep(0.02)
    assert read.calls == calls                          # nothing reads after stop
    assert sampler.stop() == 7 * GIB                    # idempotent


def test_a_run_shorter_than_one_interval_is_still_sampled():
    read = Sequence([4, 9])
    with PeakSampler(read, interval_s=60.0) as sampler:
        pass                                            # stop: one reading at start, one at stop
    assert sampler.peak_bytes == 9 and not sampler.running


def test_a_failing_read_ends_sampling_without_raising():
    calls = []

    def read() -> int:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("NVML went away")
        return 100 * len(calls)
    sampler = PeakSampler(read, interval_s=0.001).start()
    deadline = time.monotonic() + 10.0
    while sampler.running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not sampler.running
    assert sampler.stop() == 200 and len(calls) == 3


def test_close_is_called_once_after_the_last_read():
    closed = []
    sampler = PeakSampler(lambda: 1, interval_s=0.001, close=lambda: closed.append(1)).start()
    sampler.stop()
    sampler.stop()
    assert closed == [1]


def test_on_cpu_the_sampler_reports_none():
    sampler = PeakSampler.for_device(torch.device("cpu")).start()
    assert not sampler.enabled and not sampler.running
    assert sampler.stop() is None
    assert NvmlDevice.open(torch.device("cpu")) is None
    assert nvml_used_bytes(torch.device("cpu")) is None
    peaks = memory_peaks_gib(torch.device("cpu"), sampler.peak_bytes)
    assert set(peaks) == {"nvml", "allocated", "reserved", "host_rss"}
    assert peaks["nvml"] is peaks["allocated"] is peaks["reserved"] is None
    assert peaks["host_rss"] > 10 / 1024                # more than 10 MiB


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_a_cuda_device_without_nvml_gives_a_disabled_sampler():
    sampler = PeakSampler.for_device(torch.device("cuda", 0)).start()
    assert not sampler.enabled and sampler.stop() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvml_peak_covers_an_allocation_made_while_sampling():
    device = torch.device("cuda", 0)
    sampler = PeakSampler.for_device(device, interval_s=0.01).start()
    assert sampler.enabled
    time.sleep(0.05)
    base = sampler.peak_bytes
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)      # 1 GiB
    x.fill_(1)
    torch.cuda.synchronize(device)
    time.sleep(0.1)
    peak = sampler.stop()
    del x
    assert base is not None and peak is not None and peak - base >= (1 << 30) * 0.9
    peaks = memory_peaks_gib(device, peak)
    assert peaks["allocated"] >= 1.0 and peaks["nvml"] >= peaks["reserved"] >= peaks["allocated"]
