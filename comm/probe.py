"""Hardware probe: measure the rates the simulator needs on the machine it runs on.

What is measured (each part is skipped, with the reason recorded, when it cannot run here):

- collectives: all-reduce, all-gather, reduce-scatter and all-to-all bus bandwidth over
  message sizes (see :mod:`meshpilot.comm.cost_model` for the conventions), one process
  per local GPU over NCCL, or 2 gloo processes on CPU with small sizes; the latency is
  the time of a small (8 KiB) all-reduce less its bandwidth term;
- matmul: the achieved bf16 rate of transformer-shaped products. For a layer with T
  tokens (micro-batch x sequence), hidden h and MLP width f, each linear (T, k) x (k, n)
  of the layer (QKV k=h n=3h, attention output h->h, gate+up h->2f, down f->h) is timed in
  its three training forms: forward (T,k)@(k,n), input gradient (T,n)@(n,k) and weight
  gradient (k,T)@(T,n), 2*T*k*n FLOP each. The reported rate is total FLOP / total time
  of the mix (the rate of one layer's matmuls, forward and backward);
- host copies: pinned host -> device and device -> host bandwidth of one large buffer, and the blocking
  fp32-host -> bf16-device copy (cast on the host) through which ZeRO-3 with optimizer offload returns parameters,
  in this process (a rank's own threads measure it again below);
- CPU Adam: DeepSpeed's DeepSpeedCPUAdam step throughput in parameters per second, after warm-up, twice: with
  the OpenMP threads `meshpilot run` gives one offloading rank (``adam_threads``: the rate per thread of a rank,
  compute-bound) and with every core this process may use (the node's ceiling, shared by its ranks when they hit
  the host's memory bandwidth); the first construction compiles (or loads) the extension and its time is
  reported separately. Beside each Adam measurement, on the same threads and buffers, the two host passes of
  DeepSpeed's offloaded step around CPUAdam: the in-place scaling of the fp32 gradient partition
  (``unscale_and_clip_grads``) and the cast of the updated fp32 partition into a pinned 16-bit host tensor. On a
  GPU machine the rank's measurement also times the two blocking copies with which ZeRO-3 puts a sub-group of
  ``cast_copy_params`` updated parameters back (``stage3.py _reassign_or_swap_out_partitioned_parameters``: the
  16-bit partition ``.copy_()`` of the fp32 one), both cast on the host by torch: pinned fp32 host -> 16-bit GPU
  (optimizer offload; torch converts into a pageable 16-bit host tensor, then copies it up) and fp32 GPU -> pinned
  16-bit host (parameter offload without optimizer offload; torch copies down into a pageable fp32 host tensor, then
  converts it). Both run on the rank's threads, through fresh pageable memory, at the size of a sub-group.

:func:`run_probe` returns a :class:`ProbeReport`; :func:`calibrated_profile` turns it into
a cluster profile (the base cluster mapping with ``calibration:`` filled) that loads as
``cluster: path/to/profile.yaml``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .ports import free_port
from .collective_timing import CollectiveSample
from .cost_model import COLLECTIVES, alpha_beta_time

log = logging.getLogger(__name__)

MiB = 2**20
Progress = Callable[[str], None]


def _noop(_: str) -> None:
    pass


# --- settings -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeSettings:
    """What to measure and how hard. :meth:`for_machine` picks sizes for a GPU host or a CPU box."""
    device: str = "cpu"                               # "cuda" or "cpu"
    world: int = 2                                    # collective processes (GPUs, or gloo workers)
    collective_sizes: tuple[int, ...] = (MiB, 4 * MiB)
    collective_ops: tuple[str, ...] = COLLECTIVES
    latency_bytes: int = 8 * 1024                    # the small all-reduce that gives the latency
    collective_warmup: int = 1
    collective_iters: int = 3
    matmul_tokens: int = 256
    matmul_hidden: int = 512
    matmul_ffn: int = 1376
    matmul_iters: int = 3
    copy_bytes: int = 64 * MiB
    copy_iters: int = 5
    adam_params: int = 2**22                          # a GPU machine: 2**28 (1 GiB of fp32 parameters). On one 1 x H200
    #   host 2**26 measured a rank's CPU Adam at 2.52 and 3.22 G/s in two fresh processes, 2**28 at 2.451 and 2.455,
    #   and that host's ZeRO-2 offload step implied 2.1-2.8 (DeepSpeed's optimizer_step timer, 1.61-1.79 s for 2.87 G
    #   parameters, less the cast and the copy up: results/2026-12-01-s12-h200x1, call 3)
    adam_steps: int = 5
    # the blocking cast copies of ZeRO-3's step, on a rank's threads: DeepSpeed's sub_group_size (1e9) on a GPU
    # machine. One 1 x H200 host ran the fp32 host -> bf16 GPU copy at 1.51 G/s on 1e9 elements with 8 threads, 1.78
    # on 2.68e8 with 8 and 2.13 on 1e9 with 16 (results/2026-12-01-s13-h200x1, call 1)
    cast_copy_params: int = 2**22
    adam_threads: int | None = None                   # a rank's OpenMP threads; None: every core (one measurement)
    timeout_s: float = 300.0
    skip: tuple[str, ...] = ()                        # any of: collectives, matmul, copies, cpu_adam

    @staticmethod
    def for_machine(quick: bool = False, skip: Sequence[str] = (), world: int | None = None,
                    adam_threads: int | None = None) -> "ProbeSettings":
        """Defaults for this machine: NCCL over every visible GPU, else 2 gloo workers on CPU. ``adam_threads``: the
        OpenMP threads of one offloading rank (the cluster's ``threads_per_rank``)."""
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            sizes = (MiB, 16 * MiB, 256 * MiB) if quick else tuple(MiB * 4**i for i in range(6))  # 1 MiB .. 1 GiB
            return ProbeSettings(device="cuda", world=world or gpus, collective_sizes=sizes,
                                 collective_warmup=5, collective_iters=10 if quick else 20,
                                 matmul_tokens=8192, matmul_hidden=4096, matmul_ffn=11008,
                                 matmul_iters=5 if quick else 10, copy_bytes=(256 if quick else 1024) * MiB,
                                 adam_params=2**26 if quick else 2**28, adam_steps=3 if quick else 5,
                                 cast_copy_params=2**28 if quick else 10**9,
                                 adam_threads=adam_threads, timeout_s=600.0, skip=tuple(skip))
        sizes = (256 * 1024, MiB, 4 * MiB) if quick else (256 * 1024, MiB, 4 * MiB, 16 * MiB)
        return ProbeSettings(device="cpu", world=world or 2, collective_sizes=sizes,
                             collective_warmup=1, collective_iters=3 if quick else 5,
                             matmul_tokens=128 if quick else 256, matmul_hidden=256 if quick else 512,
                             matmul_ffn=688 if quick else 1376,
                             matmul_iters=3 if quick else 5, adam_params=2**20 if quick else 2**22,
                             adam_steps=3 if quick else 5, adam_threads=adam_threads, skip=tuple(skip))


# --- results --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatmulSample:
    name: str            # e.g. "qkv.fwd"
    m: int
    k: int
    n: int
    median_s: float
    tflops: float


@dataclass(frozen=True)
class CopySample:
    direction: str       # "h2d" | "d2h" | "cast_h2d" (fp32 pinned host -> 16-bit device, blocking: bytes are the fp32 side)
    nbytes: int
    median_s: float
    gbs: float


@dataclass(frozen=True)
class CpuAdamSample:
    params: int
    steps: int
    load_s: float         # first construction: JIT compile (or load from the extension cache)
    median_step_s: float
    gparams_per_s: float
    threads: int = 0      # OpenMP threads of the measurement (0: not recorded)
    grad_scale_gparams_per_s: float | None = None  # fp32 gradient *= scalar, in place, same threads
    cast_gparams_per_s: float | None = None        # fp32 -> pinned bf16 host copy, same threads
    # blocking copies cast on the host, same threads (a GPU machine): pinned fp32 host -> bf16 GPU, fp32 GPU -> pinned
    # bf16 host
    cast_copy_h2d_gparams_per_s: float | None = None
    cast_copy_d2h_gparams_per_s: float | None = None


@dataclass
class ProbeReport:
    device_name: str
    date: str
    settings: ProbeSettings
    collectives: list[CollectiveSample] = field(default_factory=list)
    latency_sample: CollectiveSample | None = None
    matmul: list[MatmulSample] = field(default_factory=list)
    copies: list[CopySample] = field(default_factory=list)
    cpu_adam: CpuAdamSample | None = None           # every core of this process
    cpu_adam_rank: CpuAdamSample | None = None      # one offloading rank's threads (settings.adam_threads)
    skipped: dict[str, str] = field(default_factory=dict)    # part -> reason
    versions: dict[str, str] = field(default_factory=dict)

    # --- summary numbers (the calibration fields) -----------------------------------------
    def busbw_gbs(self, op: str) -> float | None:
        """Best bus bandwidth of ``op`` over the measured sizes (the large sizes: the asymptote)."""
        vals = [s.busbw_gbs for s in self.collectives if s.op == op]
        return max(vals) if vals else None

    def latency_us(self) -> float | None:
        """Small all-reduce time less its bandwidth term at the asymptotic all-reduce bandwidth."""
        s, bw = self.latency_sample, self.busbw_gbs("all_reduce")
        if s is None or not bw:
            return None
        return max(0.0, s.median_s - alpha_beta_time("all_reduce", s.nbytes, s.ranks, bw, 0.0)) * 1e6

    def matmul_tflops(self) -> float | None:
        if not self.matmul:
            return None
        flops = sum(2.0 * s.m * s.k * s.n for s in self.matmul)
        return flops / sum(s.median_s for s in self.matmul) / 1e12

    def copy_gbs(self, direction: str) -> float | None:
        vals = [c.gbs for c in self.copies if c.direction == direction]
        return max(vals) if vals else None

    def cast_copy_gparams_per_s(self) -> float | None:
        """Parameters per second of the blocking fp32-host -> 16-bit-device copy (4 bytes per parameter read)."""
        gbs = self.copy_gbs("cast_h2d")
        return None if gbs is None else gbs / 4.0

    def calibration(self) -> dict[str, Any]:
        """The ``cluster.calibration`` mapping (fields of CalibrationConfig); None = not measured."""
        rank = self.cpu_adam_rank

        def r(x: float | None, digits: int = 4) -> float | None:      # significant digits
            return None if x is None else float(f"{float(x):.{digits}g}")
        return dict(
            measured_on=(f"{self.device_name} x{self.settings.world}" if self.collectives else self.device_name)
                        + f", {self.date}",
            matmul_tflops=r(self.matmul_tflops()),
            allreduce_busbw_gbs=r(self.busbw_gbs("all_reduce")),
            allgather_busbw_gbs=r(self.busbw_gbs("all_gather")),
            reducescatter_busbw_gbs=r(self.busbw_gbs("reduce_scatter")),
            alltoall_busbw_gbs=r(self.busbw_gbs("all_to_all")),
            collective_latency_us=r(self.latency_us()),
            h2d_gbs=r(self.copy_gbs("h2d")),
            d2h_gbs=r(self.copy_gbs("d2h")),
            # a rank's threads at a sub-group's size where measured (ZeRO-3's step runs it so), else this process's
            host_cast_copy_gparams_per_s=r(rank.cast_copy_h2d_gparams_per_s if rank and rank.cast_copy_h2d_gparams_per_s
                                           else self.cast_copy_gparams_per_s()),
            host_cast_copy_d2h_gparams_per_s=r(rank.cast_copy_d2h_gparams_per_s if rank else None),
            cpu_adam_gparams_per_s=r(self.cpu_adam.gparams_per_s if self.cpu_adam else None),
            cpu_adam_gparams_per_thread=r(self.cpu_adam_rank.gparams_per_s / self.cpu_adam_rank.threads
                                          if self.cpu_adam_rank and self.cpu_adam_rank.threads else None),
            host_grad_scale_gparams_per_s=r(rank.grad_scale_gparams_per_s if rank else None),
            host_cast_gparams_per_s=r(rank.cast_gparams_per_s if rank else None),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(device_name=self.device_name, date=self.date, versions=self.versions,
                    settings=asdict(self.settings), calibration=self.calibration(), skipped=self.skipped,
                    collectives=[s.to_dict() for s in self.collectives],
                    latency_sample=self.latency_sample.to_dict() if self.latency_sample else None,
                    matmul=[asdict(s) for s in self.matmul], copies=[asdict(c) for c in self.copies],
                    cpu_adam=asdict(self.cpu_adam) if self.cpu_adam else None,
                    cpu_adam_rank=asdict(self.cpu_adam_rank) if self.cpu_adam_rank else None)


# --- collectives: one process per GPU (NCCL) or gloo workers ---------------------------------

def _collective_worker(rank: int, world: int, port: int, settings: ProbeSettings, out_path: str, queue: Any) -> None:
    """Entry point of one spawned process: join the group, time every (op, size), rank 0 writes JSON."""
    import torch.distributed as dist

    from .collective_timing import time_collective

    import warnings

    logging.basicConfig(level=logging.WARNING)
    # torch >= 2.13 renames all_gather_into_tensor / reduce_scatter_tensor; older torch lacks the new names
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if settings.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
        dtype = torch.bfloat16
    else:
        torch.set_num_threads(1)
        device, backend, dtype = torch.device("cpu"), "gloo", torch.float32
    init_kw: dict[str, Any] = dict(backend=backend, rank=rank, world_size=world,
                                   timeout=_dt.timedelta(seconds=settings.timeout_s))
    if backend == "nccl":
        init_kw["device_id"] = device
    dist.init_process_group(**init_kw)
    try:
        samples = []
        lat = time_collective("all_reduce", settings.latency_bytes, device=device, dtype=dtype,
                              warmup=settings.collective_warmup + 2, iters=max(5, settings.collective_iters))
        for op in settings.collective_ops:
            for nbytes in settings.collective_sizes:
                if rank == 0:
                    queue.put(f"{op} {_fmt_bytes(nbytes)}")
                s = time_collective(op, nbytes, device=device, dtype=dtype,
                                    warmup=settings.collective_warmup, iters=settings.collective_iters)
                samples.append(s.to_dict())
                log.info("rank %d: %s %s: %.2f GB/s bus", rank, op, _fmt_bytes(nbytes), s.busbw_gbs)
        if rank == 0:
            Path(out_path).write_text(json.dumps(dict(latency=lat.to_dict(), samples=samples)))
            queue.put("done")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def probe_collectives(settings: ProbeSettings, progress: Progress = _noop) -> tuple[list[CollectiveSample],
                                                                                  CollectiveSample]:
    """Spawn ``settings.world`` processes and time the collectives; returns (samples, latency sample)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="meshpilot-probe-") as tmp:
        out = os.path.join(tmp, "collectives.json")
        procs = mp.start_processes(_collective_worker, args=(settings.world, free_port(), settings, out, queue),
                                   nprocs=settings.world, join=False, start_method="spawn")
        deadline = time.monotonic() + settings.timeout_s
        while not procs.join(timeout=0.2):
            while not queue.empty():
                progress(queue.get())
            if time.monotonic() > deadline:
                for p in procs.processes:
                    if p.is_alive():
                        p.terminate()
                raise TimeoutError(f"collective probe did not finish in {settings.timeout_s:.0f} s")
        data = json.loads(Path(out).read_text())
    return [CollectiveSample(**d) for d in data["samples"]], CollectiveSample(**data["latency"])


# --- matmul ----------------------------------------------------------------------------------

def matmul_shapes(tokens: int, hidden: int, ffn: int) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of one llama layer's linears in forward, input-gradient and weight-gradient form."""
    linears = [("qkv", hidden, 3 * hidden), ("attn_out", hidden, hidden),
               ("gate_up", hidden, 2 * ffn), ("down", ffn, hidden)]
    out = []
    for name, k, n in linears:
        out += [(f"{name}.fwd", tokens, k, n), (f"{name}.dgrad", tokens, n, k), (f"{name}.wgrad", k, tokens, n)]
    return out


def _time_device(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe_matmul(settings: ProbeSettings, progress: Progress = _noop) -> list[MatmulSample]:
    device = torch.device(settings.device)
    dtype = torch.bfloat16
    out = []
    for name, m, k, n in matmul_shapes(settings.matmul_tokens, settings.matmul_hidden, settings.matmul_ffn):
        progress(f"matmul {name} [{m}x{k}]x[{k}x{n}]")
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = _time_device(lambda: torch.matmul(a, b), device, warmup=2, iters=settings.matmul_iters)
        out.append(MatmulSample(name=name, m=m, k=k, n=n, median_s=t, tflops=2.0 * m * k * n / t / 1e12))
        del a, b
    return out


# --- host copies -----------------------------------------------------------------------------

def probe_copies(settings: ProbeSettings, progress: Progress = _noop) -> list[CopySample]:
    """Pinned host <-> device copy bandwidth of one ``copy_bytes`` buffer on GPU 0."""
    device = torch.device("cuda", 0)
    n = settings.copy_bytes
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    out = []
    for direction, fn in (("h2d", lambda: dev.copy_(host, non_blocking=True)),
                          ("d2h", lambda: host.copy_(dev, non_blocking=True))):
        progress(f"copy {direction} {_fmt_bytes(n)} pinned")
        t = _time_device(fn, device, warmup=2, iters=settings.copy_iters)
        out.append(CopySample(direction=direction, nbytes=n, median_s=t, gbs=n / t / 1e9))
    # ZeRO-3 with optimizer offload puts the updated parameters back so: a blocking copy of the pinned fp32 partition
    # into the 16-bit GPU partition, which torch casts on the host into pageable memory first (sim/step_time.py)
    params = n // 4
    fp32 = torch.empty(params, dtype=torch.float32, pin_memory=True)
    bf16 = torch.empty(params, dtype=torch.bfloat16, device=device)
    progress(f"copy fp32 host -> bf16 device {_fmt_bytes(4 * params)}, blocking (cast on the host)")
    t = _time_device(lambda: bf16.copy_(fp32), device, warmup=1, iters=settings.copy_iters)
    out.append(CopySample(direction="cast_h2d", nbytes=4 * params, median_s=t, gbs=4 * params / t / 1e9))
    return out


# --- CPU Adam ----------------------------------------------------------------------------------

def probe_cpu_adam(settings: ProbeSettings, progress: Progress = _noop, threads: int | None = None,
                   pinned: bool | None = None, cast_copies: bool = True) -> CpuAdamSample:
    """DeepSpeedCPUAdam step throughput on fp32 parameters with fp32 gradients (ZeRO-Offload's CPU step) with
    ``threads`` OpenMP threads (default: every core this process may use); and, on the same threads and parameters,
    the offloaded step's two host passes beside it (DeepSpeed 0.19 stage_1_and_2.py / stage3.py ``step``): the
    in-place scaling of the fp32 gradients (``unscale_and_clip_grads``, 8 bytes a parameter) and the cast of the fp32
    parameters into a pinned 16-bit tensor (6 bytes a parameter). ``pinned`` (default: where there is a GPU): the
    fp32 parameters and gradients in page-locked memory, as DeepSpeed's offload keeps its fp32 partition and its
    gradient with ``pin_memory`` (the Adam moments it creates are pageable). ``cast_copies`` (a GPU machine): ZeRO-3's
    two blocking cast copies on the same threads too (:func:`time_cast_copies`).

    Measured in a fresh process started with ``OMP_NUM_THREADS=threads``, as `meshpilot run` starts a rank
    (launch/actor.py sets it before torch loads), not after ``torch.set_num_threads`` in this one."""
    import multiprocessing as mp

    from meshpilot.orchestrator.config.node_limits import node_cpu_cores
    n = int(threads or node_cpu_cores())
    progress(f"CPU Adam: {settings.adam_params / 1e6:.0f}M parameters x {settings.adam_steps} steps, {n} threads "
             "(a fresh process; the first one builds or loads the DeepSpeed extension)"
             + (f", then ZeRO-3's cast copies of {settings.cast_copy_params:,} elements"
                if cast_copies and torch.cuda.is_available() else ""))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)                     # the child's environment at its start
    try:
        child = ctx.Process(target=_cpu_adam_child, args=(settings, n, pinned, cast_copies, queue), daemon=True)
        child.start()
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    try:
        out = queue.get(timeout=settings.timeout_s)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    if isinstance(out, str):
        raise RuntimeError(out)
    return out


def _cpu_adam_child(settings: ProbeSettings, threads: int, pinned: bool | None, cast_copies: bool, queue) -> None:
    """:func:`probe_cpu_adam`'s measurement, in the child it starts; puts a CpuAdamSample or the error's text."""
    try:
        queue.put(time_cpu_adam(settings, threads, pinned, cast_copies))
    except Exception as e:  # the extension needs a compiler toolchain: the parent reports it
        queue.put(f"{type(e).__name__}: {e}")


def time_cpu_adam(settings: ProbeSettings, threads: int, pinned: bool | None = None,
                  cast_copies: bool = True) -> CpuAdamSample:
    """:func:`probe_cpu_adam`'s measurement in this process, whose OpenMP threads the caller has set to ``threads``."""
    t0 = time.perf_counter()
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(16))], lr=1e-3)
    load_s = time.perf_counter() - t0
    pin = torch.cuda.is_available() if pinned is None else pinned
    adam_s, grad_scale_s, cast_s = _time_adam_and_passes(settings, pin)
    h2d, d2h = time_cast_copies(settings) if cast_copies and torch.cuda.is_available() else (None, None)
    g = settings.adam_params / 1e9
    return CpuAdamSample(params=settings.adam_params, steps=settings.adam_steps, load_s=load_s,
                         median_step_s=adam_s, gparams_per_s=g / adam_s, threads=threads,
                         grad_scale_gparams_per_s=g / grad_scale_s, cast_gparams_per_s=g / cast_s,
                         cast_copy_h2d_gparams_per_s=h2d, cast_copy_d2h_gparams_per_s=d2h)


