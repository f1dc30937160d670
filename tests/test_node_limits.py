"""Host memory and cores as a container's cgroup limits them (orchestrator/config/node_limits.py).

The cgroup and /proc files are written by each test (the kernel's formats, the numbers chosen by hand), so the
rules are checked whatever machine runs the suite; the last two read this machine's own files, one of them through a
real memory cgroup it makes where the machine allows it.
"""
from __future__ import annotations

import os

import pytest

from meshpilot.orchestrator.config.node_limits import (cpu_quota_cores, memory_limit, node_cpu_cores, node_memory,
                                                       own_cgroup_dirs)
from meshpilot.orchestrator.train.memory_peaks import node_memory_bytes

GIB = 2**30
KIB = 1024


def meminfo(tmp_path, total_gib: float, available_gib: float) -> str:
    p = tmp_path / "meminfo"
    p.write_text(f"MemTotal:       {int(total_gib * GIB / KIB)} kB\nMemFree:         1000 kB\n"
                 f"MemAvailable:   {int(available_gib * GIB / KIB)} kB\n")
    return str(p)


def cgroup_v2(tmp_path, limit: str, current_gib: float, inactive_gib: float, active_gib: float):
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text(f"{int(current_gib * GIB)}\n")
    (root / "memory.stat").write_text(f"anon {int(GIB)}\nfile {int((inactive_gib + active_gib) * GIB)}\n"
                                      f"active_anon 0\ninactive_file {int(inactive_gib * GIB)}\n"
                                      f"active_file {int(active_gib * GIB)}\n")
    return root


def test_cgroup_v2_limit_below_memtotal_is_what_ray_counts(tmp_path):
    """A pod limited to 128 GiB on a 2 TiB machine: total 128, used = 100 - 30 - 10 = 60 GiB (file pages out)."""
    info = meminfo(tmp_path, 2048, 1900)
    root = cgroup_v2(tmp_path, str(128 * GIB), 100, 30, 10)
    m = node_memory(info, str(root), None)
    assert (m.total_bytes, m.used_bytes, m.source) == (128 * GIB, 60 * GIB, "cgroup v2")


def test_no_cgroup_limit_or_a_larger_one_keeps_meminfo(tmp_path):
    info = meminfo(tmp_path, 256, 200)
    expected = (256 * GIB, 56 * GIB, "meminfo")
    for i, limit in enumerate(("max", str(512 * GIB))):   # no limit; a limit above the machine's memory
        (tmp_path / str(i)).mkdir()
        m = node_memory(info, str(cgroup_v2(tmp_path / str(i), limit, 100, 30, 10)), None)
        assert (m.total_bytes, m.used_bytes, m.source) == expected
    assert node_memory(info, str(tmp_path / "absent"), None).source == "meminfo"
    assert node_memory(info, None).total_bytes == 256 * GIB
    assert node_memory(str(tmp_path / "no-meminfo"), None) is None


def test_cgroup_v1_limit(tmp_path):
    """v1: memory.limit_in_bytes and usage_in_bytes less total_(in)active_file; v1's "no limit" is a huge number."""
    info = meminfo(tmp_path, 512, 500)
    mem = tmp_path / "cg1" / "memory"
    mem.mkdir(parents=True)
    (mem / "memory.usage_in_bytes").write_text(f"{50 * GIB}\n")
    (mem / "memory.stat").write_text(f"cache {20 * GIB}\nrss {30 * GIB}\ntotal_inactive_file {15 * GIB}\n"
                                     f"total_active_file {5 * GIB}\n")
    (mem / "memory.limit_in_bytes").write_text(f"{64 * GIB}\n")
    m = node_memory(info, str(tmp_path / "cg1"), None)
    assert (m.total_bytes, m.used_bytes, m.source) == (64 * GIB, 30 * GIB, "cgroup v1")
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert node_memory(info, str(tmp_path / "cg1"), None).source == "meminfo"


