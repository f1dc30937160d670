"""Shared parts of the GPU accuracy benchmarks (measure_deepspeed.py, measure_zo.py, accuracy_report.py).

- :class:`BenchConfig`: one named configuration of ``configs/accuracy.yaml``, described as a
  meshpilot job (model dims + train fields + plan fields), so the simulator predicts exactly
  the job that was measured (:meth:`BenchConfig.job`, :meth:`BenchConfig.plan`);
- :func:`hf_llama_config`: the Hugging Face ``LlamaConfig`` of a meshpilot model section;
- :class:`NvmlSampler`: a background thread reading NVML used memory of the config's GPUs
  every ~10 ms; the peak is taken over the whole run and over the training window
  (first step start to last step end), nothing subtracted;
- :func:`run_coordinated`: runs the ranks of one config as spawned processes and stops all of
  them as soon as one reports out-of-memory or an error (the others would hang in NCCL);
- :func:`schedule`: runs configs, each in its own subprocess group with a timeout, packing
  configs that need fewer GPUs side by side on disjoint GPU sets (``exclusive`` ones alone).

This file is a benchmark helper, not library code: it prints progress lines.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from meshpilot.comm.ports import free_port

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = HERE / "configs" / "accuracy.yaml"
GiB = 2**30


# --- the configuration list -----------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    name: str
    kind: str                        # "deepspeed" | "zo"
    raw: dict[str, Any]              # the job as a mapping (model dims, cluster, train, plan)
    overrides: tuple[str, ...]       # meshpilot dotlist overrides applied on top of raw
    warmup: int
    steps: int
    timeout_s: float
    exclusive: bool                  # run alone (CPU offload: CPU Adam uses every core)
    quick: bool                      # part of --quick
    expect: str = ""                 # free text, e.g. "oom" (documentation only, never used to score)

    def job(self):
        """The validated JobConfig (built once: OmegaConf merging is slow; do not mutate it)."""
        cached = self.__dict__.get("_job")
        if cached is None:
            from meshpilot.orchestrator.config.loader import job_from_dict
            cached = job_from_dict(self.raw, self.overrides)
            object.__setattr__(self, "_job", cached)
        return cached

    def plan(self):
        from meshpilot.orchestrator.plan.plan import resolve_plan
        return resolve_plan(self.job())

    @property
    def world(self) -> int:
        return self.plan().world_size

    def to_dict(self) -> dict[str, Any]:
        return dict(name=self.name, kind=self.kind, job=self.raw, overrides=list(self.overrides),
                    warmup=self.warmup, steps=self.steps)


def load_configs(path: str | Path = DEFAULT_CONFIGS, kind: str | None = None,
                 names: Sequence[str] | None = None) -> list[BenchConfig]:
    """Read the config list (only ``kind`` / ``names`` if given); each entry is validated as a meshpilot job."""
    data = yaml.safe_load(Path(path).read_text())
    models = data.get("models", {})
    defaults = data.get("defaults", {})
    meas = data.get("measure", {})
    out = []
    for entry in data["configs"]:
        k = entry.get("kind", "deepspeed")
        if (kind is not None and k != kind) or (names is not None and entry["name"] not in names):
            continue
        model = entry["model"]
        raw = json.loads(json.dumps(defaults))      # deep copy
        raw["model"] = dict(models[model], name=model) if model in models else model
        for section in ("train", "plan", "cluster"):
            if section in entry:
                base = raw.get(section) if isinstance(raw.get(section), dict) else None
                raw[section] = {**(base or {}), **entry[section]} if base is not None else entry[section]
        cfg = BenchConfig(name=entry["name"], kind=k, raw=raw, overrides=tuple(entry.get("overrides", ())),
                          warmup=int(entry.get("warmup", meas.get("warmup", 3))),
                          steps=int(entry.get("steps", meas.get("steps", 5))),
                          timeout_s=float(entry.get("timeout_s", meas.get("timeout_s", 180))),
                          exclusive=bool(entry.get("exclusive", False)), quick=bool(entry.get("quick", False)),
                          expect=str(entry.get("expect", "")))
        cfg.plan()                                   # validate now, before any GPU work
        out.append(cfg)
    names = [c.name for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate config names in {path}: {sorted(dup)}")
    return out


def select(configs: list[BenchConfig], only: str | None, quick: bool) -> list[BenchConfig]:
    if only:
        want = [n.strip() for n in only.split(",") if n.strip()]
        known = {c.name for c in configs}
        bad = [n for n in want if n not in known]
        if bad:
            raise SystemExit(f"unknown config(s) {bad}; known: {sorted(known)}")
        return [c for c in configs if c.name in want]
    if quick:
        return [c for c in configs if c.quick]
    return configs


def config_table(configs: Sequence[BenchConfig]) -> str:
    """A plain-text table of the configs and the exact meshpilot job of each."""
    from meshpilot.orchestrator.config.models import param_counts
    lines = [f"{'name':34s} {'kind':9s} {'params':>7s} {'seq':>5s} {'gb':>4s}  plan"]
    for c in configs:
        job, plan = c.job(), c.plan()
        p = param_counts(job.model).total
        lines.append(f"{c.name:34s} {c.kind:9s} {p / 1e9:6.2f}B {job.train.seq_len:5d} {job.train.global_batch:4d}  "
                     f"{plan.describe()}" + (f"   [expect {c.expect}]" if c.expect else ""))
    return "\n".join(lines)


def job_overrides(c: BenchConfig) -> list[str]:
    """The job as a flat dotlist: what `meshpilot simulate` takes to predict this config."""
    def flat(prefix: str, v: Any) -> list[str]:
        if isinstance(v, dict):
            return [x for k, vv in v.items() for x in flat(f"{prefix}.{k}" if prefix else str(k), vv)]
        return [f"{prefix}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}"]
    return flat("", c.raw) + list(c.overrides)


# --- Hugging Face model -----------------------------------------------------------------------

def hf_llama_config(model, seq_len: int):
    """``transformers.LlamaConfig`` for a meshpilot llama ModelConfig (SDPA attention, no KV cache)."""
    from transformers import LlamaConfig
    if model.arch != "llama":
        raise ValueError(f"the reference workload is a Llama model; got arch {model.arch}")
    kw = dict(vocab_size=model.vocab, hidden_size=model.hidden, intermediate_size=model.ffn,
              num_hidden_layers=model.layers, num_attention_heads=model.heads,
              num_key_value_heads=model.kv_heads or model.heads,
              max_position_embeddings=max(seq_len, model.max_positions), rms_norm_eps=model.norm_eps,
              tie_word_embeddings=bool(model.tie_embeddings), use_cache=False, attn_implementation="sdpa")
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_hf_llama(hf_config, device):
    """``LlamaForCausalLM`` with bf16 weights created directly on ``device`` (no fp32 host copy)."""
    import torch
    from transformers import LlamaForCausalLM
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(prev)


def enable_checkpointing(model) -> None:
    """Full activation checkpointing of every decoder layer (non-reentrant torch.utils.checkpoint)."""
    fn = getattr(model, "gradient_checkpointing_enable")
    fn(gradient_checkpointing_kwargs={"use_reentrant": False})


# --- NVML ----------------------------------------------------------------------------------

class NvmlSampler:
    """Peak NVML 'used' memory of the given GPUs, sampled every ``interval_s`` in a thread.

    ``window_start()`` / ``window_end()`` bracket the training steps; ``peak_window`` is the
    peak inside that bracket, ``peak_all`` over the sampler's whole life. Indices are NVML
    indices (the runner sets CUDA_DEVICE_ORDER=PCI_BUS_ID so they equal CUDA's).
    """

    def __init__(self, indices: Sequence[int], interval_s: float = 0.01):
        self.indices = list(indices)
        self.interval_s = interval_s
        self.peak_all = [0] * len(self.indices)
        self.peak_window = [0] * len(self.indices)
        self.samples = 0
        self._in_window = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = False
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
            self.available = bool(self._handles)
        except Exception:
            self._handles = []

    def __enter__(self) -> "NvmlSampler":
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.available:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def window_start(self) -> None:
        self._in_window = True

    def window_end(self) -> None:
        self._sample()
        self._in_window = False

    def _sample(self) -> None:
        for j, h in enumerate(self._handles):
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(h).used)
            self.peak_all[j] = max(self.peak_all[j], used)
            if self._in_window:
                self.peak_window[j] = max(self.peak_window[j], used)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def result(self) -> dict[str, Any]:
        if not self.available:
            return dict(nvml_available=False)
        return dict(nvml_available=True, nvml_gpus=self.indices, nvml_samples=self.samples,
                    nvml_peak_gib=[round(b / GiB, 4) for b in self.peak_window],
                    nvml_peak_all_gib=[round(b / GiB, 4) for b in self.peak_all])


# --- one config: its ranks as spawned processes ---------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "cuda error: out of memory" in text or "cublas_status_alloc_failed" in text


def init_rank(rank: int, world: int, device_kind: str):
    """This rank's device and its process group (MASTER_ADDR/PORT from the environment):
    NCCL bound to cuda:rank, or gloo on one CPU thread. Returns the torch device."""
    import torch
    import torch.distributed as dist
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        return device
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return torch.device("cpu")


def run_coordinated(worker: Callable[..., None], world: int, args: tuple, result_dir: Path, *,
                    timeout_s: float, gpus: Sequence[int], grace_s: float = 8.0) -> dict[str, Any]:
    """Spawn ``worker(rank, world, port, *args, result_dir, started, finished)`` on ``world`` ranks.

    Each rank writes ``result_dir/rank{r}.json`` with a ``status`` (ok | oom | error). As soon as
    one rank reports a failure the others get ``grace_s`` to report theirs, then all are stopped.
    Returns the per-rank results, the NVML peaks and the overall status
    (ok | oom | error | timeout | crashed).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    started, finished = ctx.Event(), ctx.Event()
    result_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    status, fail_at, crash = None, None, None
    with NvmlSampler(gpus) as nv:
        pc = mp.start_processes(worker, args=(world, free_port(), *args, str(result_dir), started, finished),
                                nprocs=world, join=False, start_method="spawn")
        window_open = False
        while True:
            try:
                done = pc.join(timeout=0.05)
            except Exception as e:                      # a rank exited non-zero
                status = status or "crashed"
                crash = f"{type(e).__name__}: {str(e)[-2000:]}"
                done = True
            if started.is_set() and not window_open:
                nv.window_start()
                window_open = True
            if finished.is_set() and window_open:
                nv.window_end()
                window_open = False
            if done:
                break
            results = _read_ranks(result_dir, world)
            if fail_at is None and any(r.get("status") not in (None, "ok") for r in results):
                fail_at = time.monotonic()
            if fail_at is not None and time.monotonic() - fail_at > grace_s:
                _terminate(pc)
                break
            if time.monotonic() - t0 > timeout_s:
                status = "timeout"
                _terminate(pc)
                break
        if window_open:
            nv.window_end()
        nvml = nv.result()
    results = _read_ranks(result_dir, world)
    statuses = [r.get("status") for r in results]
    if any(s == "oom" for s in statuses):
        status = "oom"
    elif any(s == "error" for s in statuses):
        status = "error"
    elif status is None:
        status = "ok" if all(s == "ok" for s in statuses) else "crashed"
    out = dict(status=status, oom=status == "oom", wall_s=round(time.monotonic() - t0, 2), ranks=results, **nvml)
    if status == "crashed" and crash:
        out["error"] = crash
    return out


def _read_ranks(result_dir: Path, world: int) -> list[dict[str, Any]]:
    out = []
    for r in range(world):
        f = result_dir / f"rank{r}.json"
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            out.append({})
    return out


def _terminate(pc) -> None:
    for p in pc.processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in pc.processes:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()


def write_rank_result(result_dir: str, rank: int, data: dict[str, Any]) -> None:
    p = Path(result_dir) / f"rank{rank}.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(p)


def memory_stats(device) -> dict[str, Any]:
    """torch's peak allocator numbers of this rank (and the card name as torch reports it)."""
    import torch
    if getattr(device, "type", "cpu") != "cuda":
        return dict(max_reserved_gib=None, max_allocated_gib=None, device_name="cpu")
    return dict(max_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GiB, 4),
                max_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GiB, 4),
                device_name=torch.cuda.get_device_name(device))


