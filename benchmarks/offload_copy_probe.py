"""Host <-> GPU copy rates of the paths DeepSpeed 0.19's optimizer offload takes, per rank, alone and with every GPU
of the node copying at once.

ZeRO-3 with optimizer offload (stage3.py, DeepSpeed 0.19) puts the updated parameters back with
``fp16_partitioned_groups_flat[i].data.copy_(fp32_partitioned_groups_flat[i].data)``: a blocking copy from a pinned
fp32 host tensor into a 16-bit GPU tensor. PyTorch converts the dtype of a blocking host-to-device copy on the host,
into a new (pageable) 16-bit host tensor, and then copies that, so the path is a host-side conversion and a pageable
transfer, not a pinned one. Stages 1-2 convert into a pinned 16-bit buffer first and copy that asynchronously
(stage_1_and_2.py). The gradient paths are pinned copies (16-bit per micro-batch, fp32 at the boundary). ZeRO-3 with
parameter offload and the optimizer on the GPU makes the step's copy the other way, fp32 GPU -> pinned 16-bit host,
which torch copies down into a new pageable fp32 host tensor and converts there.

Per path: GB/s of the GPU-side bytes and parameters per second, median of ``--iters`` after one warm-up, for a
tensor of ``--gparams`` G elements, with the rank's OpenMP threads (``--threads``, default: what `meshpilot run`
gives a rank on this node, ``clusters.threads_per_rank``). ``--ranks N`` runs N processes at once, one per GPU.

    python benchmarks/offload_copy_probe.py --out $R/copyprobe --ranks 1 2
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metadata, write_json  # noqa: E402


def _timed(fn, iters: int) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _rank(gpu: int, n: int, threads: int, iters: int, barrier, queue) -> None:
    import torch
    torch.set_num_threads(threads)
    torch.cuda.set_device(gpu)
    dev = torch.device("cuda", gpu)
    fp32_pinned = torch.randn(n, dtype=torch.float32).pin_memory()
    bf16_pinned = torch.empty(n, dtype=torch.bfloat16).pin_memory()
    bf16_gpu = torch.empty(n, dtype=torch.bfloat16, device=dev)
    fp32_gpu = torch.empty(n, dtype=torch.float32, device=dev)
    paths = {
        # stage 3 + optimizer offload: the updated fp32 partition into the GPU's 16-bit partition (blocking)
        "fp32_host_to_bf16_gpu_blocking": lambda: bf16_gpu.copy_(fp32_pinned),
        # stage 3 + parameter offload with the optimizer on the GPU: the updated fp32 partition into the host's
        # 16-bit partition (blocking; torch copies down into a pageable fp32 tensor and converts it on the host)
        "fp32_gpu_to_bf16_host_blocking": lambda: bf16_pinned.copy_(fp32_gpu),
        # stages 1-2: host conversion into a pinned 16-bit buffer, then an asynchronous pinned copy
        "fp32_host_to_bf16_pinned": lambda: bf16_pinned.copy_(fp32_pinned),
        "bf16_pinned_h2d": lambda: bf16_gpu.copy_(bf16_pinned, non_blocking=True),
        # gradients: 16-bit partition down per micro-batch, fp32 at the boundary
        "bf16_d2h_pinned": lambda: bf16_pinned.copy_(bf16_gpu, non_blocking=True),
        "fp32_d2h_pinned": lambda: fp32_pinned.copy_(fp32_gpu, non_blocking=True),
    }
    out = {}
    for name, fn in paths.items():
        barrier.wait()
        s = _timed(fn, iters)
        gpu_bytes = n * (4 if name.startswith(("fp32_d2h", "fp32_gpu")) else 2)
        out[name] = dict(seconds=s, gpu_side_gbs=gpu_bytes / s / 1e9, gparams_per_s=n / s / 1e9)
    queue.put((gpu, out))


def probe(ranks: int, gparams: float, threads: int, iters: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(ranks), ctx.Queue()
    n = int(gparams * 1e9)
    procs = [ctx.Process(target=_rank, args=(g, n, threads, iters, barrier, queue)) for g in range(ranks)]
    for p in procs:
        p.start()
    res = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return dict(ranks=ranks, threads_per_rank=threads, gparams=gparams, per_rank=res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1])
    ap.add_argument("--gparams", type=float, default=1.0, help="elements per copy, in G (default 1.0: 4 GB fp32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    import os

    import torch
    from meshpilot.orchestrator.config.clusters import threads_per_rank
    gpus = torch.cuda.device_count()
    rows = []
    print(f"{'ranks':>5s} {'threads':>7s} {'path':34s} {'GB/s (GPU side)':>15s} {'Gparams/s':>10s}")
    for r in a.ranks:
        threads = a.threads or threads_per_rank(os.cpu_count() or 1, gpus)
        res = probe(r, a.gparams, threads, a.iters)
        rows.append(res)
        for name in res["per_rank"][0]:
            gbs = statistics.mean(v[name]["gpu_side_gbs"] for v in res["per_rank"].values())
            gps = statistics.mean(v[name]["gparams_per_s"] for v in res["per_rank"].values())
            print(f"{r:5d} {threads:7d} {name:34s} {gbs:15.1f} {gps:10.2f}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "offload_copy_probe.json", dict(metadata(), command=" ".join([sys.executable, *sys.argv]),
                                                        rows=rows))
    print(json.dumps({"wrote": str(a.out / "offload_copy_probe.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
