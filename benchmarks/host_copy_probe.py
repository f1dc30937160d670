"""What a ZeRO-3 optimizer-offload step holds on the host beyond its buffers, measured one operation at a time.

Issue #15 (host memory). ZeRO-3 with ``offload_optimizer=cpu`` and the parameters on the GPU ends each optimizer
sub-group by copying its updated fp32 partition (host, pageable) into the 16-bit partition on the GPU
(``stage3.py _reassign_or_swap_out_partitioned_parameters``: ``gpu_bf16.copy_(cpu_fp32)``). A copy between devices
that also changes the dtype needs a temporary; if torch converts on the host, that step holds ``w x sub-group``
more host bytes while the copy runs. The moments of DeepSpeedCPUAdam are created lazily, sub-group by sub-group,
in the first step, so the first step's peak holds the last sub-group's temporary and every later step's the
largest one's. This probe measures, in one process on one GPU:

- ``copy``: the rise of the process's RssAnon + RssShmem (sampled every millisecond) over ``dst.copy_(src)`` for n elements, host fp32 to
  GPU bf16 (the step's copy), and host fp32 to GPU fp32 (no conversion) as the control;
- ``pin``: the rise of RssAnon + RssShmem for ``torch.zeros(n).pin_memory()`` at sizes below and above a power of
  two (the host allocator's rounding, which ``sim/host_memory.py host_memory_terms`` assumes);
- ``page_tables``: /proc/meminfo PageTables and MemTotal - MemAvailable against the RSS of a touched 8 GiB pageable
  block and of pinned ones of 8, 2 and 16 GiB (what the node's used memory counts beside the processes' own pages).

    python benchmarks/host_copy_probe.py --out $R/copyprobe
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402

GIB = 2**30


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def anon_shmem_bytes() -> int:
    return (status_kib("RssAnon") + status_kib("RssShmem")) * 1024


def node_used_bytes() -> int:
    return (meminfo_kib("MemTotal") - meminfo_kib("MemAvailable")) * 1024


def sampled_peak(fn) -> tuple[int, int]:
    """(RssAnon + RssShmem before ``fn()``, its peak while ``fn`` runs), sampled every millisecond by a thread."""
    import threading
    import time
    peak, done = [anon_shmem_bytes()], threading.Event()
    start = peak[0]

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_shmem_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], anon_shmem_bytes())
    return start, peak[0]


def copy_rise(torch, n: int, dst_dtype) -> dict:
    """Rise of RssAnon + RssShmem while one host fp32 -> GPU ``dst_dtype`` copy of n elements runs (the source
    allocated and touched before)."""
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty(n, dtype=dst_dtype, device="cuda")
    torch.cuda.synchronize()

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize()

    start, peak = sampled_peak(copy)
    return dict(n=n, dst=str(dst_dtype).replace("torch.", ""), src_bytes=4 * n, rise=peak - start,
                rise_gib=round((peak - start) / GIB, 3))


def pin_rise(torch, n: int, keep: list) -> dict:
    """Rise of RssAnon + RssShmem for one pinned fp32 block of n elements, kept alive in ``keep`` (a freed pinned
    block stays in torch's host cache and would serve the next request of its rounded size)."""
    before = anon_shmem_bytes()
    keep.append(torch.zeros(n, dtype=torch.float32).pin_memory())
    after = anon_shmem_bytes()
    nbytes = 4 * n
    pow2 = 1 << (nbytes - 1).bit_length()
    out = dict(n=n, bytes=nbytes, pow2_ceil=pow2, rise=after - before,
               rise_over_bytes=round((after - before) / nbytes, 4), rise_over_pow2=round((after - before) / pow2, 4))
    return out


def page_tables(torch, gib: int) -> dict:
    """PageTables and the node's used memory against the process's RssAnon + RssShmem, for a touched pageable block
    and for a pinned one of ``gib`` GiB each (what the node's used memory counts beside the pages themselves)."""
    import numpy as np
    out = {}
    for kind, gib in (("pageable", gib), ("pinned", gib), ("pinned_2", 2), ("pinned_16", 16)):
        pt0, used0, rss0 = meminfo_kib("PageTables") * 1024, node_used_bytes(), anon_shmem_bytes()
        if kind == "pageable":
            block = np.ones(gib * GIB // 8, dtype=np.float64)            # touched
        else:
            block = torch.ones(gib * GIB // 4, dtype=torch.float32).pin_memory()
        pt1, used1, rss1 = meminfo_kib("PageTables") * 1024, node_used_bytes(), anon_shmem_bytes()
        out[kind] = dict(gib=gib, rss_rise=rss1 - rss0, page_tables_rise=pt1 - pt0, node_used_rise=used1 - used0,
                         page_tables_per_rss=round((pt1 - pt0) / max(rss1 - rss0, 1), 5),
                         node_over_rss=round((used1 - used0) / max(rss1 - rss0, 1), 5))
        del block
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch
    if not torch.cuda.is_available():
        print("host_copy_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.cuda.init()
    pinned: list = []
    rows = dict(pin=[pin_rise(torch, n, pinned) for n in (300_000_000, 500_000_000, 550_000_000)],
                page_tables=page_tables(torch, 8))
    del pinned
    rows["copy"] = [copy_rise(torch, n, dt) for n, dt in ((500_000_000, torch.bfloat16),
                                                          (500_000_000, torch.float32),
                                                          (250_000_000, torch.bfloat16))]
    print(f"{'copy':<34}{'rise GiB':>10}{'w n GiB':>10}")
    for r in rows["copy"]:
        w = 2 if r["dst"] == "bfloat16" else 4
        print(f"host fp32 -> GPU {r['dst']:<9} n={r['n']:.1e}{r['rise_gib']:>10.3f}{w * r['n'] / GIB:>10.3f}")
    print(f"{'pin_memory':<34}{'rise GiB':>10}{'bytes':>10}{'pow2':>10}")
    for r in rows["pin"]:
        print(f"fp32 n={r['n']:.2e}{'':<20}{r['rise'] / GIB:>10.3f}{r['bytes'] / GIB:>10.3f}{r['pow2_ceil'] / GIB:>10.3f}")
    for kind, p in rows["page_tables"].items():
        print(f"{p['gib']} GiB {kind}: RSS +{p['rss_rise'] / GIB:.3f} GiB, PageTables +{p['page_tables_rise'] / 2**20:.1f} MiB "
              f"({p['page_tables_per_rss']:.4f} of RSS), node used / RSS {p['node_over_rss']:.4f}")
    write_json(a.out / "host_copy_probe.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