# --- the top level: subprocess per config, GPU packing ------------------------------------------------

def metadata() -> dict[str, Any]:
    import importlib
    import torch
    vers = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=str(torch.version.cuda))
    for mod in ("deepspeed", "transformers"):
        try:
            vers[mod] = importlib.import_module(mod).__version__
        except Exception as e:
            vers[mod] = f"unavailable ({type(e).__name__})"
    try:
        vers["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:
        vers["nccl"] = None
    # The parent must not create a CUDA context (NVML would count it on GPU 0 for every config):
    # the card name comes from NVML here; each rank records torch.cuda.get_device_name too.
    card = "cpu"
    if torch.cuda.is_available():
        try:
            import pynvml
            pynvml.nvmlInit()
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            card = name.decode() if isinstance(name, bytes) else str(name)
            pynvml.nvmlShutdown()
        except Exception:
            card = "cuda (NVML unavailable)"
    from meshpilot.orchestrator.config.node_limits import node_cpu_cores, node_memory
    mem = node_memory()
    # what the node lets a job use (a container's cgroup limits), beside what the machine has
    limits = dict(cpu_cores=node_cpu_cores(), memory_gib=None if mem is None else round(mem.total_bytes / 2**30, 2),
                  memory_source=None if mem is None else mem.source)
    return dict(card=card, gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                host_cpus=os.cpu_count(), node_limits=limits, versions=vers)


def run_subprocess(cmd: list[str], env: dict[str, str], timeout_s: float, log_path: Path) -> int:
    """Run ``cmd`` in its own session (process group); kill the whole group on timeout. Returns rc (124: timeout)."""
    with open(log_path, "w") as logf:
        p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_process_group(p)
            return 124
        finally:
            if p.poll() is None:
                kill_process_group(p)


def kill_process_group(p: subprocess.Popen, wait_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, to ``p``'s process group (started with ``start_new_session``)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class _Slot:
    cfg: BenchConfig
    gpus: list[int]
    thread: threading.Thread
    result: dict[str, Any] = field(default_factory=dict)


def schedule(configs: Sequence[BenchConfig], n_gpus: int, run_one: Callable[[BenchConfig, list[int]], dict[str, Any]],
             on_result: Callable[[BenchConfig, dict[str, Any]], None], pack: bool = True) -> None:
    """Run every config once, in order, each on ``cfg.world`` GPUs.

    With ``pack`` a config starts as soon as enough GPUs are free (in list order: a config waits
    for the ones before it to start); ``exclusive`` configs run with nothing beside them.
    """
    free = list(range(n_gpus))
    running: list[_Slot] = []
    lock = threading.Lock()

    def target(slot: _Slot) -> None:
        try:
            slot.result = run_one(slot.cfg, slot.gpus)
        except Exception as e:  # the harness itself failed for this config: record it, go on
            slot.result = dict(status="error", oom=False, error=f"harness: {type(e).__name__}: {e}")

    def reap(block: bool) -> None:
        while True:
            for s in list(running):
                if not s.thread.is_alive():
                    running.remove(s)
                    with lock:
                        free.extend(s.gpus)
                        free.sort()
                    on_result(s.cfg, s.result)
            if not block or not running:
                return
            time.sleep(0.2)

    for cfg in configs:
        need = cfg.world
        if need > n_gpus:
            on_result(cfg, dict(status="skipped", oom=False, error=f"needs {need} GPUs, this machine has {n_gpus}"))
            continue
        while True:
            reap(block=False)
            alone = cfg.exclusive or not pack
            blocked_by_exclusive = any(s.cfg.exclusive for s in running)
            if len(free) >= need and not blocked_by_exclusive and (not alone or not running):
                break
            time.sleep(0.2)
        with lock:
            gpus, rest = free[:need], free[need:]
            free[:] = rest
        slot = _Slot(cfg=cfg, gpus=gpus, thread=threading.Thread(target=lambda: None))
        slot.thread = threading.Thread(target=target, args=(slot,), daemon=True)
        running.append(slot)
        slot.thread.start()
    reap(block=True)


def default_out() -> Path:
    return Path(os.environ.get("OUT") or "benchmarks/results")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def precompile_ops(env: dict[str, str], timeout_s: float, log_dir: Path, ops: Sequence[str]) -> dict[str, Any]:
    """Build DeepSpeed's JIT ops once, in parallel subprocesses, before any config runs; returns seconds per op."""
    code = ("import time,sys; t=time.time(); from deepspeed.ops.op_builder import {b}; {b}().load(); "
            "print('BUILT', time.time()-t)")
    builders = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder"}
    procs = {}
    for op in ops:
        logf = open(log_dir / f"build_{op}.log", "w")
        procs[op] = (subprocess.Popen([sys.executable, "-c", code.format(b=builders[op])], env=env, stdout=logf,
                                      stderr=subprocess.STDOUT, start_new_session=True), logf, time.monotonic())
    out = {}
    for op, (p, logf, t0) in procs.items():
        try:
            rc = p.wait(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            kill_process_group(p)
            rc = 124
        logf.close()
        out[op] = dict(rc=rc, seconds=round(time.monotonic() - t0, 1))
    return out


def print_results_table(results: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'name':34s} {'status':8s} {'NVML peak GiB':>13s} {'reserved':>9s} {'allocated':>9s} {'step s':>8s}"]
    for r in results:
        nv = max(r.get("nvml_peak_gib") or [0]) or None
        rs = max((x.get("max_reserved_gib") or 0 for x in r.get("ranks", [])), default=0) or None
        al = max((x.get("max_allocated_gib") or 0 for x in r.get("ranks", [])), default=0) or None
        st = r.get("step_time_s")
        f = lambda v, nd=2: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
        lines.append(f"{r['name']:34s} {r.get('status', '?'):8s} {f(nv):>13s} {f(rs):>9s} {f(al):>9s} {f(st, 3):>8s}")
    return "\n".join(lines)


# --- the common top level of measure_deepspeed.py and measure_zo.py ----------------------------------

def run_config(cfg: BenchConfig, gpus: list[int], device_kind: str, rank_main: Callable[..., None]) -> dict[str, Any]:
    """One config in this (sub)process: its ranks, NVML sampling, and the summary record."""
    import tempfile
    job, plan = cfg.job(), cfg.plan()
    with tempfile.TemporaryDirectory(prefix=f"bench-{cfg.name}-") as tmp:
        out = run_coordinated(rank_main, plan.world_size, (cfg, device_kind), Path(tmp),
                              timeout_s=cfg.timeout_s, gpus=gpus if device_kind == "cuda" else [])
    return summarize(cfg, job, plan, gpus, out)


def summarize(cfg: BenchConfig, job, plan, gpus: list[int], out: dict[str, Any]) -> dict[str, Any]:
    """The record of one config: memory (NVML per GPU, torch per rank), median step time, status."""
    import statistics
    r0 = out["ranks"][0] if out["ranks"] else {}
    st = r0.get("step_times_s") or []
    measured = st[cfg.warmup:]
    step = statistics.median(measured) if measured else None
    tokens = job.train.global_batch * job.train.seq_len
    errors = sorted({r.get("error", "") for r in out["ranks"] if r.get("error")})
    return dict(name=cfg.name, kind=cfg.kind, job=cfg.raw, overrides=list(cfg.overrides),
                simulate_overrides=job_overrides(cfg), plan=plan.describe(), world=plan.world_size, gpus=gpus,
                status=out["status"], oom=out["oom"], wall_s=out["wall_s"],
                step_time_s=None if step is None else round(step, 5), step_times_s=st, warmup=cfg.warmup,
                tokens_per_s=None if not step else round(tokens / step, 1),
                nvml_peak_gib=out.get("nvml_peak_gib"), nvml_peak_all_gib=out.get("nvml_peak_all_gib"),
                nvml_samples=out.get("nvml_samples"),
                max_reserved_gib=[r.get("max_reserved_gib") for r in out["ranks"]],
                max_allocated_gib=[r.get("max_allocated_gib") for r in out["ranks"]],
                after_init=[r.get("after_init") for r in out["ranks"]],
                error="; ".join(errors)[:2000] or out.get("error"), ranks=out["ranks"])


def child_env(gpus: list[int] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"                    # NVML index == CUDA index
    arch = env.get("TORCH_CUDA_ARCH_LIST", "")
    if not arch or "a" in arch.replace("+PTX", ""):
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"                    # DeepSpeed's op builder cannot parse "9.0a"
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


def bench_parser(description: str, out_name: str):
    import argparse
    p = argparse.ArgumentParser(description=description.split("\n\n")[0])
    p.add_argument("--configs", default=str(DEFAULT_CONFIGS), help="config list YAML")
    p.add_argument("--out", default=None, help=f"output folder (default $OUT or benchmarks/results); writes {out_name}")
    p.add_argument("--only", default=None, help="comma-separated config names")
    p.add_argument("--quick", action="store_true", help="only the configs marked quick, at most 2 warm-up + 3 steps")
    p.add_argument("--dry-run", action="store_true", help="print the config table and the exact jobs; no GPU")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run one tiny config on CPU over gloo (with DS_ACCELERATOR=cpu) through the same code path")
    p.add_argument("--no-pack", action="store_true", help="run configs one at a time (no side-by-side packing)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every config's timeout")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only part K of N of the selected configs (contiguous, in list order), e.g. 1/2 then 2/2 "
                        "to stay under a per-command time limit; --append merges into an existing JSON")
    p.add_argument("--append", action="store_true", help="keep the results already in the output JSON")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)      # internal: run one config
    p.add_argument("--gpus", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def _load_selected(args, kind: str) -> list[BenchConfig]:
    import dataclasses
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    configs = select(load_configs(args.configs, kind=kind, names=names), args.only, args.quick)
    if args.quick:
        configs = [dataclasses.replace(c, warmup=min(c.warmup, 2), steps=min(c.steps, 3)) for c in configs]
    if args.timeout_scale != 1.0:
        configs = [dataclasses.replace(c, timeout_s=c.timeout_s * args.timeout_scale) for c in configs]
    if args.shard:
        try:
            k, n = (int(x) for x in args.shard.split("/"))
            assert 1 <= k <= n
        except (ValueError, AssertionError):
            raise SystemExit(f"--shard must be K/N with 1 <= K <= N, got {args.shard!r}") from None
        per = -(-len(configs) // n)
        configs = configs[(k - 1) * per: k * per]
    return configs


def bench_main(argv: list[str] | None, *, description: str, kind: str, rank_main: Callable[..., None],
               out_name: str, script: Path, smoke: Callable[[], BenchConfig],
               dry_extra: Callable[[BenchConfig], str] | None = None,
               ops: Callable[[list[BenchConfig]], list[str]] | None = None) -> int:
    args = bench_parser(description, out_name).parse_args(argv)
    if args.one:                                          # internal: one config in this subprocess
        if args.cpu_smoke:
            cfg = smoke()
        else:
            cfg = load_configs(args.configs, kind=kind, names=[args.one])[0]
            if args.quick:
                import dataclasses
                cfg = dataclasses.replace(cfg, warmup=min(cfg.warmup, 2), steps=min(cfg.steps, 3))
            if args.timeout_scale != 1.0:
                import dataclasses
                cfg = dataclasses.replace(cfg, timeout_s=cfg.timeout_s * args.timeout_scale)
        gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
        res = run_config(cfg, gpus, "cpu" if args.cpu_smoke else "cuda", rank_main)
        write_json(Path(args.result), res)
        return 0

    configs = [smoke()] if args.cpu_smoke else _load_selected(args, kind)
    print(config_table(configs), flush=True)
    if args.dry_run:
        for c in configs:
            print(f"\n# {c.name} ({c.world} GPUs, warm-up {c.warmup}, measured {c.steps}, timeout {c.timeout_s:.0f} s)")
            print("meshpilot simulate job.yaml " + " ".join(job_overrides(c)))
            if dry_extra:
                print(dry_extra(c))
        return 0

    import tempfile
    import torch
    out_dir = Path(args.out) if args.out else default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / (out_name if not args.cpu_smoke else out_name.replace(".json", "_cpu_smoke.json"))
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-logs-"))
    n_gpus = torch.cuda.device_count() if (torch.cuda.is_available() and not args.cpu_smoke) else 0
    if not n_gpus and not args.cpu_smoke:
        print("no CUDA device: use --dry-run or --cpu-smoke here", file=sys.stderr)
        return 1
    data: dict[str, Any] = dict(benchmark=script.stem, **metadata(), configs_file=str(args.configs),
                                quick=args.quick, results=[])
    if args.append and out_path.is_file():
        old = json.loads(out_path.read_text())
        rerun = {c.name for c in configs}
        data["results"] = [r for r in old.get("results", []) if r.get("name") not in rerun]
        data["earlier_runs"] = old.get("earlier_runs", []) + [{k: v for k, v in old.items()
                                                                if k not in ("results", "earlier_runs")}]
    t_start = time.monotonic()
    if n_gpus and ops is not None:
        need = ops(configs)
        if need:
            print(f"building DeepSpeed ops {need} ...", flush=True)
            data["op_build"] = precompile_ops(child_env(), 400, log_dir, need)
            print(f"  {data['op_build']}", flush=True)

    def run_one(cfg: BenchConfig, gpus: list[int]) -> dict[str, Any]:
        res_path = log_dir / f"{cfg.name}.json"
        cmd = [sys.executable, str(script), "--one", cfg.name, "--configs", str(args.configs),
               "--gpus", ",".join(map(str, gpus)), "--result", str(res_path)]
        if args.cpu_smoke:
            cmd.append("--cpu-smoke")
        if args.quick:
            cmd.append("--quick")
        if args.timeout_scale != 1.0:
            cmd += ["--timeout-scale", str(args.timeout_scale)]
        rc = run_subprocess(cmd, child_env(gpus if n_gpus else None), cfg.timeout_s + 90, log_dir / f"{cfg.name}.log")
        if res_path.is_file():
            return json.loads(res_path.read_text())
        tail = (log_dir / f"{cfg.name}.log").read_text()[-1500:]
        return dict(name=cfg.name, status="timeout" if rc == 124 else "crashed", oom=False, gpus=gpus,
                    error=f"rc={rc}: {tail}")

    def on_result(cfg: BenchConfig, res: dict[str, Any]) -> None:
        res.setdefault("name", cfg.name)
        res.setdefault("kind", cfg.kind)
        res.setdefault("job", cfg.raw)
        res.setdefault("overrides", list(cfg.overrides))
        res.setdefault("simulate_overrides", job_overrides(cfg))
        data["results"].append(res)
        names = [r.get("device_name") for r in res.get("ranks", []) if r.get("device_name")]
        if names and "card_torch" not in data:
            data["card_torch"] = names[0]                 # torch.cuda.get_device_name, from a rank
        data["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_json(out_path, data)
        nv = res.get("nvml_peak_gib") or []
        print(f"[{data['elapsed_s']:7.1f}s] {cfg.name:34s} {res.get('status'):8s} gpus={res.get('gpus')} "
              f"nvml={max(nv) if nv else '-'} GiB step={res.get('step_time_s')} s"
              + (f"  ({str(res.get('error'))[:200]})" if res.get("status") not in ("ok", "oom") else ""), flush=True)

    schedule(configs, max(n_gpus, 2), run_one, on_result, pack=not args.no_pack and not args.cpu_smoke)
    print("\n" + print_results_table(data["results"]))
    print(f"\nwrote {out_path} ({data.get('elapsed_s')} s); logs in {log_dir}")
    return 0
