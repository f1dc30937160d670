"""What this node lets a job use: host memory and CPU cores as the kernel limits them.

A job in a container (a Kubernetes pod, a Slurm step with cgroup confinement, ``docker run --memory``)
sees the whole machine in ``/proc/meminfo`` and ``os.cpu_count()``, but may use only what its cgroup
allows. Both numbers feed the plan: host memory decides whether an offloaded plan fits, cores the
CPU Adam threads of a rank.

Memory, counted as Ray's memory monitor counts it (ray ``src/ray/common/memory_monitor_utils.cc``):

    total = min(MemTotal, the cgroup's limit)
    used  = MemTotal - MemAvailable                         where MemTotal is the smaller
          = usage - inactive_file - active_file             where the cgroup's limit is the smaller

with, for cgroup v2 (``<root>/memory.max``; ``max`` means none): usage ``memory.current`` and the file
pages of ``memory.stat`` (``inactive_file``, ``active_file``); for cgroup v1 (``<root>/memory/``):
``memory.limit_in_bytes`` (a huge number means none), ``memory.usage_in_bytes`` and ``total_inactive_file``,
``total_active_file``. File pages are page cache the kernel reclaims before it kills anything. Ray reads the cgroup at
the root of the mount (a container's own, under a cgroup namespace); the kernel's OOM killer also enforces the limit of
every cgroup above this process (``/proc/self/cgroup``: a Slurm step confined without a namespace, a systemd slice),
so those count too, and the smallest limit binds.

Cores: the CPUs this process may run on (``sched_getaffinity``), capped by a CFS quota where one is set
(v2 ``cpu.max`` = ``quota period``, ``max`` = none; v1 ``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us``,
-1 = none), rounded up.

Pure file reading: every path is a parameter, so a test points it at files of its own.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PROC_MEMINFO = "/proc/meminfo"
CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class NodeMemory:
    total_bytes: int            # what Ray's memory monitor takes as the node's total
    used_bytes: int             # what it takes as used
    source: str                 # "meminfo", "cgroup v2" or "cgroup v1": where the binding limit comes from


def read_kib_fields(path: str, fields: Sequence[str]) -> dict[str, int]:
    """``{field: bytes}`` of the ``Name:  N kB`` lines of a /proc file (status, meminfo) named in
    ``fields``; a field missing from the file is missing from the result."""
    wanted, out = set(fields), {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in wanted:
                parts = rest.split()
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def _read_int(path: Path) -> int | None:
    """The integer a cgroup file holds; None where it is missing, unreadable or not a number ("max")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def _stat_fields(path: Path, keys: Sequence[str]) -> dict[str, int]:
    """``{key: value}`` of a cgroup ``memory.stat`` (``key value`` lines)."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] in keys and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


# (limit file, usage file, stat file, the stat's file-page keys) of a cgroup directory, by version
_V2 = ("memory.max", "memory.current", "memory.stat", ("inactive_file", "active_file"))
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", ("total_inactive_file", "total_active_file"))


def _cgroup_dir_memory(d: Path, files: tuple) -> tuple[int, int] | None:
    """(limit, used without file pages) of one cgroup directory; None without a limit or readable files."""
    limit_f, usage_f, stat_f, keys = files
    limit, usage = _read_int(d / limit_f), _read_int(d / usage_f)
    if limit is None or usage is None or limit <= 0:
        return None
    pages = _stat_fields(d / stat_f, keys)
    if len(pages) < len(keys):
        return None
    return limit, max(0, usage - sum(pages.values()))


def own_cgroup_dirs(root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> list[tuple[Path, tuple]]:
    """The memory cgroup directories of this process from its own up to the mount's root (v2: the ``0::/path`` line;
    v1: the line naming the ``memory`` controller), with their file names; those that do not exist are left out."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[Path, tuple]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            base, files = Path(root), _V2
        elif "memory" in controllers.split(","):
            base, files = Path(root) / "memory", _V1
        else:
            continue
        rel = Path(path.lstrip("/"))
        for d in [base / rel, *[base / p for p in rel.parents]]:
            if d.is_dir() and d != base:
                out.append((d, files))
    return out