def test_a_limit_above_this_process_binds_too(tmp_path):
    """No limit at the mount's root (what Ray reads), but the process sits in a Slurm step's cgroup of 48 GiB under a
    job's of 64 GiB (cgroup v2, no namespace): the kernel kills at 48, so 48 is the node's total and that cgroup's
    usage less its file pages (30 - 6 = 24 GiB) the used part. The memory_peaks reader gives the same pair."""
    info = meminfo(tmp_path, 512, 500)
    root = tmp_path / "cg"
    step = root / "system.slice" / "slurmstepd.scope" / "job_7" / "step_0"
    for d, limit, cur, files in ((root, "max", 40, 2), (root / "system.slice", "max", 40, 2),
                                 (root / "system.slice" / "slurmstepd.scope", "max", 40, 2),
                                 (root / "system.slice" / "slurmstepd.scope" / "job_7", str(64 * GIB), 35, 8),
                                 (step, str(48 * GIB), 30, 6)):
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(f"{cur * GIB}\n")
        (d / "memory.stat").write_text(f"inactive_file {files * GIB // 2}\nactive_file {files * GIB // 2}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/slurmstepd.scope/job_7/step_0\n")
    assert [d for d, _ in own_cgroup_dirs(str(root), str(proc))][:2] == [step, step.parent]
    m = node_memory(info, str(root), str(proc))
    assert (m.total_bytes, m.used_bytes, m.source) == (48 * GIB, 24 * GIB, "cgroup v2")
    assert node_memory_bytes(info, str(root), str(proc)) == (48 * GIB, 24 * GIB)
    # found once, the limit's source is what a sampler reads afterwards: the step's usage rises to 40 (less 6 of files)
    limit = memory_limit(info, str(root), str(proc))
    assert (limit.total_bytes, limit.cgroup_dir) == (48 * GIB, step)
    (step / "memory.current").write_text(f"{40 * GIB}\n")
    assert limit.used_bytes() == 34 * GIB
    assert node_memory(info, str(root), None).source == "meminfo"        # the root alone sets no limit
    # cgroup v1: the memory controller's line
    v1 = tmp_path / "v1" / "memory" / "slurm" / "uid_0" / "job_7"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{32 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{10 * GIB}\n")
    (v1 / "memory.stat").write_text(f"total_inactive_file {GIB}\ntotal_active_file {GIB}\n")
    proc.write_text("4:memory:/slurm/uid_0/job_7\n3:cpuset:/\n0::/\n")
    m = node_memory(info, str(tmp_path / "v1"), str(proc))
    assert (m.total_bytes, m.used_bytes, m.source) == (32 * GIB, 8 * GIB, "cgroup v1")


def test_cpu_quota(tmp_path):
    """cpu.max "250000 100000" allows 2.5 cores: 3 (rounded up); "max": none; v1 quota -1: none."""
    root = tmp_path / "cg"
    root.mkdir()
    assert cpu_quota_cores(str(root)) is None
    (root / "cpu.max").write_text("250000 100000\n")
    assert cpu_quota_cores(str(root)) == 3
    assert node_cpu_cores(str(root)) == min(3, len(os.sched_getaffinity(0)))
    (root / "cpu.max").write_text("max 100000\n")
    assert cpu_quota_cores(str(root)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota_cores(str(v1)) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cpu_quota_cores(str(v1)) == 1
    assert node_cpu_cores(str(v1)) == 1


def test_this_machine():
    """This machine's own files: the total is at most MemTotal, the used part below it; cores within the affinity."""
    m = node_memory()
    assert m is not None
    assert m.total_bytes <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < m.used_bytes < m.total_bytes
    assert 1 <= node_cpu_cores() <= len(os.sched_getaffinity(0))


def test_a_real_memory_cgroup_binds():
    """A real kernel cgroup, where this machine lets the suite make one (root with a writable memory hierarchy; CI's
    machine may not, and then the test says so): a child process moves itself into a new memory cgroup under its own
    with a 2 GiB limit, touches 256 MiB and reads node_memory(). The kernel's own files must give the limit as the
    node's total and at least the touched memory as used, from the cgroup the process is in."""
    import subprocess
    import sys
    own = own_cgroup_dirs()
    if not own:
        pytest.skip("this process sits at the root of its memory hierarchy (no cgroup to make one under)")
    parent, files = own[0]
    limit_file = files[0]
    d = parent / f"meshpilot-test-{os.getpid()}"
    try:
        d.mkdir()
    except OSError as e:
        pytest.skip(f"memory cgroups are not writable here ({parent}: {e.strerror})")
    try:
        try:
            (d / limit_file).write_text(f"{2 * GIB}\n")
        except OSError as e:
            pytest.skip(f"a memory limit cannot be set here ({d / limit_file}: {e.strerror})")
        code = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
                "b = bytearray(256 * 2**20); b[::4096] = b'x' * len(b[::4096]);"
                "from meshpilot.orchestrator.config.node_limits import node_memory;"
                "m = node_memory(); print(m.total_bytes, m.used_bytes, m.source)")
        out = subprocess.run([sys.executable, "-c", code, str(d / "cgroup.procs")], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        total, used, source = out.stdout.split(maxsplit=2)
        assert int(total) == 2 * GIB and source.strip() == ("cgroup v2" if limit_file == "memory.max" else "cgroup v1")
        assert 256 * 2**20 <= int(used) < 2 * GIB
    finally:
        d.rmdir()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
