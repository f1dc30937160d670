"""Memory peaks of one rank: NVML's device-level peak sampled through the run, torch's allocator
peaks, and the host memory that decides whether the node runs out of memory.

The simulator predicts device memory as NVML reports it (every allocation on the device: the
caching allocator's segments, the CUDA context, NCCL and cuBLAS workspaces), which
``torch.cuda.max_memory_allocated`` (live tensors only) does not see. NVML keeps no peak, so
:class:`PeakSampler` reads the device's ``used`` bytes from a daemon thread every ``interval_s``
seconds and keeps the maximum; it also reads once when it starts and once when it stops, so a
run shorter than one interval is still covered. A peak that lasts less than one interval may
be missed. NVML's ``used`` counts every process on the device, not only this rank.

Host memory, read by the same thread (:meth:`PeakSampler.for_rank`):

- ``host``: this process's RssAnon + RssShmem (``/proc/self/status``): its anonymous pages
  (heap, pageable tensors) and shared-memory pages (CUDA's pinned host buffers, cudaHostAlloc,
  are accounted as RssShmem). File-backed pages (RssFile: the mmapped safetensors of a checkpoint,
  shared libraries) are left out: they are page cache, which the kernel reclaims before it kills
  anything. ``ru_maxrss`` (``host_rss``) counts them, and stays as a secondary field;
- ``node_used``: the node's used memory as Ray's memory monitor counts it, which it compares with
  ``memory_usage_threshold`` x the node's total (0.95 by default, checked every
  ``memory_monitor_refresh_ms`` = 250 ms): MemTotal - MemAvailable (``/proc/meminfo``), or, inside a
  memory cgroup whose limit is below MemTotal, the cgroup's usage without file pages against that limit
  (:mod:`meshpilot.orchestrator.config.node_limits`). The value at the
  sampler's start (after the process group is formed, before the engine is built) is kept as
  the baseline: the node's peak minus it is what the job added.

Where NVML is not available (CPU runs, no driver, no ``pynvml``) the device reading is None;
the host readings work wherever ``/proc`` does (Linux). Communication: none (each rank samples
its own device and process; every rank of a node reads the same node counters).
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import threading
from typing import Any, Callable, Mapping

import torch

from meshpilot.orchestrator.config.node_limits import (CGROUP_ROOT, PROC_MEMINFO, memory_limit, node_memory,
                                                       read_kib_fields)

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
    """The maximum of ``read()`` over the time between :meth:`start` and :meth:`stop`, and of each
    reading of ``also`` (name -> read) alongside, in the same thread.

    Every read returns bytes (or None for "no value"); None as ``read`` leaves the primary reading
    out (the sampler is disabled when there is nothing to read). A read that raises is dropped
    (logged once) keeping the peak seen so far; the thread ends when no read is left.
    ``close`` (optional) is called once after the last read. :attr:`first` holds each reading's
    first value (its value at :meth:`start`), :attr:`peaks` each reading's peak.
    """

    PRIMARY = "primary"

    def __init__(self, read: ReadBytes | None, *, interval_s: float = INTERVAL_S,
                 close: Callable[[], None] | None = None, name: str = "memory-peak-sampler",
                 also: Mapping[str, ReadBytes] | None = None):
        self._reads: dict[str, ReadBytes] = {} if read is None else {self.PRIMARY: read}
        self._reads.update(also or {})
        self._close, self.interval_s, self.name = close, float(interval_s), name
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.peaks: dict[str, int | None] = {k: None for k in self._reads}
        self.first: dict[str, int | None] = {k: None for k in self._reads}
        self.samples = 0

    @classmethod
    def for_device(cls, device: torch.device, *, interval_s: float = INTERVAL_S,
                   also: Mapping[str, ReadBytes] | None = None) -> "PeakSampler":
        """NVML's ``used`` bytes of ``device`` (left out where NVML is not available) and ``also``."""
        nv = NvmlDevice.open(device)
        if nv is None:
            return cls(None, interval_s=interval_s, also=also)
        return cls(nv.used_bytes, interval_s=interval_s, close=nv.close, also=also)

    @classmethod
    def for_rank(cls, device: torch.device, *, interval_s: float = INTERVAL_S) -> "PeakSampler":
        """What a training rank samples: NVML's ``used`` of its device, this process's
        RssAnon + RssShmem (``host``) and the node's MemTotal - MemAvailable (``node_used``)."""
        return cls.for_device(device, interval_s=interval_s, also=host_readers())

    @property
    def enabled(self) -> bool:
        return bool(self._reads)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def peak_bytes(self) -> int | None:
        """The primary reading's peak (NVML for :meth:`for_device`)."""
        return self.peaks.get(self.PRIMARY)

    def start(self) -> "PeakSampler":
        if self._reads and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int | None:
        """Stop the thread, take a last reading; the primary peak in bytes (None: nothing was read)."""
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
            self._sample()
        if self._close is not None:
            self._close()
            self._close = None
        self._reads = {}
        return self.peak_bytes

    def __enter__(self) -> "PeakSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while self._sample() and not self._halt.wait(self.interval_s):
            pass

    def _sample(self) -> bool:
        reads = dict(self._reads)
        if not reads:
            return False
        for key, read in reads.items():
            try:
                value = read()
            except Exception as e:              # the device went away, NVML failed: keep what we have
                log.warning("memory peak sampling of %s stopped: %s", key, e)
                self._reads.pop(key, None)
                continue
            if value is None:
                continue
            if self.first[key] is None:
                self.first[key] = int(value)
            if self.peaks[key] is None or value > self.peaks[key]:
                self.peaks[key] = int(value)
        self.samples += 1
        return bool(self._reads)


