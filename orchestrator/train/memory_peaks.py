"""Memory peaks of one rank: NVML's device-level peak sampled through the run, torch's allocator
peaks and the process's peak resident set.

The simulator predicts device memory as NVML reports it (every allocation on the device: the
caching allocator's segments, the CUDA context, NCCL and cuBLAS workspaces), which
``torch.cuda.max_memory_allocated`` (live tensors only) does not see. NVML keeps no peak, so
:class:`PeakSampler` reads the device's ``used`` bytes from a daemon thread every ``interval_s``
seconds and keeps the maximum; it also reads once when it starts and once when it stops, so a
run shorter than one interval is still covered. A peak that lasts less than one interval may
be missed. NVML's ``used`` counts every process on the device, not only this rank.

Where NVML is not available (CPU runs, no driver, no ``pynvml``) the sampler does nothing and
reports None. Communication: none (each rank samples its own device).
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import threading
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

GIB = 2**30
INTERVAL_S = 0.05
ReadBytes = Callable[[], int | None]


# --- NVML ------------------------------------------------------------------------------------------

class NvmlDevice:
    """NVML's view of one CUDA device; NVML stays initialised until :meth:`close`."""

    def __init__(self, nvml: Any, handle: Any):
        self._nvml, self._handle, self._open = nvml, handle, True

    @classmethod
    def open(cls, device: torch.device) -> "NvmlDevice | None":
        """The NVML handle of ``device`` (a CUDA device), or None where NVML cannot be used."""
        if device.type != "cuda":
            return None
        try:
            import pynvml
            pynvml.nvmlInit()
        except Exception:                   # no pynvml, no driver
            return None
        try:
            return cls(pynvml, _handle(pynvml, device))
        except Exception:                   # device not visible to NVML (e.g. some MIG set-ups)
            pynvml.nvmlShutdown()
            return None

    def used_bytes(self) -> int:
        """Device memory in use, all processes."""
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._nvml.nvmlShutdown()


def _handle(pynvml: Any, device: torch.device) -> Any:
    """NVML's handle of a torch CUDA device: by its UUID where torch reports one, else by the
    physical index that CUDA_VISIBLE_DEVICES maps the torch index to."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        index = int(visible[index])
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def nvml_used_bytes(device: torch.device) -> int | None:
    """One reading of NVML's ``used`` bytes of ``device``; None without NVML."""
    nv = NvmlDevice.open(device)
    if nv is None:
        return None
    try:
        return nv.used_bytes()
    except Exception:
        return None
    finally:
        nv.close()


# --- the sampler -----------------------------------------------------------------------------------

class PeakSampler:
    """The maximum of ``read()`` over the time between :meth:`start` and :meth:`stop`.

    ``read`` returns bytes (or None for "no value"); None as ``read`` disables the sampler. A
    ``read`` that raises ends the sampling (logged once), keeping the peak seen so far.
    ``close`` (optional) is called once after the last read.
    """

    def __init__(self, read: ReadBytes | None, *, interval_s: float = INTERVAL_S,
                 close: Callable[[], None] | None = None, name: str = "memory-peak-sampler"):
        self._read, self._close, self.interval_s, self.name = read, close, float(interval_s), name
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak: int | None = None
        self.samples = 0

    @classmethod
    def for_device(cls, device: torch.device, *, interval_s: float = INTERVAL_S) -> "PeakSampler":
        """NVML's ``used`` bytes of ``device``; a disabled sampler where NVML is not available."""
        nv = NvmlDevice.open(device)
        if nv is None:
            return cls(None, interval_s=interval_s)
        return cls(nv.used_bytes, interval_s=interval_s, close=nv.close)

    @property
    def enabled(self) -> bool:
        return self._read is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def peak_bytes(self) -> int | None:
        return self._peak

    def start(self) -> "PeakSampler":
        if self._read is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int | None:
        """Stop the thread, take a last reading; the peak in bytes (None: nothing was read)."""
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
            self._sample()
        if self._close is not None:
            self._close()
            self._close = None
        self._read = None
        return self._peak

    def __enter__(self) -> "PeakSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while self._sample() and not self._halt.wait(self.interval_s):
            pass

    def _sample(self) -> bool:
        read = self._read
        if read is None:
            return False
        try:
            value = read()
        except Exception as e:                  # the device went away, NVML failed: keep what we have
            log.warning("memory peak sampling stopped: %s", e)
            self._read = None
            return False
        self.samples += 1
        if value is not None and (self._peak is None or value > self._peak):
            self._peak = int(value)
        return True


# --- the result's peaks ---------------------------------------------------------------------------

def host_rss_peak_bytes() -> int:
    """The process's peak resident set (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def torch_peak_bytes(device: torch.device | None) -> tuple[int | None, int | None]:
    """(max_memory_allocated, max_memory_reserved) of a CUDA device; (None, None) elsewhere."""
    if device is None or device.type != "cuda":
        return None, None
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))


def memory_peaks_gib(device: torch.device, nvml_peak_bytes: int | None) -> dict[str, float | None]:
    """``{"nvml", "allocated", "reserved", "host_rss"}`` in GiB, None where the source is unavailable."""
    allocated, reserved = torch_peak_bytes(device)

    def gib(b: int | None) -> float | None:
        return None if b is None else b / GIB
    return {"nvml": gib(nvml_peak_bytes), "allocated": gib(allocated), "reserved": gib(reserved),
            "host_rss": gib(host_rss_peak_bytes())}