def _version(files: tuple) -> str:
    return "cgroup v2" if files is _V2 else "cgroup v1"


def _cgroup_limits(root: str, proc_cgroup: str | None) -> list[tuple[int, Path, tuple]]:
    """(limit, directory, its file names) of every readable memory cgroup with a limit: the mount's root (Ray's view,
    v2 then v1) and the cgroups above this process (``proc_cgroup``; None: the root only)."""
    base = Path(root)
    dirs = [(base, _V2), (base / "memory", _V1), *(own_cgroup_dirs(root, proc_cgroup) if proc_cgroup else [])]
    return [(r[0], d, files) for d, files in dirs for r in [_cgroup_dir_memory(d, files)] if r]


@dataclass(frozen=True)
class MemoryLimit:
    """Where this node's binding memory limit is, found once: MemTotal (``cgroup_dir`` None) or a memory cgroup.
    :meth:`used_bytes` then reads only that source's usage, as a sampler does many times a second."""
    total_bytes: int
    source: str                             # "meminfo", "cgroup v2" or "cgroup v1"
    meminfo: str = PROC_MEMINFO
    cgroup_dir: Path | None = None
    files: tuple | None = None

    def used_bytes(self) -> int | None:
        """Used memory as counted against this limit (module docstring); None where it cannot be read."""
        if self.cgroup_dir is None:
            m = _meminfo(self.meminfo)
            return None if m is None else m[0] - m[1]
        read = _cgroup_dir_memory(self.cgroup_dir, self.files)
        return None if read is None else read[1]


def _meminfo(path: str) -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes; None where unreadable."""
    try:
        v = read_kib_fields(path, ("MemTotal", "MemAvailable"))
    except OSError:
        return None
    return (v["MemTotal"], v["MemAvailable"]) if "MemTotal" in v and "MemAvailable" in v else None


def memory_limit(meminfo: str = PROC_MEMINFO, cgroup_root: str | None = CGROUP_ROOT,
                 proc_cgroup: str | None = "/proc/self/cgroup") -> MemoryLimit | None:
    """This node's binding memory limit (module docstring); None without a readable meminfo. ``proc_cgroup``: this
    process's cgroup file (None: the mount's root only)."""
    m = _meminfo(meminfo)
    if m is None:
        return None
    limits = _cgroup_limits(cgroup_root, proc_cgroup) if cgroup_root else []
    if limits:
        limit, d, files = min(limits, key=lambda x: x[0])
        if limit < m[0]:                     # v1's "no limit" is a huge number: never the smaller
            return MemoryLimit(limit, _version(files), meminfo, d, files)
    return MemoryLimit(m[0], "meminfo", meminfo)


def node_memory(meminfo: str = PROC_MEMINFO, cgroup_root: str | None = CGROUP_ROOT,
                proc_cgroup: str | None = "/proc/self/cgroup") -> NodeMemory | None:
    """This node's memory as Ray's memory monitor and the kernel count it (module docstring); None without a readable
    meminfo."""
    limit = memory_limit(meminfo, cgroup_root, proc_cgroup)
    used = None if limit is None else limit.used_bytes()
    return None if used is None else NodeMemory(limit.total_bytes, used, limit.source)


def cpu_quota_cores(cgroup_root: str = CGROUP_ROOT) -> int | None:
    """Cores a CFS quota allows (rounded up); None where no quota is set."""
    base = Path(cgroup_root)
    try:
        parts = (base / "cpu.max").read_text().split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]) > 0:
            return max(1, math.ceil(int(parts[0]) / int(parts[1])))
    except OSError:
        pass
    quota, period = _read_int(base / "cpu/cpu.cfs_quota_us"), _read_int(base / "cpu/cpu.cfs_period_us")
    if quota is not None and period and quota > 0:
        return max(1, math.ceil(quota / period))
    return None


def node_cpu_cores(cgroup_root: str | None = CGROUP_ROOT) -> int:
    """CPU cores this process may use: its affinity set, capped by a cgroup CPU quota (module docstring)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):          # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota_cores(cgroup_root) if cgroup_root else None
    return max(1, min(cores, quota) if quota else cores)