# --- host memory: this process and the node ---------------------------------------------------------

def process_host_bytes(path: str = "/proc/self/status") -> int | None:
    """RssAnon + RssShmem of this process in bytes (the resident memory that is not page cache);
    None where the file or the fields are missing (not Linux)."""
    try:
        v = read_kib_fields(path, ("RssAnon", "RssShmem"))
    except OSError:
        return None
    return v["RssAnon"] + v["RssShmem"] if "RssAnon" in v and "RssShmem" in v else None


def node_memory_bytes(path: str = PROC_MEMINFO, cgroup_root: str | None = CGROUP_ROOT,
                      proc_cgroup: str | None = "/proc/self/cgroup") -> tuple[int, int] | None:
    """(total, used) of this node in bytes as Ray's memory monitor counts them: MemTotal and MemTotal -
    MemAvailable, or the memory cgroup's limit and usage without file pages where that limit is the smaller
    (:func:`meshpilot.orchestrator.config.node_limits.node_memory`); None where unavailable."""
    m = node_memory(path, cgroup_root, proc_cgroup)
    return None if m is None else (m.total_bytes, m.used_bytes)


def host_readers() -> dict[str, ReadBytes]:
    """The host readings a rank samples, by name (``host``, ``node_used``); empty without /proc."""
    out: dict[str, ReadBytes] = {}
    if process_host_bytes() is not None:
        out["host"] = process_host_bytes
    limit = memory_limit()                 # found once: each sample then reads only the binding source's usage
    if limit is not None and limit.used_bytes() is not None:
        out["node_used"] = limit.used_bytes
    return out


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


def host_memory_gib(sampler: PeakSampler) -> dict[str, float | None]:
    """This rank's host readings in GiB (None where unavailable): ``host`` the peak of its
    RssAnon + RssShmem and ``host_start`` its value when the sampler started; ``node_used_peak`` and
    ``node_used_start`` the node's used memory at its peak and at the start; ``node_total`` its total (both as
    Ray's memory monitor counts them: :func:`node_memory_bytes`). The node's values are the same counters on every rank of a node:
    the node's measured host memory is combined from them across its ranks
    (:func:`meshpilot.orchestrator.sim.calibration.measured_from_results`)."""
    def gib(b: int | None) -> float | None:
        return None if b is None else b / GIB
    total = node_memory_bytes()
    return {"host": gib(sampler.peaks.get("host")), "host_start": gib(sampler.first.get("host")),
            "node_used_peak": gib(sampler.peaks.get("node_used")),
            "node_used_start": gib(sampler.first.get("node_used")),
            "node_total": gib(None if total is None else total[0])}