def _time_adam_and_passes(settings: ProbeSettings, pin: bool) -> tuple[float, float, float]:
    """Seconds of one DeepSpeedCPUAdam step over ``adam_params`` fp32 parameters (page-locked where ``pin``), of the
    in-place gradient scaling and of the cast into a 16-bit host tensor, on this process's threads; each the median
    after one warm-up (the first touch of the pages, the optimizer's states)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    cpu = torch.device("cpu")

    def fp32() -> torch.Tensor:
        t = torch.randn(settings.adam_params)
        return t.pin_memory() if pin else t

    p = torch.nn.Parameter(fp32())
    p.grad = fp32()
    opt = DeepSpeedCPUAdam([p], lr=1e-3, weight_decay=0.0)
    adam_s = _time_device(opt.step, cpu, warmup=1, iters=settings.adam_steps)
    scale = torch.tensor(1.0)             # DeepSpeed multiplies by 1 / a 0-dim tensor (the clip coefficient)
    grad_scale_s = _time_device(lambda: p.grad.mul_(1.0 / scale), cpu, warmup=1, iters=settings.adam_steps)
    half = torch.empty(settings.adam_params, dtype=torch.bfloat16, pin_memory=torch.cuda.is_available())
    cast_s = _time_device(lambda: half.copy_(p.data), cpu, warmup=1, iters=settings.adam_steps)
    return adam_s, grad_scale_s, cast_s


def time_cast_copies(settings: ProbeSettings) -> tuple[float, float]:
    """G parameters/s of ZeRO-3's two blocking cast copies of one ``cast_copy_params`` sub-group on GPU 0, with this
    process's threads (module docstring): pinned fp32 host -> bf16 GPU and fp32 GPU -> pinned bf16 host. Each is
    torch's ``copy_`` without ``non_blocking``, so torch converts on the host through a fresh pageable temporary: the
    page faults of that temporary and the pageable transfer are part of every copy, as in training. Median of
    ``min(adam_steps, 3)`` after one warm-up."""
    n = settings.cast_copy_params
    dev = torch.device("cuda", 0)

    def rate(dst: torch.Tensor, src: torch.Tensor) -> float:   # CUDA events: the host's conversion lies between them
        return n / 1e9 / _time_device(lambda: dst.copy_(src), dev, warmup=1, iters=min(settings.adam_steps, 3))

    h2d = rate(torch.empty(n, dtype=torch.bfloat16, device=dev),
               torch.empty(n, dtype=torch.float32, pin_memory=True).fill_(1.0))
    d2h = rate(torch.empty(n, dtype=torch.bfloat16, pin_memory=True), torch.ones(n, dtype=torch.float32, device=dev))
    torch.cuda.empty_cache()
    return h2d, d2h


# --- the whole probe ---------------------------------------------------------------------------

PARTS = ("collectives", "matmul", "copies", "cpu_adam")


def device_name(settings: ProbeSettings) -> str:
    if settings.device == "cuda":
        return torch.cuda.get_device_name(0)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_probe(settings: ProbeSettings, progress: Progress = _noop) -> ProbeReport:
    """Measure every part not in ``settings.skip``; a part that cannot run here is recorded in ``skipped``."""
    from importlib import metadata

    try:
        ds_version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds_version = "not installed"
    report = ProbeReport(device_name=device_name(settings),
                         date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         settings=settings,
                         versions=dict(torch=torch.__version__, deepspeed=ds_version, cuda=str(torch.version.cuda)))
    for part in settings.skip:
        if part not in PARTS:
            raise ValueError(f"unknown probe part {part!r}; one of {PARTS}")
        report.skipped[part] = "skipped on request"
    on_gpu = settings.device == "cuda"
    if "collectives" not in report.skipped:
        if settings.world < 2:
            report.skipped["collectives"] = f"needs at least 2 ranks, this machine has {settings.world} GPU"
        else:
            report.collectives, report.latency_sample = probe_collectives(settings, progress)
            log.info("probe: collectives over %d %s ranks done", settings.world, "NCCL" if on_gpu else "gloo")
    if "matmul" not in report.skipped:
        report.matmul = probe_matmul(settings, progress)
        log.info("probe: matmul %.3f TFLOP/s", report.matmul_tflops())
    if "copies" not in report.skipped:
        if on_gpu:
            report.copies = probe_copies(settings, progress)
        else:
            report.skipped["copies"] = "no GPU: host<->device copies not measured"
    if "cpu_adam" not in report.skipped:
        from meshpilot.orchestrator.config.node_limits import node_cpu_cores
        # a rank's threads measured apart unless a rank gets every core (then one measurement serves both); the
        # cast copies belong to the rank's measurement
        apart = bool(settings.adam_threads) and settings.adam_threads != int(node_cpu_cores())
        try:
            report.cpu_adam = probe_cpu_adam(settings, progress, cast_copies=not apart)
            report.cpu_adam_rank = (probe_cpu_adam(settings, progress, settings.adam_threads) if apart
                                    else report.cpu_adam)
        except Exception as e:  # the extension needs a compiler toolchain: report, don't fail the probe
            report.skipped["cpu_adam"] = f"DeepSpeedCPUAdam unavailable: {type(e).__name__}: {e}"
            log.warning("probe: CPU Adam skipped: %s", e)
    if not on_gpu:
        report.skipped.setdefault("gpu", "no CUDA device: matmul measured on CPU, collectives over gloo")
    return report


def calibrated_profile(base: dict[str, Any], report: ProbeReport) -> dict[str, Any]:
    """The base cluster mapping with ``calibration`` filled from ``report``.

    A detected ``local`` base is renamed (``local-probed``) so that loading the profile does not
    run detection again and keeps the detected values that the probe was taken against.
    """
    prof = json.loads(json.dumps(base))          # deep copy of plain data
    if prof.get("name") == "local":
        prof["name"] = "local-probed"
    cal = {k: v for k, v in report.calibration().items() if v is not None}
    prof["calibration"] = cal
    return prof


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"
